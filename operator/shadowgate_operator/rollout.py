"""The rollout state machine: from a ShadowDeployment as read and the time, the status it should have.

Pure: no I/O. The operator reads the object, calls `plan_rollout`, writes the planned status first
(it is the record of what was decided), then makes the router's objects follow it and posts the
Events of the transition the status names (status.lastTransition). State lives only in status, so a
restarted operator plans the same thing from the same object, and finds in it the Events it still
has to post (no transition decided twice, none left unannounced).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
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
    GateType,
    GateWait,
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
from shadowgate_operator.gates import verdict as gating
from shadowgate_operator.gates.verdict import GateCall, GateReply
from shadowgate_operator.metrics import WindowMetrics

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Notice:
    """An Event to record once the new status is written."""

    type: EventType
    reason: str
    message: str


UNANNOUNCED = frozenset({"InvalidAction", *gating.GATE_WARNINGS})
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
    asks: tuple[GateCall, ...] = ()
    """Gates (spec.gates) to ask before this plan can say whether the rollout moves: the plan holds meanwhile;
    plan again with their answers."""
    again: bool = False
    """Reconcile again once this status is written: postRollback gates are to be told of the rollback."""

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


# --- gates (spec.gates): the moves they guard; gates.verdict says whether the answers let them through ---


def _kept(previous: Decision | None, decision: Decision) -> Decision:
    """`decision`, or `previous` when it says the same (its time kept: a hold that stays writes nothing)."""
    if previous is not None and (previous.action, previous.reason) == (decision.action, decision.reason):
        return previous
    return decision


def _gate_start(
    spec: ShadowDeploymentSpec,
    before: ShadowDeploymentStatus,
    started: ShadowDeploymentStatus,
    replies: Mapping[str, GateReply],
    now: dt.datetime,
) -> tuple[ShadowDeploymentStatus, tuple[GateCall, ...]] | None:
    """A start (`before` -> `started`) the preRollout gates hold: phase Pending, no traffic to the candidate,
    and the gates to ask; None when they let it through."""
    key = gating.gate_key(GateType.PRE_ROLLOUT, started.candidate_revision, 0)
    purpose = f"the candidate's first traffic ({_describe_step(spec, started)})"
    consulted = gating.consult(
        spec.gates, GateType.PRE_ROLLOUT, key, purpose, replies, step=0, previous=before.gate, now=now
    )
    if consulted.open:
        return None
    message = consulted.message
    waiting = _kept(before.last_decision, Decision(action=DecisionAction.WAIT, reason=message, time=now))
    held = before.model_copy(
        update={
            "phase": Phase.PENDING, "current_step": 0, "current_weight": 0, "samples": 0, "metrics": None,
            "evidence": None, "candidate_revision": started.candidate_revision,
            "analysis_revision": started.analysis_revision, "message": message, "gate": consulted.wait,
            "last_decision": waiting, "last_action": started.last_action,
        }
    )  # fmt: skip
    return held, consulted.asks


def _through_gates(
    spec: ShadowDeploymentSpec,
    status: ShadowDeploymentStatus,
    decision: Decision,
    replies: Mapping[str, GateReply],
    now: dt.datetime,
) -> tuple[Decision, GateWait | None, tuple[GateCall, ...]]:
    """An analysis's decision past the gates of its move: a step advance asks the confirmStep gates, a promotion
    (before requireApproval's wait) the confirmPromotion ones. Held: a Wait that says by whom, the hold, and
    the gates still to ask."""
    steps, step = spec.traffic.steps, status.current_step or 0
    if decision.action is DecisionAction.ADVANCE and step + 1 < len(steps):
        moment = GateType.CONFIRM_STEP
        purpose = f"step {step + 2} of {len(steps)} ({steps[step + 1]}% of requests to the candidate)"
    elif decision.action in (DecisionAction.ADVANCE, DecisionAction.PROMOTE):
        moment = GateType.CONFIRM_PROMOTION
        purpose = f"the promotion of candidate {spec.candidate.name} {spec.candidate.version}"
    else:
        return decision, None, ()
    key = gating.gate_key(moment, status.candidate_revision, step)
    consulted = gating.consult(spec.gates, moment, key, purpose, replies, step=step, previous=status.gate, now=now)
    if consulted.open:
        if consulted.summary:
            decision = decision.model_copy(update={"reason": f"{decision.reason} {consulted.summary}"[:4096]})
        return decision, None, ()
    reason = f"{consulted.message} The analysis passed: {decision.reason}"[:4096]
    return Decision(action=DecisionAction.WAIT, reason=reason, time=decision.time), consulted.wait, consulted.asks


def _settle_gate(
    spec: ShadowDeploymentSpec,
    before: ShadowDeploymentStatus,
    status: ShadowDeploymentStatus,
    replies: Mapping[str, GateReply],
    now: dt.datetime,
) -> tuple[ShadowDeploymentStatus, tuple[GateCall, ...], bool]:
    """status.gate after this plan: a hold goes when the rollout left the place it held it at; a rollback
    brings the postRollback gates (told at the next reconcile, once the router sends the candidate nothing);
    an earlier rollback's gates not told yet are to be told now. Returns the status, the gates to tell and
    whether to reconcile again at once."""
    wait, phase = status.gate, status.phase_or_pending
    if phase is Phase.ROLLED_BACK:
        if before.phase_or_pending is not Phase.ROLLED_BACK:
            tellable = any(gate.type is GateType.POST_ROLLBACK for gate in spec.gates)
            reason = status.last_decision.reason if status.last_decision is not None else "rolled back"
            wait = None if not tellable else GateWait(
                type=GateType.POST_ROLLBACK, step=status.current_step, since=now.replace(microsecond=0),
                purpose=f"the rollback ({reason})"[:512],
            )  # fmt: skip
            return status.model_copy(update={"gate": wait}), (), tellable
        if wait is not None and wait.type is GateType.POST_ROLLBACK:
            key = gating.gate_key(GateType.POST_ROLLBACK, status.candidate_revision, wait.step or 0, wait.since)
            told, calls = gating.tell(spec.gates, wait, key, replies)
            return status.model_copy(update={"gate": told}), calls, False
        return status, (), False
    stale = wait is not None and (
        wait.type is GateType.POST_ROLLBACK
        or (wait.type is GateType.PRE_ROLLOUT and phase is not Phase.PENDING)
        or (wait.type in gating.HOLDS[1:] and (phase is not Phase.PROGRESSING or wait.step != status.current_step))
    )
    if stale:
        status = status.model_copy(update={"gate": None})
    return status, (), False


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
    gates: Mapping[str, GateReply] | None = None,
) -> Plan:
    """The status `sd` should have now and the Events that announce the change.

    `analyse` runs the decision (once per analysis interval) on `metrics`, the current step's window;
    `data_problem` says why there are none (the database is away); `router` is what the router
    Deployment reports, for the Ready condition; `permission_problem` says which API call the operator
    is not allowed to make (Ready is then False with reason PermissionDenied); `blocked` why the router
    cannot follow although it may (Ready is then False with its reason). A transition is stamped
    `stamp` (default `now`): sub-second, so that its history rows keep their order.

    `gates` holds the answers of spec.gates (by gate name) the Reconciler has: a start, step advance or
    promotion whose gates have no answer to it yet holds and names them in `Plan.asks`, to be planned again
    with their answers; one they refuse holds (status.gate, the GatesOpen condition).
    """
    spec, status = sd.spec, sd.status
    notices: list[Notice] = []
    revision = spec.candidate_revision()
    replies: Mapping[str, GateReply] = gates or {}
    asks: tuple[GateCall, ...] = ()

    settings = spec.analysis_revision()
    held_start = status.phase is Phase.PENDING and status.candidate_revision is not None
    if status.candidate_revision != revision or held_start:
        before = status
        if status.candidate_revision is None or held_start:
            status = _start_analysis(spec, status, now, "Analysis started.")
            notices.append(Notice("Normal", "AnalysisStarted", status.message or ""))
        else:
            reason = "Production or candidate changed in spec: analysis restarted at step 1."
            status = _start_analysis(spec, status, now, reason)
            notices.append(Notice("Normal", "AnalysisRestarted", f"{reason} {status.message}"))
        gated = _gate_start(spec, before, status, replies, now)
        if gated is not None:  # no traffic to the candidate until its preRollout gates say yes
            (status, asks), notices = gated, []
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
        before = status
        status, notice = _manual_action(sd, status, action, now)
        gated = _gate_start(spec, before, status, replies, now) if notice.reason == "AnalysisRestarted" else None
        if gated is not None:
            status, asks = gated
            by_hand = f"({ACTION_ANNOTATION}={action.value})"
            notice = Notice("Normal", "AwaitingGates", f"Retry by hand {by_hand}: {status.message}")
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
        decision, hold, asks = _through_gates(spec, status, decision, replies, now)
        held_before = status.gate
        status, decided = apply_decision(spec, status, decision, now)
        if hold is not None:
            status = status.model_copy(update={"gate": hold, "message": gating.hold_message(hold)})
        elif held_before is not None:  # the move went through, or the analysis does not ask for it any more
            if status.message == gating.hold_message(held_before):
                status = status.model_copy(update={"message": f"Progressing: {_describe_step(spec, status)}."})
            status = status.model_copy(update={"gate": None})
        if decided:
            analysed = judged
        notices += decided

    status, told, again = _settle_gate(spec, sd.status, status, replies, now)
    asks += told
    transitions = [notice.reason for notice in notices if notice.reason not in ("ActionIgnored", "InvalidAction")]
    held_pending = status.gate is not None and status.gate.type is GateType.PRE_ROLLOUT
    transition_reason = transitions[-1] if transitions else ("AwaitingGates" if held_pending else None)
    status = _conditions(status, sd.metadata.generation, now, router, transition_reason, permission_problem, blocked)
    status = gating.gates_condition(status, spec.gates, sd.metadata.generation, now)
    transition = _transition(sd.status.last_transition, notices, action, analysed, stamp or now)
    if transition is not None:
        status = status.model_copy(update={"last_transition": transition})
    status = with_columns(spec, status)
    # Warnings while a gate's answer stays (the Reconciler says each once per cause).
    notices += [Notice("Warning", reason, message) for reason, message in gating.warnings(spec.gates, status.gate)]
    return Plan(
        status=status, notices=tuple(notices), judged_samples=judged_samples, transition=transition, asks=asks,
        again=again,
    )  # fmt: skip


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
