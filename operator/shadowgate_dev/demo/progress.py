"""The live table: one row per analysis as the operator records it, and a status line on a terminal.

Each row is a `deployment_metrics` row (what the analysis measured and decided) next to what the
model servers themselves saw: the share of requests that reached the candidate since the previous row,
counted by the candidate's own server, which is how a client of the router would check the split.
"""

from __future__ import annotations

import shutil
import textwrap
import time
from dataclasses import dataclass
from typing import Any, TextIO

CLEAR_LINE = "\r\x1b[2K"
COLUMNS = (
    ("time", 5),
    ("step", 4),
    ("weight", 6),
    ("to cand.", 8),
    ("scored", 9),
    ("{metric} {sides}", 17),
    ("change", 7),
    ("p-value", 7),
    ("score", 5),
)


@dataclass
class Counters:
    """Totals read from the router's /metrics and the model servers' /stats."""

    responses: float = 0.0
    outcomes: float = 0.0
    production: int = 0
    candidate: int = 0


def _elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class Progress:
    def __init__(
        self,
        out: TextIO,
        *,
        started: float,
        steps: int,
        min_samples: int,
        names: tuple[str, str],
        mode: str,
        metric: str,
    ):
        self.out = out
        self.live = out.isatty()
        self.started = started
        self.steps = steps
        self.min_samples = min_samples
        self.names = names
        self.mode = mode
        self.metric = metric
        self.widths = [width for _, width in COLUMNS]
        self.previous = Counters()
        self.rows = 0
        self._status_shown = False

    def _write(self, text: str) -> None:
        if self._status_shown:
            self.out.write(CLEAR_LINE)
            self._status_shown = False
        self.out.write(text + "\n")
        self.out.flush()

    def header(self) -> None:
        production, candidate = (name.rsplit("-", 1)[-1] for name in self.names)
        titles = [title.format(metric=self.metric, sides=f"{production} / {candidate}") for title, _ in COLUMNS]
        self.widths = [max(width, len(title)) for title, (_, width) in zip(titles, COLUMNS, strict=True)]
        self._write("  ".join(f"{t:>{w}}" for t, w in zip(titles, self.widths, strict=True)) + "  decision")

    def analysis(self, row: dict[str, Any], counters: Counters) -> None:
        """One row for one analysis; transitions get their reason in words below."""
        if self.rows == 0:
            self.header()
        self.rows += 1
        # The share of requests the candidate's own server received since the previous row (in shadow
        # mode production answers every request; in canary mode each request goes to one side).
        sent = counters.production - self.previous.production
        if self.mode != "shadow":
            sent += counters.candidate - self.previous.candidate
        seen = (counters.candidate - self.previous.candidate) / sent if sent > 0 else None
        self.previous = counters
        improvement = row["improvement"]
        # The always-valid p-value of the direction the estimate points in.
        p_value = row["p_value"] if improvement is None or improvement >= 0 else row["p_value_worse"]
        cells = [
            _elapsed(row["time"].timestamp() - self.started),
            f"{row['step'] + 1}/{self.steps}",
            f"{row['weight']}%",
            _number(seen, ".1%"),
            f"{row['samples']}/{self.min_samples}",
            f"{_number(row['production_value'], '.3f')} / {_number(row['candidate_value'], '.3f')}",
            _number(improvement, "+.1%"),
            _number(p_value, ".2g"),
            _number(row["overall_score"], "+.2f"),
        ]
        decision = row["decision"]
        self._write("  ".join(f"{c:>{w}}" for c, w in zip(cells, self.widths, strict=True)) + f"  {decision}")
        if decision != "Wait":
            width = max(60, min(110, shutil.get_terminal_size((100, 20)).columns) - 8)
            self._write(textwrap.fill(row["reason"], width=width, initial_indent=" " * 7, subsequent_indent=" " * 7))

    def status(self, status: dict[str, Any], counters: Counters) -> None:
        """The transient bottom line (terminals only): where the rollout is and how much traffic flowed."""
        if not self.live:
            return
        step = (status.get("currentStep") or 0) + 1
        line = (
            f"  {_elapsed(time.time() - self.started)}  {status.get('phase', 'Pending')}, step {step} of "
            f"{self.steps} at {status.get('currentWeight', 0)}%  |  requests {int(counters.responses):,}  "
            f"outcomes {int(counters.outcomes):,}  |  scored in step {status.get('samples') or 0}"
        )
        self.out.write(CLEAR_LINE + line[: shutil.get_terminal_size((100, 20)).columns - 1])
        self.out.flush()
        self._status_shown = True

    def say(self, message: str) -> None:
        self._write(message)
