"""`shadowgate migrate`: apply the numbered SQL files in migrations/ that the database has not seen, then
bring the TimescaleDB layer up to date (timescale.py).

Each file runs in its own transaction and is recorded in `shadowgate_schema_migrations`; the whole run
holds a PostgreSQL advisory lock, so two processes (two operator replicas starting together) never
apply the same file twice: the second waits, then finds nothing to do. The TimescaleDB layer follows in
one more transaction, on every run: the extension may have been installed since the last one (the tables
are then converted), and `--retention` / `--compress-after` change the storage policy. Everything done
or left undone, and what the storage policy's next runs will drop or compress, is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from shadowgate_operator import timescale

MIGRATIONS_TABLE = "shadowgate_schema_migrations"
# Any fixed 64-bit number works; this one spells "shadowgt" in ASCII.
ADVISORY_LOCK_KEY = 0x736861646F776774
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migrations_dir() -> Path:
    """$SHADOWGATE_MIGRATIONS, else migrations/ at the repository (or image) root."""
    configured = os.environ.get("SHADOWGATE_MIGRATIONS")
    return Path(configured) if configured else Path(__file__).resolve().parents[2] / "migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()


def discover(directory: Path | None = None) -> list[Migration]:
    """The migration files in order; a misnamed .sql file or a repeated number is an error, not a skip."""
    directory = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise ValueError(f"{path}: migration files are named NNNN_lowercase_words.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [migration.version for migration in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"{directory}: two migration files share a number")
    return found


async def migrate(
    connection: asyncpg.Connection,
    directory: Path | None = None,
    *,
    convert_limit: int | None = timescale.AUTO_CONVERT_ROWS,
) -> list[Migration]:
    """Apply the pending migrations and the TimescaleDB layer; returns the migrations applied now
    (empty when the schema is current). Plain tables above `convert_limit` rows are not converted into
    hypertables (None: no limit); `migrate_with_report` says so."""
    applied, _ = await migrate_with_report(connection, directory, convert_limit=convert_limit)
    return applied


async def migrate_with_report(
    connection: asyncpg.Connection,
    directory: Path | None = None,
    *,
    convert_limit: int | None = timescale.AUTO_CONVERT_ROWS,
    changes: Mapping[str, dt.timedelta | None] | None = None,
) -> tuple[list[Migration], timescale.LayerReport]:
    """`migrate`, returning what the TimescaleDB layer found and did too; `changes` (retention,
    compress_after) change the stored storage policy first (ValueError if the result contradicts itself)."""
    migrations = discover(directory)
    await connection.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await connection.execute(
            f"""CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
                    version    integer PRIMARY KEY,
                    name       text        NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {row["version"] for row in await connection.fetch(f"SELECT version FROM {MIGRATIONS_TABLE}")}
        done: list[Migration] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES ($1, $2)", migration.version, migration.name
                )
            done.append(migration)
        async with connection.transaction():
            report = await timescale.apply(connection, convert_limit=convert_limit, changes=changes)
        return done, report
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)


async def migrate_dsn(dsn: str) -> list[Migration]:
    """`migrate` on a connection of its own: for tests, benchmarks and the demo."""
    connection = await asyncpg.connect(dsn)
    try:
        return await migrate(connection)
    finally:
        await connection.close()


async def database_problems(connection: asyncpg.Connection) -> list[str]:
    """What makes this database unsafe to analyse on, in words (empty when fine).

    A database with the timescaledb extension but without it in shared_preload_libraries answers
    queries on compressed chunks wrongly and silently, so it must be refused loudly.
    """
    problems = []
    has_extension = await connection.fetchval("SELECT count(*) > 0 FROM pg_extension WHERE extname = 'timescaledb'")
    if has_extension:
        preload = await connection.fetchval("SELECT current_setting('shared_preload_libraries', true)")
        if "timescaledb" not in (preload or ""):
            problems.append(
                "the timescaledb extension is installed but not in shared_preload_libraries "
                f"({preload or 'empty'}): add it and restart PostgreSQL, or results on compressed data are wrong"
            )
    return problems


async def _run(dsn: str, changes: dict[str, dt.timedelta | None]) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        problems = await database_problems(connection)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            return 1
        try:
            done, report = await migrate_with_report(connection, convert_limit=None, changes=changes)
        except ValueError as exc:  # a storage policy that contradicts itself: nothing of it was stored
            print(f"error: {exc}", file=sys.stderr)
            return 2
        current = await connection.fetchval(f"SELECT max(version) FROM {MIGRATIONS_TABLE}")
        summary = await timescale.summary(connection)
    finally:
        await connection.close()
    for migration in done:
        print(f"applied {migration.path.name}")
    print(f"schema at version {current}" + ("" if done else " (nothing to do)"))
    for note in report.notes:
        print(note)
    for problem in report.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"storage: {summary}")
    return 0


def run_with_database(args: argparse.Namespace, work: Callable[[str], Coroutine[Any, Any, int]]) -> int:
    """What the database subcommands share: the DSN from --dsn or $SHADOWGATE_DSN (exit 2 without one),
    then `work(dsn)`, with a database that cannot be reached or refuses reported in one line (exit 1)."""
    dsn = args.dsn or os.environ.get("SHADOWGATE_DSN")
    if not dsn:
        print("error: give --dsn or set SHADOWGATE_DSN (postgresql://user@host:port/database)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(work(dsn))
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _changes(args: argparse.Namespace) -> dict[str, dt.timedelta | None]:
    """The storage-policy settings the flags change (ValueError when one is malformed)."""
    changes: dict[str, dt.timedelta | None] = {}
    if args.retention is not None:
        changes["retention"] = timescale.parse_horizon(args.retention)
    if args.compress_after is not None:
        changes["compress_after"] = timescale.parse_horizon(args.compress_after)
    return changes


def run(args: argparse.Namespace) -> int:
    try:
        changes = _changes(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_with_database(args, lambda dsn: _run(dsn, changes))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="create or upgrade the database schema",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dsn", help="PostgreSQL/TimescaleDB connection string (default: $SHADOWGATE_DSN)")
    parser.add_argument(
        "--retention",
        metavar="HORIZON",
        help="drop predictions and outcomes older than this (e.g. 90d, 36h), or `none` to keep everything "
        "(the default); TimescaleDB full edition only. Stored in the database; its first run comes an hour "
        "later, and migrate says beforehand what it will drop",
    )
    parser.add_argument(
        "--compress-after",
        metavar="HORIZON",
        help="compress predictions and outcomes older than this (default 7d), or `none`; TimescaleDB full edition",
    )
    parser.set_defaults(func=run)
