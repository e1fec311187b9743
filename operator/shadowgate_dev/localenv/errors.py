"""The one error the local environment raises: which component failed, why, and its log tail."""

from __future__ import annotations

from pathlib import Path


class ComponentError(RuntimeError):
    """A component of the local environment could not be built, started or reached."""

    def __init__(self, component: str, reason: str, log_path: Path | None = None, tail_lines: int = 25):
        self.component = component
        self.reason = reason
        self.log_path = log_path
        message = f"{component}: {reason}"
        tail = log_tail(log_path, tail_lines) if log_path else ""
        if tail:
            message += f"\n--- last lines of {log_path} ---\n{tail}"
        super().__init__(message)


def log_tail(path: Path | None, lines: int = 25) -> str:
    """The last `lines` lines of a log file, or "" when there is none."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
