"""The promotion / rollback decision: a pure function of spec, status, metrics and time.

Until the outcome analysis lands (metrics from TimescaleDB, the sequential test), it holds the
rollout at its current step and says so: nothing is promoted or rolled back automatically.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from shadowgate_operator.api import Decision, DecisionAction, ShadowDeploymentSpec, ShadowDeploymentStatus

HOLD_REASON = (
    "Holding at step {step} ({weight}% {mode}): automatic analysis of outcomes is not implemented yet, "
    "so the candidate is neither promoted nor rolled back on its own; use the shadowgate.io/action "
    "annotation to promote or abort."
)


def decide(spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, metrics: Any, now: dt.datetime) -> Decision:
    """What to do at this analysis interval, with the reason in words."""
    del metrics  # no metrics are collected yet
    step = (status.current_step or 0) + 1
    reason = HOLD_REASON.format(step=step, weight=status.current_weight or 0, mode=spec.traffic.mode.value)
    return Decision(action=DecisionAction.WAIT, reason=reason, time=now)
