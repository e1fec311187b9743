"""The candidate's circuit breaker (issue 12): a candidate whose calls keep failing is left alone for a while.

A dead, hung or hostile candidate costs the router something on every call: a connect attempt, a mirror
slot held until the timeout, or an answer read up to a limit and refused (a candidate writing a 128 MB
header at every call: bench/hostile). After
`BreakerSettings.failures` failed calls in a row, or a failure ratio of `ratio` over at least `min_calls`
calls of the last `window` seconds, the breaker opens: for `cool_off` seconds no call is made, then up to
`probes` calls go through (half-open). All of them answering closes it; any of them failing opens it again
for twice as long (up to `max_cool_off`).

Only calls that got no usable HTTP answer count as failures (proxy.BREAKER_FAILURES: connect, timeout,
closed, bad_response): those are what cost the router. A 5xx or an answer without a prediction is cheap,
and is the analysis' business, not the breaker's.

What the breaker changes in the data is on the safe side: every call it skips is recorded as a failure of
the candidate (`CIRCUIT_OPEN`), so the error rate the operator gates on still sees every request the
candidate was given; a call it skips could at best have succeeded, so the candidate can only look worse
for it, never better. proxy.py records the rows; router/README.md ("Candidate circuit breaker") says what
the analysis makes of them.

Pure: the clock is injected, nothing here sleeps or does I/O (and it imports nothing of the router: the CLI
takes its defaults).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

CIRCUIT_OPEN = "circuit_open"
"""Recorded as the candidate's error (and exported as requests_total's status) for a call the breaker skipped."""

_BUCKETS = 10
"""The failure ratio's window is kept as this many buckets of window / _BUCKETS seconds each."""


class State(enum.IntEnum):
    """Exported as shadowgate_router_candidate_breaker_state."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failures: int = 10
    """Failed calls in a row that open the breaker; 0 turns the breaker off."""
    ratio: float = 0.5
    """Share of failed calls over the window that opens it (with at least `min_calls` calls in the window)."""
    min_calls: int = 20
    window: float = 10.0
    """Seconds over which the failure ratio is taken."""
    cool_off: float = 5.0
    """Seconds without calls once opened; doubled each time a probe fails, up to `max_cool_off`."""
    max_cool_off: float = 60.0
    probes: int = 3
    """Calls let through after a cool-off (half-open); all of them must answer for the breaker to close."""

    @property
    def enabled(self) -> bool:
        return self.failures > 0


class Breaker:
    """One candidate's breaker. `admit()` before a call: None means skip it (record it as CIRCUIT_OPEN);
    otherwise pass the ticket it returns to `record()` when the call has ended, or to `release()` if it was
    cut short without an outcome (the router stopping). Outcomes of calls admitted before the last change of
    state are ignored: they describe the candidate as it was before, and must not be taken for a probe's."""

    __slots__ = (
        "_buckets",
        "_clock",
        "_epoch",
        "_in_flight",
        "_on_change",
        "_opened_at",
        "_passed",
        "_row",
        "cool_off",
        "reason",
        "settings",
        "state",
    )

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Breaker], None] | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self.cool_off = settings.cool_off
        """The current cool-off: settings.cool_off, doubled after each failed probe."""
        self.reason = ""
        """Why the breaker last opened (for the log)."""
        self._epoch = 0
        """Bumped at every change of state: a ticket of another epoch is stale."""
        self._row = 0
        """Failures in a row (closed)."""
        self._buckets: list[list[int]] = [[-1, 0, 0] for _ in range(_BUCKETS)]
        """[bucket number, calls, failures], bucket number = int(now / (window / _BUCKETS)), ring-indexed."""
        self._opened_at = 0.0
        self._in_flight = 0
        """Probes admitted and not yet ended (half-open)."""
        self._passed = 0
        """Probes that answered (half-open)."""

    # the hot path: closed costs one comparison to admit and a few to record
    def admit(self) -> int | None:
        if self.state is State.CLOSED:
            return self._epoch
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self.cool_off:
                return None
            self._change(State.HALF_OPEN)
            self._in_flight = self._passed = 0
        if self._in_flight + self._passed >= self.settings.probes:
            return None
        self._in_flight += 1
        return self._epoch

    def record(self, ticket: int, failed: bool) -> None:
        if ticket != self._epoch:
            return
        if self.state is State.CLOSED:
            self._count(failed)
        elif self.state is State.HALF_OPEN:
            self._in_flight -= 1
            if failed:
                self.cool_off = min(self.cool_off * 2, self.settings.max_cool_off)
                self._open("a call after the cool-off failed too")
            else:
                self._passed += 1
                if self._passed >= self.settings.probes:
                    self.cool_off = self.settings.cool_off
                    self._row = 0
                    for bucket in self._buckets:
                        bucket[0] = -1
                    self._change(State.CLOSED)

    def release(self, ticket: int) -> None:
        """A call admitted with `ticket` ended without an outcome: its probe slot is free again."""
        if ticket == self._epoch and self.state is State.HALF_OPEN:
            self._in_flight -= 1

    # own
    def _count(self, failed: bool) -> None:
        settings = self.settings
        number = int(self._clock() * _BUCKETS / settings.window)
        bucket = self._buckets[number % _BUCKETS]
        if bucket[0] != number:
            bucket[0], bucket[1], bucket[2] = number, 0, 0
        bucket[1] += 1
        if not failed:
            self._row = 0
            return
        bucket[2] += 1
        self._row += 1
        if self._row >= settings.failures:
            self._open(f"{self._row} calls in a row failed")
            return
        calls = failures = 0
        for first, count, failed_count in self._buckets:
            if first > number - _BUCKETS:
                calls += count
                failures += failed_count
        if calls >= settings.min_calls and failures >= settings.ratio * calls:
            self._open(f"{failures} of {calls} calls in the last {settings.window:g}s failed")

    def _open(self, reason: str) -> None:
        self.reason = reason
        self._opened_at = self._clock()
        self._change(State.OPEN)

    def _change(self, state: State) -> None:
        self.state = state
        self._epoch += 1
        if self._on_change is not None:
            self._on_change(self)
