"""Notifications from the real operator: its transitions queued with their history rows, delivered by the
worker it runs, to real HTTP receivers on loopback; the operator killed between a transition and its delivery."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat

from shadowgate_dev.localenv.process import free_port
from shadowgate_operator.builders import ROUTER_SECRET_LABEL
from shadowgate_operator.migrate import migrate_dsn
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import apply, events_for, eventually, example, metric, rows, shadow, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.database]

QUEUED = """SELECT id, receiver, attempts, delivered_at IS NOT NULL AS delivered FROM notifications
            WHERE namespace = $1 AND deployment = $2 ORDER BY seq"""


class Receiver:
    """A webhook receiver on loopback (a thread of its own, as the operator is another process): answers
    200 to every POST and records (path, headers, body). Not listening until `start`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append((self.path, dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def ids(self, path: str) -> list[str]:
        found = []
        for where, _, body in self.received:
            if where == path:
                document = json.loads(body)
                found.append(document.get("id") or document["blocks"][-1]["elements"][0]["text"].split()[1])
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.stop()


def condition(kubectl: Kubectl, namespace: str, name: str, status: str) -> dict[str, Any] | None:
    for found in shadow(kubectl, namespace, name).get("status", {}).get("conditions", []):
        if found["type"] == "NotificationsDelivered" and found["status"] == status:
            return dict(found)
    return None


@pytest.mark.timeout(600)
def test_killed_between_a_transition_and_its_delivery_the_message_still_arrives_once(
    kubectl: Kubectl,
    namespace: str,
    dsn: str,
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
    receiver: Receiver,
) -> None:
    asyncio.run(migrate_dsn(dsn))
    name = "announced"
    urls = {"url": receiver.url("/events"), "slack": receiver.url("/slack")}
    hooks = {"name": "hooks", "labels": {ROUTER_SECRET_LABEL: "true"}}  # the label every named Secret needs
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "Secret", "metadata": hooks, "stringData": urls})
    notifications = [
        {"name": "events", "urlSecretRef": {"name": "hooks"}},
        {"name": "team", "format": "slack", "urlSecretRef": {"name": "hooks", "key": "slack"}},
    ]
    metrics = f"127.0.0.1:{free_port()}"
    operator = start_operator("--namespace", namespace, "--metrics", metrics)
    apply_shadow(namespace, example(name, notifications=notifications))
    uid = wait_phase(kubectl, namespace, name, "Progressing", timeout=60)["metadata"]["uid"]
    started, promoted = f"{uid}.t1.0", f"{uid}.t2.0"

    # The receiver is down: the transition is queued with its rows, attempted, and failing is shown.
    eventually(
        lambda: (
            {(r["id"], r["receiver"]) for r in rows(dsn, QUEUED, namespace, name) if r["attempts"] >= 1}
            == {(started, "events"), (started, "team")}
        ),
        60,
        "AnalysisStarted queued and attempted for both receivers",
    )

    def both_failing() -> dict[str, Any] | None:
        found = condition(kubectl, namespace, name, "False")  # each receiver is named once it has failed 3 times
        return found if found and all(f"receiver {r}:" in found["message"] for r in ("events", "team")) else None

    failing = eventually(both_failing, 90, "NotificationsDelivered False for both receivers")
    assert failing["reason"] == "DeliveryFailing" and "cannot connect" in failing["message"]
    warning = eventually(
        lambda: [e for e in events_for(kubectl, namespace, name) if e["reason"] == "NotificationFailing"],
        30,
        "a NotificationFailing Warning",
    )
    assert warning[0]["type"] == "Warning"
    assert metric(f"http://{metrics}", "shadowgate_notification_failures_total", cause="connect") >= 3

    # A transition whose messages cannot be delivered yet; then the operator dies.
    kubectl("annotate", "shadowdeployment", name, "-n", namespace, "shadowgate.io/action=promote")
    wait_phase(kubectl, namespace, name, "Promoted", timeout=60)
    eventually(
        lambda: {r["id"] for r in rows(dsn, QUEUED, namespace, name)} == {started, promoted},
        60,
        "Promoted queued",
    )
    operator.stop(kill=True)
    assert not any(r["delivered"] for r in rows(dsn, QUEUED, namespace, name))
    assert receiver.received == []

    # The receiver comes back, and another operator (which announces the transition in status again).
    receiver.start()
    operator = start_operator("--namespace", namespace)
    eventually(
        lambda: all(r["delivered"] for r in rows(dsn, QUEUED, namespace, name)),
        120,
        "every message delivered",
    )
    eventually(lambda: condition(kubectl, namespace, name, "True"), 60, "NotificationsDelivered True")
    # Each message once, in order, for each receiver; nothing else queued or sent.
    assert receiver.ids("/events") == [started, promoted]
    assert receiver.ids("/slack") == [started, promoted]
    assert [(r["id"], r["receiver"]) for r in rows(dsn, QUEUED, namespace, name)] == [
        (started, "events"), (started, "team"), (promoted, "events"), (promoted, "team"),
    ]  # fmt: skip

    _, headers, body = [each for each in receiver.received if each[0] == "/events"][1]
    event = from_http(HTTPMessage(headers=headers, body=body), JSONFormat())
    assert event.get_type() == "io.shadowgate.rollout.Promoted"
    assert event.get_id() == promoted
    assert event.get_source() == f"/apis/shadowgate.io/v1alpha1/namespaces/{namespace}/shadowdeployments/{name}"
    data = event.get_data()
    assert isinstance(data, dict)
    assert (data["reason"], data["phase"], data["weight"], data["sequence"]) == ("Promoted", "Promoted", 100, 2)
    assert data["action"] == "promote"
    slack = json.loads(next(body for where, _, body in reversed(receiver.received) if where == "/slack"))
    assert slack["text"].startswith(f"{namespace}/{name}: Promoted: ")
    assert slack["blocks"][0]["text"]["text"] == f"{namespace}/{name} Promoted"
    operator.assert_running()
