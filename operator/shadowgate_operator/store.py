"""The operator's side of the database: pools per DSN, schema on first use, and the rows it writes.

Each ShadowDeployment names its database through spec.database.secretRef (the same DSN its router
writes to); several may share one. A pool is opened on first use of a DSN, after checking the database
is safe to analyse on and applying pending migrations (unless the operator runs with --no-migrate).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from shadowgate_operator.migrate import database_problems, migrate_with_report

logger = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    """The database cannot be used right now; the message says why in words."""


DSN_FORM = "postgresql://user:password@host:5432/database"


def dsn_problem(dsn: str) -> str | None:
    """Why `dsn` is not a PostgreSQL URL asyncpg (and the router) can use, in words that never quote it:
    it comes from a Secret, and the answer goes into status and Events. None when it looks usable."""
    if not dsn.strip():
        return "it is empty"
    scheme, separator, rest = dsn.partition("://")
    if not separator or scheme not in ("postgresql", "postgres"):
        return "it does not start with postgresql:// (or postgres://)"
    if any(character.isspace() or not character.isprintable() for character in dsn):
        return "it contains a space or a line break (a trailing newline from `echo`?)"
    location = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    for host in location.split(","):  # asyncpg takes several hosts, each with its port
        port = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in port:
            number = port.rpartition(":")[2]
            if not (number.isascii() and number.isdigit() and 1 <= int(number) <= 65535):
                return "a port in it is not a number from 1 to 65535"
        if host.startswith("[") and "]" not in host:
            return "an IPv6 host in it has no closing ]"
    return None


@dataclass
class Databases:
    run_migrations: bool = True
    _pools: dict[str, asyncpg.Pool] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def pool(self, dsn: str) -> asyncpg.Pool:
        """The pool for `dsn`, opened (and the schema brought up to date) on first use."""
        if dsn in self._pools:
            return self._pools[dsn]
        async with self._lock:
            if dsn in self._pools:
                return self._pools[dsn]
            pool = await asyncpg.create_pool(dsn, min_size=0, max_size=4, timeout=10, command_timeout=30)
            try:
                async with pool.acquire() as connection:
                    problems = await database_problems(connection)
                    if problems:
                        raise DatabaseUnavailable("; ".join(problems))
                    if self.run_migrations:
                        _, report = await migrate_with_report(connection)
                        for problem in report.problems:
                            logger.warning("database %s: %s", _where(dsn), problem)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                await pool.close()
                raise DatabaseUnavailable(f"cannot use the database: {_describe(exc)}") from exc
            except (ValueError, asyncpg.InterfaceError) as exc:
                # The DSN did not parse (asyncpg's words may quote it, password and all: name the type only).
                await pool.close()
                raise DatabaseUnavailable(f"the DSN is not one asyncpg can use ({type(exc).__name__})") from exc
            except BaseException:
                await pool.close()
                raise
            self._pools[dsn] = pool
            return pool

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()


def _where(dsn: str) -> str:
    """host:port/database of a DSN, without its credentials (for logs)."""
    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port}{parts.path}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class EventRow:
    time: dt.datetime
    namespace: str
    deployment: str
    event: str
    phase: str | None
    step: int | None
    weight: int | None
    message: str
    details: dict[str, Any] | None = None


async def record_events(pool: asyncpg.Pool, rows: list[EventRow]) -> None:
    if not rows:
        return
    await pool.executemany(
        """INSERT INTO deployment_events (time, namespace, deployment, event, phase, step, weight, message, details)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)""",
        [
            (r.time, r.namespace, r.deployment, r.event, r.phase, r.step, r.weight, r.message,
             json.dumps(r.details) if r.details is not None else None)
            for r in rows
        ],
    )  # fmt: skip


@dataclass(frozen=True)
class MetricsRow:
    time: dt.datetime
    namespace: str
    deployment: str
    step: int
    weight: int
    samples: int
    metric: str
    production_value: float | None
    candidate_value: float | None
    improvement: float | None
    overall_score: float | None
    p_value: float | None
    decision: str
    reason: str
    metrics: dict[str, Any] | None = None


async def record_metrics(pool: asyncpg.Pool, row: MetricsRow) -> None:
    await pool.execute(
        """INSERT INTO deployment_metrics (time, namespace, deployment, step, weight, samples, metric,
               production_value, candidate_value, improvement, overall_score, p_value, decision, reason, metrics)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb)""",
        row.time, row.namespace, row.deployment, row.step, row.weight, row.samples, row.metric,
        row.production_value, row.candidate_value, row.improvement, row.overall_score, row.p_value,
        row.decision, row.reason, json.dumps(row.metrics) if row.metrics is not None else None,
    )  # fmt: skip


@dataclass
class Outbox:
    """deployment_events and deployment_metrics rows the database has not taken yet, per ShadowDeployment.

    A database that is away delays these rows, it does not lose them: each reconcile that reaches the
    database writes what waits first, oldest first, each row with its own time. Memory is bounded by
    `limit` rows per deployment (the oldest go first, with a log line); rows still waiting when the
    operator stops are lost, while the Events and status that say the same remain.
    """

    limit: int = 10_000
    _events: dict[tuple[str, str], list[EventRow]] = field(default_factory=dict)
    _metrics: dict[tuple[str, str], list[MetricsRow]] = field(default_factory=dict)

    def add(self, key: tuple[str, str], events: Sequence[EventRow] = (), metrics: Sequence[MetricsRow] = ()) -> None:
        for waiting, new in ((self._events, events), (self._metrics, metrics)):
            if not new:
                continue
            rows: list[Any] = waiting.setdefault(key, [])
            rows.extend(new)
            if len(rows) > self.limit:
                logger.error(
                    "%s/%s: %d rows waited too long for the database; dropping the oldest", *key, len(rows) - self.limit
                )
                del rows[: len(rows) - self.limit]

    def waiting(self, key: tuple[str, str]) -> int:
        return len(self._events.get(key, ())) + len(self._metrics.get(key, ()))

    async def flush(self, pool: asyncpg.Pool, key: tuple[str, str]) -> None:
        """Write what waits for this deployment; on an error, what was not written keeps waiting."""
        events = self._events.get(key)
        if events:
            await record_events(pool, events)
            del self._events[key]
        metrics = self._metrics.get(key)
        while metrics:
            await record_metrics(pool, metrics[0])
            metrics.pop(0)
        self._metrics.pop(key, None)

    def forget(self, key: tuple[str, str]) -> None:
        dropped = self.waiting(key)
        if dropped:
            logger.warning("%s/%s is gone; %d of its rows never reached the database", *key, dropped)
        self._events.pop(key, None)
        self._metrics.pop(key, None)


async def record_spec(
    pool: asyncpg.Pool, namespace: str, deployment: str, generation: int, revision: str, spec: dict[str, Any]
) -> None:
    """The spec an analysis ran under, once per generation (replay reads settings from here)."""
    await pool.execute(
        """INSERT INTO shadow_deployments (namespace, deployment, generation, candidate_revision, spec)
           VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT DO NOTHING""",
        namespace, deployment, generation, revision, json.dumps(spec),
    )  # fmt: skip
