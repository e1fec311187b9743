"""The candidate's circuit breaker as a state machine: a fake clock, no sleeps, no sockets."""

from __future__ import annotations

import pytest

from shadowgate_router.breaker import Breaker, BreakerSettings, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, **changes: float) -> Breaker:
    settings = {"failures": 5, "ratio": 0.5, "min_calls": 10, "window": 10.0, "cool_off": 5.0, "probes": 2}
    settings.update(changes)
    return Breaker(BreakerSettings(**settings), clock)  # type: ignore[arg-type]


def call(breaker: Breaker, failed: bool) -> bool:
    """One call through the breaker; False if it was skipped."""
    ticket = breaker.admit()
    if ticket is None:
        return False
    breaker.record(ticket, failed)
    return True


def test_failures_in_a_row_open_it_and_nothing_passes_during_the_cool_off(clock: Clock) -> None:
    guard = breaker(clock)
    for _ in range(4):
        assert call(guard, failed=True)
    assert guard.state is State.CLOSED
    assert call(guard, failed=True)
    assert guard.state is State.OPEN and guard.reason == "5 calls in a row failed"
    clock.now += 4.999
    assert [call(guard, failed=False) for _ in range(100)] == [False] * 100
    assert guard.state is State.OPEN


def test_an_answer_breaks_the_row(clock: Clock) -> None:
    guard = breaker(clock, min_calls=1000)
    for _ in range(10):
        for _ in range(4):
            call(guard, failed=True)
        call(guard, failed=False)
    assert guard.state is State.CLOSED, "4 failures in a row, then an answer, ten times: under both thresholds"


def test_a_failure_ratio_over_the_window_opens_it(clock: Clock) -> None:
    guard = breaker(clock, failures=1000)
    for index in range(9):  # 4 of 9 failed: ratio reached but too few calls
        call(guard, failed=index % 2 == 1)
        clock.now += 0.1
    assert guard.state is State.CLOSED
    call(guard, failed=True)  # 5 of 10
    assert guard.state is State.OPEN
    assert guard.reason == "5 of 10 calls in the last 10s failed"


def test_failures_older_than_the_window_are_forgotten(clock: Clock) -> None:
    guard = breaker(clock, failures=1000)
    for _ in range(8):
        call(guard, failed=True)
    clock.now += 11.0  # the window has moved past them
    for _ in range(10):
        call(guard, failed=False)
    for _ in range(8):
        call(guard, failed=True)  # 8 of 18 in the window
    assert guard.state is State.CLOSED
    call(guard, failed=True)  # 9 of 19
    assert guard.state is State.CLOSED
    call(guard, failed=True)  # 10 of 20
    assert guard.state is State.OPEN


def test_after_the_cool_off_a_few_probes_pass_and_their_answers_close_it(clock: Clock) -> None:
    guard = breaker(clock)
    for _ in range(5):
        call(guard, failed=True)
    clock.now += 5.0
    first, second = guard.admit(), guard.admit()
    assert first is not None and second is not None and guard.state is State.HALF_OPEN
    assert guard.admit() is None, "no more than `probes` calls at once while half-open"
    guard.record(first, failed=False)
    assert guard.admit() is None and guard.state is State.HALF_OPEN, "the probes are counted, not just in flight"
    guard.record(second, failed=False)
    assert guard.state is State.CLOSED
    assert all(call(guard, failed=False) for _ in range(100))


def test_a_failed_probe_opens_it_again_for_twice_as_long_up_to_the_limit(clock: Clock) -> None:
    guard = breaker(clock, max_cool_off=15.0)
    for _ in range(5):
        call(guard, failed=True)
    for expected in (5.0, 10.0, 15.0, 15.0):
        clock.now += expected - 0.001
        assert guard.admit() is None
        clock.now += 0.001
        assert call(guard, failed=True), "a probe after the cool-off"
        assert guard.state is State.OPEN
    clock.now += 15.0
    assert call(guard, failed=False) and call(guard, failed=False)
    assert guard.state is State.CLOSED and guard.cool_off == 5.0, "closing resets the cool-off"


def test_after_closing_the_old_failures_do_not_count(clock: Clock) -> None:
    guard = breaker(clock, failures=1000, min_calls=4)
    for _ in range(4):
        call(guard, failed=True)
    assert guard.state is State.OPEN
    clock.now += 5.0
    call(guard, failed=False)
    call(guard, failed=False)
    assert guard.state is State.CLOSED
    call(guard, failed=True)
    assert guard.state is State.CLOSED, "1 failure in the window, not 5 of 7"


def test_outcomes_of_calls_admitted_before_a_change_are_ignored(clock: Clock) -> None:
    guard = breaker(clock)
    slow = guard.admit()  # a call in flight while the breaker opens (a hung candidate's timeouts)
    assert slow is not None
    for _ in range(5):
        call(guard, failed=True)
    clock.now += 5.0
    probe = guard.admit()
    assert probe is not None and guard.state is State.HALF_OPEN
    guard.record(slow, failed=False)  # not a probe: must not count towards closing
    guard.record(slow, failed=False)
    assert guard.state is State.HALF_OPEN
    guard.record(probe, failed=True)
    assert guard.state is State.OPEN


def test_a_released_probe_frees_its_slot(clock: Clock) -> None:
    guard = breaker(clock, probes=1)
    for _ in range(5):
        call(guard, failed=True)
    clock.now += 5.0
    probe = guard.admit()
    assert probe is not None and guard.admit() is None
    guard.release(probe)  # cut short (the router stopping): no verdict
    assert guard.state is State.HALF_OPEN
    assert call(guard, failed=False) and guard.state is State.CLOSED


def test_every_change_of_state_is_reported(clock: Clock) -> None:
    seen: list[State] = []
    guard = Breaker(BreakerSettings(failures=2, probes=1, cool_off=1.0), clock, lambda it: seen.append(it.state))
    call(guard, failed=True)
    call(guard, failed=True)
    clock.now += 1.0
    call(guard, failed=False)
    assert seen == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_off_when_failures_is_zero() -> None:
    assert not BreakerSettings(failures=0).enabled
    assert BreakerSettings().enabled
