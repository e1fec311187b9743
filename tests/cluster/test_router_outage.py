"""The database stopped for 30 s under load, then started: every request and every outcome ends up in the
database exactly once, and no request waited for it.

The test runs its own PostgreSQL (so stopping it disturbs no other test), gives the router a small memory
bound so that the outage overflows to the spool file, and sends predictions and outcomes throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from shadowgate_dev.localenv import Postgres
from tests.support.load import Result, client_session, percentile, run_load
from tests.support.router import ModelServer, Router, migrated_postgres, model_pair, router_config, wait_until

pytestmark = pytest.mark.database

RATE = 100.0
BEFORE, OUTAGE, AFTER = 5.0, 30.0, 5.0


@pytest.fixture
async def own_database() -> AsyncIterator[Postgres]:
    async with migrated_postgres() as postgres:
        yield postgres


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[ModelServer, ModelServer]]:
    with model_pair(tmp_path) as pair:
        yield pair


async def send_outcomes(router: Router, results: list[Result], done: asyncio.Event) -> list[str]:
    """Every 0.25 s, one batch with an outcome for each prediction answered since the last batch."""
    sent: list[str] = []
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {router.token}"}) as client:
        while True:
            finished = done.is_set()
            fresh = [result.request_id for result in results[len(sent) :]]
            if fresh:
                batch = [{"request_id": request_id, "outcome": len(sent) % 2} for request_id in fresh]
                answer = await client.post(f"{router.url}/outcomes", json=batch)
                assert answer.status_code == 202, answer.text
                sent += fresh
            if finished:
                return sent
            await asyncio.sleep(0.25)


async def test_a_30_second_outage_loses_and_doubles_nothing(
    own_database: Postgres, servers: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    config = router_config(servers[0].url, servers[1].url, deployment="outage", mode="shadow", weight=50)
    router = Router.with_file(tmp_path, own_database.dsn, config, "--memory-rows", "500").start()
    total = int((BEFORE + OUTAGE + AFTER) * RATE)
    answered: list[Result] = []
    spooled: list[float] = []
    try:
        async with client_session() as session:

            async def load() -> list[Result]:
                url = f"{router.url}/v2/models/fraud/infer"
                # In slices, so outcomes can follow the predictions as they are answered.
                for start in range(0, total, int(RATE)):
                    results = await run_load(url, int(RATE), RATE, session=session)
                    answered.extend(
                        Result(
                            start + r.index,
                            r.status,
                            r.latency,
                            r.request_id,
                            r.served_by,
                            b"",
                            start / RATE + r.scheduled,
                        )
                        for r in results
                    )
                return answered

            async def outage() -> None:
                await asyncio.sleep(BEFORE)
                await asyncio.to_thread(own_database.stop)
                down = time.monotonic()
                while time.monotonic() - down < OUTAGE:
                    await asyncio.sleep(1)
                    spooled.append(await asyncio.to_thread(router.metric, "shadowgate_router_spool_rows"))
                await asyncio.to_thread(own_database.start)

            done = asyncio.Event()
            load_task = asyncio.create_task(load())
            outcomes_task = asyncio.create_task(send_outcomes(router, answered, done))
            await asyncio.gather(load_task, outage())
            done.set()
            sent_outcomes = await outcomes_task

        assert [result.status for result in answered] == [200] * total
        during = [r.latency * 1000 for r in answered if BEFORE + 1 <= r.scheduled < BEFORE + OUTAGE]
        assert percentile(during, 0.99) < 250, "requests waited while the database was away"
        assert max(spooled) > 0, "the outage should have overflowed memory into the spool"
        assert router.metric("shadowgate_router_database_errors_total") > 0
        try:
            wait_until(lambda: router.pending_rows() == 0, 60, "the router to write everything it held")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrouter log:\n{router.log()[-6000:]}") from None
    finally:
        router.stop()

    connection = await asyncpg.connect(own_database.dsn)
    try:
        predictions = await connection.fetch(
            "SELECT request_id, count(*) AS copies FROM predictions WHERE deployment = 'outage' GROUP BY 1"
        )
        outcomes = await connection.fetch(
            "SELECT request_id, count(*) AS copies FROM outcomes WHERE deployment = 'outage' GROUP BY 1"
        )
    finally:
        await connection.close()
    assert {row["request_id"] for row in predictions} == {result.request_id for result in answered}
    assert {row["copies"] for row in predictions} == {1}, "a prediction was written twice"
    assert len(predictions) == total
    assert {row["request_id"] for row in outcomes} == set(sent_outcomes)
    assert {row["copies"] for row in outcomes} == {1}, "an outcome was written twice"
    print(
        f"{total} predictions and {len(sent_outcomes)} outcomes, each in the database once; "
        f"up to {max(spooled):.0f} rows (predictions and outcomes) waited on disk; p99 during the outage "
        f"{percentile(during, 0.99):.1f} ms"
    )
