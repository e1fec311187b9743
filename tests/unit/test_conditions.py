"""Status shaping: conditions keep their transition time, phases imply conditions, patches are minimal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shadowgate_operator.api import (
    Condition,
    ConditionStatus,
    ConditionType,
    Phase,
    ShadowDeploymentStatus,
)
from shadowgate_operator.conditions import PHASE_CONDITIONS, set_condition, transition

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1, microseconds=123456)
TRUE, FALSE = ConditionStatus.TRUE, ConditionStatus.FALSE


def test_set_condition_adds_a_missing_condition() -> None:
    conditions = set_condition([], ConditionType.READY, TRUE, "RouterAvailable", "2/2 routers ready", 3, T0)
    assert conditions == [
        Condition(
            type=ConditionType.READY,
            status=TRUE,
            reason="RouterAvailable",
            message="2/2 routers ready",
            observed_generation=3,
            last_transition_time=T0,
        )
    ]


def test_same_status_keeps_the_transition_time_but_takes_the_news() -> None:
    before = set_condition([], ConditionType.READY, TRUE, "RouterAvailable", "2/2 ready", 3, T0)
    after = set_condition(before, ConditionType.READY, TRUE, "RouterAvailable", "3/3 ready", 4, T1)
    (condition,) = after
    assert condition.last_transition_time == T0
    assert (condition.message, condition.observed_generation) == ("3/3 ready", 4)


def test_status_change_moves_the_transition_time_to_the_second() -> None:
    before = set_condition([], ConditionType.READY, TRUE, "RouterAvailable", "", 3, T0)
    (condition,) = set_condition(before, ConditionType.READY, FALSE, "RouterUnavailable", "0/2 ready", 3, T1)
    assert condition.last_transition_time == T1.replace(microsecond=0)
    assert condition.status is FALSE


def test_set_condition_leaves_others_in_place_and_the_input_untouched() -> None:
    ready = set_condition([], ConditionType.READY, TRUE, "RouterAvailable", "", 1, T0)
    both = set_condition(ready, ConditionType.PROGRESSING, TRUE, "StepStarted", "", 1, T0)
    updated = set_condition(both, ConditionType.READY, FALSE, "RouterUnavailable", "", 1, T1)
    assert [c.type for c in updated] == [ConditionType.READY, ConditionType.PROGRESSING]
    assert updated[1] is both[1]
    assert both[0].status is TRUE


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_sets_its_three_conditions(phase: Phase) -> None:
    status = transition(ShadowDeploymentStatus(), phase, reason="Because", message="why", generation=2, now=T0)
    assert status.phase is phase and status.message == "why" and status.observed_generation == 2
    got = {c.type: c.status for c in status.conditions}
    progressing, promoted, rolled_back = PHASE_CONDITIONS[phase]
    assert got == {
        ConditionType.PROGRESSING: progressing,
        ConditionType.PROMOTED: promoted,
        ConditionType.ROLLED_BACK: rolled_back,
    }


def test_transition_explains_progressing_and_its_subject_only() -> None:
    status = transition(
        ShadowDeploymentStatus(),
        Phase.ROLLED_BACK,
        reason="ErrorRateGate",
        message="candidate error rate 9% > 5%",
        generation=1,
        now=T0,
    )
    rolled_back = status.condition(ConditionType.ROLLED_BACK)
    promoted = status.condition(ConditionType.PROMOTED)
    progressing = status.condition(ConditionType.PROGRESSING)
    assert rolled_back is not None and rolled_back.reason == "ErrorRateGate"
    assert progressing is not None and progressing.message == "candidate error rate 9% > 5%"
    assert promoted is not None and (promoted.reason, promoted.message) == ("RolledBack", "")


def test_transition_keeps_ready_and_other_fields() -> None:
    ready = set_condition([], ConditionType.READY, TRUE, "RouterAvailable", "", 1, T0)
    status = ShadowDeploymentStatus(conditions=ready, current_weight=5, samples=40)
    moved = transition(status, Phase.PROGRESSING, reason="StepStarted", message="5%", generation=1, now=T1)
    assert moved.condition(ConditionType.READY) == ready[0]
    assert (moved.current_weight, moved.samples) == (5, 40)


def test_repeating_a_transition_changes_nothing_but_the_message() -> None:
    first = transition(ShadowDeploymentStatus(), Phase.PROGRESSING, reason="Step", message="a", generation=1, now=T0)
    again = transition(first, Phase.PROGRESSING, reason="Step", message="a", generation=1, now=T1)
    assert again.to_dict() == first.to_dict()
    later = transition(first, Phase.PROGRESSING, reason="Step", message="b", generation=1, now=T1)
    changed = {key for key, value in later.to_dict().items() if first.to_dict().get(key) != value}
    assert changed == {"message", "conditions"}
    assert all(c.last_transition_time == T0.replace(microsecond=0) for c in later.conditions)
