"""Notifications delivered for real: the queue in a real PostgreSQL, receivers' URLs in Secrets of the real
API server, and real HTTP receivers on loopback (aiohttp) that fail, hang, go away and come back."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from prometheus_client import CollectorRegistry

from shadowgate_dev.localenv.process import free_port
from shadowgate_operator.api import ShadowDeployment
from shadowgate_operator.builders import ROUTER_SECRET_LABEL
from shadowgate_operator.kube import Kube
from shadowgate_operator.notify.deliver import Deliverer, DeliveryMetrics, RetryPolicy
from shadowgate_operator.notify.messages import Announcement, Outgoing, outgoing
from shadowgate_operator.notify.queue import NotificationQueue
from tests.admission_cases import load_example, merge_patch
from tests.conftest import Kubectl
from tests.support.databases import POSTGRES, own_database
from tests.support.operator import apply

pytestmark = [pytest.mark.cluster, pytest.mark.database]

UID = "7d1e0c9a-0000-4000-8000-00000000beef"
FAST = RetryPolicy(first_delay=0.2, max_delay=1.0, timeout=5.0, lease=10.0)


class Receiver:
    """An HTTP receiver on loopback: records what it is sent; answers `statuses` in turn, then 200;
    `hang` holds every request unanswered until released."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses: deque[int] = deque()
        self.hang = asyncio.Event()
        self.hang.set()  # set: answer at once
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        await self.hang.wait()
        status = self.statuses.popleft() if self.statuses else 200
        return web.Response(status=status, text="ok" if status < 400 else "receiver says no")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        self.hang.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self) -> list[str]:
        return [json.loads(body).get("id") or _slack_id(body) for _, body in self.received]


def _slack_id(body: bytes) -> str:
    context = json.loads(body)["blocks"][-1]["elements"][0]["text"]
    return str(context.split()[1])


async def until(condition: Callable[[], bool] | Callable[[], Awaitable[bool]], what: str, within: float = 60) -> float:
    """Wait for `condition` (polled) up to `within` seconds; returns the seconds it took."""
    started = time.monotonic()
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def queue_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    with own_database(request, POSTGRES, "notify") as dsn:
        yield dsn


@pytest.fixture
async def queue(queue_dsn: str) -> AsyncIterator[NotificationQueue]:
    pool = await asyncpg.create_pool(queue_dsn, min_size=0, max_size=4)
    await pool.execute("TRUNCATE notifications")
    yield NotificationQueue(pool)
    await pool.close()


@pytest.fixture
async def kube(kubeconfig: str) -> AsyncIterator[Kube]:
    client = Kube.connect(kubeconfig)
    yield client
    await client.close()


@pytest.fixture
async def receivers() -> AsyncIterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        await receiver.stop()


Workers = Callable[..., Deliverer]


@pytest.fixture
async def workers(kube: Kube, queue: NotificationQueue) -> AsyncIterator[Workers]:
    """workers(policy=...) starts a Deliverer on the test's queue, with metrics of its own; all stop at the end."""
    running: list[tuple[Deliverer, asyncio.Task[None]]] = []

    def start(policy: RetryPolicy = FAST, concurrency: int = 8) -> Deliverer:
        worker = Deliverer(
            kube, DeliveryMetrics(CollectorRegistry()), policy=policy, concurrency=concurrency, poll_seconds=0.2
        )
        worker.watch(queue)
        running.append((worker, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, task in running:
        await stop(worker, task)


async def stop(worker: Deliverer, task: asyncio.Task[None], grace: float = 1.0) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await worker.close(grace)


def secret(kubectl: Kubectl, namespace: str, name: str, values: dict[str, str], *, labelled: bool = True) -> None:
    """A receivers' Secret, labelled shadowgate.io/router-secret=true as the operator requires (unless not)."""
    labels = {ROUTER_SECRET_LABEL: "true"} if labelled else {}
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": labels},
        "stringData": values,
    }
    apply(kubectl, namespace, manifest)


def rollout(namespace: str, receivers: list[dict[str, Any]]) -> ShadowDeployment:
    document = merge_patch(
        load_example(),
        {
            "metadata": {"namespace": namespace, "uid": UID},
            "spec": {"notifications": receivers},
            "status": {
                "phase": "Promoted", "currentStep": 2, "currentWeight": 100, "samples": 812,
                "metrics": {"overallScore": 0.81, "pValue": 0.002, "improvement": 0.17,
                            "production": {"metricValue": 0.5}, "candidate": {"metricValue": 0.415}},
            },
        },
    )  # fmt: skip
    return ShadowDeployment.model_validate(document)


def messages(sd: ShadowDeployment, sequence: int = 5, reason: str = "Promoted") -> list[Outgoing]:
    announcement = Announcement.of(
        sd, sequence=sequence, time=dt.datetime.now(dt.UTC), index=0, event_type="Normal", reason=reason,
        message="candidate promoted: mae 0.415 vs 0.5 (17% better), score 0.81 >= 0.7, p = 0.002",
    )  # fmt: skip
    return outgoing(announcement, sd.spec.notifications)


async def row(queue: NotificationQueue, receiver: str) -> asyncpg.Record:
    """The receiver's first queued message."""
    found = await queue.pool.fetchrow("SELECT * FROM notifications WHERE receiver = $1 ORDER BY seq LIMIT 1", receiver)
    assert found is not None
    return found


def counted(worker: Deliverer, name: str, **labels: str) -> float:
    """A sample of the worker's metrics, as /metrics shows it."""
    return worker.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_cloudevent_and_a_slack_message_arrive_once_each_with_the_transitions_numbers(
    kubectl: Kubectl, namespace: str, queue: NotificationQueue, workers: Workers, receivers: list[Receiver]
) -> None:
    events, team = Receiver(), Receiver()
    receivers += [await events.start(), await team.start()]
    secret(kubectl, namespace, "hooks", {"url": events.url, "slack": team.url})
    sd = rollout(namespace, [
        {"name": "events", "urlSecretRef": {"name": "hooks"}},
        {"name": "team", "format": "slack", "urlSecretRef": {"name": "hooks", "key": "slack"}},
    ])  # fmt: skip
    assert await queue.enqueue(messages(sd)) == 2
    worker = workers()
    await until(lambda: len(events.received) == 1 and len(team.received) == 1, "both receivers to be told")

    headers, body = events.received[0]
    event = from_http(HTTPMessage(headers=headers, body=body), JSONFormat())
    assert event.get_id() == f"{UID}.t5.0"
    assert event.get_type() == "io.shadowgate.rollout.Promoted"
    data = event.get_data()
    assert isinstance(data, dict)
    assert (data["weight"], data["samples"], data["metrics"]["overallScore"], data["metrics"]["pValue"]) == (
        100,
        812,
        0.81,
        0.002,
    )
    slack_headers, slack_body = team.received[0]
    assert slack_headers["Content-Type"] == "application/json"
    payload = json.loads(slack_body)
    assert payload["text"].startswith(f"{namespace}/fraud-detector: Promoted: candidate promoted")
    assert [block["type"] for block in payload["blocks"]] == ["header", "section", "section", "context"]

    await until(lambda: counted(worker, "shadowgate_notifications_delivered_total", format="slack") == 1, "counted")
    # The worker counts a delivery before it marks the row: wait for the rows, not the counter.
    await until(lambda: _none_waiting(queue), "both rows to be marked delivered")
    for receiver in ("events", "team"):
        stored = await row(queue, receiver)
        assert stored["delivered_at"] is not None and stored["attempts"] == 1
    # The same transition announced again (a restart, a takeover): nothing new is queued or sent.
    assert await queue.enqueue(messages(sd)) == 0
    assert await queue.waiting() == 0
    assert len(events.received) == len(team.received) == 1


async def test_a_receiver_that_is_down_gets_the_message_when_it_is_back_and_queueing_never_waits(
    kubectl: Kubectl, namespace: str, queue: NotificationQueue, workers: Workers, receivers: list[Receiver]
) -> None:
    down = Receiver()  # not started: connections to its port are refused
    secret(kubectl, namespace, "hooks", {"url": down.url})
    sd = rollout(namespace, [{"name": "events", "urlSecretRef": {"name": "hooks"}}])
    worker = workers()
    started = time.monotonic()
    assert await queue.enqueue(messages(sd, sequence=1)) == 1
    assert await queue.enqueue(messages(sd, sequence=2)) == 1
    queued = time.monotonic() - started
    assert queued < 1.0, f"queueing took {queued:.2f}s with the receiver down"  # what a decision waits for
    await until(lambda: counted(worker, "shadowgate_notification_failures_total", format="cloudevents",
                                cause="connect") >= 4, "failed attempts to be counted")  # fmt: skip
    await until(lambda: _last_error(queue, "events", "cannot connect"), "the failure to be written in the row")
    assert (await queue.pool.fetchval("SELECT attempts FROM notifications WHERE id LIKE '%.t2.0'")) == 0  # in order

    receivers.append(await down.start())
    await until(lambda: len(down.received) == 2, "the receiver, back, to get both messages")
    assert down.ids() == [f"{UID}.t1.0", f"{UID}.t2.0"]  # in the order they were queued
    await until(lambda: _none_waiting(queue), "both rows to be marked delivered")


async def _last_error(queue: NotificationQueue, receiver: str, words: str) -> bool:
    return words in ((await row(queue, receiver))["last_error"] or "")


async def _none_waiting(queue: NotificationQueue) -> bool:
    return await queue.waiting() == 0


async def test_a_worker_that_dies_mid_delivery_leaves_the_message_to_the_next_one_with_the_same_id(
    kubectl: Kubectl,
    namespace: str,
    kube: Kube,
    queue: NotificationQueue,
    workers: Workers,
    receivers: list[Receiver],
) -> None:
    receiver = await Receiver().start()
    receivers.append(receiver)
    receiver.hang.clear()  # the first worker's post is received, never answered
    secret(kubectl, namespace, "hooks", {"url": receiver.url})
    sd = rollout(namespace, [{"name": "events", "urlSecretRef": {"name": "hooks"}}])
    await queue.enqueue(messages(sd))

    lease = RetryPolicy(first_delay=0.2, max_delay=1.0, timeout=30.0, lease=3.0)
    first = Deliverer(kube, DeliveryMetrics(CollectorRegistry()), policy=lease, poll_seconds=0.2)
    first.watch(queue)
    task = asyncio.create_task(first.run())
    await until(lambda: len(receiver.received) == 1, "the first worker's post to arrive")
    await stop(first, task, grace=0)  # dies with the message claimed and unanswered
    assert (await row(queue, "events"))["delivered_at"] is None

    receiver.hang.set()
    second = workers(policy=lease)
    waited = await until(lambda: len(receiver.received) == 2, "the next worker to deliver it", within=30)
    assert waited < 30
    await until(lambda: _none_waiting(queue), "the row to be marked delivered")
    assert receiver.ids() == [f"{UID}.t5.0"] * 2  # a receiver drops the copy by id
    stored = await row(queue, "events")
    assert stored["attempts"] == 2 and stored["delivered_at"] is not None
    assert counted(second, "shadowgate_notifications_delivered_total", format="cloudevents") == 1


async def test_a_receiver_answering_500_twice_gets_it_on_the_third_attempt_and_the_failures_are_counted(
    kubectl: Kubectl, namespace: str, queue: NotificationQueue, workers: Workers, receivers: list[Receiver]
) -> None:
    receiver = await Receiver().start()
    receivers.append(receiver)
    receiver.statuses.extend([500, 503])
    secret(kubectl, namespace, "hooks", {"url": receiver.url})
    await queue.enqueue(messages(rollout(namespace, [{"name": "events", "urlSecretRef": {"name": "hooks"}}])))
    worker = workers()
    await until(lambda: _none_waiting(queue), "delivery")
    assert receiver.ids() == [f"{UID}.t5.0"] * 3
    assert (await row(queue, "events"))["attempts"] == 3
    assert counted(worker, "shadowgate_notification_failures_total", format="cloudevents", cause="http_5xx") == 2
    assert counted(worker, "shadowgate_notifications_delivered_total", format="cloudevents") == 1


async def test_a_permanent_refusal_is_abandoned_at_once_and_counted(
    kubectl: Kubectl, namespace: str, queue: NotificationQueue, workers: Workers, receivers: list[Receiver]
) -> None:
    receiver = await Receiver().start()
    receivers.append(receiver)
    receiver.statuses.append(410)
    secret(kubectl, namespace, "hooks", {"url": receiver.url})
    await queue.enqueue(messages(rollout(namespace, [{"name": "events", "urlSecretRef": {"name": "hooks"}}])))
    worker = workers()
    await until(lambda: _none_waiting(queue), "the message to be given up on")
    stored = await row(queue, "events")
    assert stored["abandoned_at"] is not None and stored["delivered_at"] is None
    assert "HTTP 410" in stored["last_error"] and "receiver says no" in stored["last_error"]
    assert counted(worker, "shadowgate_notifications_abandoned_total", format="cloudevents", cause="http_4xx") == 1
    assert len(receiver.received) == 1


async def test_a_hanging_receiver_holds_back_its_own_messages_only(
    kubectl: Kubectl, namespace: str, queue: NotificationQueue, workers: Workers, receivers: list[Receiver]
) -> None:
    stuck, fine = await Receiver().start(), await Receiver().start()
    receivers += [stuck, fine]
    stuck.hang.clear()
    secret(kubectl, namespace, "hooks", {"stuck": stuck.url, "fine": fine.url})
    sd = rollout(namespace, [
        {"name": "stuck", "urlSecretRef": {"name": "hooks", "key": "stuck"}},
        {"name": "fine", "urlSecretRef": {"name": "hooks", "key": "fine"}},
    ])  # fmt: skip
    await queue.enqueue(messages(sd, sequence=1))
    workers(policy=RetryPolicy(first_delay=0.2, max_delay=1.0, timeout=60.0, lease=90.0), concurrency=2)
    await until(lambda: len(stuck.received) == 1, "the stuck receiver to be called")
    for sequence in (2, 3, 4):
        await queue.enqueue(messages(sd, sequence=sequence))
    await until(lambda: len(fine.received) == 4, "the other receiver to get every message while one hangs")
    assert fine.ids() == [f"{UID}.t{sequence}.0" for sequence in (1, 2, 3, 4)]
    assert len(stuck.received) == 1  # its later messages wait behind the first, in order


async def test_a_missing_secret_is_waited_for_and_a_url_the_operator_will_not_call_is_refused(
    kubectl: Kubectl, namespace: str, queue: NotificationQueue, workers: Workers, receivers: list[Receiver]
) -> None:
    receiver = await Receiver().start()
    receivers.append(receiver)
    sd = rollout(namespace, [
        {"name": "later", "urlSecretRef": {"name": "hooks"}},
        {"name": "metadata", "urlSecretRef": {"name": "bad-hooks"}},
    ])  # fmt: skip
    secret(kubectl, namespace, "bad-hooks", {"url": "http://169.254.169.254/latest/meta-data/"})
    await queue.enqueue(messages(sd))
    worker = workers()
    await until(lambda: counted(worker, "shadowgate_notification_failures_total", format="cloudevents",
                                cause="no_url") >= 2, "the missing Secret to be retried")  # fmt: skip
    assert (await row(queue, "metadata"))["abandoned_at"] is not None
    assert "link-local" in (await row(queue, "metadata"))["last_error"]
    secret(kubectl, namespace, "hooks", {"url": receiver.url})
    await until(lambda: _none_waiting(queue), "delivery once the Secret exists")
    assert receiver.ids() == [f"{UID}.t5.0"]


async def test_a_secret_not_labelled_for_the_operator_is_neither_posted_to_nor_quoted_until_labelled(
    kubectl: Kubectl, namespace: str, queue: NotificationQueue, workers: Workers, receivers: list[Receiver]
) -> None:
    """Issue 12, least privilege: a receiver's Secret needs shadowgate.io/router-secret=true like the router's
    Secrets, or anyone who may create a ShadowDeployment could have the operator post to (or quote, in an error)
    any Secret of the namespace. Unlabelled: retried as secret_not_allowed, nothing sent; labelled: delivered."""
    receiver = await Receiver().start()
    receivers.append(receiver)
    secret(kubectl, namespace, "hooks", {"url": receiver.url}, labelled=False)
    sd = rollout(namespace, [{"name": "events", "urlSecretRef": {"name": "hooks"}}])
    await queue.enqueue(messages(sd))
    worker = workers()
    await until(lambda: counted(worker, "shadowgate_notification_failures_total", format="cloudevents",
                                cause="secret_not_allowed") >= 2, "the unlabelled Secret to be refused")  # fmt: skip
    stored = await row(queue, "events")
    assert stored["abandoned_at"] is None and stored["delivered_at"] is None  # retried: labelling it heals it
    assert stored["last_error"].startswith(
        f"Secret {namespace}/hooks (spec.notifications[].urlSecretRef) is not labelled shadowgate.io/router-secret=true"
    )
    assert receiver.url not in stored["last_error"] and receiver.received == []

    kubectl("label", "secret", "hooks", "-n", namespace, f"{ROUTER_SECRET_LABEL}=true")
    await until(lambda: _none_waiting(queue), "delivery once the Secret is labelled")
    assert receiver.ids() == [f"{UID}.t5.0"]


async def test_finished_rows_are_pruned_after_a_while_and_waiting_ones_never(
    namespace: str, queue: NotificationQueue
) -> None:
    sd = rollout(namespace, [{"name": "events", "urlSecretRef": {"name": "hooks"}}])
    for sequence in (1, 2, 3):
        await queue.enqueue(messages(sd, sequence=sequence))
    await queue.pool.execute("UPDATE notifications SET created_at = now() - interval '8 days'")
    await queue.pool.execute("UPDATE notifications SET delivered_at = now() WHERE id LIKE '%.t1.0'")
    await queue.pool.execute("UPDATE notifications SET abandoned_at = now() WHERE id LIKE '%.t2.0'")
    assert await queue.prune(dt.timedelta(days=7)) == 2
    assert [r["id"] for r in await queue.pool.fetch("SELECT id FROM notifications")] == [f"{UID}.t3.0"]


async def test_an_operator_watching_some_namespaces_claims_only_their_messages(queue: NotificationQueue) -> None:
    """Operators watching other namespaces can share a database: each delivers its own namespaces' messages,
    whose receivers' Secrets it may read (a namespaced operator took another's and got 403 on every attempt)."""
    ours = messages(rollout("team-a", [{"name": "events", "urlSecretRef": {"name": "hooks"}}]))
    theirs = [dataclasses.replace(m, id=m.id.replace(UID, "other-uid"), namespace="team-b") for m in ours]
    await queue.enqueue(ours + theirs)

    claimed = await queue.claim(10, lease_seconds=60, namespaces=("team-a",))
    assert [(c.message.namespace, c.message.id) for c in claimed] == [("team-a", m.id) for m in ours]
    untouched = await queue.pool.fetch("SELECT attempts, leased_until FROM notifications WHERE namespace = 'team-b'")
    assert [(r["attempts"], r["leased_until"]) for r in untouched] == [(0, None)] * len(theirs)

    everyone = await queue.claim(10, lease_seconds=60)  # an operator watching all namespaces
    assert [c.message.namespace for c in everyone] == ["team-b"] * len(theirs)
