"""Issue 12 D6: inference traffic alone cannot move a decision.

The router trusts the client's X-Request-Id, and outcomes are joined to predictions by id. Before the
analysis scored one prediction per id, re-sending inference requests with the ids of published outcomes
and crafted inputs (so that the candidate's answer equals the outcome) turned a clearly worse candidate
into a promoted one within seconds, without the outcome token. Here the attack runs against the real
router, recording into PostgreSQL, while the real operator analyses: the candidate is still rolled back,
and the analysis counts the repeats it left unscored.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import httpx
import pytest

from shadowgate_operator.migrate import migrate_dsn
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import example, wait_phase
from tests.support.router import ModelServer, Router, router_config

pytestmark = [pytest.mark.cluster, pytest.mark.database]

CANDIDATE_BIAS = 1.0
"""The candidate answers sum(inputs) + 1, production sum(inputs): with outcomes sum(inputs) + N(0, 1),
the candidate's MAE is about 1.17 against production's 0.80."""


def body(value: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [value]}]}


async def traffic(router: Router, stop: asyncio.Event, published: list[tuple[str, float]]) -> None:
    """An honest client: a request a time, its outcome posted a moment later (and made public)."""
    rng = random.Random(3)
    async with httpx.AsyncClient(timeout=10) as client:
        index = 0
        while not stop.is_set():
            batch = []
            for _ in range(20):
                index += 1
                request_id, value = f"trade-{index}", rng.uniform(-5, 5)
                answer = await client.post(
                    f"{router.url}/v2/models/fraud/infer", json=body(value), headers={"X-Request-Id": request_id}
                )
                assert answer.status_code == 200
                batch.append({"request_id": request_id, "outcome": value + rng.gauss(0, 1)})
            posted = await client.post(
                f"{router.url}/outcomes", json={"outcomes": batch}, headers={"Authorization": f"Bearer {router.token}"}
            )
            assert posted.status_code == 202, posted.text
            published.extend((item["request_id"], item["outcome"]) for item in batch)
            await asyncio.sleep(0.1)


async def attack(router: Router, stop: asyncio.Event, published: list[tuple[str, float]]) -> int:
    """No token: three inference requests per published outcome, with its request id and an input crafted
    so that the candidate answers exactly the outcome (and production is off by one)."""
    sent = 0
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            if len(published) <= sent // 3:
                await asyncio.sleep(0.05)
                continue
            request_id, outcome = published[sent // 3]
            answer = await client.post(
                f"{router.url}/v2/models/fraud/infer",
                json=body(outcome - CANDIDATE_BIAS),
                headers={"X-Request-Id": request_id},
            )
            assert answer.status_code == 200
            sent += 1
    return sent


def test_replayed_ids_with_crafted_inputs_do_not_save_a_worse_candidate(
    kubectl: Kubectl,
    namespace: str,
    dsn: str,
    tmp_path: Path,
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
) -> None:
    name = "attacked"
    asyncio.run(migrate_dsn(dsn))  # the router records from its first request on
    production, candidate = ModelServer(tmp_path, bias=0.0), ModelServer(tmp_path, bias=CANDIDATE_BIAS)
    production.start()
    candidate.start()
    config = router_config(
        production.url, candidate.url, deployment=name, namespace=namespace, weight=100, stickyHeader=None
    )
    router = Router.with_file(tmp_path, dsn, config).start()
    try:
        start_operator("--namespace", namespace)
        analysis = {"interval": "5s", "minSamples": 100, "metric": "mae", "maxStepDuration": "5m"}
        apply_shadow(namespace, example(name, traffic={"mode": "shadow", "steps": [100]}, analysis=analysis))
        wait_phase(kubectl, namespace, name, "Progressing")

        async def run() -> int:
            stop = asyncio.Event()
            published: list[tuple[str, float]] = []
            honest = asyncio.create_task(traffic(router, stop, published))
            attacker = asyncio.create_task(attack(router, stop, published))
            try:
                await asyncio.to_thread(wait_phase, kubectl, namespace, name, "RolledBack", 180)
            finally:
                stop.set()
                await honest
            return await attacker

        sent = asyncio.run(run())
        assert sent > 300, "the attack ran: three requests per published outcome"
        status = wait_phase(kubectl, namespace, name, "RolledBack")["status"]
        assert status["lastDecision"]["action"] == "RollBack"
        assert "significantly worse on mae" in status["lastDecision"]["reason"]
        assert status["metrics"]["unscoredRepeats"] > 100, "the repeats were recorded, and left unscored"
    finally:
        router.stop()
        production.stop()
        candidate.stop()
