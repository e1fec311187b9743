"""The operator's side of the database: pools per DSN, schema on first use, and the rows it writes.

Each ShadowDeployment names its database through spec.database.secretRef (the same DSN its router
writes to); several may share one. A pool is opened on first use of a DSN, after checking the database
is safe to analyse on and applying pending migrations (unless the operator runs with --no-migrate).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from shadowgate_operator.migrate import database_problems, migrate


class DatabaseUnavailable(RuntimeError):
    """The database cannot be used right now; the message says why in words."""


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
                        await migrate(connection)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                await pool.close()
                raise DatabaseUnavailable(f"cannot use the database: {_describe(exc)}") from exc
            except BaseException:
                await pool.close()
                raise
            self._pools[dsn] = pool
            return pool

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()


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


async def record_spec(
    pool: asyncpg.Pool, namespace: str, deployment: str, generation: int, revision: str, spec: dict[str, Any]
) -> None:
    """The spec an analysis ran under, once per generation (replay reads settings from here)."""
    await pool.execute(
        """INSERT INTO shadow_deployments (namespace, deployment, generation, candidate_revision, spec)
           VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT DO NOTHING""",
        namespace, deployment, generation, revision, json.dumps(spec),
    )  # fmt: skip
