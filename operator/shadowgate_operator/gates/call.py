"""Asking gates over HTTP: the answers a plan needs (gates.verdict decides what they mean).

`Gatekeeper.ask` takes the gates a plan names (rollout.Plan.asks) and returns each one's `GateReply`:

1. an answer to the same question given less than an analysis interval ago is reused (`Remembered`, kept in
   the object's record), so a gate is called at most about once per interval, however often the object is
   reconciled;
2. otherwise the gate's URL is read from its Secret (notify.deliver.url_from_secret, as a notification's:
   at each call, so a rotated URL is used at once; nothing is stored), only if the Secret is labelled
   shadowgate.io/router-secret=true (builders.secret_problem, the rule of every Secret a ShadowDeployment
   names); then a CloudEvent (notify.messages.gate_request) is POSTed. All of a move's gates are called
   together, each bounded by its own timeout as a whole (connect, send, answer): a gate that hangs costs
   its object's loop that timeout once per interval, never another object's loop, which run apart
   (handlers.rollout_loop).

What a reply says is bounded (the first 200 characters of the answer's body) and never holds the URL (a
Slack-like URL is a credential) nor anything else of the Secret.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from prometheus_client import CollectorRegistry, Counter

from shadowgate_operator.api import GateOutcome, ShadowDeployment
from shadowgate_operator.builders import GATE_URL_SECRET_FIELD, HELD_GATES
from shadowgate_operator.gates.verdict import ANSWER_LIMIT, MESSAGE_LIMIT, GateCall, GateReply
from shadowgate_operator.notify.deliver import SecretFault, SecretReader, url_from_secret
from shadowgate_operator.notify.messages import gate_request

logger = logging.getLogger(__name__)

USER_AGENT = "shadowgate-gates/1"
ANSWER_BYTES = 4096
"""Bytes of an answer's body read (the rest is not waited for)."""
REUSE_WITHIN = 0.9
"""An answer is reused for this share of the analysis interval: the next analysis (an interval later) asks
again, whatever the time the call itself took."""
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Remembered:
    """A gate's latest reply, the question it answered and when (time.monotonic())."""

    reply: GateReply
    at: float


class GateMetrics:
    """The gate series of the operator's /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "shadowgate_gate_calls",
            "Gate webhooks called (spec.gates), by type (preRollout, confirmStep, confirmPromotion, postRollback) "
            "and outcome (Passed, Refused, TimedOut, Unreachable, NotAllowed).",
            ["type", "outcome"],
            registry=registry,
        )


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub(" ", text).strip()


@dataclass
class Gatekeeper:
    secrets: SecretReader
    metrics: GateMetrics | None = None
    http: httpx.AsyncClient | None = None
    _own_http: bool = False

    def __post_init__(self) -> None:
        if self.http is None:
            self.http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
            self._own_http = True

    async def close(self) -> None:
        if self._own_http and self.http is not None:
            await self.http.aclose()

    async def ask(
        self, remembered: dict[str, Remembered], sd: ShadowDeployment, calls: Iterable[GateCall], interval: float
    ) -> dict[str, GateReply]:
        """Each gate's reply to its call, by gate name: remembered (`remembered`, the object's record) when it
        answered the same question less than `interval` x REUSE_WITHIN seconds ago, else asked now."""
        now = time.monotonic()
        replies: dict[str, GateReply] = {}
        due: list[GateCall] = []
        for call in calls:
            kept = remembered.get(call.gate.name)
            if kept is not None and kept.reply.key == call.key and now - kept.at < interval * REUSE_WITHIN:
                replies[call.gate.name] = kept.reply
            else:
                due.append(call)
        answered = await asyncio.gather(*(self.call(sd, call) for call in due))
        for call, reply in zip(due, answered, strict=True):
            remembered[call.gate.name] = Remembered(reply, time.monotonic())
            replies[call.gate.name] = reply
        return replies

    async def call(self, sd: ShadowDeployment, call: GateCall) -> GateReply:
        """Ask one gate now; never raises for a gate, a Secret or a network that misbehaves."""
        reply = await self._call(sd, call)
        if self.metrics is not None:
            self.metrics.calls.labels(call.gate.type.value, reply.outcome.value).inc()
        log = logger.info if reply.outcome is GateOutcome.PASSED else logger.warning
        log("%s/%s: gate %s (%s): %s %s", sd.namespace, sd.name, call.gate.name, call.gate.type.value,
            reply.outcome.value, reply.message)  # fmt: skip
        return reply

    async def _call(self, sd: ShadowDeployment, call: GateCall) -> GateReply:
        gate, ref = call.gate, call.gate.url_secret_ref

        def reply(outcome: GateOutcome, message: str) -> GateReply:
            return GateReply(gate.name, call.key, outcome, message[:MESSAGE_LIMIT])

        url = await url_from_secret(self.secrets, sd.namespace, ref.name, ref.key, GATE_URL_SECRET_FIELD, HELD_GATES)
        if isinstance(url, SecretFault):
            outcome = GateOutcome.NOT_ALLOWED if url.cause == "not_allowed" else GateOutcome.UNREACHABLE
            return reply(outcome, url.words)
        asked_at = dt.datetime.now(dt.UTC)
        envelope = gate_request(
            sd, id=f"{sd.metadata.uid or sd.name}.gate.{gate.name}.{int(asked_at.timestamp() * 1000)}", time=asked_at,
            gate=gate.name, moment=gate.type.value, purpose=call.purpose,
        )  # fmt: skip
        timeout = gate.timeout_seconds
        assert self.http is not None
        try:
            async with asyncio.timeout(timeout):
                async with self.http.stream(
                    "POST", url, content=envelope.body, headers=envelope.headers, timeout=timeout
                ) as response:
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) >= ANSWER_BYTES:
                            break
        except (TimeoutError, httpx.TimeoutException):
            return reply(GateOutcome.TIMED_OUT, f"no answer within {gate.timeout} (timed out)")
        except httpx.ConnectError:
            return reply(GateOutcome.UNREACHABLE, "cannot connect to the URL in its Secret")
        except httpx.HTTPError as exc:  # its text may hold the URL: the kind of failure only
            return reply(GateOutcome.UNREACHABLE, f"no answer: {type(exc).__name__}")
        status = response.status_code
        text = _printable(body[:ANSWER_BYTES].decode(errors="replace")).replace(url, "<url>")
        answer = f"HTTP {status}" + (f": {text[:ANSWER_LIMIT]!r}" if text else "")
        if 200 <= status < 300:
            return reply(GateOutcome.PASSED, answer)
        return reply(GateOutcome.REFUSED, answer)
