"""The operator analyses real rows in PostgreSQL and acts by itself: promote, roll back, hard gates.

Rows are seeded the way the router writes them (tests/support/seeder.py), continuously, so each step's
window fills; the operator runs for real against the local control plane.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from shadowgate_dev.localenv import Postgres
from shadowgate_dev.localenv.process import free_port
from shadowgate_operator.migrate import migrate_dsn
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import (
    apply,
    eventually,
    example,
    metric,
    reasons,
    router_secret,
    rows,
    shadow,
    wait_phase,
    wait_reasons,
)
from tests.support.seeder import Model, Seeder

pytestmark = [pytest.mark.cluster, pytest.mark.database]

EVENTS = "SELECT event FROM deployment_events WHERE namespace = $1 AND deployment = $2 ORDER BY time"
DECISIONS = "SELECT decision FROM deployment_metrics WHERE namespace = $1 AND deployment = $2 ORDER BY time"
FAST = {"interval": "5s", "minSamples": 100, "maxErrorRate": 0.05, "maxStepDuration": "5m"}


@pytest.fixture
def migrated(dsn: str) -> str:
    asyncio.run(migrate_dsn(dsn))
    return dsn


def recorded_until(dsn: str, sql: str, namespace: str, name: str, last: str, timeout: float) -> list[str]:
    """The first column of EVENTS or DECISIONS once its last row is `last`: the operator writes its rows
    after the status that records the decision, so they are waited for."""

    def ended() -> list[str] | None:
        found = [next(iter(row.values())) for row in rows(dsn, sql, namespace, name)]
        return found if found[-1:] == [last] else None

    return eventually(ended, timeout, f"the {last} row of {name} ({sql})")


def replay(dsn: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "shadowgate_operator.cli", "replay", *args, "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rollout(
    kubectl: Kubectl,
    namespace: str,
    name: str,
    apply_shadow: ApplyShadow,
    start_operator: StartOperator,
) -> Callable[[str, float], dict[str, Any]]:
    start_operator("--namespace", namespace)
    apply_shadow(namespace, example(name, traffic={"mode": "shadow", "steps": [10, 50]}, analysis=FAST))
    wait_phase(kubectl, namespace, name, "Progressing")
    return lambda phase, timeout: wait_phase(kubectl, namespace, name, phase, timeout=timeout)


def test_a_better_candidate_is_promoted_through_every_step(
    kubectl: Kubectl, namespace: str, migrated: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    wait = rollout(kubectl, namespace, "better", apply_shadow, start_operator)
    with Seeder(migrated, namespace, "better", production=Model(error_scale=1.0), candidate=Model(error_scale=0.5)):
        promoted = wait("Promoted", 90)
    status = promoted["status"]
    assert status["currentWeight"] == 100
    assert status["lastDecision"]["action"] == "Promote"
    assert status["metrics"]["overallScore"] >= 0.7
    wait_reasons(kubectl, namespace, "better", ["AnalysisStarted", "StepAdvanced", "Promoted"])
    # Rows are written after status (status is the record of the decision): wait for them.
    events = recorded_until(migrated, EVENTS, namespace, "better", "Promoted", 10)
    assert events == ["AnalysisStarted", "StepAdvanced", "Promoted"]
    decisions = recorded_until(migrated, DECISIONS, namespace, "better", "Promote", 10)
    assert decisions[-2:] == ["Advance", "Promote"]
    assert all(d == "Wait" for d in decisions[:-2])
    config = json.loads(kubectl("get", "configmap", "better-router", "-n", namespace, "-o",
                                "jsonpath={.data.config\\.json}").stdout)  # fmt: skip
    assert config["weight"] == 100

    # Replay: the same data under the recorded settings promotes again; with a minSamples no step
    # reached, it would have kept waiting.
    replayed = replay(migrated, f"{namespace}/better")
    assert "Would have ended: Promote" in replayed
    assert "StepAdvanced" in replayed  # what actually happened is listed below the replay
    strict = replay(migrated, f"{namespace}/better", "--min-samples", "1000000")
    assert "Would have ended: Wait" in strict
    assert "of minSamples 1,000,000" in strict


def test_a_worse_candidate_is_rolled_back(
    kubectl: Kubectl, namespace: str, migrated: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    wait = rollout(kubectl, namespace, "worse", apply_shadow, start_operator)
    with Seeder(migrated, namespace, "worse", production=Model(error_scale=0.5), candidate=Model(error_scale=1.0)):
        rolled_back = wait("RolledBack", 90)
    assert rolled_back["status"]["currentWeight"] == 0
    assert rolled_back["status"]["lastDecision"]["action"] == "RollBack"
    wait_reasons(kubectl, namespace, "worse", ["AnalysisStarted", "RolledBack"])
    assert shadow(kubectl, namespace, "worse")["status"]["currentStep"] == 0


def test_a_much_better_candidate_failing_ten_percent_is_held_then_rolled_back_by_the_gate(
    kubectl: Kubectl, namespace: str, migrated: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    """The gate rolls back once the excess over maxErrorRate is shown (at gateConfidence: a few hundred
    requests at 10% against 5%); until then the candidate, though far better on quality, is held at its
    step, never advanced with an error rate over its budget."""
    wait = rollout(kubectl, namespace, "flaky", apply_shadow, start_operator)
    candidate = Model(error_scale=0.5, error_rate=0.10)
    with Seeder(migrated, namespace, "flaky", production=Model(error_scale=1.0), candidate=candidate):
        rolled_back = wait("RolledBack", 60)
    reason = rolled_back["status"]["lastDecision"]["reason"]
    assert "error rate" in reason and "5.0%" in reason and "shown at gateConfidence" in reason
    assert rolled_back["status"]["currentStep"] == 0, "never advanced"
    eventually(lambda: "GateFailed" in reasons(kubectl, namespace, "flaky"), 15, "the GateFailed Event")


def test_the_sums_catch_up_between_analyses(
    kubectl: Kubectl, namespace: str, migrated: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    """With a long interval the running sums are still read every few seconds (and saved), so the read
    an analysis waits for covers seconds of arrivals, not the whole interval's."""
    start_operator("--namespace", namespace)
    apply_shadow(namespace, example("patient", analysis={**FAST, "interval": "60s"}))
    wait_phase(kubectl, namespace, "patient", "Progressing")
    saved = "SELECT horizon, state FROM analysis_windows WHERE namespace = $1 AND deployment = $2"
    with Seeder(migrated, namespace, "patient", production=Model(error_scale=1.0), candidate=Model(error_scale=1.0)):
        first = eventually(lambda: rows(migrated, saved, namespace, "patient"), 20, "the first saved sums")[0]
        horizons = {first["horizon"]}
        eventually(
            lambda: (
                len(horizons.update(r["horizon"] for r in rows(migrated, saved, namespace, "patient")) or horizons) >= 3
            ),
            35,  # a catch-up every 5 s plus its read, which takes seconds on a loaded machine
            "two catch-ups after the first analysis",
        )
        latest = rows(migrated, saved, namespace, "patient")[0]
    # Caught up without deciding: at most one analysis so far (the 60 s interval has not come round again).
    assert len(rows(migrated, DECISIONS, namespace, "patient")) <= 1
    requests = json.loads(latest["state"])["sums"]["production_requests"]
    assert requests > json.loads(first["state"])["sums"]["production_requests"]


def test_rows_wait_for_a_database_that_is_away(kubectl: Kubectl, namespace: str, start_operator: StartOperator) -> None:
    """A decision taken while the database is down (here a manual promote) is in status and Events at
    once, and its deployment_events row is written once the database is back: delayed, not dropped."""
    postgres = Postgres()
    postgres.start()
    try:
        asyncio.run(migrate_dsn(postgres.dsn))
        manifest = example("outbox", analysis=FAST)
        spec = manifest["spec"]
        for secret, key, value in (
            (spec["database"]["secretRef"]["name"], "dsn", postgres.dsn),
            (spec["outcomes"]["tokenSecretRef"]["name"], "token", "test-token"),
        ):
            apply(kubectl, namespace, router_secret(secret, key, value))
        metrics = f"127.0.0.1:{free_port()}"
        start_operator("--namespace", namespace, "--metrics", metrics)
        apply(kubectl, namespace, manifest)
        # The deadline covers the operator's start too (18 s of imports alone at load 26 on 2 cores).
        wait_phase(kubectl, namespace, "outbox", "Progressing", timeout=90)
        eventually(lambda: rows(postgres.dsn, EVENTS, namespace, "outbox"), 10, "the AnalysisStarted row")

        postgres.stop()
        kubectl("annotate", "shadowdeployment", "outbox", "-n", namespace, "shadowgate.io/action=promote")
        wait_phase(kubectl, namespace, "outbox", "Promoted")
        eventually(lambda: "Promoted" in reasons(kubectl, namespace, "outbox"), 10, "the Promoted Event")
        # The operator has tried to write the Promoted row and keeps it: the database is away.
        waiting = "shadowgate_rollout_history_rows_waiting"
        eventually(lambda: metric(f"http://{metrics}", waiting, name="outbox") >= 1, 30, "rows waiting")
        postgres.start()

        written = recorded_until(postgres.dsn, EVENTS, namespace, "outbox", "Promoted", 30)
        assert written.count("Promoted") == 1 and written[0] == "AnalysisStarted"
    finally:
        postgres.stop()
        postgres.cleanup()
