"""Gates (spec.gates), the pure part: which moves ask which gates, what their answers do to the plan.

The Reconciler plans, asks the gates a plan names (Plan.asks), and plans again with their answers
(`gates=`); these tests play both sides with GateReply values in place of HTTP calls.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from shadowgate_operator.api import ConditionType, DecisionAction, GateOutcome, GateType, Phase
from shadowgate_operator.gates.verdict import MESSAGE_LIMIT, GateReply
from shadowgate_operator.metrics import Moments, SideMetrics, WindowMetrics
from shadowgate_operator.rollout import Plan, plan_rollout
from tests.unit.test_rollout import ACTION, T0, after, condition, reasons, resource, window

Replies = dict[str, GateReply]


def gate(name: str, moment: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": moment, "urlSecretRef": {"name": "gates"}, **extra}


def gated(*gates: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"spec": {"gates": list(gates), **spec}}


def answer(plan: Plan, outcome: GateOutcome, message: str = "", *, only: str | None = None) -> Replies:
    """What the Reconciler would hand the next plan: each asked gate's reply to the question it was asked."""
    assert plan.asks, "the plan asks no gate"
    return {
        call.gate.name: GateReply(call.gate.name, call.key, outcome, message)
        for call in plan.asks
        if only is None or call.gate.name == only
    }


def both_passes(sd_patch: dict[str, Any], outcome: GateOutcome, message: str = "", **kwargs: Any) -> Plan:
    """Plan, ask the gates it names, plan again with their answers (what the Reconciler does)."""
    sd = resource(sd_patch)
    first = plan_rollout(sd, T0, **kwargs)
    return plan_rollout(sd, T0, gates=answer(first, outcome, message), **kwargs)


def warnings(plan: Plan) -> list[tuple[str, str]]:
    return [(notice.reason, notice.message) for notice in plan.notices if notice.type == "Warning"]


# --- preRollout --------------------------------------------------------------------------------------


def test_a_pre_rollout_gate_is_asked_before_the_candidate_gets_any_traffic() -> None:
    spec = gated(gate("smoke", "preRollout"))
    first = plan_rollout(resource(spec), T0)
    assert [(call.gate.name, call.gate.type) for call in first.asks] == [("smoke", GateType.PRE_ROLLOUT)]
    assert "the candidate's first traffic" in first.asks[0].purpose
    assert (first.status.phase, first.status.current_weight) == (Phase.PENDING, 0)
    assert reasons(first) == []  # nothing is announced before the gate answers

    refused = plan_rollout(resource(spec), T0, gates=answer(first, GateOutcome.REFUSED, "HTTP 500: 'smoke failing'"))
    assert refused.asks == ()
    status = refused.status
    assert (status.phase, status.current_weight, status.current_step) == (Phase.PENDING, 0, 0)
    assert status.gate is not None and status.gate.type is GateType.PRE_ROLLOUT and status.gate.since == T0
    assert condition(refused, ConditionType.GATES_OPEN) == ("False", "GateRefused")
    gates_open = status.condition(ConditionType.GATES_OPEN)
    assert gates_open is not None and "gate smoke refused (HTTP 500: 'smoke failing')" in gates_open.message
    assert "HTTP 500: 'smoke failing'" in (status.message or "")
    assert condition(refused, ConditionType.PROGRESSING) == ("Unknown", "AwaitingGates")
    assert warnings(refused) == [
        (
            "GateRefused",
            "Gate smoke (preRollout): gate smoke refused (HTTP 500: 'smoke failing'); the rollout holds before "
            "the candidate's first traffic (mirroring 5% of requests to candidate fraud-v2 2.0.0 (step 1 of 3, "
            "shadow mode)).",
        )
    ]
    assert refused.transition is None

    # The next reconcile asks again (the Reconciler answers from what it remembers within an interval):
    # the same answer changes nothing in status, so nothing is written.
    later = T0 + timedelta(seconds=30)
    again = plan_rollout(after(refused, spec), later)
    assert [call.gate.name for call in again.asks] == ["smoke"]
    refusal = answer(again, GateOutcome.REFUSED, "HTTP 500: 'smoke failing'")
    same = plan_rollout(after(refused, spec), later, gates=refusal)
    assert same.status.to_dict() == refused.status.to_dict()
    assert warnings(same) == warnings(refused)  # said once by the Reconciler: same cause, same message

    opened = plan_rollout(after(refused, spec), later, gates=answer(again, GateOutcome.PASSED, "HTTP 200"))
    assert reasons(opened) == ["AnalysisStarted"]
    assert (opened.status.phase, opened.status.current_weight, opened.status.gate) == (Phase.PROGRESSING, 5, None)
    assert opened.status.analysis_started_at == later, "the evidence starts with the candidate's traffic"
    assert condition(opened, ConditionType.GATES_OPEN) == ("True", "Open")
    assert warnings(opened) == []


def test_a_gate_answers_only_the_question_it_was_asked() -> None:
    spec = gated(gate("smoke", "preRollout"))
    first = plan_rollout(resource(spec), T0)
    stale = {"smoke": GateReply("smoke", "preRollout:another-candidate:0", GateOutcome.PASSED)}
    plan = plan_rollout(resource(spec), T0, gates=stale)
    assert [call.key for call in plan.asks] == [call.key for call in first.asks]
    assert plan.status.phase is Phase.PENDING


def test_a_retry_waits_for_the_pre_rollout_gates_with_no_traffic_to_the_candidate() -> None:
    spec = gated(gate("smoke", "preRollout"))
    ok = both_passes(spec, GateOutcome.PASSED)
    promoted = plan_rollout(after(ok, {**spec, "metadata": {"annotations": {ACTION: "promote"}}}), T0)
    assert promoted.status.phase is Phase.PROMOTED
    retry = {**spec, "metadata": {"annotations": {ACTION: "retry:1"}}}
    asked = plan_rollout(after(promoted, retry), T0 + timedelta(minutes=1))
    held = plan_rollout(
        after(promoted, retry), T0 + timedelta(minutes=1), gates=answer(asked, GateOutcome.TIMED_OUT, "no answer")
    )
    assert reasons(held) == ["AwaitingGates", "GateTimedOut"] and f"({ACTION}=retry:1)" in held.notices[0].message
    assert (held.status.phase, held.status.current_weight) == (Phase.PENDING, 0)
    assert condition(held, ConditionType.GATES_OPEN) == ("False", "GateTimedOut")
    assert condition(held, ConditionType.PROGRESSING) == ("Unknown", "AwaitingGates")
    assert held.status.last_action is not None  # the verb is handled once; the hold goes on by itself
    started = plan_rollout(after(held, retry), T0 + timedelta(minutes=2), gates=answer(asked, GateOutcome.PASSED))
    assert reasons(started) == ["AnalysisStarted"] and started.status.current_weight == 5


# --- confirmStep, confirmPromotion -------------------------------------------------------------------


def test_a_step_advance_asks_the_confirm_step_gates_and_holds_until_they_say_yes() -> None:
    spec = gated(gate("load", "confirmStep"), gate("final", "confirmPromotion"))
    running = plan_rollout(resource(spec), T0)
    assert running.asks == () and running.status.phase is Phase.PROGRESSING  # no preRollout gate
    moment = T0 + timedelta(seconds=30)
    passing = window(400)
    asked = plan_rollout(after(running, spec), moment, analyse=True, metrics=passing)
    assert [(call.gate.name, call.key.split(":")[0]) for call in asked.asks] == [("load", "confirmStep")]
    assert "step 2 of 3 (10% of requests to the candidate)" in asked.asks[0].purpose

    held = plan_rollout(
        after(running, spec), moment, analyse=True, metrics=passing,
        gates=answer(asked, GateOutcome.REFUSED, "HTTP 503: 'load test running'"),
    )  # fmt: skip
    status = held.status
    assert (status.phase, status.current_step, status.current_weight) == (Phase.PROGRESSING, 0, 5)
    assert status.last_decision is not None and status.last_decision.action is DecisionAction.WAIT
    assert status.last_decision.reason.startswith("Held by gates (confirmStep) before step 2 of 3")
    assert "The analysis passed:" in status.last_decision.reason
    assert status.samples == 400, "the analysis goes on while held"
    assert condition(held, ConditionType.GATES_OPEN) == ("False", "GateRefused")
    assert [reason for reason, _ in warnings(held)] == ["GateRefused"]
    assert reasons(held) == ["GateRefused"] and held.transition is None

    # Between analyses the hold stays, and nothing is asked.
    between = plan_rollout(after(held, spec), moment + timedelta(seconds=5))
    assert between.asks == () and between.status.gate == status.gate
    assert between.status.to_dict() == status.to_dict()

    # The next analysis asks again; a yes advances.
    moment += timedelta(seconds=30)
    again = plan_rollout(after(held, spec), moment, analyse=True, metrics=passing)
    assert [call.gate.name for call in again.asks] == ["load"]
    advanced = plan_rollout(
        after(held, spec), moment, analyse=True, metrics=passing, gates=answer(again, GateOutcome.PASSED, "HTTP 200")
    )
    assert reasons(advanced) == ["StepAdvanced"]
    assert (advanced.status.current_step, advanced.status.current_weight, advanced.status.gate) == (1, 10, None)
    assert "Gates: gate load let it through (HTTP 200)." in advanced.notices[0].message
    assert condition(advanced, ConditionType.GATES_OPEN) == ("True", "Open")


def test_a_hold_ends_when_the_analysis_stops_asking_for_the_move() -> None:
    spec = gated(gate("load", "confirmStep"))
    running = plan_rollout(resource(spec), T0)
    moment = T0 + timedelta(seconds=30)
    asked = plan_rollout(after(running, spec), moment, analyse=True, metrics=window(400))
    held = plan_rollout(
        after(running, spec), moment, analyse=True, metrics=window(400), gates=answer(asked, GateOutcome.REFUSED)
    )
    assert held.status.gate is not None
    undecided = plan_rollout(after(held, spec), moment + timedelta(seconds=30), analyse=True, metrics=window(10))
    assert undecided.asks == () and undecided.status.gate is None
    assert undecided.status.message == "Progressing: mirroring 5% of requests to candidate fraud-v2 2.0.0 " \
        "(step 1 of 3, shadow mode)."  # fmt: skip
    assert condition(undecided, ConditionType.GATES_OPEN) == ("True", "Open")


@pytest.mark.parametrize(("on_timeout", "phase"), [("hold", Phase.PROGRESSING), ("proceed", Phase.PROMOTED)])
def test_on_timeout_says_what_a_gate_that_does_not_answer_means(on_timeout: str, phase: Phase) -> None:
    spec = gated(gate("final", "confirmPromotion", onTimeout=on_timeout), traffic={"steps": [5]})
    running = plan_rollout(resource(spec), T0)
    moment = T0 + timedelta(seconds=30)
    asked = plan_rollout(after(running, spec), moment, analyse=True, metrics=window(400))
    assert "the promotion of candidate fraud-v2 2.0.0" in asked.asks[0].purpose
    plan = plan_rollout(
        after(running, spec), moment, analyse=True, metrics=window(400),
        gates=answer(asked, GateOutcome.TIMED_OUT, "no answer within 10s"),
    )  # fmt: skip
    assert plan.status.phase is phase
    if phase is Phase.PROMOTED:
        assert "gate final did not answer in time (no answer within 10s)" in plan.notices[0].message
        assert condition(plan, ConditionType.GATES_OPEN) == ("True", "Open")
    else:
        assert condition(plan, ConditionType.GATES_OPEN) == ("False", "GateTimedOut")


def test_confirm_promotion_comes_before_require_approval_and_a_person_is_not_asked_about() -> None:
    spec = gated(gate("final", "confirmPromotion"), traffic={"steps": [5]}, analysis={"requireApproval": True})
    running = plan_rollout(resource(spec), T0)
    moment = T0 + timedelta(seconds=30)
    asked = plan_rollout(after(running, spec), moment, analyse=True, metrics=window(400))
    held = plan_rollout(
        after(running, spec), moment, analyse=True, metrics=window(400), gates=answer(asked, GateOutcome.REFUSED)
    )
    assert reasons(held) == ["GateRefused"]  # no AwaitingApproval before the gate says yes
    waiting = plan_rollout(
        after(running, spec), moment, analyse=True, metrics=window(400), gates=answer(asked, GateOutcome.PASSED)
    )
    assert reasons(waiting) == ["AwaitingApproval"] and waiting.status.gate is None
    # A person's promote while a gate holds: promoted, the hold goes.
    promote = {**spec, "metadata": {"annotations": {ACTION: "promote"}}}
    promoted = plan_rollout(after(held, promote), moment + timedelta(seconds=5))
    assert promoted.asks == () and promoted.status.phase is Phase.PROMOTED and promoted.status.gate is None
    assert condition(promoted, ConditionType.GATES_OPEN) == ("True", "Open")


def test_a_gate_whose_secret_is_not_labelled_holds_without_a_warning_of_its_own() -> None:
    """The Ready check names the unlabelled Secret (SecretNotAllowed, one Warning); the gate shows it."""
    spec = gated(gate("smoke", "preRollout"))
    refusal = "Secret models/gates (spec.gates[].urlSecretRef) is not labelled shadowgate.io/router-secret=true"
    plan = both_passes(spec, GateOutcome.NOT_ALLOWED, refusal)
    assert plan.status.phase is Phase.PENDING
    assert condition(plan, ConditionType.GATES_OPEN) == ("False", "SecretNotAllowed")
    assert warnings(plan) == []


def test_an_answer_is_bounded_in_status() -> None:
    spec = gated(gate("smoke", "preRollout"))
    plan = both_passes(spec, GateOutcome.REFUSED, "x" * 5000)
    assert plan.status.gate is not None
    assert len(plan.status.gate.answers[0].message) == MESSAGE_LIMIT


def test_no_gates_no_condition_and_nothing_asked() -> None:
    plan = plan_rollout(resource(), T0)
    assert plan.asks == () and plan.status.condition(ConditionType.GATES_OPEN) is None


# --- postRollback ------------------------------------------------------------------------------------


def worse(n: int) -> WindowMetrics:
    """The candidate fails a third of its requests: the error-rate gate rolls it back."""
    ok = SideMetrics(requests=n, latency_p99_ms=10.0, loss=Moments(n, 0.5 * n, 0.5 * 0.5 * n + n))
    failing = SideMetrics(requests=n, errors=n // 3, latency_p99_ms=10.0, loss=Moments(n, 0.5 * n, 0.5 * 0.5 * n + n))
    return WindowMetrics(production=ok, candidate=failing, scored=n, paired=True,
                         loss_difference=Moments(n, 0.0, 0.25 * n))  # fmt: skip


def test_post_rollback_gates_are_told_after_the_rollback_and_never_undo_it() -> None:
    spec = gated(gate("oncall", "postRollback"), gate("load", "confirmStep"))
    running = plan_rollout(resource(spec), T0)
    moment = T0 + timedelta(seconds=30)
    rolled_back = plan_rollout(after(running, spec), moment, analyse=True, metrics=worse(400))
    assert rolled_back.status.phase is Phase.ROLLED_BACK and rolled_back.status.current_weight == 0
    # Not in the same reconcile: the rollback is written and the router follows it first.
    assert rolled_back.asks == () and rolled_back.again
    assert condition(rolled_back, ConditionType.GATES_OPEN) == ("Unknown", "Telling")

    told = plan_rollout(after(rolled_back, spec), moment + timedelta(seconds=1))
    assert [call.gate.name for call in told.asks] == ["oncall"] and not told.again
    assert told.asks[0].purpose.startswith("the rollback (")
    failed = plan_rollout(
        after(rolled_back, spec), moment + timedelta(seconds=1), gates=answer(told, GateOutcome.REFUSED, "HTTP 500")
    )
    assert failed.status.phase is Phase.ROLLED_BACK and failed.status.current_weight == 0
    assert condition(failed, ConditionType.GATES_OPEN) == ("False", "GateRefused")
    found = failed.status.condition(ConditionType.GATES_OPEN)
    assert found is not None and found.message.endswith("the rollback stands.")
    assert [reason for reason, _ in warnings(failed)] == ["GateRefused"]
    # Told once: not asked again.
    later = plan_rollout(after(failed, spec), moment + timedelta(minutes=5))
    assert later.asks == () and later.status.to_dict() == failed.status.to_dict()

    ok = plan_rollout(
        after(rolled_back, spec), moment + timedelta(seconds=1), gates=answer(told, GateOutcome.PASSED, "HTTP 204")
    )
    assert condition(ok, ConditionType.GATES_OPEN) == ("True", "Open") and warnings(ok) == []


def test_an_abort_by_hand_tells_the_post_rollback_gates_too() -> None:
    spec = gated(gate("oncall", "postRollback"))
    running = plan_rollout(resource(spec), T0)
    aborted = plan_rollout(after(running, {**spec, "metadata": {"annotations": {ACTION: "abort"}}}), T0)
    assert aborted.status.phase is Phase.ROLLED_BACK and aborted.again
    assert aborted.status.gate is not None and aborted.status.gate.type is GateType.POST_ROLLBACK
