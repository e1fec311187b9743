"""Whether a move's gates let it through: pure, no I/O.

A plan that would start the analysis (preRollout), advance a step (confirmStep) or promote
(confirmPromotion) `consult`s the gates of that moment with the answers it was given (`GateReply`, from
gates.call). A gate without an answer to this very question (its `key`) is to be asked (`GateCall`): the
plan holds meanwhile and the Reconciler plans again once it has the answers. All answered and each passes
(2xx, or a timeout where onTimeout is proceed): the move goes on. Otherwise the rollout holds where it is,
and status.gate (`GateWait`) says since when, by whom and with what answer; the next analysis asks again.

After a rollback, the postRollback gates are `tell`-ed once each: their answers are shown, never acted on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shadowgate_operator.api import (
    ConditionStatus,
    ConditionType,
    Gate,
    GateAnswer,
    GateOutcome,
    GateTimeoutAction,
    GateType,
    GateWait,
    ShadowDeploymentStatus,
)
from shadowgate_operator.conditions import set_condition

ANSWER_LIMIT = 200
"""Characters of a gate's answer (its body) shown in status, conditions and Events."""
MESSAGE_LIMIT = 512
"""Characters of a reply's message in status (the answer, or why there was none)."""
WARNING_REASONS: Mapping[GateOutcome, str] = {
    GateOutcome.REFUSED: "GateRefused",
    GateOutcome.TIMED_OUT: "GateTimedOut",
    GateOutcome.UNREACHABLE: "GateUnreachable",
    GateOutcome.NOT_ALLOWED: "SecretNotAllowed",
}
"""The Warning (and GatesOpen reason) of each answer that does not pass."""
GATE_WARNINGS = frozenset({"GateRefused", "GateTimedOut", "GateUnreachable"})
"""The Warnings gates give, once per cause while it stays (an unlabelled Secret is said by the Ready check,
as SecretNotAllowed)."""
HOLDS = (GateType.PRE_ROLLOUT, GateType.CONFIRM_STEP, GateType.CONFIRM_PROMOTION)


@dataclass(frozen=True)
class GateCall:
    """A gate to ask now, and the question."""

    gate: Gate
    key: str
    """The question (moment, candidate, step): an answer counts only for the question it was given to."""
    purpose: str
    """What it is asked to let through (or told of), in words: the CloudEvent's message."""


@dataclass(frozen=True)
class GateReply:
    """What a gate answered (gates.call), or why it did not."""

    gate: str
    key: str
    outcome: GateOutcome
    message: str = ""

    def answer(self) -> GateAnswer:
        return GateAnswer(name=self.gate, outcome=self.outcome, message=self.message[:MESSAGE_LIMIT])


def gate_key(moment: GateType, revision: str | None, step: int, since: dt.datetime | None = None) -> str:
    """The question a gate is asked: the same moment, candidate and step (and rollback) is the same question."""
    key = f"{moment.value}:{revision or '-'}:{step}"
    return key if since is None else f"{key}:{since.isoformat()}"


def passes(gate: Gate | None, answer: GateAnswer) -> bool:
    """Whether `answer` lets the move through: 2xx, or a timeout of a gate that proceeds on timeout."""
    if answer.outcome is GateOutcome.PASSED:
        return True
    return answer.outcome is GateOutcome.TIMED_OUT and gate is not None and gate.on_timeout is GateTimeoutAction.PROCEED


def describe(answer: GateAnswer) -> str:
    words = {
        GateOutcome.PASSED: "let it through",
        GateOutcome.REFUSED: "refused",
        GateOutcome.TIMED_OUT: "did not answer in time",
        GateOutcome.UNREACHABLE: "could not be asked",
        GateOutcome.NOT_ALLOWED: "was not asked",
    }[answer.outcome]
    return f"gate {answer.name} {words}" + (f" ({answer.message})" if answer.message else "")


@dataclass(frozen=True)
class Consultation:
    """What the gates of a move said."""

    open: bool
    asks: tuple[GateCall, ...] = ()
    """Gates without an answer to this question: to be asked before the plan can say."""
    wait: GateWait | None = None
    """The hold to show in status.gate (None when open)."""
    answers: tuple[GateAnswer, ...] = ()

    @property
    def summary(self) -> str:
        """The answers that let it through, for the transition's reason ('' when no gate was asked)."""
        if not self.answers:
            return ""
        return "Gates: " + "; ".join(describe(answer) for answer in self.answers) + "."

    @property
    def message(self) -> str:
        """Why the rollout is held, in words (status.message, lastDecision)."""
        if self.wait is None:
            return ""
        return hold_message(self.wait)


def hold_message(wait: GateWait) -> str:
    held = [describe(answer) for answer in wait.answers if answer.outcome is not GateOutcome.PASSED]
    asked = ", ".join(held) if held else "asking the gates"
    return f"Held by gates ({wait.type.value}) before {wait.purpose}: {asked}."


def consult(
    gates: Sequence[Gate],
    moment: GateType,
    key: str,
    purpose: str,
    replies: Mapping[str, GateReply],
    *,
    step: int | None,
    previous: GateWait | None,
    now: dt.datetime,
) -> Consultation:
    """The verdict of the `moment` gates on the move `purpose` (question `key`), from `replies` by gate name.
    A hold keeps the time it began (`previous`, when it was a hold of the same moment and step)."""
    guarding = [gate for gate in gates if gate.type is moment]
    if not guarding:
        return Consultation(open=True)
    fresh = {
        gate.name: replies[gate.name] for gate in guarding if gate.name in replies and replies[gate.name].key == key
    }
    asks = tuple(GateCall(gate, key, purpose) for gate in guarding if gate.name not in fresh)
    answers = tuple(fresh[gate.name].answer() for gate in guarding if gate.name in fresh)
    if not asks and all(passes(gate, fresh[gate.name].answer()) for gate in guarding):
        return Consultation(open=True, answers=answers)
    same = previous is not None and previous.type is moment and previous.step == step
    since = previous.since if same and previous is not None else now.replace(microsecond=0)
    wait = GateWait(type=moment, step=step, since=since, purpose=purpose[:512], answers=list(answers))
    return Consultation(open=False, asks=asks, wait=wait, answers=answers)


def tell(
    gates: Sequence[Gate], wait: GateWait, key: str, replies: Mapping[str, GateReply]
) -> tuple[GateWait, tuple[GateCall, ...]]:
    """After a rollback: `wait` (status.gate, type postRollback) with the replies to its question added, and
    the postRollback gates not told yet. Each gate is told once; what it answers is shown, not acted on."""
    told = {answer.name for answer in wait.answers}
    answers = list(wait.answers)
    calls = []
    for gate in gates:
        if gate.type is not GateType.POST_ROLLBACK or gate.name in told:
            continue
        reply = replies.get(gate.name)
        if reply is not None and reply.key == key:
            answers.append(reply.answer())
        else:
            calls.append(GateCall(gate, key, wait.purpose))
    if len(answers) != len(wait.answers):
        wait = wait.model_copy(update={"answers": answers[:8]})
    return wait, tuple(calls)


def _failing(gates: Sequence[Gate], wait: GateWait) -> list[GateAnswer]:
    by_name = {gate.name: gate for gate in gates}
    return [answer for answer in wait.answers if not passes(by_name.get(answer.name), answer)]


def warnings(gates: Sequence[Gate], wait: GateWait | None) -> list[tuple[str, str]]:
    """(reason, message) of each Warning the gates' answers give while they stay (said once per cause)."""
    if wait is None:
        return []
    consequence = (
        "the rollback stands" if wait.type is GateType.POST_ROLLBACK else f"the rollout holds before {wait.purpose}"
    )
    return [
        (WARNING_REASONS[answer.outcome], f"Gate {answer.name} ({wait.type.value}): {describe(answer)}; {consequence}.")
        for answer in _failing(gates, wait)
        if WARNING_REASONS[answer.outcome] in GATE_WARNINGS
    ]


def gates_condition(
    status: ShadowDeploymentStatus, gates: Sequence[Gate], generation: int | None, now: dt.datetime
) -> ShadowDeploymentStatus:
    """status with GatesOpen following status.gate: True while no gate holds the rollout, False (the first
    failing answer's reason: GateRefused, GateTimedOut, GateUnreachable, SecretNotAllowed) while one does or
    a postRollback gate failed, Unknown while gates are being asked; absent when spec.gates is empty."""
    kept = [c for c in status.conditions if c.type is not ConditionType.GATES_OPEN]
    wait = status.gate
    if not gates:
        conditions = kept
    elif wait is None:
        conditions = set_condition(
            status.conditions, ConditionType.GATES_OPEN, ConditionStatus.TRUE, "Open", "No gate holds the rollout.",
            generation, now,
        )  # fmt: skip
    else:
        failing = _failing(gates, wait)
        told = wait.type is GateType.POST_ROLLBACK
        if failing:
            message = "; ".join(describe(answer) for answer in failing)
            message = f"After the rollback: {message}; the rollback stands." if told else hold_message(wait)
            state = (ConditionStatus.FALSE, WARNING_REASONS[failing[0].outcome], message)
        elif told and len(wait.answers) >= sum(gate.type is GateType.POST_ROLLBACK for gate in gates):
            state = (ConditionStatus.TRUE, "Open", "The postRollback gates were told of the rollback (2xx).")
        elif told:
            state = (ConditionStatus.UNKNOWN, "Telling", "Telling the postRollback gates of the rollback.")
        else:
            state = (ConditionStatus.UNKNOWN, "Asking", hold_message(wait))
        conditions = set_condition(status.conditions, ConditionType.GATES_OPEN, *state, generation, now)
    if conditions == list(status.conditions):
        return status
    return status.model_copy(update={"conditions": conditions})
