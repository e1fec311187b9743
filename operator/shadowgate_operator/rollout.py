"""The rollout state machine: from a ShadowDeployment as read and the time, the status it should have.

Pure: no I/O. The operator reads the object, calls `plan_rollout`, writes the planned status first
(it is the record of what was decided), then makes the router's objects follow it and posts the
Events of the transition the status names (status.lastTransition). State lives only in status, so a
restarted operator plans the same thing from the same object, and finds in it the Events it still
has to post (no transition decided twice, none left unannounced).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from shadowgate_operator import api
from shadowgate_operator.api import (
    ACTION_ANNOTATION,
    ActionVerb,
    AnalysedStep,
    AnnouncedEvent,
    ConditionStatus,
    ConditionType,
    Decision,
    DecisionAction,
    HandledAction,
    ManualAction,
    Phase,
    ShadowDeployment,
    ShadowDeploymentSpec,
    ShadowDeploymentStatus,
    Transition,
)
from shadowgate_operator.conditions import set_condition, transition
from shadowgate_operator.decision import analyse as analyse_window
from shadowgate_operator.metrics import WindowMetrics

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Notice:
    """An Event to record once the new status is written."""

    type: EventType
    reason: str
    message: str


UNANNOUNCED = frozenset({"InvalidAction"})
"""Notices that are not part of a transition: warnings about a cause that stays (the Reconciler says
them once per cause), not recorded in status.lastTransition."""


@dataclass(frozen=True)
class RouterState:
    """What the operator saw of the router Deployment."""

    available_replicas: int
    desired_replicas: int

    @property
    def available(self) -> bool:
        return self.available_replicas > 0

    def describe(self) -> str:
        return f"{self.available_replicas} of {self.desired_replicas} router replicas available"

    @classmethod
    def from_deployment(cls, deployment: dict[str, Any]) -> RouterState:
        status = deployment.get("status") or {}
        return cls(
            available_replicas=int(status.get("availableReplicas") or 0),
            desired_replicas=int((deployment.get("spec") or {}).get("replicas") or 0),
        )


@dataclass(frozen=True)
class Plan:
    status: ShadowDeploymentStatus
    notices: tuple[Notice, ...] = field(default=())
    judged_samples: int | None = None
    """Scored requests the analysis judged, when one ran (for its deployment_metrics row): status.samples
    starts again at 0 when the decision advances to the next step."""
    transition: Transition | None = None
    """The transition this plan makes (also in status.lastTransition), or None."""

    @property
    def weight(self) -> int:
        return self.status.current_weight or 0


def weight_for(spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus) -> int:
    """The router weight each phase implies; Paused keeps the weight it was paused at."""
    phase = status.phase_or_pending
    if phase is Phase.PROMOTED:
        return 100
    if phase in (Phase.ROLLED_BACK, Phase.FAILED, Phase.PENDING):
        return 0
    if phase is Phase.PAUSED:
        return status.current_weight or 0
    steps = spec.traffic.steps
    return steps[min(status.current_step or 0, len(steps) - 1)]


def _describe_step(spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus) -> str:
    steps = spec.traffic.steps
    step = min(status.current_step or 0, len(steps) - 1)
    verb = "mirroring" if spec.traffic.mode.value == "shadow" else "answering"
    return (
        f"{verb} {steps[step]}% of requests to candidate {spec.candidate.name} {spec.candidate.version} "
        f"(step {step + 1} of {len(steps)}, {spec.traffic.mode.value} mode)"
    )


def _start_analysis(
    spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, now: dt.datetime, reason: str
) -> ShadowDeploymentStatus:
    started = status.model_copy(
        update={
            "phase": Phase.PROGRESSING,
            "current_step": 0,
            "samples": 0,
            "metrics": None,
            "analysis_started_at": now,
            "step_started_at": now,
            "candidate_revision": spec.candidate_revision(),
            "analysis_revision": spec.analysis_revision(),
            "evidence": None,
            "last_decision": Decision(action=DecisionAction.RESTART, reason=reason, time=now),
        }
    )
    started = started.model_copy(update={"current_weight": weight_for(spec, started)})
    return started.model_copy(update={"message": f"Progressing: {_describe_step(spec, started)}."})


def _finish(
    spec: ShadowDeploymentSpec,
    status: ShadowDeploymentStatus,
    phase: Phase,
    action: DecisionAction,
    reason: str,
    now: dt.datetime,
) -> ShadowDeploymentStatus:
    finished = status.model_copy(
        update={"phase": phase, "last_decision": Decision(action=action, reason=reason, time=now), "message": reason}
    )
    return finished.model_copy(update={"current_weight": weight_for(spec, finished)})


def _manual_action(
    sd: ShadowDeployment, status: ShadowDeploymentStatus, action: ManualAction, now: dt.datetime
) -> tuple[ShadowDeploymentStatus, Notice]:
    spec = sd.spec
    phase = status.phase_or_pending
    by_hand = f"({ACTION_ANNOTATION}={action.value})"
    handled = HandledAction(value=action.value, verb=action.verb, time=now)
    if action.verb is ActionVerb.PROMOTE and not phase.finished:
        reason = f"Promoted by hand {by_hand}: the router sends 100% of requests to candidate {spec.candidate.name}."
        status = _finish(spec, status, Phase.PROMOTED, DecisionAction.PROMOTE, reason, now)
        notice = Notice("Normal", "Promoted", reason)
    elif action.verb is ActionVerb.ABORT and not phase.finished:
        reason = f"Aborted by hand {by_hand}: rolled back, the router sends no requests to the candidate."
        status = _finish(spec, status, Phase.ROLLED_BACK, DecisionAction.ROLL_BACK, reason, now)
        notice = Notice("Normal", "RolledBack", reason)
    elif action.verb is ActionVerb.RETRY and phase.finished:
        status = _start_analysis(spec, status, now, f"Analysis restarted by hand {by_hand}.")
        notice = Notice("Normal", "AnalysisRestarted", f"Retry by hand {by_hand}: {status.message}")
    else:
        notice = Notice(
            "Normal", "ActionIgnored", f"{action.verb.value} ignored {by_hand}: the rollout is {phase.value}."
        )
    return status.model_copy(update={"last_action": handled}), notice


@dataclass(frozen=True)
class Blocked:
    """Why the router cannot follow the plan although the operator may make every call: the API server
    refused a child (RouterRefused), or the spec names something the operator will not use
    (InvalidDatabaseSecret, RouterImageNotAllowed, SecretNotAllowed). Ready is False with this reason until it
    is fixed."""

    reason: str
    message: str
    holds_router: bool = True
    """RouterImageNotAllowed and SecretNotAllowed: whether the router Deployment is left as it was meanwhile
    (False for a notification's Secret, which the router never holds)."""


def _ready(
    router: RouterState | None, permission_problem: str | None, blocked: Blocked | None = None
) -> tuple[ConditionStatus, str, str]:
    if permission_problem is not None:
        # The router cannot be kept in shape (or the analysis cannot read its data) until someone grants it.
        return ConditionStatus.FALSE, "PermissionDenied", permission_problem
    if blocked is not None:
        return ConditionStatus.FALSE, blocked.reason, blocked.message
    if router is None:
        return ConditionStatus.UNKNOWN, "RouterPending", "The router has not been created yet."
    if router.available:
        return ConditionStatus.TRUE, "RouterAvailable", f"{router.describe()}."
    return ConditionStatus.FALSE, "RouterUnavailable", f"{router.describe()}."


def _conditions(
    status: ShadowDeploymentStatus,
    generation: int | None,
    now: dt.datetime,
    router: RouterState | None,
    transition_reason: str | None,
    permission_problem: str | None,
    blocked: Blocked | None,
) -> ShadowDeploymentStatus:
    """Conditions follow the phase; a transition in this plan gives its reason, otherwise the reason stays."""
    phase = status.phase_or_pending
    existing = status.condition(ConditionType.PROGRESSING)
    reason = transition_reason or (existing.reason if existing is not None else phase.value)
    status = transition(status, phase, reason=reason, message=status.message or "", generation=generation, now=now)
    ready = _ready(router, permission_problem, blocked)
    conditions = set_condition(status.conditions, ConditionType.READY, *ready, generation, now)
    return status.model_copy(update={"conditions": conditions})


def apply_decision(
    spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, decision: Decision, now: dt.datetime
) -> tuple[ShadowDeploymentStatus, list[Notice]]:
    """Carry out what the analysis decided: the next step, promotion, rollback, or nothing."""
    action = decision.action
    if action is DecisionAction.ADVANCE and (status.current_step or 0) + 1 < len(spec.traffic.steps):
        advanced = status.model_copy(
            update={"current_step": (status.current_step or 0) + 1, "step_started_at": now, "samples": 0,
                    "last_decision": decision}
        )  # fmt: skip
        message = f"Progressing: {_describe_step(spec, advanced)}."
        advanced = advanced.model_copy(update={"current_weight": weight_for(spec, advanced), "message": message})
        return advanced, [Notice("Normal", "StepAdvanced", f"{decision.reason} Now {_describe_step(spec, advanced)}.")]
    if action in (DecisionAction.ADVANCE, DecisionAction.PROMOTE) and spec.analysis.require_approval:
        return _await_approval(status, decision)
    if action in (DecisionAction.ADVANCE, DecisionAction.PROMOTE):
        promoted = _finish(spec, status, Phase.PROMOTED, DecisionAction.PROMOTE, decision.reason, now)
        return promoted, [Notice("Normal", "Promoted", decision.reason)]
    if action is DecisionAction.ROLL_BACK:
        rolled_back = _finish(spec, status, Phase.ROLLED_BACK, DecisionAction.ROLL_BACK, decision.reason, now)
        return rolled_back, [Notice("Warning", "RolledBack", decision.reason)]
    if action is DecisionAction.FAIL:
        failed = _finish(spec, status, Phase.FAILED, DecisionAction.FAIL, decision.reason, now)
        return failed, [Notice("Warning", "Failed", decision.reason)]
    last = status.last_decision
    if last is None or (last.action, last.reason) != (decision.action, decision.reason):
        status = status.model_copy(update={"last_decision": decision})
    return status, []


AWAITING_APPROVAL = "Waiting for approval (analysis.requireApproval)"


def _await_approval(status: ShadowDeploymentStatus, decision: Decision) -> tuple[ShadowDeploymentStatus, list[Notice]]:
    """A candidate that would be promoted, held at its step for a person's yes: the decision says Wait and
    why; the AwaitingApproval Event comes once, when the hold begins (not at each analysis that passes)."""
    reason = (
        f"{AWAITING_APPROVAL}: {decision.reason} Approve with `kubectl shadow promote` (annotation "
        f"{ACTION_ANNOTATION}=promote); the analysis goes on meanwhile."
    )
    last = status.last_decision
    held = Decision(action=DecisionAction.WAIT, reason=reason, time=decision.time)
    waiting = last is not None and last.action is DecisionAction.WAIT and last.reason.startswith(AWAITING_APPROVAL)
    if waiting and last is not None and last.reason == reason:
        return status, []
    status = status.model_copy(update={"last_decision": held, "message": reason})
    return status, ([] if waiting else [Notice("Normal", "AwaitingApproval", reason)])


def _without_data(
    spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, problem: str, now: dt.datetime
) -> Decision:
    """No analysis was possible (the database is away, a query failed): wait, but not past maxStepDuration,
    or a candidate nobody can judge would keep its share for as long as the database stays away."""
    limit = spec.analysis.max_step_seconds
    started = status.step_started_at
    if limit is not None and started is not None and (now - started).total_seconds() >= limit:
        reason = (
            f"No analysis possible for maxStepDuration {spec.analysis.max_step_duration} at step "
            f"{(status.current_step or 0) + 1}: {problem}. The candidate cannot be judged: failed "
            "(the router sends it no traffic)."
        )
        return Decision(action=DecisionAction.FAIL, reason=reason, time=now)
    return Decision(action=DecisionAction.WAIT, reason=f"Waiting for data: {problem}", time=now)


def plan_rollout(
    sd: ShadowDeployment,
    now: dt.datetime,
    *,
    analyse: bool = False,
    router: RouterState | None = None,
    metrics: WindowMetrics | None = None,
    data_problem: str | None = None,
    permission_problem: str | None = None,
    blocked: Blocked | None = None,
    stamp: dt.datetime | None = None,
) -> Plan:
    """The status `sd` should have now and the Events that announce the change.

    `analyse` runs the decision (once per analysis interval) on `metrics`, the current step's window;
    `data_problem` says why there are none (the database is away); `router` is what the router
    Deployment reports, for the Ready condition; `permission_problem` says which API call the operator
    is not allowed to make (Ready is then False with reason PermissionDenied); `blocked` why the router
    cannot follow although it may (Ready is then False with its reason). A transition is stamped
    `stamp` (default `now`): sub-second, so that its history rows keep their order.
    """
    spec, status = sd.spec, sd.status
    notices: list[Notice] = []
    revision = spec.candidate_revision()

    settings = spec.analysis_revision()
    if status.candidate_revision != revision:
        if status.candidate_revision is None:
            status = _start_analysis(spec, status, now, "Analysis started.")
            notices.append(Notice("Normal", "AnalysisStarted", status.message or ""))
        else:
            reason = "Production or candidate changed in spec: analysis restarted at step 1."
            status = _start_analysis(spec, status, now, reason)
            notices.append(Notice("Normal", "AnalysisRestarted", f"{reason} {status.message}"))
    elif status.analysis_revision is None:
        # Written by an operator from before the analysis revision: adopt the current settings.
        status = status.model_copy(update={"analysis_revision": settings})
    elif status.analysis_revision != settings and not status.phase_or_pending.finished:
        reason = (
            "The analysis settings changed in spec (metric, lossCap, mode, stickyHeader, fallbackToProduction or "
            "segmentBy): evidence gathered under the old ones answers another question, analysis restarted at step 1."
        )
        status = _start_analysis(spec, status, now, reason)
        notices.append(Notice("Normal", "AnalysisRestarted", f"{reason} {status.message}"))

    try:
        action = sd.pending_action()
    except ValueError as exc:
        action = None
        notices.append(Notice("Warning", "InvalidAction", str(exc)))
    if action is not None:
        status, notice = _manual_action(sd, status, action, now)
        notices.append(notice)

    phase = status.phase_or_pending
    if spec.paused and phase is Phase.PROGRESSING:
        message = f"Paused by spec.paused: weight frozen at {status.current_weight}%."
        status = status.model_copy(update={"phase": Phase.PAUSED, "message": message})
        notices.append(Notice("Normal", "Paused", message))
    elif not spec.paused and phase is Phase.PAUSED:
        status = status.model_copy(
            update={"phase": Phase.PROGRESSING, "message": f"Progressing: {_describe_step(spec, status)}."}
        )
        notices.append(Notice("Normal", "Resumed", f"Resumed: {_describe_step(spec, status)}."))

    # The weight always follows the phase and step (new steps in spec apply at once; Paused keeps its own).
    status = status.model_copy(update={"current_weight": weight_for(spec, status)})
    judged_samples = None
    analysed = None
    if status.phase is Phase.PROGRESSING and analyse:
        if data_problem is not None:
            decision = _without_data(spec, status, data_problem, now)
        else:
            verdict = analyse_window(spec, status, metrics, now)
            decision = verdict.decision
            # The step's numbers go to status first: the next analysis reads its evidence from there.
            status = status.model_copy(
                update={"metrics": verdict.metrics, "samples": verdict.samples, "evidence": verdict.evidence}
            )
            judged_samples = verdict.samples
            if verdict.gate is not None:
                notices.append(Notice("Warning", "GateFailed", verdict.gate))
        judged = AnalysedStep(
            step=status.current_step or 0, weight=status.current_weight or 0, samples=status.samples or 0
        )
        status, decided = apply_decision(spec, status, decision, now)
        if decided:
            analysed = judged
        notices += decided

    transitions = [notice.reason for notice in notices if notice.reason not in ("ActionIgnored", "InvalidAction")]
    transition_reason = transitions[-1] if transitions else None
    status = _conditions(status, sd.metadata.generation, now, router, transition_reason, permission_problem, blocked)
    transition = _transition(sd.status.last_transition, notices, action, analysed, stamp or now)
    if transition is not None:
        status = status.model_copy(update={"last_transition": transition})
    status = with_columns(spec, status)
    return Plan(status=status, notices=tuple(notices), judged_samples=judged_samples, transition=transition)


def with_columns(spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus) -> ShadowDeploymentStatus:
    """status.step ("2/3") and status.score, which `kubectl get` shows, from the rest of status: the score
    only once the step has minSamples scored requests (before, it is latency and errors alone)."""
    steps = len(spec.traffic.steps)
    step = None if status.current_step is None else f"{min(status.current_step, steps - 1) + 1}/{steps}"
    judged = status.metrics is not None and (status.samples or 0) >= spec.analysis.min_samples
    score = status.metrics.overall_score if judged and status.metrics is not None else None
    if (status.step, status.score) == (step, score):
        return status
    return status.model_copy(update={"step": step, "score": score})


def _transition(
    previous: Transition | None,
    notices: list[Notice],
    action: ManualAction | None,
    analysed: AnalysedStep | None,
    stamp: dt.datetime,
) -> Transition | None:
    announced = [notice for notice in notices if notice.reason not in UNANNOUNCED]
    if not announced:
        return None
    return Transition(
        sequence=(previous.sequence if previous is not None else 0) + 1,
        time=stamp,
        action=action.value if action is not None else None,
        analysed=analysed,
        events=[
            AnnouncedEvent(type=api.EventType(n.type), reason=n.reason, message=n.message[:1024]) for n in announced
        ],
    )
