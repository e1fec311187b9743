"""The operator's side of the database: pools per DSN, schema on first use, and the rows it writes.

Each ShadowDeployment names its database through spec.database.secretRef (the same DSN its router
writes to); several may share one. A pool is opened on first use of a DSN, after checking the database
is safe to analyse on and applying pending migrations (unless the operator runs with --no-migrate).

History rows (deployment_events, deployment_metrics) are written idempotently: a row whose deployment,
time and event (or decision) are already there is not written again, so the rows of a transition can be
written again after a restart or a takeover (from status.lastTransition) without doubling them. A
transition's notifications (notify/) are queued in the same transaction as its rows: both are written or
neither, and queueing them again after a restart adds nothing (one row per message id and receiver).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from shadowgate_operator.analysis.window import WindowAnalysis
from shadowgate_operator.dbaway import DATABASE_AWAY, describe
from shadowgate_operator.metrics import WindowMetrics
from shadowgate_operator.migrate import database_problems, migrate_with_report
from shadowgate_operator.notify.messages import Outgoing
from shadowgate_operator.notify.queue import enqueue

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


_INSERT_EVENT = """
INSERT INTO deployment_events (time, namespace, deployment, event, phase, step, weight, message, details)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb
WHERE NOT EXISTS (
    SELECT 1 FROM deployment_events WHERE namespace = $2 AND deployment = $3 AND time = $1 AND event = $4
)"""

_INSERT_METRICS = """
INSERT INTO deployment_metrics (time, namespace, deployment, step, weight, samples, metric, production_value,
    candidate_value, improvement, overall_score, p_value, decision, reason, metrics)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15::jsonb
WHERE NOT EXISTS (
    SELECT 1 FROM deployment_metrics WHERE namespace = $2 AND deployment = $3 AND time = $1 AND decision = $13
)"""


def _json(value: dict[str, Any] | None) -> str | None:
    return json.dumps(value) if value is not None else None


@dataclass
class Database:
    """One database (one DSN): what the Reconciler reads and writes there."""

    pool: asyncpg.Pool

    async def record_spec(
        self, namespace: str, deployment: str, generation: int, revision: str, spec: dict[str, Any]
    ) -> None:
        """The spec an analysis ran under, once per generation (replay reads settings from here)."""
        await self.pool.execute(
            """INSERT INTO shadow_deployments (namespace, deployment, generation, candidate_revision, spec)
               VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT DO NOTHING""",
            namespace, deployment, generation, revision, json.dumps(spec),
        )  # fmt: skip

    async def write(
        self, events: Sequence[EventRow], metrics: Sequence[MetricsRow], notifications: Sequence[Outgoing] = ()
    ) -> int:
        """History rows, each unless the same one is there already, and the notifications announcing them,
        each unless queued already, in one transaction. Returns how many notifications were new."""
        async with self.pool.acquire() as connection, connection.transaction():
            if events:
                await connection.executemany(
                    _INSERT_EVENT,
                    [(r.time, r.namespace, r.deployment, r.event, r.phase, r.step, r.weight, r.message,
                      _json(r.details)) for r in events],
                )  # fmt: skip
            if metrics:
                await connection.executemany(
                    _INSERT_METRICS,
                    [(r.time, r.namespace, r.deployment, r.step, r.weight, r.samples, r.metric, r.production_value,
                      r.candidate_value, r.improvement, r.overall_score, r.p_value, r.decision, r.reason,
                      _json(r.metrics)) for r in metrics],
                )  # fmt: skip
            return await enqueue(connection, notifications)

    async def refresh(self, analysis: WindowAnalysis) -> WindowMetrics:
        """Bring one deployment's window up to what was recorded (see WindowAnalysis.refresh)."""
        async with self.pool.acquire() as connection:
            return await analysis.refresh(connection)


@dataclass
class Databases:
    """The Database of each DSN in use, shared by the ShadowDeployments that name it."""

    run_migrations: bool = True
    opened: Callable[[asyncpg.Pool], None] | None = None
    """Called with each pool once it is open and its schema up to date (the delivery worker watches its
    notifications queue)."""
    _open: dict[str, Database] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self, dsn: str) -> Database:
        """The Database of `dsn`, opened (and its schema brought up to date) on first use."""
        if dsn in self._open:
            return self._open[dsn]
        async with self._lock:
            if dsn in self._open:
                return self._open[dsn]
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
            except (ValueError, asyncpg.InterfaceError) as exc:
                # The DSN did not parse (asyncpg's words may quote it, password and all: name the type only).
                await pool.close()
                raise DatabaseUnavailable(f"the DSN is not one asyncpg can use ({type(exc).__name__})") from exc
            except DATABASE_AWAY as exc:
                await pool.close()
                raise DatabaseUnavailable(f"cannot use the database: {describe(exc)}") from exc
            except BaseException:
                await pool.close()
                raise
            self._open[dsn] = Database(pool)
            if self.opened is not None:
                self.opened(pool)
            return self._open[dsn]

    async def close(self) -> None:
        for database in self._open.values():
            await database.pool.close()
        self._open.clear()


Writer = Callable[[Sequence[EventRow], Sequence[MetricsRow], Sequence[Outgoing]], Awaitable[int]]


def _where(dsn: str) -> str:
    """host:port/database of a DSN, without its credentials (for logs)."""
    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port}{parts.path}"


@dataclass
class Rows:
    """One ShadowDeployment's history rows, and the notifications announcing them, that the database has not
    taken yet.

    A database that is away delays these rows, it does not lose them: each reconcile that reaches the
    database writes what waits first, oldest first, each row with its own time. Memory is bounded by
    `limit` rows (the oldest go first, with a log line). Rows still waiting when the operator stops are
    lost, except those of the latest transition, which the next operator writes again from status.
    """

    limit: int = 10_000
    events: list[EventRow] = field(default_factory=list)
    metrics: list[MetricsRow] = field(default_factory=list)
    notifications: list[Outgoing] = field(default_factory=list)

    def add(
        self,
        events: Sequence[EventRow] = (),
        metrics: Sequence[MetricsRow] = (),
        notifications: Sequence[Outgoing] = (),
    ) -> None:
        for waiting, new in ((self.events, events), (self.metrics, metrics), (self.notifications, notifications)):
            waiting.extend(new)  # type: ignore[arg-type]
            if len(waiting) > self.limit:
                logger.error("%d history rows waited too long for the database; dropping the oldest",
                             len(waiting) - self.limit)  # fmt: skip
                del waiting[: len(waiting) - self.limit]

    @property
    def waiting(self) -> int:
        return len(self.events) + len(self.metrics) + len(self.notifications)

    async def flush(self, write: Writer) -> int:
        """Write what waits (with Database.write), in one transaction; on an error (DATABASE_AWAY), everything
        keeps waiting. Returns how many notifications were newly queued."""
        if not self.waiting:
            return 0
        events, metrics, notifications = list(self.events), list(self.metrics), list(self.notifications)
        queued = await write(events, metrics, notifications)
        del self.events[: len(events)]
        del self.metrics[: len(metrics)]
        del self.notifications[: len(notifications)]
        return queued
