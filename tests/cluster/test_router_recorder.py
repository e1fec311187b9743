"""The recorder against a real PostgreSQL: rows survive a router restart during an outage (through the spool),
a replayed batch lands once, and a row the database refuses is set aside instead of blocking the rest."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from shadowgate_dev.localenv import Postgres
from shadowgate_router.metrics import RouterMetrics
from shadowgate_router.recorder import OUTCOME_COLUMNS, PREDICTION_COLUMNS, Recorder, now_us
from shadowgate_router.spool import Spool
from tests.support.router import migrated_postgres

pytestmark = pytest.mark.database


@pytest.fixture
async def own_database() -> AsyncIterator[Postgres]:
    async with migrated_postgres() as postgres:
        yield postgres


def outcome_rows(deployment: str, count: int) -> list[tuple[object, ...]]:
    start = now_us()
    return [(start + n, "ns", deployment, f"r-{n}", float(n)) for n in range(count)]


async def copies(dsn: str, deployment: str) -> dict[str, int]:
    connection = await asyncpg.connect(dsn)
    try:
        found = await connection.fetch(
            "SELECT request_id, count(*) AS n FROM outcomes WHERE deployment = $1 GROUP BY 1", deployment
        )
    finally:
        await connection.close()
    return {row["request_id"]: row["n"] for row in found}


def recorder(postgres: Postgres, spool: Path, **options: int) -> Recorder:
    return Recorder("outcomes", OUTCOME_COLUMNS, postgres.dsn, spool, RouterMetrics(), flush_interval=0.05, **options)


async def test_rows_outlive_a_restart_during_an_outage_and_land_once(own_database: Postgres, tmp_path: Path) -> None:
    deployment = f"restart-{secrets.token_hex(3)}"
    rows = outcome_rows(deployment, 1000)
    await asyncio.to_thread(own_database.stop)

    first = recorder(own_database, tmp_path, memory_rows=100)
    first.start()
    for row in rows:
        first.put(row)
    for _ in range(200):  # beyond the memory bound, rows go to disk
        if first.spool.rows >= 900:
            break
        await asyncio.sleep(0.05)
    assert first.spool.rows >= 900, "beyond the memory bound, rows go to disk"
    await first.close(1.0)  # the database is still away: everything ends up on disk
    assert Spool(tmp_path, "outcomes").rows == 1000

    await asyncio.to_thread(own_database.start)
    second = recorder(own_database, tmp_path)
    second.start()
    for _ in range(100):
        if not second.pending:
            break
        await asyncio.sleep(0.05)
    await second.close(5.0)
    assert await copies(own_database.dsn, deployment) == {f"r-{n}": 1 for n in range(1000)}


async def test_a_batch_replayed_after_a_crash_lands_once(own_database: Postgres, tmp_path: Path) -> None:
    deployment = f"replay-{secrets.token_hex(3)}"
    rows = outcome_rows(deployment, 50)
    Spool(tmp_path / "a", "outcomes").append(rows)
    Spool(tmp_path / "b", "outcomes").append(rows)  # the same rows, as if written but never marked done
    for directory in ("a", "b"):
        writer = recorder(own_database, tmp_path / directory)
        writer.start()
        await writer.close(5.0)
    assert await copies(own_database.dsn, deployment) == {f"r-{n}": 1 for n in range(50)}


async def test_prediction_rows_spooled_by_an_older_router_land_with_the_newer_columns_null(
    own_database: Postgres, tmp_path: Path
) -> None:
    """A router upgraded during an outage finds rows its predecessor spooled without sticky_key and segment
    (the columns added last): they are written with those columns NULL, beside the new router's full rows."""
    deployment = f"older-{secrets.token_hex(3)}"
    start = now_us()
    sides = ("1.0", 1.0, None, 2.5, 200, None, "2.0", 1.5, None, 3.0, 200, None)
    older = [
        (start + n, "ns", deployment, f"old-{n}", "production", "shadow", 100, "rev", *sides, False, None)
        for n in range(3)
    ]
    assert len(older[0]) == len(PREDICTION_COLUMNS) - 2
    Spool(tmp_path, "predictions").append(older)
    writer = Recorder(
        "predictions", PREDICTION_COLUMNS, own_database.dsn, tmp_path, RouterMetrics(), flush_interval=0.05
    )
    writer.start()
    writer.put(
        (start + 10, "ns", deployment, "new-0", "production", "shadow", 100, "rev", *sides, False, None, "k", "A")
    )
    await writer.close(5.0)
    connection = await asyncpg.connect(own_database.dsn)
    try:
        found = await connection.fetch(
            "SELECT request_id, sticky_key, segment FROM predictions WHERE deployment = $1 ORDER BY time", deployment
        )
    finally:
        await connection.close()
    assert [tuple(row) for row in found] == [
        ("old-0", None, None),
        ("old-1", None, None),
        ("old-2", None, None),
        ("new-0", "k", "A"),
    ]


async def test_a_row_the_database_refuses_is_set_aside(own_database: Postgres, tmp_path: Path) -> None:
    deployment = f"refused-{secrets.token_hex(3)}"
    rows = outcome_rows(deployment, 5)
    poisoned = (rows[2][0], "ns", deployment, "nul\x00byte", 2.0)  # text columns cannot hold NUL
    rows[2] = poisoned
    writer = recorder(own_database, tmp_path)
    writer.start()
    for row in rows:
        writer.put(row)
    await writer.close(5.0)
    assert set(await copies(own_database.dsn, deployment)) == {"r-0", "r-1", "r-3", "r-4"}
    rejected = [json.loads(line) for line in (tmp_path / "outcomes.rejected.jsonl").read_text().splitlines()]
    assert rejected == [list(poisoned)]
    assert writer.metrics.rows_rejected.labels("outcomes")._value.get() == 1


async def test_one_refused_row_in_a_big_batch_costs_a_few_statements(
    own_database: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: a refused row sent its whole batch down a row-by-row path (2,000 statements); by halves,
    the good rows still go in and the bad one is set aside in about twenty."""
    deployment = f"bisect-{secrets.token_hex(3)}"
    rows = outcome_rows(deployment, 2_000)
    rows[1_234] = (rows[1_234][0], "ns", deployment, "nul\x00byte", 2.0)
    writer = recorder(own_database, tmp_path, batch_rows=2_000)
    statements = 0
    insert = writer._insert

    async def counting(*args: object) -> None:
        nonlocal statements
        statements += 1
        await insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_insert", counting)
    writer.start()
    for row in rows:
        writer.put(row)
    await writer.close(10.0)
    assert len(await copies(own_database.dsn, deployment)) == 1_999
    assert statements <= 2 * 12, f"{statements} statements"
