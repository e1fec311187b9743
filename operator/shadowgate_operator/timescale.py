"""TimescaleDB for shadowgate's tables: hypertables, compression and retention, brought up to date by
every `migrate` (the CLI and the operator's own).

The numbered migrations (migrations/) make the plain schema, which works on every PostgreSQL. What
TimescaleDB adds is applied here instead, after them, because it depends on things that change after the
first migrate: the extension may be installed later (a plain PostgreSQL that gets TimescaleDB), the
edition may be the Apache-only one, and the storage policy is a setting.

- Hypertables: `predictions` and `outcomes` (chunks as long as the compression horizon, `chunk_interval`),
  `deployment_metrics` (weekly) and `deployment_events` (30 days), wherever the extension is installed
  (every edition). Tables that hold rows are converted with their rows copied under a lock: `migrate`
  says so, and the operator's migrate leaves tables above AUTO_CONVERT_ROWS rows to the CLI, saying why
  (`LayerReport.problems`). A changed horizon changes the span of new chunks only.
- Compression (full "timescale" edition only): `predictions` and `outcomes` segmented by
  (namespace, deployment), ordered by time.
- The storage policy: one row in `storage_policy` (migration 0005), changed only by
  `shadowgate migrate --retention ... --compress-after ...`. Retention is off unless set: nothing the
  user did not ask to lose is ever dropped. Compression starts after DEFAULT_POLICY.compress_after.
  A new or changed policy job first runs POLICY_START_DELAY after the migrate that made it (compression
  POLICY_STAGGER after retention, so the two never work on the same chunks at once), and `migrate` says
  beforehand what that first run will drop or compress. On the Apache edition and on plain PostgreSQL no
  policy runs: the report says so (retention there is `drop_chunks` or `DELETE`, the user's call).

TimescaleDB 2.x API only (timescaledb_information views, create_hypertable with if_not_exists and
migrate_data, the policy functions, alter_job): nothing specific to one release.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg

HYPERTABLES: dict[str, dt.timedelta | None] = {
    "predictions": None,
    "outcomes": None,
    "deployment_metrics": dt.timedelta(days=7),
    "deployment_events": dt.timedelta(days=30),
}
"""Each hypertable's chunk interval; None: `chunk_interval(policy)`."""

COMPRESSED = ("predictions", "outcomes")

DEFAULT_CHUNK_INTERVAL = dt.timedelta(days=7)
"""The chunk interval of predictions and outcomes where nothing compresses them (see `chunk_interval`)."""

POLICY_START_DELAY = dt.timedelta(hours=1)
"""A new or changed policy job first runs this long after the migrate that made it: time to read what
migrate said it will do, and to change it."""

POLICY_STAGGER = dt.timedelta(minutes=10)
"""Compression's first run comes this long after retention's."""

AUTO_CONVERT_ROWS = 100_000
"""The operator's migrate converts plain tables into hypertables up to this many rows (a few seconds);
bigger ones are left to `shadowgate migrate`, which copies them under a lock and says so."""


@dataclass(frozen=True)
class StoragePolicy:
    """How long rows are kept and when they are compressed; None: never (keep / leave uncompressed)."""

    retention: dt.timedelta | None = None
    compress_after: dt.timedelta | None = dt.timedelta(days=7)

    def check(self) -> None:
        for name, value in (("retention", self.retention), ("compress_after", self.compress_after)):
            if value is not None and value <= dt.timedelta(0):
                raise ValueError(f"{name} must be positive (or none)")
        if self.retention is not None and self.compress_after is not None and self.compress_after >= self.retention:
            raise ValueError(
                f"compress_after ({describe(self.compress_after)}) must be shorter than retention "
                f"({describe(self.retention)}): chunks would be dropped before they are compressed"
            )


DEFAULT_POLICY = StoragePolicy()

_HORIZON = re.compile(r"^\s*(\d+)\s*(d|day|days|h|hour|hours)\s*$")


def parse_horizon(text: str) -> dt.timedelta | None:
    """`90d`, `36h` or `none` (None)."""
    if text.strip().lower() in ("none", "off", "never"):
        return None
    match = _HORIZON.match(text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a horizon like 90d, 36h or none")
    amount, unit = int(match.group(1)), match.group(2)
    return dt.timedelta(days=amount) if unit.startswith("d") else dt.timedelta(hours=amount)


def describe(value: dt.timedelta | None) -> str:
    if value is None:
        return "none"
    if value % dt.timedelta(days=1) == dt.timedelta(0):
        return f"{value.days} day{'' if value.days == 1 else 's'}"
    return f"{value.total_seconds() / 3600:g} hours"


@dataclass(frozen=True)
class Edition:
    """What this database offers: the extension's version (None: plain PostgreSQL) and its license."""

    version: str | None
    license: str | None

    @property
    def full(self) -> bool:
        """Compression and policies need the full ("timescale") license; the Apache edition has neither."""
        return self.version is not None and self.license == "timescale"

    def describe(self) -> str:
        if self.version is None:
            return "plain PostgreSQL (no timescaledb extension)"
        edition = "" if self.full else f", {self.license or 'unknown'} license: hypertables only"
        return f"timescaledb {self.version}{edition}"


async def edition(connection: asyncpg.Connection) -> Edition:
    row = await connection.fetchrow(
        """SELECT (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS version,
                  current_setting('timescaledb.license', true) AS license"""
    )
    return Edition(row["version"], row["license"] if row["version"] else None)


async def read_policy(connection: asyncpg.Connection) -> StoragePolicy:
    row = await connection.fetchrow("SELECT retention, compress_after FROM storage_policy")
    return DEFAULT_POLICY if row is None else StoragePolicy(row["retention"], row["compress_after"])


async def write_policy(connection: asyncpg.Connection, policy: StoragePolicy) -> None:
    policy.check()
    await connection.execute(
        """INSERT INTO storage_policy (singleton, retention, compress_after) VALUES (true, $1, $2)
           ON CONFLICT (singleton) DO UPDATE
           SET retention = excluded.retention, compress_after = excluded.compress_after, updated_at = now()""",
        policy.retention,
        policy.compress_after,
    )


@dataclass
class LayerReport:
    """What `apply` found and did, in words: `notes` to print, `problems` to show as warnings."""

    edition: Edition
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def _hypertables(connection: asyncpg.Connection) -> dict[str, bool]:
    """Our tables that are hypertables, and whether compression is enabled on each."""
    rows = await connection.fetch(
        """SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables
           WHERE hypertable_schema = current_schema() AND hypertable_name = ANY($1::text[])""",
        list(HYPERTABLES),
    )
    return {row["hypertable_name"]: row["compression_enabled"] for row in rows}


async def _rows(connection: asyncpg.Connection, table: str) -> int:
    """Rows in a plain table, counted up to a little past the automatic conversion's limit."""
    count: int = await connection.fetchval(
        f"SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT {AUTO_CONVERT_ROWS + 1}) AS rows"
    )
    return count


def chunk_interval(current: Edition, policy: StoragePolicy) -> dt.timedelta:
    """The chunk interval of predictions and outcomes: the compression horizon where compression runs.

    The incremental analysis reads back no further than that horizon (analysis/window.py), and each chunk a
    read could touch costs every one of its index probes and some planning (bench/analysis: 185 ms of
    CPU per read with daily chunks and a 7-day horizon, 61 ms with weekly ones, 48 ms on plain
    PostgreSQL, on the same loaded machine), so chunks as long as the horizon keep a read to two of them.
    """
    if current.full and policy.compress_after is not None:
        return policy.compress_after
    return DEFAULT_CHUNK_INTERVAL


async def _convert(
    connection: asyncpg.Connection, report: LayerReport, convert_limit: int | None, chunks: dt.timedelta
) -> bool:
    """Make every table a hypertable; False when one was left plain (the report says why)."""
    existing = await _hypertables(connection)
    complete = True
    for table, fixed in HYPERTABLES.items():
        if table in existing:
            continue
        rows = await _rows(connection, table)
        if convert_limit is not None and rows > convert_limit:
            report.problems.append(
                f"timescaledb is installed but {table} is a plain table with more than {convert_limit:,} rows: "
                f"the operator does not convert it (that copies every row under a lock); run `shadowgate migrate`"
            )
            complete = False
            continue
        await connection.execute(
            """SELECT create_hypertable($1::regclass, 'time', chunk_time_interval => $2::interval,
                                        if_not_exists => true, migrate_data => true)""",
            table,
            fixed or chunks,
        )
        report.notes.append(
            f"{table}: converted into a hypertable"
            + (f" ({rows:,}{'+' if rows > AUTO_CONVERT_ROWS else ''} rows copied into chunks)" if rows else "")
        )
    return complete


async def _set_chunk_interval(connection: asyncpg.Connection, report: LayerReport, chunks: dt.timedelta) -> None:
    """New chunks of predictions and outcomes span `chunks` (existing ones keep their span)."""
    rows = await connection.fetch(
        """SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions
           WHERE hypertable_schema = current_schema() AND hypertable_name = ANY($1::text[])""",
        list(COMPRESSED),
    )
    for row in rows:
        if row["time_interval"] == chunks:
            continue
        await connection.execute(
            "SELECT set_chunk_time_interval($1::regclass, $2::interval)", row["hypertable_name"], chunks
        )
        report.notes.append(
            f"{row['hypertable_name']}: new chunks span {describe(chunks)}"
            f" (they spanned {describe(row['time_interval'])})"
        )


async def _enable_compression(connection: asyncpg.Connection, report: LayerReport) -> None:
    enabled = await _hypertables(connection)
    for table in COMPRESSED:
        if enabled.get(table):
            continue
        await connection.execute(
            f"""ALTER TABLE {table} SET (timescaledb.compress,
                    timescaledb.compress_segmentby = 'namespace, deployment',
                    timescaledb.compress_orderby = 'time DESC')"""
        )
        report.notes.append(f"{table}: compression enabled (segmented by namespace, deployment)")


@dataclass(frozen=True)
class _Job:
    job_id: int
    table: str
    horizon: dt.timedelta | None
    next_start: dt.datetime | None


async def _jobs(connection: asyncpg.Connection, proc: str, key: str) -> dict[str, _Job]:
    rows = await connection.fetch(
        f"""SELECT job_id, hypertable_name, (config->>'{key}')::interval AS horizon, next_start
            FROM timescaledb_information.jobs
            WHERE proc_name = $1 AND hypertable_schema = current_schema() AND hypertable_name = ANY($2::text[])""",
        proc,
        list(COMPRESSED),
    )
    return {
        row["hypertable_name"]: _Job(row["job_id"], row["hypertable_name"], row["horizon"], row["next_start"])
        for row in rows
    }


async def _older_chunks(connection: asyncpg.Connection, table: str, horizon: dt.timedelta, at: dt.datetime) -> str:
    """What a policy with this horizon, run at `at`, acts on: chunks that end before `at - horizon`."""
    row = await connection.fetchrow(
        """SELECT count(*) AS chunks, min(range_start) AS oldest, max(range_end) AS newest,
                  count(*) FILTER (WHERE is_compressed) AS compressed
           FROM timescaledb_information.chunks
           WHERE hypertable_schema = current_schema() AND hypertable_name = $1 AND range_end <= $2""",
        table,
        at - horizon,
    )
    if not row["chunks"]:
        return "nothing yet"
    chunks = f"{row['chunks']} chunk{'' if row['chunks'] == 1 else 's'}"
    return f"{chunks} of rows stamped {row['oldest']:%Y-%m-%d} to {row['newest']:%Y-%m-%d}" + (
        f" ({row['compressed']} already compressed)" if row["compressed"] else ""
    )


async def _apply_policy(
    connection: asyncpg.Connection,
    report: LayerReport,
    proc: str,
    key: str,
    wanted: dt.timedelta | None,
    delay: dt.timedelta,
) -> dt.datetime | None:
    """Make the jobs of one policy (retention or compression) match the setting; new or changed jobs
    first run `delay` from now (returned; None when nothing was made), and the report says what that run
    will do."""
    noun = "retention" if proc == "policy_retention" else "compression"
    verb = "drops" if noun == "retention" else "compresses"
    existing = await _jobs(connection, proc, key)
    now: dt.datetime = await connection.fetchval("SELECT now()")
    made = None
    for table in COMPRESSED:
        job = existing.get(table)
        if job is not None and job.horizon == wanted:
            continue
        remove = "remove_retention_policy" if noun == "retention" else "remove_compression_policy"
        add = "add_retention_policy" if noun == "retention" else "add_compression_policy"
        if job is not None:
            await connection.execute(f"SELECT {remove}('{table}', if_exists => true)")
        if wanted is None:
            if job is not None:
                report.notes.append(f"{table}: {noun} policy removed")
            continue
        job_id = await connection.fetchval(f"SELECT {add}('{table}', $1::interval, if_not_exists => true)", wanted)
        made = first_run = now + delay
        # Created in this transaction, so the scheduler sees it only with this start: no run at once.
        await connection.execute("SELECT alter_job($1, next_start => $2)", job_id, first_run)
        report.notes.append(
            f"{table}: {noun} after {describe(wanted)}; its first run, at {first_run:%Y-%m-%d %H:%M %Z}, "
            f"{verb} {await _older_chunks(connection, table, wanted, first_run)}"
        )
    return made


async def apply(
    connection: asyncpg.Connection,
    *,
    convert_limit: int | None = None,
    changes: Mapping[str, dt.timedelta | None] | None = None,
) -> LayerReport:
    """Bring the TimescaleDB layer up to date (in the caller's transaction, if any): hypertables,
    compression, the storage policy's jobs. `changes` (retention, compress_after) first change the stored
    policy (ValueError when the result contradicts itself); `convert_limit` leaves bigger plain tables
    alone (the operator's migrate). Idempotent: a second run changes nothing."""
    current = await edition(connection)
    report = LayerReport(current)
    stored = await read_policy(connection)
    if changes:
        stored = dataclasses.replace(stored, **changes)
        await write_policy(connection, stored)
    if current.version is None:
        return report
    chunks = chunk_interval(current, stored)
    converted = await _convert(connection, report, convert_limit, chunks)
    if converted:
        await _set_chunk_interval(connection, report, chunks)
    # Nothing read it (see README, "TimescaleDB"): per-minute traffic comes from predictions directly.
    await connection.execute("DROP MATERIALIZED VIEW IF EXISTS predictions_per_minute")
    if not current.full:
        return report
    if not converted:
        return report
    await _enable_compression(connection, report)
    retention_start = await _apply_policy(
        connection, report, "policy_retention", "drop_after", stored.retention, POLICY_START_DELAY
    )
    await _apply_policy(
        connection,
        report,
        "policy_compression",
        "compress_after",
        stored.compress_after,
        POLICY_START_DELAY + POLICY_STAGGER,
    )
    if retention_start is not None:
        # A compression job made earlier must not run beside retention's first run either.
        for job in (await _jobs(connection, "policy_compression", "compress_after")).values():
            if job.next_start is None or job.next_start < retention_start + POLICY_STAGGER:
                await connection.execute(
                    "SELECT alter_job($1, next_start => $2)", job.job_id, retention_start + POLICY_STAGGER
                )
    return report


async def summary(connection: asyncpg.Connection) -> str:
    """One line: the edition and the storage policy in force."""
    current = await edition(connection)
    stored = await read_policy(connection)
    if not current.full:
        kept = (
            ""
            if stored.retention is None
            else f" (the stored retention of {describe(stored.retention)} is not run on this edition: "
            "drop_chunks or DELETE does it)"
        )
        return f"{current.describe()}; nothing compressed or dropped by shadowgate{kept}"
    return (
        f"{current.describe()}; retention {describe(stored.retention)}"
        f"{' (everything kept)' if stored.retention is None else ''}, "
        f"compression after {describe(stored.compress_after)}"
    )


async def compression_horizon(connection: asyncpg.Connection) -> dt.timedelta | None:
    """How old rows are when the compression policy compresses them (the shortest horizon of the jobs on
    predictions and outcomes), or None where nothing compresses them (plain PostgreSQL, the Apache
    edition, no policy). After its first run, the incremental analysis reads no rows stamped more than this
    before its previous run (analysis.window.WindowAnalysis.lookback)."""
    if not (await edition(connection)).full:
        return None
    horizon: dt.timedelta | None = await connection.fetchval(
        """SELECT min((config->>'compress_after')::interval) FROM timescaledb_information.jobs
           WHERE proc_name = 'policy_compression' AND hypertable_schema = current_schema()
             AND hypertable_name = ANY($1::text[])""",
        list(COMPRESSED),
    )
    return horizon
