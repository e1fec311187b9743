"""Getting rows into PostgreSQL without ever making a request wait, and without losing or doubling one.

`Recorder.put` is the only call the hot path makes: an append to an in-memory deque. Two background tasks
take it from there:

- the journal, every flush interval (or as soon as a batch's worth is waiting), appends the new rows to the
  table's write-ahead `Spool` file and keeps them in memory too (up to `memory_rows`; older ones are read
  back from disk when their turn comes). From then on a killed process loses nothing: at most one flush
  interval of rows (0.2 s) is only in memory. While rows wait on disk for the database, the journal
  fdatasyncs the file about once a second (group commit, in a thread); a healthy router commits rows
  before that and never flushes the disk.
- the writer takes the oldest rows on disk and writes them in batches with COPY into a temporary table,
  then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` into the real one, in one transaction, and only
  then marks them done in the spool. When the database is away it backs off and rows pile up on disk; on
  reconnect they are written in the order they were recorded, and once (the unique key includes the
  row's own timestamp, so a batch written twice lands once). Rows the database refuses as invalid (a
  constraint, an encoding) are set aside in ``<table>.rejected.jsonl`` rather than blocking everything
  behind them.

The spool is bounded (`spool_max_bytes`): past it rows are dropped and counted, so an endless outage cannot
fill the volume and get the pod evicted with everything on it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from shadowgate_common.aio import wait_event
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
    "sticky_key",
    "segment",
)
OUTCOME_COLUMNS = ("time", "namespace", "deployment", "request_id", "outcome")
OUTCOME_CONFLICT = (("namespace", "deployment", "request_id", "time"), "outcome")
"""An outcome's identity (its unique key) and value: a second value for the same key is not written."""


def now_us() -> int:
    """Rows carry their time as integer microseconds: exact through the spool and into timestamptz."""
    return time.time_ns() // 1000


def _to_record(row: Row, width: int) -> Row:
    # A row spooled by an older router may lack the columns added since (at the end): they are NULL.
    return (EPOCH + timedelta(microseconds=row[0]), *row[1:], *(None,) * (width - len(row)))


# What a database that is away, restarting or killed mid-statement raises. InternalClientError covers
# asyncpg's ProtocolError, seen when the server goes away in the middle of a COPY.
_DATABASE_GONE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.UntranslatableCharacterError)
"""What the database says of a row it will not take, whenever it is offered (not a passing failure)."""


class _Unavailable(Exception):
    """The database cannot take rows now; try again later."""


@dataclass(slots=True)
class _Block:
    """Rows journaled together, still in memory: where they sit in the spool file."""

    rows: list[Row]
    start: int
    end: int


class Recorder:
    """Writes one table's rows; `start()` runs the background tasks, `close()` flushes at shutdown."""

    def __init__(
        self,
        table: str,
        columns: Sequence[str],
        dsn: str,
        spool_dir: Path,
        metrics: RouterMetrics,
        *,
        memory_rows: int = 20_000,
        batch_rows: int = 2_000,
        flush_interval: float = 0.2,
        spill_rows: int = 500,
        spool_max_bytes: int = 400 * 1024 * 1024,
        sync_interval: float = 1.0,
        connect_timeout: float = 3.0,
        write_timeout: float = 10.0,
        max_backoff: float = 2.0,
        conflict: tuple[Sequence[str], str] | None = None,
    ) -> None:
        self.table = table
        self.columns = tuple(columns)
        self.dsn = dsn
        self.spool = Spool(spool_dir, table)
        self.rejected_path = spool_dir / f"{table}.rejected.jsonl"
        self.metrics = metrics
        self.memory_rows = memory_rows
        """Journaled rows also kept in memory, so the writer need not read them back from disk."""
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.spill_rows = spill_rows
        """Rows per spool record (and between two checks of the spool's limit)."""
        self.spool_max_bytes = spool_max_bytes
        self.sync_interval = sync_interval
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.max_backoff = max_backoff
        self.conflict = (tuple(conflict[0]), conflict[1]) if conflict else None
        """(key columns, value column): count and log rows not written because their key was recorded with
        another value (the unique key makes a repeat a no-op; for outcomes, a 'correction' at the same time)."""
        self._fresh: collections.deque[Row] = collections.deque()
        """Recorded, not yet on disk: at most one flush interval's worth."""
        self._cache: collections.deque[_Block] = collections.deque()
        """The newest journaled rows not yet in the database, contiguous up to the end of the spool file."""
        self._cached = 0
        self._journal_wake = asyncio.Event()
        self._writer_wake = asyncio.Event()
        self._unsynced = False
        self._synced_at = 0.0
        self._connection: asyncpg.Connection | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_complaint = 0.0
        self._stopping = False
        self._journal_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._incoming = f"shadowgate_incoming_{table}"
        self._queue_gauge = metrics.queue_depth.labels(table)
        self._spool_bytes = metrics.spool_bytes.labels(table)
        self._spool_rows = metrics.spool_rows.labels(table)
        self._written = metrics.rows_written.labels(table)
        self._errors = metrics.database_errors.labels(table)
        self._rejected = metrics.rows_rejected.labels(table)
        self._dropped = metrics.rows_dropped.labels(table)
        self._conflicting = metrics.rows_conflicting.labels(table)
        self._last_drop_complaint = 0.0
        self._update_gauges()

    # the hot path
    def put(self, row: Row) -> None:
        """Queue one row; never blocks, never fails."""
        fresh = self._fresh
        fresh.append(row)
        if len(fresh) == self.batch_rows:
            self._journal_wake.set()

    # observers
    @property
    def pending(self) -> int:
        """Rows not yet in the database (in memory only, or on disk)."""
        return len(self._fresh) + self.spool.rows

    def _update_gauges(self) -> None:
        self._queue_gauge.set(len(self._fresh))
        self._spool_bytes.set(self.spool.bytes)
        self._spool_rows.set(self.spool.rows)

    # the background tasks
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._journal_task = loop.create_task(self._run_journal(), name=f"journal-{self.table}")
        self._writer_task = loop.create_task(self._run_writer(), name=f"recorder-{self.table}")

    async def _run_journal(self) -> None:
        while True:
            await wait_event(self._journal_wake, self.flush_interval)
            self._journal_wake.clear()
            if self._stopping:
                return  # close() journals what is left itself
            try:
                await self._journal()
            except Exception:  # a full or failing disk: keep the rows in memory and say so; retry
                log.exception("%s: cannot write rows to %s; keeping them in memory", self.table, self.spool.path)
            self._update_gauges()

    async def _journal(self) -> None:
        """Fresh rows to disk (and the cache); fsync rows that waited on disk since the last tick."""
        if self._unsynced and self.spool.rows and time.monotonic() - self._synced_at >= self.sync_interval:
            # Still here a tick after they were written: the database is slow or away. Group commit.
            self._unsynced = False
            self._synced_at = time.monotonic()
            await asyncio.to_thread(self.spool.sync)
        elif not self.spool.rows and not self._cache and self.spool.size:
            self.spool.clear()  # all of it is in the database: start the file afresh
            self._unsynced = False
        fresh = self._fresh
        while fresh:
            rows = [fresh.popleft() for _ in range(min(self.spill_rows, len(fresh)))]
            if self.spool.bytes >= self.spool_max_bytes:
                self._drop(
                    len(rows), f"the spool holds {self.spool.bytes} bytes, its limit, until the database is back"
                )
                continue
            start = self.spool.size
            try:
                end = self.spool.append(rows)
            except OSError:
                # The disk refuses (full, failing): keep the rows in memory for the next tick while memory
                # allows, else drop and count them; never hold an unbounded backlog.
                if len(fresh) + len(rows) <= self.memory_rows:
                    fresh.extendleft(reversed(rows))
                else:
                    self._drop(len(rows), f"{self.spool.path} cannot be written and memory is full")
                raise
            self._unsynced = True
            self._cache.append(_Block(rows, start, end))
            self._cached += len(rows)
            while self._cached > self.memory_rows:  # the oldest are on disk: read back when their turn comes
                self._cached -= len(self._cache.popleft().rows)
            self._writer_wake.set()
            if fresh:
                await asyncio.sleep(0)  # a few hundred rows at a time: requests barely notice

    def _drop(self, count: int, why: str) -> None:
        """Rows that cannot be kept: drop them, count them and say so.

        The last resort of a very long outage (the spool's disk budget spent: a spool that filled its volume,
        an emptyDir with a size limit, would get the pod evicted, and everything on disk with it) or of a
        disk that refuses writes.
        """
        self._dropped.inc(count)
        now = time.monotonic()
        if now - self._last_drop_complaint > 30:
            self._last_drop_complaint = now
            log.error("%s: dropping rows: %s", self.table, why)

    async def _run_writer(self) -> None:
        while not self._stopping:
            await wait_event(self._writer_wake, self.flush_interval)
            self._writer_wake.clear()
            if time.monotonic() < self._retry_at or not self.spool.rows:
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
        """Put every row on disk at once, then write what the database takes within `grace` seconds.

        Whatever it does not take stays in the spool for the next start: a SIGKILL at any point after the
        first step loses nothing.
        """
        deadline = time.monotonic() + grace
        self._stopping = True
        self._journal_wake.set()
        self._writer_wake.set()
        if self._journal_task is not None:
            await self._journal_task  # it returns at once, or after the step under way
            self._journal_task = None
        try:
            await self._journal()
            self.spool.sync()
        except Exception:
            log.exception("%s: cannot write rows to %s at shutdown", self.table, self.spool.path)
        if self._writer_task is not None:
            # On timeout wait_for cancels it mid-write: what was not committed is still in the spool.
            try:
                await asyncio.wait_for(self._writer_task, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                # Cancelled mid-statement, the connection is unusable ("another operation is in progress"):
                # drop it, so the final drain below starts on a fresh one instead of failing.
                if self._connection is not None:
                    self._connection.terminate()
                    self._connection = None
            self._writer_task = None
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while self.spool.rows:
                    try:
                        await self._drain()
                    except _Unavailable as exc:
                        self._failed(exc)
                        await asyncio.sleep(min(0.5, self.max_backoff))
        except TimeoutError:
            pass
        if self.spool.rows:
            log.warning(
                "%s: database unavailable at shutdown; %d rows kept in %s", self.table, self.spool.rows, self.spool.path
            )
        elif self.spool.size:
            self.spool.clear()
        self.spool.close()
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
                "%s: cannot write to the database (%s); %d rows waiting on disk",
                self.table,
                exc,
                self.pending,
            )
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def _drain(self) -> None:
        """Write everything journaled, oldest first: from memory where it still is, else from disk."""
        connection = await self._connect()
        spool, cache = self.spool, self._cache
        while spool.rows:
            first = cache[0] if cache else None
            if first is None or spool.offset < first.start:
                rows, position = spool.read(self.batch_rows, until=first.start if first else None)
            else:
                rows, position = [], first.start
                for block in cache:
                    if rows and len(rows) + len(block.rows) > self.batch_rows:
                        break
                    rows += block.rows
                    position = block.end
            await self._write(connection, rows)
            spool.commit(position, len(rows))
            while cache and cache[0].end <= position:
                self._cached -= len(cache.popleft().rows)
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
            await self._insert(connection, [_to_record(row, len(self.columns)) for row in rows])
        except _REFUSED as exc:
            log.warning("%s: the database refused a batch (%s); finding the rows it refuses", self.table, exc)
            written = await self._write_bisecting(connection, rows)
        except _DATABASE_GONE as exc:
            raise _Unavailable(f"write: {exc}") from None
        else:
            written = len(rows)
        self._written.inc(written)

    async def _insert(self, connection: asyncpg.Connection, records: Sequence[Row]) -> None:
        columns = ", ".join(self.columns)
        insert = f"INSERT INTO {self.table} ({columns}) SELECT {columns} FROM {self._incoming} ON CONFLICT DO NOTHING"
        async with connection.transaction():
            await connection.copy_records_to_table(
                self._incoming, records=records, columns=self.columns, timeout=self.write_timeout
            )
            if self.conflict is None:
                await connection.execute(insert, timeout=self.write_timeout)
                return
            key, value = self.conflict
            same_key = " AND ".join(f"t.{column} = i.{column}" for column in key)
            # Rows whose key was recorded before with another value (the statement sees the table as it was
            # before its own insert), and further values of a new key that comes twice in the batch: not written.
            ignored = await connection.fetchval(
                f"WITH inserted AS ({insert}), "
                f"offered AS (SELECT i.*, t.{value} AS recorded FROM {self._incoming} i "
                f"LEFT JOIN {self.table} t ON {same_key}) "
                f"SELECT (SELECT count(*) FROM offered WHERE recorded IS NOT NULL AND recorded <> {value}) + "
                f"(SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(DISTINCT {value}) AS n FROM offered "
                f"WHERE recorded IS NULL GROUP BY {', '.join(key)}) d)::bigint",
                timeout=self.write_timeout,
            )
        if ignored:
            self._conflicting.inc(int(ignored))
            log.warning(
                "%s: %d rows not written: a row with the same %s and another %s was recorded first",
                self.table,
                ignored,
                "/".join(key),
                value,
            )

    async def _write_bisecting(self, connection: asyncpg.Connection, rows: Sequence[Row]) -> int:
        """Rows the database accepts go in, the others go to the rejected file; returns how many went in.

        By halves: a batch of 2,000 with one bad row (a value a text or JSONB column cannot hold) takes some
        twenty statements, not 2,000, so a peer sending such values cannot slow the writer to a crawl."""
        refused: list[Row] = []
        pending = [rows]
        while pending:
            part = pending.pop()
            try:
                await self._insert(connection, [_to_record(row, len(self.columns)) for row in part])
            except _REFUSED as exc:
                if len(part) > 1:
                    middle = len(part) // 2
                    pending += (part[middle:], part[:middle])  # the first half next: order kept
                    continue
                log.error("%s: row refused by the database, set aside in %s: %s", self.table, self.rejected_path, exc)
                refused.append(part[0])
            except _DATABASE_GONE as exc:
                raise _Unavailable(f"write: {exc}") from None
        if refused:
            with self.rejected_path.open("a") as rejected:
                rejected.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in refused)
            self._rejected.inc(len(refused))
        return len(rows) - len(refused)
