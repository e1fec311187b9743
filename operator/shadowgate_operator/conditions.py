"""Status shaping: conditions and phase transitions. Pure functions.

The operator computes a whole new status from the old one and writes it only when it differs, so a
reconcile that changes nothing writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from shadowgate_operator.api import Condition, ConditionStatus, ConditionType, Phase, ShadowDeploymentStatus

TRUE, FALSE, UNKNOWN = ConditionStatus.TRUE, ConditionStatus.FALSE, ConditionStatus.UNKNOWN
PHASE_CONDITION_TYPES = (ConditionType.PROGRESSING, ConditionType.PROMOTED, ConditionType.ROLLED_BACK)

# What each phase implies for (Progressing, Promoted, RolledBack). Ready is not here: it follows the
# router pods, not the phase.
PHASE_CONDITIONS: Mapping[Phase, tuple[ConditionStatus, ConditionStatus, ConditionStatus]] = {
    Phase.PENDING: (UNKNOWN, FALSE, FALSE),
    Phase.PROGRESSING: (TRUE, FALSE, FALSE),
    Phase.PAUSED: (FALSE, FALSE, FALSE),
    Phase.PROMOTED: (FALSE, TRUE, FALSE),
    Phase.ROLLED_BACK: (FALSE, FALSE, TRUE),
    Phase.FAILED: (FALSE, FALSE, FALSE),
}

# The condition a phase is about: it carries the transition's reason and message.
_SUBJECT: Mapping[Phase, ConditionType] = {
    Phase.PROMOTED: ConditionType.PROMOTED,
    Phase.ROLLED_BACK: ConditionType.ROLLED_BACK,
}


def set_condition(
    conditions: Sequence[Condition],
    condition_type: ConditionType,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """A new list with condition_type set. lastTransitionTime moves only when status changes;
    reason, message and observedGeneration always follow the latest observation."""
    previous = next((c for c in conditions if c.type is condition_type), None)
    changed_at = previous.last_transition_time if previous and previous.status is status else _second(now)
    updated = Condition(
        type=condition_type,
        status=status,
        reason=reason,
        message=message,
        observed_generation=generation,
        last_transition_time=changed_at,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c is previous else c for c in conditions]


def transition(
    status: ShadowDeploymentStatus,
    phase: Phase,
    *,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> ShadowDeploymentStatus:
    """status moved to phase: the phase, its message, observedGeneration and the phase's conditions.

    reason (CamelCase) and message explain the transition; they go on Progressing and on the
    condition the phase is about (Promoted, RolledBack). Other fields are left to the caller.
    """
    conditions: list[Condition] = list(status.conditions)
    subject = _SUBJECT.get(phase, ConditionType.PROGRESSING)
    for condition_type, condition_status in zip(PHASE_CONDITION_TYPES, PHASE_CONDITIONS[phase], strict=True):
        explained = condition_type in (subject, ConditionType.PROGRESSING)
        conditions = set_condition(
            conditions,
            condition_type,
            condition_status,
            reason if explained else phase.value,
            message if explained else "",
            generation,
            now,
        )
    return status.model_copy(
        update={"phase": phase, "message": message, "observed_generation": generation, "conditions": conditions}
    )


def _second(moment: datetime) -> datetime:
    # Kubernetes times have second precision; sub-second values would differ on every read-back.
    return moment.replace(microsecond=0)


def notifications_condition(
    status: ShadowDeploymentStatus,
    receivers: int,
    failing: Sequence[tuple[str, str]],
    generation: int | None,
    now: datetime,
) -> ShadowDeploymentStatus:
    """status with NotificationsDelivered following the delivery worker: True (Delivering) while no receiver
    fails, False (DeliveryFailing) naming each failing (receiver, what went wrong); absent when
    spec.notifications names no receiver (`receivers` 0)."""
    kept = [c for c in status.conditions if c.type is not ConditionType.NOTIFICATIONS_DELIVERED]
    if receivers == 0:
        conditions = kept
    elif failing:
        message = "; ".join(f"receiver {receiver}: {detail}" for receiver, detail in failing)
        conditions = set_condition(
            status.conditions, ConditionType.NOTIFICATIONS_DELIVERED, FALSE, "DeliveryFailing", message[:4000],
            generation, now,
        )  # fmt: skip
    else:
        conditions = set_condition(
            status.conditions, ConditionType.NOTIFICATIONS_DELIVERED, TRUE, "Delivering",
            "no receiver is failing: each message is delivered at least once, retried with backoff", generation, now,
        )  # fmt: skip
    if conditions == list(status.conditions):
        return status
    return status.model_copy(update={"conditions": conditions})
