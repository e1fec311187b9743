"""The rollout state machine, table by table: what status and which Events each situation plans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shadowgate_operator.api import ConditionType, Decision, DecisionAction, Phase, ShadowDeployment
from shadowgate_operator.metrics import Moments, SideMetrics, WindowMetrics
from shadowgate_operator.rollout import Blocked, Plan, RouterState, apply_decision, plan_rollout
from tests.admission_cases import load_example, merge_patch

T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
UID = "6f1c2a57-0d1e-4c55-9a1b-2f3e4d5c6b7a"


def resource(patch: dict[str, Any] | None = None, *, generation: int = 1) -> ShadowDeployment:
    base = {"metadata": {"namespace": "models", "uid": UID, "generation": generation}}
    return ShadowDeployment.model_validate(merge_patch(merge_patch(load_example(), base), patch or {}))


def after(plan: Plan, patch: dict[str, Any] | None = None, *, generation: int = 1) -> ShadowDeployment:
    """The object as the next reconcile reads it: the planned status written, plus a user's change."""
    return resource(merge_patch({"status": plan.status.to_dict()}, patch or {}), generation=generation)


def reasons(plan: Plan) -> list[str]:
    return [notice.reason for notice in plan.notices]


def condition(plan: Plan, kind: ConditionType) -> tuple[str, str]:
    found = plan.status.condition(kind)
    assert found is not None
    return found.status.value, found.reason


def started() -> Plan:
    return plan_rollout(resource(), T0)


def test_a_new_resource_starts_its_analysis_at_the_first_step() -> None:
    plan = started()
    assert reasons(plan) == ["AnalysisStarted"]
    assert plan.notices[0].type == "Normal"
    assert "mirroring 5% of requests to candidate fraud-v2 2.0.0 (step 1 of 3, shadow mode)" in plan.notices[0].message
    status = plan.status
    assert (status.phase, status.current_step, status.current_weight, status.samples) == (Phase.PROGRESSING, 0, 5, 0)
    assert status.analysis_started_at == status.step_started_at == T0
    assert status.candidate_revision == resource().spec.candidate_revision()
    assert status.observed_generation == 1
    assert condition(plan, ConditionType.PROGRESSING) == ("True", "AnalysisStarted")
    assert condition(plan, ConditionType.PROMOTED)[0] == condition(plan, ConditionType.ROLLED_BACK)[0] == "False"
    assert condition(plan, ConditionType.READY) == ("Unknown", "RouterPending")


@pytest.mark.parametrize(
    ("router", "ready"),
    [
        (None, ("Unknown", "RouterPending")),
        (RouterState(available_replicas=0, desired_replicas=2), ("False", "RouterUnavailable")),
        (RouterState(available_replicas=1, desired_replicas=2), ("True", "RouterAvailable")),
    ],
)
def test_ready_follows_the_router_deployment(router: RouterState | None, ready: tuple[str, str]) -> None:
    plan = plan_rollout(after(started()), T0 + timedelta(seconds=1), router=router)
    assert condition(plan, ConditionType.READY) == ready
    assert reasons(plan) == []


def test_planning_again_changes_nothing() -> None:
    first = started()
    again = plan_rollout(after(first), T0 + timedelta(minutes=5))
    assert again.notices == ()
    assert again.status.to_dict() == first.status.to_dict()


def test_a_new_candidate_restarts_the_analysis_but_new_thresholds_do_not() -> None:
    first = plan_rollout(after(started(), {"status": {"currentStep": 2, "currentWeight": 20}}), T0)
    assert first.status.current_weight == 20  # the weight follows the step

    thresholds = plan_rollout(after(first, {"spec": {"analysis": {"promotionThreshold": 0.5}}}, generation=2), T0)
    assert reasons(thresholds) == []
    assert (thresholds.status.current_step, thresholds.status.observed_generation) == (2, 2)

    later = T0 + timedelta(hours=1)
    candidate = {"spec": {"candidate": {"version": "2.1.0"}}}
    restarted = plan_rollout(after(first, candidate, generation=3), later)
    assert reasons(restarted) == ["AnalysisRestarted"]
    assert "Production or candidate changed in spec" in restarted.notices[0].message
    assert (restarted.status.current_step, restarted.status.current_weight) == (0, 5)
    assert restarted.status.analysis_started_at == later
    assert restarted.status.last_decision is not None
    assert restarted.status.last_decision.action is DecisionAction.RESTART


def test_paused_freezes_the_weight_until_resumed() -> None:
    pause = {"spec": {"paused": True, "traffic": {"steps": [40, 60]}}}
    paused = plan_rollout(after(started(), pause), T0)
    assert reasons(paused) == ["Paused"]
    assert (paused.status.phase, paused.status.current_weight) == (Phase.PAUSED, 5)
    assert condition(paused, ConditionType.PROGRESSING) == ("False", "Paused")

    still = plan_rollout(after(paused, pause), T0 + timedelta(minutes=1), analyse=True)
    assert reasons(still) == []
    assert still.status.current_weight == 5
    assert still.status.last_decision == paused.status.last_decision  # no analysis while paused

    resumed = plan_rollout(after(paused, {"spec": {"paused": False, "traffic": {"steps": [40, 60]}}}), T0)
    assert reasons(resumed) == ["Resumed"]
    assert (resumed.status.phase, resumed.status.current_weight) == (Phase.PROGRESSING, 40)


ACTION = "shadowgate.io/action"


@pytest.mark.parametrize(
    ("phase", "verb", "expected_phase", "weight", "event"),
    [
        ("Progressing", "promote", Phase.PROMOTED, 100, "Promoted"),
        ("Paused", "promote", Phase.PROMOTED, 100, "Promoted"),
        ("Progressing", "abort", Phase.ROLLED_BACK, 0, "RolledBack"),
        ("RolledBack", "retry", Phase.PROGRESSING, 5, "AnalysisRestarted"),
        ("Promoted", "retry", Phase.PROGRESSING, 5, "AnalysisRestarted"),
        ("Progressing", "retry", Phase.PROGRESSING, 5, "ActionIgnored"),
        ("Promoted", "abort", Phase.PROMOTED, 100, "ActionIgnored"),
        ("RolledBack", "promote", Phase.ROLLED_BACK, 0, "ActionIgnored"),
    ],
)
def test_manual_verbs(phase: str, verb: str, expected_phase: Phase, weight: int, event: str) -> None:
    status = started().status.to_dict() | {"phase": phase}
    plan = plan_rollout(resource({"status": status, "metadata": {"annotations": {ACTION: verb}}}), T0)
    assert reasons(plan) == [event]
    assert (plan.status.phase, plan.status.current_weight) == (expected_phase, weight)
    assert plan.status.last_action is not None
    assert (plan.status.last_action.verb.value, plan.status.last_action.value) == (verb, verb)
    if event != "ActionIgnored":
        assert f"({ACTION}={verb})" in plan.notices[0].message
        assert condition(plan, ConditionType.PROGRESSING)[1] == event


def test_a_verb_is_acted_on_once_and_again_with_a_new_nonce() -> None:
    annotated = {"metadata": {"annotations": {ACTION: "promote"}}}
    promoted = plan_rollout(after(started(), annotated), T0)
    assert reasons(promoted) == ["Promoted"]
    assert reasons(plan_rollout(after(promoted, annotated), T0)) == []
    retried = plan_rollout(after(promoted, {"metadata": {"annotations": {ACTION: "retry:2"}}}), T0)
    assert reasons(retried) == ["AnalysisRestarted"]


def test_an_unknown_verb_is_a_warning_and_changes_nothing() -> None:
    first = started()
    plan = plan_rollout(after(first, {"metadata": {"annotations": {ACTION: "launch"}}}), T0)
    assert [(n.type, n.reason) for n in plan.notices] == [("Warning", "InvalidAction")]
    assert "unknown verb (use promote, abort, retry)" in plan.notices[0].message
    assert plan.status.to_dict() == first.status.to_dict()


def test_the_analysis_holds_and_says_why_without_churn() -> None:
    first = plan_rollout(after(started()), T0, analyse=True)
    decision = first.status.last_decision
    assert decision is not None
    assert decision.action is DecisionAction.WAIT
    assert decision.reason == "Waiting at step 1 of 3 (5% shadow): no analysis data yet."
    again = plan_rollout(after(first), T0 + timedelta(seconds=30), analyse=True)
    assert again.status.to_dict() == first.status.to_dict()  # same decision: no new time, no status write


NO_TRAFFIC = WindowMetrics(
    production=SideMetrics(requests=0, latency_p99_ms=None),
    candidate=SideMetrics(requests=0, latency_p99_ms=None),
    scored=0,
    paired=True,
)


def test_an_idle_rollout_plans_the_same_status_at_every_analysis() -> None:
    """No traffic: each analysis decides the same Wait on an empty window, so the status (what the operator
    writes) stays as the first analysis left it, lastDecision.time included (when the decision last
    changed, not when it was last re-checked): an idle rollout costs no status write per interval."""
    first = plan_rollout(after(started()), T0, analyse=True, metrics=NO_TRAFFIC)
    assert first.status.last_decision is not None
    assert first.status.last_decision.reason.startswith("Waiting for samples at step 1 of 3")
    assert first.status.metrics is not None and first.status.metrics.p_value is None  # no test ran yet
    plan = first
    for look in range(1, 4):
        plan = plan_rollout(after(plan), T0 + timedelta(seconds=30 * look), analyse=True, metrics=NO_TRAFFIC)
        assert plan.notices == ()
        assert plan.status.to_dict() == first.status.to_dict(), f"analysis {look + 1} changed the status"


def test_last_decision_time_is_when_the_decision_last_changed() -> None:
    first = plan_rollout(after(started()), T0, analyse=True, metrics=NO_TRAFFIC)
    same = plan_rollout(after(first), T0 + timedelta(minutes=5), analyse=True, metrics=NO_TRAFFIC)
    assert same.status.last_decision == first.status.last_decision
    later = T0 + timedelta(minutes=10)
    changed = plan_rollout(after(first), later, analyse=True, metrics=window(40))  # new numbers, new reason
    assert changed.status.last_decision is not None and changed.status.last_decision.time == later
    assert changed.status.last_decision.reason != first.status.last_decision.reason


def test_an_advance_reports_the_samples_it_judged_though_the_next_step_starts_at_zero() -> None:
    n = 400
    metrics = WindowMetrics(
        production=SideMetrics(requests=n, latency_p99_ms=10.0, loss=Moments(n, 0.7 * n, 0.7 * 0.7 * n + n)),
        candidate=SideMetrics(requests=n, latency_p99_ms=10.0, loss=Moments(n, 0.5 * n, 0.5 * 0.5 * n + n)),
        scored=n,
        paired=True,
        # differences with mean 0.2 and variance 0.25, no skew (the power sums of a normal sample)
        loss_difference=Moments(n, 0.2 * n, 0.29 * n, 0.158 * n, 0.2491 * n),
    )
    advanced = plan_rollout(after(started()), T0 + timedelta(seconds=30), analyse=True, metrics=metrics)
    assert reasons(advanced) == ["StepAdvanced"]
    assert (advanced.status.current_step, advanced.status.samples, advanced.judged_samples) == (1, 0, n)
    assert plan_rollout(after(advanced), T0 + timedelta(seconds=31)).judged_samples is None  # no analysis, no count
    evidence = advanced.status.evidence
    assert evidence is not None and evidence.since == advanced.status.analysis_started_at
    assert evidence.p_better < 0.01, "written to status: the next shadow step goes on from it"


def test_a_change_of_analysis_settings_restarts_the_analysis_with_no_evidence() -> None:
    """A log-loss p-value says nothing about accuracy: a new metric (or lossCap, mode, sticky key, segments)
    restarts at step 1 without the old evidence (issue 11)."""
    first = started()
    assert first.status.analysis_revision == resource().spec.analysis_revision()
    evidence = {"since": "2026-11-25T09:30:00Z", "pBetter": 0.001, "pWorse": 1.0}
    carrying = {"status": {"currentStep": 1, "evidence": evidence}}
    plan = plan_rollout(
        after(first, {**carrying, "spec": {"analysis": {"metric": "accuracy"}}}), T0 + timedelta(minutes=5)
    )
    assert reasons(plan) == ["AnalysisRestarted"]
    assert (plan.status.current_step, plan.status.evidence) == (0, None)
    assert plan.status.analysis_revision != first.status.analysis_revision
    # The same settings: the evidence stays.
    same = plan_rollout(after(first, carrying), T0 + timedelta(minutes=5))
    assert reasons(same) == [] and same.status.evidence is not None
    # An operator from before the analysis revision left none: adopted, nothing restarts.
    older = plan_rollout(
        after(first, {"status": {"currentStep": 1, "analysisRevision": None}}), T0 + timedelta(minutes=5)
    )
    assert reasons(older) == [] and older.status.current_step == 1
    assert older.status.analysis_revision == first.status.analysis_revision


def test_a_database_away_for_longer_than_max_step_duration_ends_the_step() -> None:
    """Issue 12 D7: 'Waiting for data' must not keep a candidate's share for as long as the database is away."""
    limited = {"spec": {"analysis": {"maxStepDuration": "10m"}}}
    problem = "cannot query the database: ConnectionRefusedError"
    waiting = plan_rollout(after(started(), limited), T0 + timedelta(minutes=9), analyse=True, data_problem=problem)
    assert waiting.status.last_decision is not None
    assert waiting.status.last_decision.action is DecisionAction.WAIT
    failed = plan_rollout(after(started(), limited), T0 + timedelta(minutes=10), analyse=True, data_problem=problem)
    assert failed.status.phase is Phase.FAILED and failed.status.current_weight == 0
    assert failed.status.last_decision is not None
    assert failed.status.last_decision.reason.startswith("No analysis possible for maxStepDuration 10m at step 1")
    assert problem in failed.status.last_decision.reason


def test_a_refused_api_call_makes_ready_false_and_leaves_the_rollout_alone() -> None:
    problem = "The operator may not apply Deployment models/fraud-detector-router: ... Grant it in the ClusterRole x."
    router = RouterState(available_replicas=2, desired_replicas=2)
    denied = plan_rollout(after(started()), T0 + timedelta(seconds=1), router=router, permission_problem=problem)
    assert condition(denied, ConditionType.READY) == ("False", "PermissionDenied")
    ready = denied.status.condition(ConditionType.READY)
    assert ready is not None and ready.message == problem
    assert reasons(denied) == []  # the Reconciler records the Warning: it knows which call was refused
    assert (denied.status.phase, denied.status.current_weight) == (Phase.PROGRESSING, 5)
    healed = plan_rollout(after(denied), T0 + timedelta(seconds=2), router=router)
    assert condition(healed, ConditionType.READY) == ("True", "RouterAvailable")


def test_a_blocked_router_makes_ready_false_with_its_own_reason() -> None:
    router = RouterState(available_replicas=2, desired_replicas=2)
    refused = Blocked("RouterRefused", "The API server refused Deployment models/x-router: ... Invalid value")
    blocked = plan_rollout(after(started()), T0 + timedelta(seconds=1), router=router, blocked=refused)
    assert condition(blocked, ConditionType.READY) == ("False", "RouterRefused")
    assert (blocked.status.phase, blocked.status.current_weight) == (Phase.PROGRESSING, 5)
    # A refused permission is named first: it is what a person fixes first.
    both = plan_rollout(after(started()), T0 + timedelta(seconds=1), router=router, blocked=refused,
                        permission_problem="The operator may not ...")  # fmt: skip
    assert condition(both, ConditionType.READY) == ("False", "PermissionDenied")
    healed = plan_rollout(after(blocked), T0 + timedelta(seconds=2), router=router)
    assert condition(healed, ConditionType.READY) == ("True", "RouterAvailable")


def window(n: int) -> WindowMetrics:
    """A window of n scored requests where the candidate is clearly better (shadow mode)."""
    return WindowMetrics(
        production=SideMetrics(requests=n, latency_p99_ms=10.0, loss=Moments(n, 0.7 * n, 0.7 * 0.7 * n + n)),
        candidate=SideMetrics(requests=n, latency_p99_ms=10.0, loss=Moments(n, 0.5 * n, 0.5 * 0.5 * n + n)),
        scored=n,
        paired=True,
        loss_difference=Moments(n, 0.2 * n, 0.2 * 0.2 * n + 0.25 * n),
    )


def test_kubectl_get_shows_the_step_and_a_score_only_once_the_step_has_min_samples() -> None:
    """status.step and status.score are the Step and Score columns: the score is blank while it would be
    latency and errors alone (fewer than minSamples scored requests)."""
    first = started()
    assert (first.status.step, first.status.score) == ("1/3", None)
    early = plan_rollout(after(first), T0 + timedelta(seconds=30), analyse=True, metrics=window(40))
    assert early.status.metrics is not None and early.status.metrics.overall_score is not None
    assert (early.status.step, early.status.samples, early.status.score) == ("1/3", 40, None)
    judged = plan_rollout(after(early), T0 + timedelta(seconds=60), analyse=True, metrics=window(40_000))
    assert reasons(judged) == ["StepAdvanced"]  # the next step starts with no samples: no score again
    assert (judged.status.step, judged.status.samples, judged.status.score) == ("2/3", 0, None)
    promoted = plan_rollout(after(first, {"spec": {"traffic": {"steps": [5]}}}), T0, analyse=True, metrics=window(400))
    assert promoted.status.phase is Phase.PROMOTED
    assert promoted.status.metrics is not None
    assert (promoted.status.step, promoted.status.score) == ("1/1", promoted.status.metrics.overall_score)


def test_require_approval_holds_a_passing_candidate_at_its_last_step_until_a_person_promotes() -> None:
    held_spec = resource({"spec": {"analysis": {"requireApproval": True}}})
    last = started().status.model_copy(update={"current_step": 2, "current_weight": 20})
    passed = Decision(action=DecisionAction.PROMOTE, reason="Step 3 passed: score 0.81 >= 0.7.", time=T0)
    held, notices = apply_decision(held_spec.spec, last, passed, T0)
    assert [(n.type, n.reason) for n in notices] == [("Normal", "AwaitingApproval")]
    assert "Step 3 passed: score 0.81 >= 0.7." in notices[0].message and "kubectl shadow promote" in notices[0].message
    assert (held.phase, held.current_step, held.current_weight) == (Phase.PROGRESSING, 2, 20)
    assert held.last_decision is not None and held.last_decision.action is DecisionAction.WAIT
    # The next analysis that passes again: no second Event; new numbers only update the decision's reason.
    assert apply_decision(held_spec.spec, held, passed, T0) == (held, [])
    again = Decision(action=DecisionAction.PROMOTE, reason="Step 3 passed: score 0.83 >= 0.7.", time=T0)
    updated, notices = apply_decision(held_spec.spec, held, again, T0)
    assert notices == [] and updated.last_decision is not None and "0.83" in updated.last_decision.reason
    # Without requireApproval the same decision promotes; with it, the person's promote does.
    assert apply_decision(resource().spec, last, passed, T0)[0].phase is Phase.PROMOTED
    approved = resource(
        {"spec": {"analysis": {"requireApproval": True}}, "status": held.to_dict(),
         "metadata": {"annotations": {ACTION: "promote"}}}
    )  # fmt: skip
    plan = plan_rollout(approved, T0)
    assert reasons(plan) == ["Promoted"] and plan.status.phase is Phase.PROMOTED


def test_require_approval_still_rolls_back_a_candidate_that_turns_bad_while_it_waits() -> None:
    spec = resource({"spec": {"analysis": {"requireApproval": True}}}).spec
    last = started().status.model_copy(update={"current_step": 2, "current_weight": 20})
    passed = Decision(action=DecisionAction.PROMOTE, reason="Step 3 passed.", time=T0)
    held, _ = apply_decision(spec, last, passed, T0)
    worse = Decision(action=DecisionAction.ROLL_BACK, reason="Error rate 0.12 > maxErrorRate 0.05.", time=T0)
    rolled_back, notices = apply_decision(spec, held, worse, T0)
    assert rolled_back.phase is Phase.ROLLED_BACK and [n.reason for n in notices] == ["RolledBack"]
