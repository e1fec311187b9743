"""The Reconciler called in-process against the real API server and PostgreSQL (as kubebuilder tests
Reconcile against envtest): what one reconcile writes, what it leaves alone, and what an operator dying
between any two of its calls leaves behind. The subprocess tests (test_operator.py) stay for kopf's part.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from shadowgate_operator.builders import OperatorSettings
from shadowgate_operator.kube import Kube, KubeError
from shadowgate_operator.migrate import migrate_dsn
from shadowgate_operator.ports import Database
from shadowgate_operator.record import Rollouts
from shadowgate_operator.service import Reconciler
from shadowgate_operator.store import Databases
from tests.cluster.conftest import ApplyShadow
from tests.conftest import Kubectl
from tests.support.operator import apply, events_for, example, get_json, router_config, router_secret

pytestmark = [pytest.mark.cluster, pytest.mark.database]

EVENTS = "SELECT event, time FROM deployment_events WHERE namespace = $1 AND deployment = $2 ORDER BY time"
WRITES = frozenset({"update", "apply", "create"})
NO_RESYNC = 1e9
"""The tests' resync period: a resync only where a test asks for one (record.resync_at = 0). With the
operator's 10 minutes, a record's first resync falls anywhere within them, maybe within a test that counts calls."""


class Killed(BaseException):
    """The operator process died here (BaseException: nothing in the operator catches it)."""


class Calls:
    """Kubernetes API calls and database writes, counted; `die_at` makes the n-th one kill the operator."""

    def __init__(self, die_at: int | None = None):
        self.die_at = die_at
        self.seen = 0
        self.kube: collections.Counter[str] = collections.Counter()

    def step(self, what: str) -> None:
        if self.die_at is not None and self.seen == self.die_at:
            raise Killed(what)
        self.seen += 1


class CountingKube:
    """The real Kube, each call counted (and possibly the last)."""

    def __init__(self, kube: Kube, calls: Calls):
        self._kube, self._calls = kube, calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._kube, name)
        if name == "close":
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.step(f"kube.{name}")
            self._calls.kube[name] += 1
            return await method(*args, **kwargs)

        return call


class DyingDatabases:
    """The real Databases, whose writes may be where the operator dies."""

    def __init__(self, databases: Databases, calls: Calls):
        self._databases, self._calls = databases, calls

    async def get(self, dsn: str) -> Database:
        return DyingDatabase(await self._databases.get(dsn), self._calls)

    async def close(self) -> None:
        await self._databases.close()


class DyingDatabase:
    def __init__(self, database: Database, calls: Calls):
        self._database, self._calls = database, calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._database, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if name == "write":
                self._calls.step("database.write")
            return await method(*args, **kwargs)

        return call


MakeReconciler = Callable[..., Reconciler]


@pytest.fixture
async def make_reconciler(kubeconfig: str, shadow_crd: str, dsn: str) -> AsyncIterator[MakeReconciler]:
    """make_reconciler(calls) -> a Reconciler as a fresh operator process would have it."""
    await migrate_dsn(dsn)
    made: list[Reconciler] = []

    def make(calls: Calls | None = None) -> Reconciler:
        calls = calls or Calls()
        reconciler = Reconciler(
            kube=CountingKube(Kube.connect(kubeconfig), calls),
            settings=OperatorSettings(router_image="registry.example/shadowgate:test"),
            databases=DyingDatabases(Databases(), calls),
            rollouts=Rollouts(resync_seconds=NO_RESYNC),
        )
        made.append(reconciler)
        return reconciler

    yield make
    for reconciler in made:
        await reconciler.close()


async def history(dsn: str, namespace: str, name: str) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        return [row["event"] for row in await connection.fetch(EVENTS, namespace, name)]
    finally:
        await connection.close()


async def analyses_recorded(dsn: str, namespace: str, name: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        found = await connection.fetchval(
            "SELECT count(*) FROM deployment_metrics WHERE namespace = $1 AND deployment = $2", namespace, name
        )
        return int(found)
    finally:
        await connection.close()


def shadow(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(kubectl("get", "shadowdeployment", name, "-n", namespace, "-o", "json").stdout)
    return found


def annotate(kubectl: Kubectl, namespace: str, name: str, value: str) -> None:
    kubectl("annotate", "--overwrite", "shadowdeployment", name, "-n", namespace, f"shadowgate.io/action={value}")


async def test_a_reconcile_writes_status_children_event_and_row_then_nothing_until_something_changes(
    kubectl: Kubectl, namespace: str, apply_shadow: ApplyShadow, make_reconciler: MakeReconciler, dsn: str
) -> None:
    apply_shadow(namespace, example("first", traffic={"mode": "shadow", "steps": [5, 50]}))
    calls = Calls()
    reconciler = make_reconciler(calls)
    record = reconciler.rollouts.get(namespace, "first")

    await reconciler.reconcile(record)
    body = shadow(kubectl, namespace, "first")
    status = body["status"]
    assert (status["phase"], status["currentWeight"]) == ("Progressing", 5)
    transition = status["lastTransition"]
    assert (transition["sequence"], [e["reason"] for e in transition["events"]]) == (1, ["AnalysisStarted"])
    event = events_for(kubectl, namespace, "first")[0]
    assert event["metadata"]["name"] == f"first.{body['metadata']['uid'][:8]}.t1.0"
    assert event["metadata"]["annotations"]["shadowgate.io/transition"] == "1"
    assert await history(dsn, namespace, "first") == ["AnalysisStarted"]
    # get: both named Secrets (their router-secret label checked, issue 12 D13), not the router Deployment of a
    # new object (there is none yet: its watch reports it); apply: the six children and the router's NetworkPolicy.
    assert calls.kube == {"get_shadowdeployment": 1, "get": 2, "replace_status": 1, "apply": 7,
                          "post_event": 1}  # fmt: skip

    # The router Deployment's watch event (kopf delivers it to router_seen): Ready follows, no GET.
    calls.kube.clear()
    deployment = json.loads(kubectl("get", "deployment", "first-router", "-n", namespace, "-o", "json").stdout)
    reconciler.rollouts.router_seen(deployment)
    assert record.wake.is_set()
    await reconciler.reconcile(record)
    assert calls.kube == {"replace_status": 1}
    ready = next(c for c in shadow(kubectl, namespace, "first")["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], ready["message"]) == ("RouterUnavailable", "0 of 2 router replicas available.")

    # Nothing changed: nothing is read or written again (the object comes from the record, watches keep it).
    calls.kube.clear()
    await reconciler.reconcile(record)
    assert sum(calls.kube.values()) == 0

    # A new first step: the status and the ConfigMap change; the other children are left alone.
    kubectl("patch", "shadowdeployment", "first", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"traffic":{"steps":[15,50]}}}')  # fmt: skip
    reconciler.rollouts.seen(shadow(kubectl, namespace, "first"))
    await reconciler.reconcile(record)
    assert calls.kube == {"replace_status": 1, "apply": 1}
    configmap = json.loads(kubectl("get", "configmap", "first-router", "-n", namespace, "-o", "json").stdout)
    assert json.loads(configmap["data"]["config.json"])["weight"] == 15


async def test_an_idle_rollout_is_analysed_every_interval_without_api_writes(
    kubectl: Kubectl, namespace: str, apply_shadow: ApplyShadow, make_reconciler: MakeReconciler, dsn: str
) -> None:
    """No traffic: every analysis reads the empty window and decides the same Wait, so after the decision
    first changes (no data yet -> too few samples) it costs no API call; each analysis still leaves its row."""
    apply_shadow(namespace, example("idle"))
    calls = Calls()
    reconciler = make_reconciler(calls)
    record = reconciler.rollouts.get(namespace, "idle")
    await reconciler.reconcile(record, analyse=None)  # a new object: started and analysed at once
    reconciler.rollouts.router_seen(json.loads(kubectl("get", "deployment", "idle-router", "-n", namespace,
                                                       "-o", "json").stdout))  # fmt: skip
    await reconciler.reconcile(record, analyse=True)  # the window read: 0 of minSamples
    decided = shadow(kubectl, namespace, "idle")["status"]
    assert decided["lastDecision"]["reason"].startswith("Waiting for samples at step 1")
    rows_before = await analyses_recorded(dsn, namespace, "idle")

    calls.kube.clear()
    start = reconciler.clock()
    for interval in range(1, 4):  # the next three intervals, 30 s apart
        reconciler.clock = lambda later=start + dt.timedelta(seconds=30 * interval): later
        await reconciler.reconcile(record, analyse=True)
    assert sum(calls.kube.values()) == 0, calls.kube
    assert shadow(kubectl, namespace, "idle")["status"] == decided
    assert await analyses_recorded(dsn, namespace, "idle") == rows_before + 3

    # A restarted operator paces the next analysis from lastDecision.time: 10 s after the decision changed,
    # in the 20 s left of its interval; 100 s after (an idle rollout), at random within the next interval.
    decided_at = dt.datetime.fromisoformat(decided["lastDecision"]["time"])
    for since, (low, high) in ((10, (10.0, 20.0)), (100, (0.0, 30.0))):
        restarted = make_reconciler()
        restarted.clock = lambda now=decided_at + dt.timedelta(seconds=since): now
        again = restarted.rollouts.get(namespace, "idle")
        await restarted.reconcile(again)
        assert again.analysis_due is not None
        assert low <= again.analysis_due - time.monotonic() <= high


async def test_a_finished_rollout_is_left_alone_until_its_resync(
    kubectl: Kubectl, namespace: str, apply_shadow: ApplyShadow, make_reconciler: MakeReconciler
) -> None:
    apply_shadow(namespace, example("done"))
    calls = Calls()
    reconciler = make_reconciler(calls)
    await reconciler.tick(namespace, "done")
    annotate(kubectl, namespace, "done", "promote")
    reconciler.rollouts.seen(shadow(kubectl, namespace, "done"))
    delay = await reconciler.tick(namespace, "done")
    assert shadow(kubectl, namespace, "done")["status"]["phase"] == "Promoted"
    assert delay > 400  # the next look is the resync (about 10 minutes), not the analysis interval
    calls.kube.clear()
    for _ in range(3):
        await reconciler.tick(namespace, "done")
    assert sum(calls.kube.values()) == 0


async def test_a_resync_reads_every_child_and_applies_only_those_deleted_or_edited_by_hand(
    kubectl: Kubectl, namespace: str, apply_shadow: ApplyShadow, make_reconciler: MakeReconciler
) -> None:
    """A resync writes nothing when every child is as built (as the API server holds it: defaults added,
    quantities in its own form), and applies again only the children deleted or edited by hand."""
    resources = {"requests": {"cpu": "0.5", "memory": "0.125Gi"}, "limits": {"memory": "1024Mi"}}
    apply_shadow(namespace, example("kept", router={"replicas": 1, "resources": resources}))
    calls = Calls()
    reconciler = make_reconciler(calls)
    record = reconciler.rollouts.get(namespace, "kept")
    await reconciler.reconcile(record)
    reconciler.rollouts.router_seen(get_json(kubectl, "deployment", "kept-router", "-n", namespace))
    await reconciler.reconcile(record)  # Ready follows the router
    held = get_json(kubectl, "deployment", "kept-router", "-n", namespace)
    assert held["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "500m", "memory": "128Mi"}  # fmt: skip

    async def resync() -> collections.Counter[str]:
        calls.kube.clear()
        record.resync_at = 0.0
        await reconciler.reconcile(record)
        return calls.kube

    # Both named Secrets and the seven children read; nothing written.
    assert await resync() == {"get": 2 + 7}

    kubectl("delete", "service", "kept-router", "-n", namespace)
    kubectl("set", "image", "deployment/kept-router", "-n", namespace, "router=attacker.example/x:1")
    kubectl("patch", "configmap", "kept-router", "-n", namespace, "--type=merge", "-p", '{"data":{"config.json":"{}"}}')
    calls.kube.clear()
    await reconciler.reconcile(record)
    assert sum(calls.kube.values()) == 0  # no watch of these children: their repair waits for the resync
    assert await resync() == {"get": 2 + 7, "apply": 3}
    image = get_json(kubectl, "deployment", "kept-router", "-n", namespace)["spec"]["template"]["spec"]
    assert image["containers"][0]["image"] == "registry.example/shadowgate:test"
    assert get_json(kubectl, "service", "kept-router", "-n", namespace) is not None
    assert router_config(kubectl, namespace, "kept")["weight"] == 5
    assert await resync() == {"get": 2 + 7}  # in place again


async def test_a_conflicting_write_is_planned_again_from_a_fresh_read(
    kubectl: Kubectl, namespace: str, apply_shadow: ApplyShadow, make_reconciler: MakeReconciler
) -> None:
    apply_shadow(namespace, example("raced"))
    reconciler = make_reconciler()
    record = reconciler.rollouts.get(namespace, "raced")
    await reconciler.reconcile(record)
    stale = record.body
    annotate(kubectl, namespace, "raced", "abort")  # written after the record's copy: its resourceVersion is old
    await reconciler.reconcile(record)  # plans from the stale copy, meets 409, reads again, plans again
    assert record.body is not stale
    assert shadow(kubectl, namespace, "raced")["status"]["phase"] == "RolledBack"


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("then", ["nothing", "another verb"])
async def test_an_operator_dying_between_any_two_calls_loses_and_doubles_nothing(
    kubectl: Kubectl,
    namespace: str,
    apply_shadow: ApplyShadow,
    make_reconciler: MakeReconciler,
    dsn: str,
    then: str,
) -> None:
    """A promote by hand, with the operator killed before its 1st, 2nd, ... call; then (maybe) another verb
    before the next operator starts. The next operator finishes the job: the status, the router following
    it, and one Event and one history row per transition, in order, none lost or doubled."""
    position = 0
    while True:
        name = f"die-{position}"
        apply_shadow(namespace, example(name))
        await make_reconciler().tick(namespace, name)  # AnalysisStarted, by an operator that lives
        annotate(kubectl, namespace, name, "promote")
        dying = make_reconciler(Calls(die_at=position))
        try:
            await dying.tick(namespace, name)
            finished = True
        except Killed:
            finished = False
        promoted = shadow(kubectl, namespace, name)["status"]["phase"] == "Promoted"
        expected = ["AnalysisStarted", "Promoted"] if promoted else ["AnalysisStarted"]
        if then == "another verb":  # the next operator meets a new transition before anything else
            annotate(kubectl, namespace, name, "retry:2")
            expected.append("AnalysisRestarted" if promoted else "ActionIgnored")
        else:
            expected = ["AnalysisStarted", "Promoted"]
        successor = make_reconciler()
        successor.resume(namespace, name)
        await successor.tick(namespace, name)

        status = shadow(kubectl, namespace, name)["status"]
        weight = {"Promoted": 100, "Progressing": 5}[status["phase"]]
        configmap = json.loads(kubectl("get", "configmap", f"{name}-router", "-n", namespace, "-o", "json").stdout)
        assert json.loads(configmap["data"]["config.json"])["weight"] == weight, position
        events = events_for(kubectl, namespace, name)
        assert [event["reason"] for event in events] == expected, position
        transitions = [int(event["metadata"]["annotations"]["shadowgate.io/transition"]) for event in events]
        assert transitions == list(range(1, status["lastTransition"]["sequence"] + 1)), position
        assert await history(dsn, namespace, name) == expected, position
        if finished:  # the dying operator finished before its call number `position`: every point was tried
            break
        position += 1
    assert position >= 4  # status, ConfigMap, Event, row at least


async def test_a_refused_child_turns_ready_false_at_the_next_reconcile_with_one_status_write_each(
    kubectl: Kubectl, namespace: str, apply_shadow: ApplyShadow, make_reconciler: MakeReconciler
) -> None:
    apply_shadow(namespace, example("refused"))
    calls = Calls()
    reconciler = make_reconciler(calls)
    kube = reconciler.kube

    async def refuse(obj: dict[str, Any]) -> dict[str, Any]:
        calls.kube["apply"] += 1
        if obj["kind"] == "Deployment":
            raise KubeError("apply", f"Deployment {namespace}/refused-router", 403,
                            'deployments.apps is forbidden: User "x" cannot patch resource "deployments"')  # fmt: skip
        return await Kube.apply(kube._kube, obj)  # type: ignore[attr-defined]

    kube.apply = refuse  # type: ignore[method-assign]
    delay = await reconciler.tick(namespace, "refused")
    record = reconciler.rollouts.get(namespace, "refused")
    assert record.wake.is_set()  # Ready must follow at once
    assert calls.kube["replace_status"] == 1
    await reconciler.tick(namespace, "refused")
    assert calls.kube["replace_status"] == 2
    ready = next(c for c in shadow(kubectl, namespace, "refused")["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PermissionDenied")
    assert "Grant it in the operator's role shadowgate-operator" in ready["message"]
    warnings = [e for e in events_for(kubectl, namespace, "refused") if e["reason"] == "PermissionDenied"]
    assert len(warnings) == 1
    assert delay >= 0.5


async def test_a_dsn_secret_is_read_at_each_reconcile_until_it_exists_then_again_at_the_resync(
    kubectl: Kubectl, namespace: str, make_reconciler: MakeReconciler, dsn: str
) -> None:
    """The operator reads the Secrets a ShadowDeployment names and never watches them (`secrets: get` only). One
    not created yet (applied after the object) is said so and read again at each reconcile until it is there; once
    read, the DSN is kept until the resync, which sees it replaced by one that is no DSN."""
    manifest = example("later", database={"secretRef": {"name": "later-db"}})
    apply(kubectl, namespace, router_secret(manifest["spec"]["outcomes"]["tokenSecretRef"]["name"], "token", "t"))
    apply(kubectl, namespace, manifest)
    reconciler = make_reconciler()
    record = reconciler.rollouts.get(namespace, "later")

    await reconciler.tick(namespace, "later")  # the first analysis, at once
    missing = f"Secret {namespace}/later-db (spec.database.secretRef) does not exist"
    assert shadow(kubectl, namespace, "later")["status"]["lastDecision"]["reason"] == f"Waiting for data: {missing}"
    assert [e["message"] for e in events_for(kubectl, namespace, "later") if e["reason"] == "DatabaseUnavailable"] == [
        missing
    ]
    await reconciler.reconcile(record)
    assert record.dsn is None and record.recorded_generation is None

    apply(kubectl, namespace, router_secret("later-db", "dsn", dsn))
    await reconciler.reconcile(record)  # no watch event says so: the next reconcile reads it
    assert record.dsn == dsn and record.recorded_generation == 1

    apply(kubectl, namespace, router_secret("later-db", "dsn", "hunter2 is no DSN"))
    await reconciler.reconcile(record)
    assert record.dsn == dsn  # kept until the resync
    record.resync_at = 0.0
    await reconciler.reconcile(record)
    ready = next(c for c in shadow(kubectl, namespace, "later")["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidDatabaseSecret")
    assert "hunter2" not in ready["message"]


async def test_reads_of_one_object_at_the_same_time_share_one_request(
    kubectl: Kubectl, namespace: str, kubeconfig: str
) -> None:
    """1,000 new objects naming the same Secrets read them a few times, not 1,000 (bench/operator); a read that
    starts after the last one ended is a new request, and sees what changed meanwhile."""
    apply(kubectl, namespace, router_secret("shared-db", "dsn", "postgresql://one@db:5432/x"))
    requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
    kube = Kube.connect(kubeconfig, counted=lambda verb, kind, code: requests.update([(verb, kind, code)]))
    try:
        read = [kube.get("v1", "Secret", namespace, "shared-db") for _ in range(50)]
        missing = [kube.get("v1", "Secret", namespace, "not-there") for _ in range(5)]
        found = await asyncio.gather(*read, *missing)
        assert requests == {("get", "Secret", 200): 1, ("get", "Secret", 404): 1}
        assert all(secret is not None and secret["metadata"]["name"] == "shared-db" for secret in found[:50])
        assert found[50:] == [None] * 5

        apply(kubectl, namespace, router_secret("shared-db", "dsn", "postgresql://two@db:5432/x"))
        assert await kube.get_secret_value(namespace, "shared-db", "dsn") == "postgresql://two@db:5432/x"
        assert requests[("get", "Secret", 200)] == 2
    finally:
        await kube.close()
