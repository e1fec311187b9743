"""Databases of a test's own in the session's throwaway clusters, on TimescaleDB or on plain PostgreSQL.

All three are supported (the migrations use TimescaleDB where the extension exists, and only its
hypertables on the Apache-only edition), so the query and migration tests run on each: `EDITIONS` are the
pytest params, `own_database(request, kind)` makes the database.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shadowgate_dev.localenv import Postgres
from shadowgate_operator.migrate import migrate_dsn

TIMESCALEDB, APACHE, POSTGRES = "timescaledb", "apache", "postgres"
EDITIONS = (TIMESCALEDB, APACHE, POSTGRES)
"""Param ids: the test runs on a database with the timescaledb extension (full edition), with the
extension under `timescaledb.license = apache`, and on plain PostgreSQL."""


def with_database(dsn: str, name: str) -> str:
    """The same server and user, another database."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


def cluster_dsn(request: pytest.FixtureRequest, kind: str) -> str:
    """An administrative DSN of the session cluster for `kind`: the TimescaleDB one (skipped where this
    machine has no TimescaleDB build) or the plain one."""
    if kind == POSTGRES:
        plain: Postgres = request.getfixturevalue("plain_database")
        return plain.dsn
    if kind == APACHE:
        apache: Postgres = request.getfixturevalue("apache_database")
        if not apache.timescale:
            pytest.skip(f"no TimescaleDB on this machine: {apache.timescale_reason}")
        return apache.dsn
    database: Postgres | None = request.getfixturevalue("database")
    if database is not None and not database.timescale:
        pytest.skip(f"no TimescaleDB on this machine: {database.timescale_reason}")
    dsn: str = request.getfixturevalue("dsn")
    return dsn


async def create_database(admin_dsn: str, name: str, *, timescaledb: bool, migrated: bool = True) -> str:
    """CREATE DATABASE `name` beside `admin_dsn`'s, with the extension when asked, migrated when asked."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(admin_dsn, name)
    if timescaledb:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute("CREATE EXTENSION timescaledb")
        finally:
            await connection.close()
    if migrated:
        await migrate_dsn(dsn)
    return dsn


async def drop_database(admin_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextmanager
def own_database(request: pytest.FixtureRequest, kind: str, prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A fresh database for one module or test on `kind` (TIMESCALEDB or POSTGRES), dropped afterwards."""
    admin = cluster_dsn(request, kind)
    name = f"{prefix}_{kind}_{secrets.token_hex(4)}"
    dsn = asyncio.run(create_database(admin, name, timescaledb=kind != POSTGRES, migrated=migrated))
    try:
        yield dsn
    finally:
        asyncio.run(drop_database(admin, name))
