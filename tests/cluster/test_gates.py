"""Gates from the real operator: spec.gates webhooks on loopback that refuse, hang, or say yes at the fourth
try; the rollout held in sight (status, GatesOpen, a Warning), and going on by itself once a gate says yes."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat

from shadowgate_dev.localenv.process import free_port
from shadowgate_operator.migrate import migrate_dsn
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import (
    apply,
    events_for,
    eventually,
    example,
    metric,
    router_secret,
    rows,
    shadow,
    wait_phase,
    wait_reasons,
)
from tests.support.seeder import Model, Seeder

pytestmark = [pytest.mark.cluster, pytest.mark.database]

REFUSAL = "smoke tests failing: 3 of 12"
INTERVAL = 5.0


class Gates:
    """Gate webhooks on loopback, one per path (a thread of its own: the operator is another process):
    /refuse answers 500 with REFUSAL; /hang never answers (until the test ends); /flaky answers 503 three
    times, then 200; /told answers 204; /step answers 409 twice, then 200; /promote answers 200; /counting
    answers 500 with another body each time; /events (a notification receiver) 202. Records (path,
    monotonic time, headers, body) of each POST."""

    def __init__(self) -> None:
        self.port = free_port()
        self.calls: list[tuple[str, float, dict[str, str], bytes]] = []
        self.released = threading.Event()
        calls, released = self.calls, self.released

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                calls.append((self.path, time.monotonic(), dict(self.headers.items()), body))
                if self.path == "/hang":
                    released.wait(120)
                    return
                tries = sum(path == self.path for path, *_ in calls)
                status, text = {
                    "/refuse": (500, REFUSAL),
                    "/flaky": (503 if tries <= 3 else 200, "not yet" if tries <= 3 else "go"),
                    "/told": (204, ""),
                    "/step": (409 if tries <= 2 else 200, "load test running" if tries <= 2 else "ok"),
                    "/promote": (200, "approved"),
                    "/counting": (500, f"checks failing, look {tries}"),
                    "/events": (202, ""),
                }[self.path]
                answer = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def times(self, path: str) -> list[float]:
        return [at for where, at, *_ in list(self.calls) if where == path]

    def stop(self) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def gates() -> Iterator[Gates]:
    made = Gates()
    yield made
    made.stop()


def gates_open(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any] | None:
    found = shadow(kubectl, namespace, name)
    for condition in found.get("status", {}).get("conditions", []):
        if condition["type"] == "GatesOpen":
            return dict(condition)
    return None


def received(gates: Gates, name: str) -> list[Any]:
    """The CloudEvents the notification receiver (/events) got about ShadowDeployment `name`."""
    events = [
        from_http(HTTPMessage(headers=h, body=b), JSONFormat()) for p, _, h, b in list(gates.calls) if p == "/events"
    ]
    return [event for event in events if (event.get_data() or {}).get("name") == name]


def held(kubectl: Kubectl, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        condition = gates_open(kubectl, namespace, name)
        return condition if condition and (condition["status"], condition["reason"]) == ("False", reason) else None

    return eventually(probe, 60, f"{name}: GatesOpen False with reason {reason}")


@pytest.mark.timeout(600)
def test_gates_hold_the_rollout_in_sight_and_let_it_go_when_they_say_yes(
    kubectl: Kubectl,
    namespace: str,
    dsn: str,
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
    gates: Gates,
) -> None:
    asyncio.run(migrate_dsn(dsn))
    urls = {path: gates.url(f"/{path}") for path in ("refuse", "hang", "flaky", "told", "counting", "events")}
    secret = router_secret("gates", "refuse", urls["refuse"])
    secret["stringData"] = urls
    apply(kubectl, namespace, secret)

    def gated(name: str, *gate_list: dict[str, Any]) -> dict[str, Any]:
        manifest = example(name, gates=list(gate_list))
        manifest["spec"]["analysis"]["interval"] = f"{INTERVAL:g}s"
        return manifest

    def gate(name: str, moment: str, key: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": moment, "urlSecretRef": {"name": "gates", "key": key}, **extra}

    metrics = f"127.0.0.1:{free_port()}"
    operator = start_operator("--namespace", namespace, "--metrics", metrics)
    apply_shadow(namespace, gated("refused", gate("smoke", "preRollout", "refuse")))
    apply_shadow(namespace, gated("hanging", gate("load", "preRollout", "hang", timeout="2s")))
    apply_shadow(
        namespace, gated("flaky", gate("checks", "preRollout", "flaky"), gate("oncall", "postRollback", "told"))
    )
    counting = gated("counting", gate("smoke", "preRollout", "counting"))
    counting["spec"]["notifications"] = [{"name": "team", "urlSecretRef": {"name": "gates", "key": "events"}}]
    apply_shadow(namespace, counting)

    # A gate that answers 500: held before any traffic, its answer in sight, said once as a Warning.
    refused = held(kubectl, namespace, "refused", "GateRefused")
    assert f"gate smoke refused (HTTP 500: '{REFUSAL}')" in refused["message"]
    status = shadow(kubectl, namespace, "refused")["status"]
    assert (status["phase"], status["currentWeight"]) == ("Pending", 0)
    assert REFUSAL in status["message"] and status["gate"]["type"] == "preRollout"
    assert gates.url("/refuse") not in str(status)  # the URL is the Secret's, never shown
    warnings = eventually(
        lambda: [e for e in events_for(kubectl, namespace, "refused") if e["reason"] == "GateRefused"],
        30,
        "a GateRefused Warning",
    )
    assert warnings[0]["type"] == "Warning" and REFUSAL in warnings[0]["message"]

    # A gate that hangs: held after its timeout, which the condition names.
    hanging = held(kubectl, namespace, "hanging", "GateTimedOut")
    assert "gate load did not answer in time (no answer within 2s (timed out))" in hanging["message"]
    assert shadow(kubectl, namespace, "hanging")["status"]["phase"] == "Pending"

    # A gate that says yes at its fourth try: the rollout goes on by itself, and it was not asked more often
    # than the analysis interval.
    flaky = wait_phase(kubectl, namespace, "flaky", "Progressing", timeout=120)
    assert flaky["status"]["currentWeight"] == 5 and "gate" not in flaky["status"]
    assert eventually(lambda: gates_open(kubectl, namespace, "flaky"), 30, "GatesOpen")["status"] == "True"
    times = gates.times("/flaky")
    assert len(times) == 4, times
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 0.9 * INTERVAL - 0.5, gaps
    _, _, headers, body = next(call for call in gates.calls if call[0] == "/flaky")
    event = from_http(HTTPMessage(headers=headers, body=body), JSONFormat())
    assert event.get_type() == "io.shadowgate.gate.preRollout"
    data = event.get_data()
    assert isinstance(data, dict) and data["gate"] == "checks" and data["name"] == "flaky"
    assert data["message"].startswith("Asked to let through the candidate's first traffic")
    reasons = [e["reason"] for e in events_for(kubectl, namespace, "flaky")]
    assert "AnalysisStarted" in reasons and reasons.count("GateRefused") == 1, reasons  # one Warning per cause

    # The refusing gates still hold their rollouts, still asked once an interval.
    assert shadow(kubectl, namespace, "refused")["status"]["phase"] == "Pending"
    assert len(gates.times("/refuse")) >= 2

    # A hold is told to spec.notifications once, however often the gate is asked while it holds, even when
    # its answer differs at each look (each is a new cause for a Warning Event).
    eventually(lambda: len(gates.times("/counting")) >= 4, 120, "the counting gate asked 4 times")
    told_hold = eventually(lambda: received(gates, "counting"), 30, "the hold's notification")
    assert [event.get_type() for event in told_hold] == ["io.shadowgate.rollout.GateRefused"], told_hold
    assert "checks failing, look 1" in told_hold[0].get_data()["message"]
    queued = rows(dsn, "SELECT id FROM notifications WHERE namespace = $1 AND deployment = 'counting'", namespace)
    assert [row["id"] for row in queued] == [told_hold[0].get_id()]
    assert shadow(kubectl, namespace, "counting")["status"]["phase"] == "Pending"

    # An abort: rolled back at once, then the postRollback gate is told (its 204 shown, nothing undone).
    kubectl("annotate", "shadowdeployment", "flaky", "-n", namespace, "shadowgate.io/action=abort")
    wait_phase(kubectl, namespace, "flaky", "RolledBack", timeout=60)
    eventually(lambda: gates.times("/told"), 30, "the postRollback gate told")
    _, _, headers, body = next(call for call in gates.calls if call[0] == "/told")
    told = from_http(HTTPMessage(headers=headers, body=body), JSONFormat())
    assert told.get_type() == "io.shadowgate.gate.postRollback"
    assert (
        eventually(
            lambda: (c := gates_open(kubectl, namespace, "flaky")) and c["reason"] == "Open" and c, 30, "GatesOpen Open"
        )["status"]
        == "True"
    )
    assert shadow(kubectl, namespace, "flaky")["status"]["phase"] == "RolledBack"
    assert len(gates.times("/told")) == 1

    assert metric(f"http://{metrics}", "shadowgate_gate_calls_total", type="preRollout", outcome="Refused") >= 4
    assert metric(f"http://{metrics}", "shadowgate_gate_calls_total", type="preRollout", outcome="TimedOut") >= 1
    operator.assert_running()


@pytest.mark.timeout(600)
def test_step_and_promotion_gates_hold_a_passing_candidate_until_they_say_yes(
    kubectl: Kubectl,
    namespace: str,
    dsn: str,
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
    gates: Gates,
) -> None:
    """A better candidate (rows seeded as the router writes them): its first step passes, but the confirmStep
    gate refuses twice, so it stays at step 1 (still analysed); then it advances, and the confirmPromotion
    gate, asked once, lets it be promoted."""
    asyncio.run(migrate_dsn(dsn))
    secret = router_secret("gates", "step", gates.url("/step"))
    secret["stringData"]["promote"] = gates.url("/promote")
    apply(kubectl, namespace, secret)
    start_operator("--namespace", namespace)
    manifest = example(
        "passing",
        traffic={"mode": "shadow", "steps": [10, 50]},
        gates=[
            {"name": "load", "type": "confirmStep", "urlSecretRef": {"name": "gates", "key": "step"}},
            {"name": "board", "type": "confirmPromotion", "urlSecretRef": {"name": "gates", "key": "promote"}},
        ],
    )
    manifest["spec"]["analysis"] = {"interval": "5s", "minSamples": 100, "maxErrorRate": 0.05, "maxStepDuration": "5m"}
    apply_shadow(namespace, manifest)
    wait_phase(kubectl, namespace, "passing", "Progressing")
    with Seeder(dsn, namespace, "passing", production=Model(error_scale=1.0), candidate=Model(error_scale=0.5)):
        refused = held(kubectl, namespace, "passing", "GateRefused")
        assert "gate load refused (HTTP 409: 'load test running')" in refused["message"]
        status = shadow(kubectl, namespace, "passing")["status"]
        assert (status["currentStep"], status["currentWeight"]) == (0, 10)
        assert status["lastDecision"]["action"] == "Wait"
        assert status["lastDecision"]["reason"].startswith("Held by gates (confirmStep) before step 2 of 2")
        promoted = wait_phase(kubectl, namespace, "passing", "Promoted", timeout=120)
    assert promoted["status"]["currentWeight"] == 100
    wait_reasons(kubectl, namespace, "passing", ["AnalysisStarted", "GateRefused", "StepAdvanced", "Promoted"])
    events = {e["reason"]: e["message"] for e in events_for(kubectl, namespace, "passing")}
    assert "Gates: gate load let it through (HTTP 200: 'ok')." in events["StepAdvanced"]
    assert "Gates: gate board let it through (HTTP 200: 'approved')." in events["Promoted"]
    assert len(gates.times("/step")) == 3 and len(gates.times("/promote")) == 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(gates.times("/step"))]
    assert min(gaps) >= 0.9 * INTERVAL - 0.5, gaps
