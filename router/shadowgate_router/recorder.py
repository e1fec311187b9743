"""Getting rows into PostgreSQL without ever making a request wait, and without losing or doubling one.

`Recorder.put` is the only call the hot path makes: an append to an in-memory deque. A background task
takes batches from it and writes them with COPY into a temporary table, then
``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` into the real one, in one transaction; a batch is
removed from memory only once committed. When the database is away the task backs off, rows pile up in
memory up to `memory_rows`, and beyond that the oldest move to a `Spool` file. On reconnect the spool is
replayed first, then memory: in order, and once (the unique key includes the row's own timestamp, so a
batch written twice lands once). Rows the database refuses as invalid (a constraint, an encoding) are
set aside in ``<table>.rejected.jsonl`` rather than blocking everything behind them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from shadowgate_router.metrics import RouterMetrics
from shadowgate_router.spool import Row, Spool

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

PREDICTION_COLUMNS = (
    "time",
    "namespace",
    "deployment",
    "request_id",
    "served_by",
    "mode",
    "weight",
    "config_revision",
    "production_version",
    "production_prediction",
    "production_confidence",
    "production_latency_ms",
    "production_status",
    "production_error",
    "candidate_version",
    "candidate_prediction",
    "candidate_confidence",
    "candidate_latency_ms",
    "candidate_status",
    "candidate_error",
    "fallback",
    "features",
)
OUTCOME_COLUMNS = ("time", "namespace", "deployment", "request_id", "outcome")


def now_us() -> int:
    """Rows carry their time as integer microseconds: exact through the spool's JSON and into timestamptz."""
    return time.time_ns() // 1000


def _to_record(row: Row) -> Row:
    return (EPOCH + timedelta(microseconds=row[0]), *row[1:])


# What a database that is away, restarting or killed mid-statement raises. InternalClientError covers
# asyncpg's ProtocolError, seen when the server goes away in the middle of a COPY.
_DATABASE_GONE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


class _Unavailable(Exception):
    """The database cannot take rows now; try again later."""


class Recorder:
    """Writes one table's rows; `run()` is the background task, `close()` flushes at shutdown."""

    def __init__(
        self,
        table: str,
        columns: Sequence[str],
        dsn: str,
        spool_dir: Path,
        metrics: RouterMetrics,
        *,
        memory_rows: int = 100_000,
        batch_rows: int = 2_000,
        flush_interval: float = 0.2,
        spill_rows: int = 250,
        spool_max_bytes: int = 400 * 1024 * 1024,
        connect_timeout: float = 3.0,
        write_timeout: float = 10.0,
        max_backoff: float = 2.0,
    ) -> None:
        self.table = table
        self.columns = tuple(columns)
        self.dsn = dsn
        self.spool = Spool(spool_dir, table)
        self.rejected_path = spool_dir / f"{table}.rejected.jsonl"
        self.metrics = metrics
        self.memory_rows = memory_rows
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.spill_rows = spill_rows
        self.spool_max_bytes = spool_max_bytes
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.max_backoff = max_backoff
        self._memory: collections.deque[Row] = collections.deque()
        self._wake = asyncio.Event()
        self._connection: asyncpg.Connection | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_complaint = 0.0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._incoming = f"shadowgate_incoming_{table}"
        self._queue_gauge = metrics.queue_depth.labels(table)
        self._spool_bytes = metrics.spool_bytes.labels(table)
        self._spool_rows = metrics.spool_rows.labels(table)
        self._written = metrics.rows_written.labels(table)
        self._errors = metrics.database_errors.labels(table)
        self._rejected = metrics.rows_rejected.labels(table)
        self._dropped = metrics.rows_dropped.labels(table)
        self._last_drop_complaint = 0.0
        self._update_gauges()

    # the hot path
    def put(self, row: Row) -> None:
        """Queue one row; never blocks, never fails."""
        memory = self._memory
        memory.append(row)
        if len(memory) == self.batch_rows:
            self._wake.set()

    # observers
    @property
    def pending(self) -> int:
        """Rows not yet in the database (memory and spool)."""
        return len(self._memory) + self.spool.rows

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    def _update_gauges(self) -> None:
        self._queue_gauge.set(len(self._memory))
        self._spool_bytes.set(self.spool.bytes)
        self._spool_rows.set(self.spool.rows)

    # the background task
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"recorder-{self.table}")

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            await self._spill_excess()
            if time.monotonic() < self._retry_at or not self.pending:
                self._update_gauges()
                continue
            try:
                await self._drain()
            except _Unavailable as exc:
                self._failed(exc)
            except Exception as exc:
                # A bug must not end the task: rows would then wait forever, unwritten and unreported.
                log.exception("%s: unexpected error while writing; retrying", self.table)
                self._failed(exc)
            self._update_gauges()

    async def close(self, grace: float) -> None:
        """Stop the task's loop, write what is left within `grace` seconds, spool whatever still could not go."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + grace
        if self._task is not None:
            # On timeout wait_for cancels it mid-write: what was not committed is still in memory or spool.
            try:
                await asyncio.wait_for(self._task, grace)
            except TimeoutError:
                # Cancelled mid-statement, the connection is unusable ("another operation is in progress"):
                # drop it, so the final drain below starts on a fresh one instead of failing.
                if self._connection is not None:
                    self._connection.terminate()
                    self._connection = None
            self._task = None
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while self.pending:
                    try:
                        await self._drain()
                    except _Unavailable as exc:
                        self._failed(exc)
                        await asyncio.sleep(min(0.5, self.max_backoff))
        except TimeoutError:
            pass
        if self._memory:
            log.warning(
                "%s: database unavailable at shutdown; %d rows kept in %s",
                self.table,
                len(self._memory),
                self.spool.path,
            )
            self._to_spool(list(self._memory))
            self._memory.clear()
        self._update_gauges()
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    def _failed(self, exc: Exception) -> None:
        self._errors.inc()
        self._failures += 1
        delay = min(self.max_backoff, 0.1 * 2 ** min(self._failures, 10))
        self._retry_at = time.monotonic() + delay
        now = time.monotonic()
        if self._failures == 1 or now - self._last_complaint > 30:
            self._last_complaint = now
            log.warning(
                "%s: cannot write to the database (%s); %d rows waiting (%d on disk)",
                self.table,
                exc,
                self.pending,
                self.spool.rows,
            )
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def _spill_excess(self) -> None:
        """Memory over its bound: move the oldest rows to disk (the spool always holds the oldest)."""
        # Small chunks written from the loop itself: a thread would race the final flush at shutdown, and
        # a few hundred rows encode in about a millisecond, so requests barely notice.
        while len(self._memory) > self.memory_rows:
            count = min(self.spill_rows, len(self._memory) - self.memory_rows)
            self._to_spool([self._memory.popleft() for _ in range(count)])
            await asyncio.sleep(0)
        self._update_gauges()

    def _to_spool(self, rows: list[Row]) -> None:
        """Append to the spool unless its disk budget is spent; then drop the rows, count them and say so.

        The last resort of a very long outage: a spool that filled its volume (the router's emptyDir has a
        size limit) would get the pod evicted, and everything in memory and on disk with it.
        """
        if self.spool.bytes < self.spool_max_bytes:
            self.spool.append(rows)
            return
        self._dropped.inc(len(rows))
        now = time.monotonic()
        if now - self._last_drop_complaint > 30:
            self._last_drop_complaint = now
            log.error(
                "%s: the spool holds %d bytes, its limit; dropping rows until the database is back",
                self.table,
                self.spool.bytes,
            )

    async def _drain(self) -> None:
        connection = await self._connect()
        while self.spool.rows:
            rows, position = self.spool.read(self.spill_rows)
            await self._write(connection, rows)
            self.spool.commit(position, len(rows))
            await self._spill_excess()
        while self._memory:
            batch = list(itertools.islice(self._memory, self.batch_rows))
            await self._write(connection, batch)
            for _ in batch:
                self._memory.popleft()
            self._update_gauges()
        if self._failures:
            log.info("%s: database reachable again; everything waiting is written", self.table)
        self._failures = 0

    async def _connect(self) -> asyncpg.Connection:
        if self._connection is not None and not self._connection.is_closed():
            return self._connection
        try:
            connection = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
        except _DATABASE_GONE as exc:
            raise _Unavailable(f"connect: {exc}") from None
        try:
            await connection.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {self._incoming} (LIKE {self.table} INCLUDING DEFAULTS) "
                "ON COMMIT DELETE ROWS",
                timeout=self.write_timeout,
            )
        except _DATABASE_GONE as exc:
            connection.terminate()
            hint = " (has `shadowgate migrate` run?)" if isinstance(exc, asyncpg.UndefinedTableError) else ""
            raise _Unavailable(f"prepare: {exc}{hint}") from None
        self._connection = connection
        return connection

    async def _write(self, connection: asyncpg.Connection, rows: Sequence[Row]) -> None:
        try:
            await self._insert(connection, [_to_record(row) for row in rows])
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            log.warning("%s: the database refused a batch (%s); writing its rows one by one", self.table, exc)
            written = await self._write_one_by_one(connection, rows)
        except _DATABASE_GONE as exc:
            raise _Unavailable(f"write: {exc}") from None
        else:
            written = len(rows)
        self._written.inc(written)

    async def _insert(self, connection: asyncpg.Connection, records: Sequence[Row]) -> None:
        columns = ", ".join(self.columns)
        async with connection.transaction():
            await connection.copy_records_to_table(
                self._incoming, records=records, columns=self.columns, timeout=self.write_timeout
            )
            await connection.execute(
                f"INSERT INTO {self.table} ({columns}) SELECT {columns} FROM {self._incoming} ON CONFLICT DO NOTHING",
                timeout=self.write_timeout,
            )

    async def _write_one_by_one(self, connection: asyncpg.Connection, rows: Sequence[Row]) -> int:
        """Rows the database accepts go in, the others go to the rejected file; returns how many went in."""
        refused: list[Row] = []
        for row in rows:
            try:
                await self._insert(connection, [_to_record(row)])
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
                log.error("%s: row refused by the database, set aside in %s: %s", self.table, self.rejected_path, exc)
                refused.append(row)
            except _DATABASE_GONE as exc:
                raise _Unavailable(f"write: {exc}") from None
        if refused:
            with self.rejected_path.open("a") as rejected:
                rejected.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in refused)
            self._rejected.inc(len(refused))
        return len(rows) - len(refused)
