"""`shadowgate migrate` on every edition shadowgate supports: TimescaleDB (full), its Apache-only edition
and plain PostgreSQL, each in a database of the test's own.

Also the defects only a real TimescaleDB shows: storage policies that acted the moment migrate made them
(rows dropped, a race between retention and compression), an extension installed after the first migrate
that was never used, and a database with the extension but without it preloaded.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shadowgate_dev.localenv import Postgres
from shadowgate_operator import timescale
from shadowgate_operator.cli import main
from shadowgate_operator.migrate import MIGRATIONS_TABLE, database_problems, discover, migrate_dsn, migrate_with_report
from shadowgate_operator.store import Databases, DatabaseUnavailable
from tests.support.databases import APACHE, EDITIONS, POSTGRES, TIMESCALEDB, own_database

pytestmark = pytest.mark.database

TABLES = sorted(timescale.HYPERTABLES)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def fetch(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(dsn)
    try:
        return [dict(row) for row in await connection.fetch(sql, *args)]
    finally:
        await connection.close()


async def value(dsn: str, sql: str, *args: Any) -> Any:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


def migrate_cli(dsn: str, *flags: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["migrate", "--dsn", dsn, *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def hypertables(dsn: str) -> list[str]:
    if not await value(dsn, "SELECT count(*) > 0 FROM pg_extension WHERE extname = 'timescaledb'"):
        return []
    rows = await fetch(dsn, "SELECT hypertable_name FROM timescaledb_information.hypertables ORDER BY 1")
    return [row["hypertable_name"] for row in rows]


async def jobs(dsn: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Our policy jobs by (kind, table): job id, horizon, next start."""
    rows = await fetch(
        dsn,
        """SELECT job_id, proc_name, hypertable_name, next_start,
                  coalesce(config->>'drop_after', config->>'compress_after')::interval AS horizon
           FROM timescaledb_information.jobs WHERE proc_name IN ('policy_retention', 'policy_compression')""",
    )
    return {(row["proc_name"].removeprefix("policy_"), row["hypertable_name"]): row for row in rows}


async def insert_predictions(dsn: str, days_ago: list[float], deployment: str = "old") -> None:
    """One prediction (and its outcome) per age, stamped that many days before now."""
    connection = await asyncpg.connect(dsn)
    try:
        now: dt.datetime = await connection.fetchval("SELECT now()")
        stamps = [now - dt.timedelta(days=days) for days in days_ago]
        await connection.executemany(
            """INSERT INTO predictions (time, namespace, deployment, request_id, served_by, mode, weight)
               VALUES ($1, 'ns', $2, $3, 'production', 'shadow', 10)""",
            [(stamp, deployment, f"r{index}") for index, stamp in enumerate(stamps)],
        )
        await connection.executemany(
            "INSERT INTO outcomes (time, namespace, deployment, request_id, outcome) VALUES ($1, 'ns', $2, $3, 1)",
            [(stamp + dt.timedelta(seconds=5), deployment, f"r{index}") for index, stamp in enumerate(stamps)],
        )
    finally:
        await connection.close()


@pytest.fixture(params=EDITIONS)
def edition_dsn(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(edition, DSN) of a fresh, unmigrated database on each edition."""
    with own_database(request, request.param, "test_migrations", migrated=False) as dsn:
        yield request.param, dsn


@pytest.fixture
def timescale_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, unmigrated database with the timescaledb extension (full edition)."""
    with own_database(request, TIMESCALEDB, "test_migrations", migrated=False) as dsn:
        yield dsn


@pytest.fixture
def plain_tables_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, unmigrated database without the extension, in the TimescaleDB cluster (it can be added)."""
    with own_database(request, TIMESCALEDB, "test_migrations", migrated=False) as dsn:
        run(_drop_extension(dsn))
        yield dsn


async def _drop_extension(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("DROP EXTENSION timescaledb")
    finally:
        await connection.close()


# --- every edition -------------------------------------------------------------------------------------


def test_migrate_makes_the_schema_on_every_edition_and_a_second_run_changes_nothing(
    edition_dsn: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    kind, dsn = edition_dsn
    code, out, err = migrate_cli(dsn, capsys=capsys)
    assert code == 0, err
    assert f"schema at version {discover()[-1].version}" in out
    assert run(value(dsn, "SELECT retention IS NULL AND compress_after = interval '7 days' FROM storage_policy"))
    assert run(value(dsn, "SELECT to_regclass('predictions_per_minute') IS NULL"))
    if kind == POSTGRES:
        assert run(hypertables(dsn)) == []
        assert "storage: plain PostgreSQL (no timescaledb extension); nothing compressed or dropped" in out
    elif kind == APACHE:
        assert run(hypertables(dsn)) == TABLES
        assert run(jobs(dsn)) == {}
        assert "apache license: hypertables only" in out
    else:
        assert run(hypertables(dsn)) == TABLES
        scheduled = run(jobs(dsn))
        # Compression only (retention is off unless asked for), and not at once.
        assert set(scheduled) == {("compression", "predictions"), ("compression", "outcomes")}
        now = run(value(dsn, "SELECT now()"))
        assert all(job["next_start"] >= now + dt.timedelta(minutes=60) for job in scheduled.values())
        assert "retention none (everything kept), compression after 7 days" in out
    first = run(jobs(dsn)) if kind == TIMESCALEDB else {}

    code, out, err = migrate_cli(dsn, capsys=capsys)
    assert code == 0 and "(nothing to do)" in out, err
    assert "converted" not in out and "policy" not in out
    if kind == TIMESCALEDB:
        assert run(jobs(dsn)) == first


def test_the_request_id_keys_lead_with_request_id_and_keep_rows_unique_on_an_existing_database(
    edition_dsn: tuple[str, str], tmp_path: Path
) -> None:
    """Migration 0009 rebuilds the request-id keys of a database that has rows (on TimescaleDB, some in
    compressed chunks): same rows, same uniqueness, request_id first (the analysis's lookups descend it)."""
    kind, dsn = edition_dsn
    earlier = tmp_path / "migrations"
    earlier.mkdir()
    for migration in discover():
        if migration.version < 9:
            (earlier / migration.path.name).write_text(migration.sql)
    run(_migrate_from(dsn, earlier))
    run(insert_predictions(dsn, [30, 3, 0.1]))
    if kind == TIMESCALEDB:
        older = "SELECT count(compress_chunk(c)) FROM show_chunks('predictions', older_than => interval '7 days') c"
        assert run(value(dsn, older)) == 1
    assert run(keys(dsn)) == {
        "predictions_request_key": '(namespace, deployment, request_id, "time")',
        "outcomes_request_key": '(namespace, deployment, request_id, "time")',
    }

    run(_migrate_from(dsn, None))
    assert run(keys(dsn)) == {
        "predictions_request_id_key": '(request_id, namespace, deployment, "time")',
        "outcomes_request_id_key": '(request_id, namespace, deployment, "time")',
    }
    assert run(value(dsn, "SELECT count(*) FROM predictions")) == 3
    for index in range(3):  # every row again, the compressed one too: refused, or a no-op with ON CONFLICT
        again = f"""INSERT INTO predictions (time, namespace, deployment, request_id, served_by, mode, weight)
                    SELECT time, namespace, deployment, request_id, served_by, mode, weight FROM predictions
                    WHERE request_id = 'r{index}'"""
        with pytest.raises(asyncpg.UniqueViolationError):
            run(value(dsn, again))
        run(value(dsn, again + " ON CONFLICT DO NOTHING"))
    assert run(value(dsn, "SELECT count(*) FROM predictions")) == 3


async def keys(dsn: str) -> dict[str, str]:
    """The unique request-id keys of predictions and outcomes: name -> columns."""
    rows = await fetch(
        dsn,
        """SELECT indexname, substring(indexdef from '\\(.*\\)') AS columns FROM pg_indexes
           WHERE schemaname = current_schema() AND tablename IN ('predictions', 'outcomes')
             AND indexdef LIKE 'CREATE UNIQUE INDEX%'""",
    )
    return {row["indexname"]: row["columns"] for row in rows}


async def _migrate_from(dsn: str, directory: Path | None) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await migrate_with_report(connection, directory)
    finally:
        await connection.close()


# --- fix 2: the storage policy ------------------------------------------------------------------------


def test_a_retention_policy_says_what_it_will_drop_and_drops_nothing_at_once(
    timescale_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's migrate on a database with older data: 90 days' retention deleted everything older
    within a second, and the first compression run failed on chunks dropped under it. Now retention is
    off until asked for; asked for, migrate says what its first run will drop and when, and the two
    jobs' first runs are an hour away and apart."""
    code, _, err = migrate_cli(timescale_dsn, capsys=capsys)
    assert code == 0, err
    run(insert_predictions(timescale_dsn, [120, 100, 40, 20, 1]))
    code, out, err = migrate_cli(timescale_dsn, "--retention", "90d", capsys=capsys)
    assert code == 0, err
    assert "predictions: retention after 90 days; its first run, at " in out
    assert "drops 2 chunks of rows stamped" in out  # the 120- and 100-day-old rows' weekly chunks
    assert "retention 90 days, compression after 7 days" in out
    assert run(value(timescale_dsn, "SELECT count(*) FROM predictions")) == 5  # nothing dropped yet

    scheduled = run(jobs(timescale_dsn))
    retention, compression = scheduled[("retention", "predictions")], scheduled[("compression", "predictions")]
    now = run(value(timescale_dsn, "SELECT now()"))
    assert retention["horizon"] == dt.timedelta(days=90)
    assert retention["next_start"] >= now + timescale.POLICY_START_DELAY - dt.timedelta(minutes=1)
    assert compression["next_start"] >= retention["next_start"] + timescale.POLICY_STAGGER

    # Their first runs, in the order they are scheduled: the old rows go, compression finds every chunk.
    for job in (retention, compression, scheduled[("retention", "outcomes")], scheduled[("compression", "outcomes")]):
        run(_run_job(timescale_dsn, job["job_id"]))
    ages = run(fetch(timescale_dsn, "SELECT round(extract(epoch FROM now() - time) / 86400) AS days FROM predictions"))
    assert sorted(int(row["days"]) for row in ages) == [1, 20, 40]
    assert run(value(timescale_dsn, "SELECT count(*) FROM outcomes")) == 3
    compressed = run(
        value(
            timescale_dsn,
            "SELECT count(*) FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'predictions' AND is_compressed",
        )
    )
    assert compressed == 2  # the 40- and 20-day-old rows' chunks

    # Back to keeping everything: the retention jobs go.
    code, out, _ = migrate_cli(timescale_dsn, "--retention", "none", capsys=capsys)
    assert code == 0 and "predictions: retention policy removed" in out
    assert {kind for kind, _ in run(jobs(timescale_dsn))} == {"compression"}


async def _run_job(dsn: str, job_id: int) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("CALL run_job($1)", job_id)
    finally:
        await connection.close()


def test_a_policy_that_contradicts_itself_is_refused(timescale_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = migrate_cli(timescale_dsn, "--retention", "5d", capsys=capsys)
    assert code == 2 and "compress_after (7 days) must be shorter than retention (5 days)" in err
    code, _, err = migrate_cli(timescale_dsn, "--retention", "soon", capsys=capsys)
    assert code == 2 and "is not a horizon like 90d" in err
    assert run(value(timescale_dsn, "SELECT retention FROM storage_policy")) is None


def test_a_database_migrated_by_the_first_timescale_migration_keeps_its_horizons(
    timescale_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the first version of 0002 left (hypertables, 90 days' retention, 7 days' compression, the
    unread aggregate) is recorded as the storage policy; its jobs stay as they are, the aggregate goes."""
    run(_as_the_first_0002_left_it(timescale_dsn))
    # Those jobs start about a second after they are made (and so move their next_start): compare the rest.
    before = {key: (job["job_id"], job["horizon"]) for key, job in run(jobs(timescale_dsn)).items()}
    assert set(before) == {
        (kind, table) for kind in ("retention", "compression") for table in ("predictions", "outcomes")
    }
    code, out, err = migrate_cli(timescale_dsn, capsys=capsys)
    assert code == 0, err
    assert "applied 0005_storage_policy.sql" in out
    assert "storage: timescaledb" in out and "retention 90 days, compression after 7 days" in out
    # Chunks as long as the compression horizon from now on: a read touches two of them, not eight.
    assert "predictions: new chunks span 7 days (they spanned 1 day)" in out
    assert {key: (job["job_id"], job["horizon"]) for key, job in run(jobs(timescale_dsn)).items()} == before
    assert run(value(timescale_dsn, "SELECT to_regclass('predictions_per_minute') IS NULL"))


async def _as_the_first_0002_left_it(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for migration in discover()[:2]:
            await connection.execute(migration.sql)
        await connection.execute(
            f"""CREATE TABLE {MIGRATIONS_TABLE} (version integer PRIMARY KEY, name text NOT NULL,
                                                  applied_at timestamptz NOT NULL DEFAULT now());
                INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES (1, 'tables'), (2, 'timescale')"""
        )
        first = {
            "predictions": "1 day",
            "outcomes": "1 day",
            "deployment_metrics": "7 days",
            "deployment_events": "30 days",
        }
        for table, interval in first.items():
            await connection.execute(
                f"SELECT create_hypertable('{table}', 'time', chunk_time_interval => '{interval}'::interval)"
            )
        for table in timescale.COMPRESSED:
            await connection.execute(
                f"""ALTER TABLE {table} SET (timescaledb.compress, timescaledb.compress_segmentby =
                    'namespace, deployment', timescaledb.compress_orderby = 'time DESC')"""
            )
            await connection.execute(f"SELECT add_compression_policy('{table}', interval '7 days')")
            await connection.execute(f"SELECT add_retention_policy('{table}', interval '90 days')")
        await connection.execute(
            """CREATE MATERIALIZED VIEW predictions_per_minute WITH (timescaledb.continuous) AS
               SELECT time_bucket(interval '1 minute', time) AS bucket, namespace, deployment, count(*) AS requests
               FROM predictions GROUP BY 1, 2, 3 WITH NO DATA"""
        )
    finally:
        await connection.close()


# --- fix 3: the extension installed after the first migrate --------------------------------------------


def test_tables_are_converted_when_the_extension_arrives_after_the_first_migrate(
    plain_tables_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = plain_tables_dsn
    code, out, err = migrate_cli(dsn, capsys=capsys)
    assert code == 0 and "storage: plain PostgreSQL" in out, err
    run(insert_predictions(dsn, [30, 3, 0.1]))
    run(_create_extension(dsn))

    # The operator's migrate converts small tables by itself; above its limit it says why not, and leaves
    # them as they are (converting copies every row under a lock).
    _, report = run(_migrate_with_limit(dsn, 2))
    assert any("predictions is a plain table with more than 2 rows" in p and "run `shadowgate migrate`" in p
               for p in report.problems)  # fmt: skip
    assert run(hypertables(dsn)) == ["deployment_events", "deployment_metrics"]  # empty: converted
    assert run(jobs(dsn)) == {}

    code, out, err = migrate_cli(dsn, capsys=capsys)
    assert code == 0, err
    assert "predictions: converted into a hypertable (3 rows copied into chunks)" in out
    assert "outcomes: converted into a hypertable (3 rows copied into chunks)" in out
    assert "outcomes: compression after 7 days; its first run" in out and "compresses 1 chunk of rows stamped" in out
    assert run(hypertables(dsn)) == TABLES
    assert run(value(dsn, "SELECT count(*) FROM predictions")) == 3
    assert {kind for kind, _ in run(jobs(dsn))} == {"compression"}


async def _create_extension(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("CREATE EXTENSION timescaledb")
    finally:
        await connection.close()


async def _migrate_with_limit(dsn: str, limit: int) -> tuple[Any, timescale.LayerReport]:
    connection = await asyncpg.connect(dsn)
    try:
        return await migrate_with_report(connection, convert_limit=limit)
    finally:
        await connection.close()


# --- a misconfigured TimescaleDB is refused, loudly ---------------------------------------------------


def test_a_database_without_timescaledb_preloaded_is_refused(
    database: Postgres | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the extension installed but not preloaded, compressed chunks vanish from answers silently:
    migrate and the operator refuse such a database and say how to fix it."""
    if database is None or not database.timescale:
        pytest.skip("no TimescaleDB on this machine")
    with Postgres() as cluster:
        run(migrate_dsn(cluster.dsn))
        cluster.stop()
        cluster.settings["shared_preload_libraries"] = ""
        cluster.start()
        problems = run(_problems(cluster.dsn))
        assert len(problems) == 1 and "not in shared_preload_libraries" in problems[0]
        code, _, err = migrate_cli(cluster.dsn, capsys=capsys)
        assert code == 1 and "error: the timescaledb extension is installed but not in shared_preload_libraries" in err
        with pytest.raises(DatabaseUnavailable, match="add it and restart PostgreSQL"):
            run(_open_pool(cluster.dsn))


async def _problems(dsn: str) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        return await database_problems(connection)
    finally:
        await connection.close()


async def _open_pool(dsn: str) -> None:
    databases = Databases()
    try:
        await databases.get(dsn)
    finally:
        await databases.close()
