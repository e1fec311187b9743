"""`shadowgate migrate`: apply the numbered SQL files in migrations/ that the database has not seen.

Each file runs in its own transaction and is recorded in `shadowgate_schema_migrations`; the whole run
holds a PostgreSQL advisory lock, so two processes (two operator replicas starting together) never
apply the same file twice: the second waits, then finds nothing to do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

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


async def migrate(connection: asyncpg.Connection, directory: Path | None = None) -> list[Migration]:
    """Apply the pending migrations; returns those applied now (empty when the schema is current)."""
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
        return done
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


async def _run(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        problems = await database_problems(connection)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            return 1
        done = await migrate(connection)
        current = await connection.fetchval(f"SELECT max(version) FROM {MIGRATIONS_TABLE}")
    finally:
        await connection.close()
    for migration in done:
        print(f"applied {migration.path.name}")
    print(f"schema at version {current}" + ("" if done else " (nothing to do)"))
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


def run(args: argparse.Namespace) -> int:
    return run_with_database(args, _run)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="create or upgrade the database schema",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dsn", help="PostgreSQL/TimescaleDB connection string (default: $SHADOWGATE_DSN)")
    parser.set_defaults(func=run)
