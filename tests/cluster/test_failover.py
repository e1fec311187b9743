"""High availability: two operator replicas with peering (as the shipped manifests run them), the active one
killed (SIGKILL) at random moments while a rollout advances on real traffic rows. The standby takes
over; no decision is taken twice, skipped or left half-applied; the takeover time is measured."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import pytest

from shadowgate_dev.localenv.process import free_port
from shadowgate_operator.migrate import migrate_dsn
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import (
    OperatorProcess,
    apply,
    events_for,
    eventually,
    example,
    get_json,
    metric,
    router_config,
    rows,
    shadow,
)
from tests.support.seeder import Model, Seeder

pytestmark = [pytest.mark.cluster, pytest.mark.database]

LIFETIME = 10
"""--peering-lifetime of both replicas: a killed active one is taken for dead after at most this long."""
EVENTS = "SELECT event FROM deployment_events WHERE namespace = $1 AND deployment = $2 ORDER BY time"
DECISIONS = (
    "SELECT decision FROM deployment_metrics WHERE namespace = $1 AND deployment = $2 AND decision <> 'Wait' "
    "ORDER BY time"
)
APPLIES = "shadowgate_operator_api_requests_total"
PAUSING = "Pausing operations in favour of"
"""kopf's log line when a replica stands by for one of higher priority."""


@pytest.mark.timeout(900)
def test_the_standby_takes_over_from_a_killed_active_replica_and_no_decision_is_doubled_or_lost(
    kubectl: Kubectl, namespace: str, dsn: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    asyncio.run(migrate_dsn(dsn))
    apply(kubectl, namespace, {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "ha"}})
    standby_metrics = f"127.0.0.1:{free_port()}"

    def replica(priority: int, metrics: str) -> OperatorProcess:
        return start_operator(
            "--namespace", namespace, "--peering", "ha", "--priority", str(priority),
            "--peering-lifetime", str(LIFETIME), "--metrics", metrics,
        )  # fmt: skip

    active = replica(200, f"127.0.0.1:{free_port()}")
    standby = replica(100, standby_metrics)
    eventually(
        lambda: len((get_json(kubectl, "kopfpeering", "ha", "-n", namespace) or {}).get("status") or {}) == 2,
        60,
        "both replicas in the KopfPeering",
    )
    name = "ha"
    analysis = {"interval": "5s", "minSamples": 100, "maxErrorRate": 0.05, "maxStepDuration": "10m"}
    apply_shadow(namespace, example(name, traffic={"mode": "shadow", "steps": [10, 20, 40]}, analysis=analysis))
    chance = random.Random()
    takeovers: list[float] = []
    deadline = time.monotonic() + 600
    with Seeder(dsn, namespace, name, production=Model(error_scale=1.0), candidate=Model(error_scale=0.5)):
        while shadow(kubectl, namespace, name).get("status", {}).get("phase") != "Promoted":
            assert time.monotonic() < deadline, shadow(kubectl, namespace, name).get("status")
            active.assert_running()
            standby.assert_running()
            time.sleep(chance.uniform(2.0, 8.0))  # a random moment of the rollout
            if shadow(kubectl, namespace, name).get("status", {}).get("phase") == "Promoted":
                break
            before = metric(f"http://{standby_metrics}", APPLIES, verb="apply")
            active.stop(kill=True)
            killed = time.monotonic()
            # The standby has taken over once its loops run: its first reconcile applies every child again.
            eventually(
                lambda before=before: metric(f"http://{standby_metrics}", APPLIES, verb="apply") >= before + 6,
                LIFETIME + 60,
                "the standby to take over",
                interval=0.1,
            )
            takeovers.append(time.monotonic() - killed)
            # The killed replica comes back (as a Deployment's pod would) with the higher priority: the
            # standby hands back to it, and the next kill is of an active replica again (once it has taken
            # over: its first reconcile applies every child, and the standby has paused in its favour).
            pauses = standby.log().count(PAUSING)
            active_metrics = f"http://127.0.0.1:{free_port()}"
            active = replica(200, active_metrics.removeprefix("http://"))
            eventually(
                lambda pauses=pauses, url=active_metrics: (
                    metric(url, APPLIES, verb="apply") >= 6 and standby.log().count(PAUSING) > pauses
                ),
                120,
                "the restarted replica to take over again",
            )
    print(f"takeover after SIGKILL of the active replica: {', '.join(f'{t:.1f}' for t in takeovers)} s "
          f"(median {statistics.median(takeovers):.1f} s; --peering-lifetime {LIFETIME})")  # fmt: skip
    assert takeovers, "the rollout finished before any replica was killed"

    wanted = ["AnalysisStarted", "StepAdvanced", "StepAdvanced", "Promoted"]
    eventually(lambda: [e["reason"] for e in events_for(kubectl, namespace, name)] == wanted, 30, f"Events {wanted}")
    events = events_for(kubectl, namespace, name)
    sequences = [int(e["metadata"]["annotations"]["shadowgate.io/transition"]) for e in events]
    assert sequences == [1, 2, 3, 4]
    eventually(lambda: [r["event"] for r in rows(dsn, EVENTS, namespace, name)] == wanted, 30, "the history rows")
    assert [r["decision"] for r in rows(dsn, DECISIONS, namespace, name)] == ["Advance", "Advance", "Promote"]
    eventually(lambda: router_config(kubectl, namespace, name)["weight"] == 100, 30, "the router at 100%")
    status = shadow(kubectl, namespace, name)["status"]
    assert (status["currentWeight"], status["lastTransition"]["sequence"]) == (100, 4)
