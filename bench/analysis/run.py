"""bench/analysis: how long one ShadowDeployment's analysis takes with millions of rows in the tables,
on plain PostgreSQL and on TimescaleDB in one run.

For each database (`--editions`, default both: a throwaway plain PostgreSQL, then a throwaway
TimescaleDB from the cached build), loads prediction and outcome rows with generate_series and measures
at two table sizes (default 1 million and 10 million prediction rows, the same 200,000 in the current
window, which reaches 30 days back (`--span`); outcomes for about 95% of them, 2% corrected once). On
TimescaleDB the storage policy's compression jobs are run once the rows are in (as the policy would an
hour after migrate), so most of the window is compressed:

- the whole-window query (`window_metrics`, what replay uses): it reads every row of the window;
- a cold first refresh of a `WindowAnalysis` without saved sums (what an operator would pay on taking
  over a busy step if it had nothing saved; with saved sums it never does, see below);
- steady state, at 110, 333 and 667 requests/s (each answered by both models, most with an outcome):
  while a writer inserts predictions and outcomes as routers do (for the measured deployment and two
  others), the analysis runs as the operator paces it (`WindowAnalysis.catch_up_seconds`: every 5 s,
  more often on a busy deployment), reads only what was recorded since its previous run and saves its
  sums (table analysis_windows). This is what every read of the operator costs, the one an analysis
  waits for included;
- a restart: a new `WindowAnalysis` (a restarted operator, or a replica taking over) one pause after
  the last run goes on from the saved sums and reads only the rows recorded since.

At the end of each size the incremental result is checked against the whole-window query, and the plans
of both statements (EXPLAIN ANALYZE, BUFFERS) are printed. Timings are medians of repeated runs; the
machine's load average is printed beside them, since other work on the machine skews them.

    make bench-analysis                                 # both databases, 1M and 10M rows: about an hour
    .venv/bin/python bench/analysis/run.py --sizes 1000000 --runs 6    # quicker
    .venv/bin/python bench/analysis/run.py --editions timescaledb --compress-after 2d   # another horizon
    .venv/bin/python bench/analysis/run.py --editions postgres --rates 333 --grouped   # sticky keys, segments
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from shadowgate_dev.localenv import Postgres
from shadowgate_operator import timescale
from shadowgate_operator.analysis.sql import Options, explain, whole_window_query
from shadowgate_operator.analysis.window import WindowAnalysis, window_metrics
from shadowgate_operator.api import Metric, TrafficMode
from shadowgate_operator.metrics import WindowMetrics
from shadowgate_operator.migrate import migrate_with_report

NAMESPACE, TARGET = "bench", "target"
OTHERS = tuple(f"model-{i}" for i in range(1, 10))
LIVE_OTHERS = OTHERS[:2]
"""Deployments that keep writing while the target is measured: rows outside its window, growing."""
EDITIONS = ("postgres", "timescaledb")
RESTARTS = 3
"""Restarts measured per rate (the median is reported)."""
TICK = 0.1
"""The writer inserts every TICK seconds, like a router flushing its batches."""
OUTCOME_DELAY_TICKS = 20
"""Live outcomes arrive 2 s after their predictions (plus a few in the same batch)."""

# One statement per segment: `count` predictions of `deployment` stamped evenly over [start, end) and
# recorded half a second later, with UUID request ids as routers mint them (index probes land anywhere);
# then their outcomes: 95% get one, 0 to 60 s later, 2% a correction 30 s after that, none that would
# fall after `now` (they have not happened yet).
_SEGMENT = """
WITH inserted AS (
    INSERT INTO predictions (time, recorded_at, namespace, deployment, request_id, served_by, mode, weight,
        production_version, production_prediction, production_confidence, production_latency_ms,
        production_status, production_error, candidate_version, candidate_prediction, candidate_confidence,
        candidate_latency_ms, candidate_status, candidate_error)
    SELECT t, t + interval '0.5 s', $1, $2, gen_random_uuid()::text, 'production', 'shadow', 20,
        'v1', random(), CASE WHEN i % 2 = 0 THEN random() END, 3 + 20 * random() ^ 3, 200, NULL,
        'v2', random(), CASE WHEN i % 2 = 0 THEN random() END, 4 + 30 * random() ^ 3,
        CASE WHEN i % 97 = 0 THEN 503 WHEN i % 211 = 0 THEN NULL ELSE 200 END,
        CASE WHEN i % 211 = 0 THEN 'timeout' END
    FROM (SELECT i, $3::timestamptz + (i * ($4::timestamptz - $3::timestamptz) / $5) AS t
          FROM generate_series(0, $5 - 1) AS i) AS stamped
    RETURNING namespace, deployment, request_id, time
),
due AS (
    SELECT namespace, deployment, request_id, time + random() * interval '60 s' AS at, random() AS roll
    FROM inserted
)
INSERT INTO outcomes (time, recorded_at, namespace, deployment, request_id, outcome)
SELECT at, at + interval '0.2 s', namespace, deployment, request_id, round(random()) FROM due
WHERE roll < 0.95 AND at < $6
UNION ALL
SELECT at + interval '30 s', at + interval '30.2 s', namespace, deployment, request_id, round(random()) FROM due
WHERE roll < 0.02 AND at + interval '30 s' < $6
"""

_LIVE_PREDICTIONS = """
INSERT INTO predictions (time, namespace, deployment, request_id, served_by, mode, weight,
    production_prediction, production_latency_ms, production_status,
    candidate_prediction, candidate_latency_ms, candidate_status)
SELECT clock_timestamp() - random() * interval '50 ms', $1, $2, $3 || '-' || i, 'production', 'shadow', 20,
    random(), 3 + 20 * random() ^ 3, 200, random(), 4 + 30 * random() ^ 3, CASE WHEN i % 97 = 0 THEN 503 ELSE 200 END
FROM generate_series(1, $4) AS i
"""

_LIVE_OUTCOMES = """
INSERT INTO outcomes (time, namespace, deployment, request_id, outcome)
SELECT clock_timestamp(), $1, $2, $3 || '-' || i, round(random())
FROM generate_series(1, $4) AS i
WHERE random() < $5
"""


@dataclass
class Steady:
    """Refreshes at one arrival rate."""

    refresh_ms: list[float]
    refresh_cpu_ms: list[float]
    """CPU time of the PostgreSQL backend per refresh."""
    seconds_per_run: float
    """Mean seconds of recording one run covered: the operator's catch-up pause at this rate."""
    rows_per_run: float
    """Mean rows a run read: new requests and earlier ones rescored by a new outcome."""
    predictions_per_run: float
    outcomes_per_run: float
    resume_ms: float
    resume_cpu_ms: float
    """Median of RESTARTS runs of a new WindowAnalysis that resumes from the saved sums, a pause after the last."""
    load: tuple[float, float]
    """Load average (1 min) before and after."""


@dataclass
class Figures:
    rows: int
    window_rows: int
    whole_window_ms: list[float]
    whole_window_cpu_ms: list[float]
    first_refresh_ms: list[float]
    first_refresh_cpu_ms: list[float]
    steady: list[Steady]
    window_rows_after: int
    matches: bool
    edition: str = ""


class Clock:
    """Wall time, and the CPU time of the connection's PostgreSQL backend (from /proc/<pid>/schedstat,
    in nanoseconds): on a shared machine the second says what the analysis costs when others' work
    stretches the first. None where the backend's /proc entry cannot be read."""

    def __init__(self, backend_pid: int):
        self.path = f"/proc/{backend_pid}/schedstat"

    def _cpu_ns(self) -> int | None:
        try:
            with open(self.path) as stat:
                return int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    async def measure(self, work: Awaitable[object]) -> tuple[float, float | None]:
        """(wall ms, backend CPU ms) of awaiting `work`."""
        cpu_before = self._cpu_ns()
        started = time.perf_counter()
        await work
        wall = (time.perf_counter() - started) * 1000
        cpu_after = self._cpu_ns()
        cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / 1e6
        return wall, cpu


def log(message: str) -> None:
    print(message, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def p90(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else math.nan


async def _indexes(connection: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await connection.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('predictions', 'outcomes') ORDER BY 1"
    )
    return [(row["indexname"], row["indexdef"]) for row in rows]


async def load(
    connection: asyncpg.Connection, segments: list[tuple[str, dt.datetime, dt.datetime, int]], now: dt.datetime
) -> None:
    """Insert prediction segments and their outcomes with the indexes dropped, then rebuild them: a bulk
    load takes a few minutes this way instead of an hour of random index inserts."""
    indexes = await _indexes(connection)
    for name, _ in indexes:
        await connection.execute(f'DROP INDEX "{name}"')
    await connection.execute("SET maintenance_work_mem = '1GB'")
    started = time.monotonic()
    for deployment, start, end, count in segments:
        await connection.execute(_SEGMENT, NAMESPACE, deployment, start, end, count, now)
    log(f"  inserted in {time.monotonic() - started:.0f}s; rebuilding {len(indexes)} indexes")
    for _, definition in indexes:
        await connection.execute(definition)
    await connection.execute("VACUUM ANALYZE predictions")
    await connection.execute("VACUUM ANALYZE outcomes")
    log(f"  loaded in {time.monotonic() - started:.0f}s")


def plan_lines(lines: list[str]) -> list[str]:
    """The plan's nodes (with their actual times, rows and loops, estimates left out), buffers of the
    top node, and the planning and execution times."""
    kept = []
    for index, line in enumerate(lines):
        if "actual time" in line:
            head, _, actual = line.partition("(cost=")
            kept.append(f"{head.rstrip()}  ({actual.split(') (', 1)[-1]}" if ") (" in actual else line)
        elif (index == 1 and "Buffers" in line) or line.startswith(("Planning Time", "Execution Time")):
            kept.append(line)
    return kept


async def steady_state(
    connection: asyncpg.Connection,
    writer: asyncpg.Connection,
    analysis: WindowAnalysis,
    rate: int,
    args: argparse.Namespace,
) -> tuple[Steady, tuple[dt.datetime | None, dt.datetime], WindowAnalysis]:
    """Refresh as the operator does (when `WindowAnalysis.catch_up_seconds` says, or every --interval)
    while a writer inserts predictions and outcomes on a fixed schedule, as routers do (the target and
    two other deployments), then once more from a new WindowAnalysis, as a restarted operator would;
    returns the figures, a typical slice and the analysis that goes on."""
    per_tick = max(1, round(rate * TICK))
    stop = asyncio.Event()
    predictions = outcomes = 0

    async def write() -> None:
        nonlocal predictions, outcomes
        tick = 0
        tag = f"live-{analysis.deployment}-{time.time_ns()}"
        started = time.monotonic()
        while not stop.is_set():
            for deployment in (analysis.deployment, *LIVE_OTHERS):
                statements: list[tuple[Any, ...]] = [(_LIVE_PREDICTIONS, f"{tag}-{tick}", per_tick)]
                if tick >= OUTCOME_DELAY_TICKS:
                    delayed = f"{tag}-{tick - OUTCOME_DELAY_TICKS}"
                    statements.append((_LIVE_OUTCOMES, delayed, per_tick, 0.9))
                    if tick % 50 == 0:  # now and then a correction of an earlier outcome
                        statements.append((_LIVE_OUTCOMES, delayed, per_tick, 0.5))
                # A few outcomes land in the same batch as their prediction.
                statements.append((_LIVE_OUTCOMES, f"{tag}-{tick}", per_tick, 0.05))
                for sql, *arguments in statements:
                    status = await writer.execute(sql, NAMESPACE, deployment, *arguments)
                    if deployment == analysis.deployment:
                        count = int(status.split()[-1])
                        if sql is _LIVE_PREDICTIONS:
                            predictions += count
                        else:
                            outcomes += count
            tick += 1
            # On a fixed schedule: the rate holds however long the inserts take.
            await asyncio.sleep(max(0.0, started + tick * TICK - time.monotonic()))

    refreshes: list[float] = []
    cpu: list[float] = []
    spans: list[float] = []
    rows_read: list[int] = []
    slices: list[tuple[dt.datetime | None, dt.datetime]] = []
    clock = Clock(await connection.fetchval("SELECT pg_backend_pid()"))
    load_before = os.getloadavg()[0]

    def pause() -> float:
        return args.interval or analysis.catch_up_seconds()

    task = asyncio.create_task(write())
    started = time.monotonic()
    try:
        await analysis.refresh(connection)  # start from now: the first slice is a whole pause
        for run in range(args.runs + 2):
            await asyncio.sleep(pause())
            before = analysis.horizon
            wall, backend = await clock.measure(analysis.refresh(connection))
            if run < 2:
                continue  # the pause settles to the rate first
            refreshes.append(wall)
            if backend is not None:
                cpu.append(backend)
            assert analysis.horizon is not None
            slices.append((before, analysis.horizon))
            spans.append(analysis.last_span)
            rows_read.append(analysis.last_rows)
        # Restarts: each new operator finds the sums saved by the last run and reads what came since.
        resumes: list[float] = []
        resumes_cpu: list[float] = []
        for _ in range(RESTARTS):
            await asyncio.sleep(pause())
            restarted = WindowAnalysis(
                analysis.namespace,
                analysis.deployment,
                analysis.metric,
                analysis.mode,
                analysis.since,
                options=analysis.options,
            )
            wall, backend = await clock.measure(restarted.refresh(connection))
            if not restarted.resumed:
                raise SystemExit("the restarted analysis did not find the saved sums")
            resumes.append(wall)
            resumes_cpu.extend([] if backend is None else [backend])
            analysis = restarted
        resume_ms, resume_cpu = median(resumes), (median(resumes_cpu) if resumes_cpu else None)
    finally:
        stop.set()
        await task
    elapsed = time.monotonic() - started
    span = statistics.mean(spans)
    figures = Steady(
        refresh_ms=refreshes,
        refresh_cpu_ms=cpu,
        seconds_per_run=span,
        rows_per_run=statistics.mean(rows_read),
        predictions_per_run=predictions / elapsed * span,
        outcomes_per_run=outcomes / elapsed * span,
        resume_ms=resume_ms,
        resume_cpu_ms=math.nan if resume_cpu is None else resume_cpu,
        load=(load_before, os.getloadavg()[0]),
    )
    log(
        f"  {rate} requests/s, a run every {span:.1f}s reading {figures.rows_per_run:.0f} rows"
        f" ({figures.predictions_per_run:.0f} predictions + {figures.outcomes_per_run:.0f} outcomes):"
        f" median {median(refreshes):.1f} ms (backend CPU {median(cpu):.1f} ms), "
        f"p90 {p90(refreshes):.1f} ms over {len(refreshes)} runs (load {figures.load[0]:.1f}/{figures.load[1]:.1f}); "
        f"after a restart (median of {RESTARTS}): {resume_ms:.1f} ms (backend CPU {figures.resume_cpu_ms:.1f} ms)"
    )
    return figures, slices[len(slices) // 2], analysis


async def measure(
    dsn: str, target: str, rows: int, window_rows: int, since: dt.datetime, args: argparse.Namespace
) -> tuple[Figures, list[str], list[str]]:
    options = Options(clustered=args.grouped, segmented=args.grouped)
    connection = await asyncpg.connect(dsn)
    writer = await asyncpg.connect(dsn)
    try:
        clock = Clock(await connection.fetchval("SELECT pg_backend_pid()"))
        whole: list[float] = []
        whole_cpu: list[float] = []
        for _ in range(args.repeats):
            wall, backend = await clock.measure(
                window_metrics(
                    connection, NAMESPACE, target, Metric.MAE, TrafficMode.SHADOW, since, None, options=options
                )
            )
            whole.append(wall)
            whole_cpu.extend([] if backend is None else [backend])
        log(f"  whole-window query: median {median(whole):.0f} ms (backend CPU {median(whole_cpu):.0f} ms)")

        first: list[float] = []
        first_cpu: list[float] = []
        for _ in range(args.repeats):
            cold = WindowAnalysis(
                NAMESPACE, target, Metric.MAE, TrafficMode.SHADOW, since, saved=False, options=options
            )
            wall, backend = await clock.measure(cold.refresh(connection))
            first.append(wall)
            first_cpu.extend([] if backend is None else [backend])
        log(
            f"  cold first refresh (no saved sums): median {median(first):.0f} ms"
            f" (backend CPU {median(first_cpu):.0f} ms)"
        )
        # The operator's analysis: from the whole window once (saved from then on), then incremental.
        analysis = WindowAnalysis(NAMESPACE, target, Metric.MAE, TrafficMode.SHADOW, since, options=options)
        await analysis.refresh(connection)

        steady = []
        typical: tuple[dt.datetime | None, dt.datetime] | None = None
        for rate in sorted(args.rates):
            phase, typical, analysis = await steady_state(connection, writer, analysis, rate, args)
            steady.append(phase)
        assert typical is not None

        incremental = await analysis.refresh(connection)
        whole_now = await window_metrics(
            connection, NAMESPACE, target, Metric.MAE, TrafficMode.SHADOW, since, None, options=options
        )
        steady_plan = plan_lines(await explain(connection, analysis.query(*typical)))
        whole_plan = plan_lines(
            await explain(
                connection,
                whole_window_query(NAMESPACE, target, Metric.MAE, TrafficMode.SHADOW, since, None, options=options),
            )
        )
        figures = Figures(
            rows=rows,
            window_rows=window_rows,
            whole_window_ms=whole,
            whole_window_cpu_ms=whole_cpu,
            first_refresh_ms=first,
            first_refresh_cpu_ms=first_cpu,
            steady=steady,
            window_rows_after=incremental.production.requests,
            matches=_same(incremental, whole_now),
        )
        return figures, steady_plan, whole_plan
    finally:
        await writer.close()
        await connection.close()


def _same(a: WindowMetrics, b: WindowMetrics) -> bool:
    """Equal counts, sums equal to rounding (the incremental sums are added in another order)."""

    def close(x: float | None, y: float | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9))

    return (
        (a.scored, a.production.requests, a.candidate.requests, a.production.errors, a.candidate.errors)
        == (b.scored, b.production.requests, b.candidate.requests, b.production.errors, b.candidate.errors)
        and a.loss_difference.n == b.loss_difference.n
        and close(a.loss_difference.total, b.loss_difference.total)
        and close(a.production.latency_p99_ms, b.production.latency_p99_ms)
        and close(a.candidate.metric_value, b.candidate.metric_value)
        and close(a.agreement, b.agreement)
        and (a.clusters is None) == (b.clusters is None)
        and all(
            x.keys == y.keys and close(x.squares, y.squares) and close(x.cross, y.cross) and x.counts == y.counts
            for x, y in zip(a.clusters or (), b.clusters or (), strict=True)
        )
        and [(g.name, g.samples) for g in a.segments] == [(g.name, g.samples) for g in b.segments]
    )


async def _compress(dsn: str, since: dt.datetime) -> str:
    """On TimescaleDB with a compression policy: run its jobs now, as the policy would (their first run is
    an hour after migrate), and say what they compressed."""
    connection = await asyncpg.connect(dsn)
    try:
        if await timescale.compression_horizon(connection) is None:
            return "no compression on this edition"
        jobs = await connection.fetch(
            "SELECT job_id FROM timescaledb_information.jobs WHERE proc_name = 'policy_compression' ORDER BY 1"
        )
        started = time.monotonic()
        for job in jobs:
            await connection.execute("CALL run_job($1)", job["job_id"])
        await connection.execute("ANALYZE predictions; ANALYZE outcomes")
        row = await connection.fetchrow(
            """SELECT count(*) FILTER (WHERE is_compressed) AS compressed, count(*) AS chunks
               FROM timescaledb_information.chunks WHERE hypertable_name = 'predictions' AND range_end > $1""",
            since,
        )
        return (
            f"compression policy run in {time.monotonic() - started:.0f}s: {row['compressed']} of the "
            f"{row['chunks']} chunks of predictions in the window compressed"
        )
    finally:
        await connection.close()


async def bench(dsn: str, edition: str, args: argparse.Namespace) -> list[Figures]:
    connection = await asyncpg.connect(dsn)
    try:
        changes = {} if args.compress_after is None else {"compress_after": args.compress_after}
        await migrate_with_report(connection, changes=changes)
        now: dt.datetime = await connection.fetchval("SELECT now()")
        settings = await connection.fetch(
            "SELECT name, current_setting(name) AS setting FROM pg_settings WHERE name IN "
            "('shared_buffers', 'work_mem', 'max_parallel_workers_per_gather', 'server_version')"
        )
        storage = await timescale.summary(connection)
    finally:
        await connection.close()
    log(f"{edition}: " + ", ".join(f"{row['name']}={row['setting']}" for row in settings) + f"; {storage}")
    window = args.window
    span: dt.timedelta = args.span

    results: list[Figures] = []
    loaded = 0
    oldest = now - span
    for phase, size in enumerate(sorted(args.sizes)):
        # Each size measures a deployment of its own whose window holds exactly `window` rows; the
        # previous size's target and its live rows are then just more rows outside the window.
        target = f"{TARGET}-{phase + 1}"
        connection = await asyncpg.connect(dsn)
        try:
            now = await connection.fetchval("SELECT now()")
        finally:
            await connection.close()
        since = now - span
        log(f"\n== {edition}: {size:,} prediction rows, {window:,} in the {_span(span)} window of {target} ==")
        segments = [(target, since, now, window)]
        if phase == 0:  # two deployments busy during the window too: their rows interleave on disk
            segments += [(other, since, now, window) for other in LIVE_OTHERS]
        # Everything else is older: a week per size, all deployments (the target's earlier steps too).
        inside = sum(count for _, _, _, count in segments)
        per_deployment = max(0, size - loaded - inside) // (len(OTHERS) + 1)
        older_end = oldest
        oldest = older_end - dt.timedelta(days=7)
        segments += [(deployment, oldest, older_end, per_deployment) for deployment in (target, *OTHERS)]
        loaded += inside + per_deployment * (len(OTHERS) + 1)
        connection = await asyncpg.connect(dsn)
        try:
            await load(connection, segments, now)
            total = await connection.fetchval("SELECT count(*) FROM predictions")
            outcomes = await connection.fetchval("SELECT count(*) FROM outcomes")
        finally:
            await connection.close()
        log(f"  tables: {total:,} predictions, {outcomes:,} outcomes")
        log(f"  {await _compress(dsn, since)}")
        figures, steady_plan, whole_plan = await measure(dsn, target, total, window, since, args)
        figures.edition = edition
        results.append(figures)
        log("  plan of a steady-state refresh (rows recorded in one interval):")
        for line in steady_plan:
            log(f"    {line}")
        log("  plan of the whole-window query:")
        for line in whole_plan:
            log(f"    {line}")
        log(f"  incremental result equals the whole-window query: {'yes' if figures.matches else 'NO'}")
    return results


def summarize(results: list[Figures], args: argparse.Namespace) -> int:
    log(
        f"\n== summary ({_span(args.span)} window): median wall ms [backend CPU ms]; load average before/after"
        " each steady-state phase =="
    )
    log(
        f"{'database':<26} {'predictions':>12} {'window':>8} {'whole-window':>14} {'cold first':>12} {'req/s':>6}"
        f" {'every':>6} {'arrivals per run':>17} {'refresh':>13} {'p90':>6} {'restart':>13} {'load':>9}  same"
    )
    for f in results:
        whole = f"{median(f.whole_window_ms):.0f} [{median(f.whole_window_cpu_ms):.0f}]"
        first = f"{median(f.first_refresh_ms):.0f} [{median(f.first_refresh_cpu_ms):.0f}]"
        for rate, steady in zip(sorted(args.rates), f.steady, strict=True):
            arrivals = f"{steady.predictions_per_run:,.0f}+{steady.outcomes_per_run:,.0f}"
            refresh = f"{median(steady.refresh_ms):.1f} [{median(steady.refresh_cpu_ms):.1f}]"
            restart = f"{steady.resume_ms:.1f} [{steady.resume_cpu_ms:.1f}]"
            log(
                f"{f.edition:<26} {f.rows:>12,} {f.window_rows:>8,} {whole:>14} {first:>12} {rate:>6}"
                f" {steady.seconds_per_run:>5.1f}s {arrivals:>17} {refresh:>13} {p90(steady.refresh_ms):>6.1f}"
                f" {restart:>13} {steady.load[0]:>4.1f}/{steady.load[1]:<4.1f}  {'yes' if f.matches else 'NO'}"
            )
    for edition in dict.fromkeys(f.edition for f in results):
        mine = [f for f in results if f.edition == edition]
        for index, rate in enumerate(sorted(args.rates)):
            wall = max(median(f.steady[index].refresh_ms) for f in mine)
            cpu = max(median(f.steady[index].refresh_cpu_ms) for f in mine)
            slowest_restart = max(f.steady[index].resume_ms for f in mine)
            log(
                f"{edition}, {rate:,} requests/s: slowest median analysis read {wall:.1f} ms wall"
                f" ({'within' if wall <= args.budget_ms else 'OVER'} {args.budget_ms:.0f} ms),"
                f" {cpu:.1f} ms backend CPU ({'within' if cpu <= args.budget_ms else 'OVER'});"
                f" after a restart (median of {RESTARTS}) {slowest_restart:.1f} ms"
                f" ({'within' if slowest_restart <= args.budget_ms else 'OVER'})"
            )
    cadence = f"every {args.interval:g}s" if args.interval else "when the operator would (catch_up_seconds)"
    log(
        f"(runs {cadence}: between analyses the operator keeps a progressing window's sums caught up, so each"
        " read, an analysis's included, covers the arrivals since the previous one, whatever the window's size"
        " or the tables')"
    )
    return 0 if all(f.matches for f in results) else 1


def _span(span: dt.timedelta) -> str:
    return f"{span.days}-day" if span >= dt.timedelta(days=1) else f"{span.total_seconds() / 60:g}-minute"


def parse_span(text: str) -> dt.timedelta:
    """`30d`, `12h` or `10m`."""
    match = re.fullmatch(r"(\d+)([dhm])", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a span like 30d, 12h or 10m")
    amount, unit = int(match.group(1)), match.group(2)
    seconds = {"d": 86400, "h": 3600, "m": 60}[unit]
    return dt.timedelta(seconds=amount * seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="prediction rows in the tables"
    )
    parser.add_argument("--window", type=int, default=200_000, help="the target's rows in its current window")
    parser.add_argument(
        "--span",
        type=parse_span,
        default=dt.timedelta(days=30),
        help="how far back the target's window goes (default 30d: on TimescaleDB most of it is compressed)",
    )
    parser.add_argument(
        "--editions",
        nargs="+",
        choices=EDITIONS,
        default=list(EDITIONS),
        help="databases to measure one after the other, each a throwaway cluster (timescaledb needs the "
        "cached build: `make binaries` with SHADOWGATE_TIMESCALEDB_SOURCE)",
    )
    parser.add_argument(
        "--compress-after",
        type=timescale.parse_horizon,
        default=None,
        help="TimescaleDB: the storage policy's compression horizon (default: the policy's default, 7d)",
    )
    parser.add_argument(
        "--rates",
        type=int,
        nargs="+",
        default=[110, 333, 667],
        help="requests/s the target receives (each with an outcome), one steady-state phase each: 110 fills a "
        "200,000-request window in a 30-minute step, 333 in 10 minutes, 667 twice that",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=None,
        help="seconds between runs (default: as the operator paces them, every 1-5s depending on the rate)",
    )
    parser.add_argument(
        "--grouped",
        action="store_true",
        help="analyse as a deployment with spec.traffic.stickyHeader and spec.analysis.segmentBy set: sums per "
        "sticky-key bucket and per segment too, saved with the rest (the bench's rows have no sticky key, so "
        "each request is its own key and every bucket fills)",
    )
    parser.add_argument("--runs", type=int, default=12, help="steady-state refreshes per rate and size")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the whole-window query and first refresh")
    parser.add_argument("--budget-ms", type=float, default=50.0)
    parser.add_argument(
        "--shared-buffers",
        default="1GB",
        help="PostgreSQL shared_buffers ('default' keeps the built-in 128MB, small for a 5 GB dataset)",
    )
    args = parser.parse_args(argv)
    results: list[Figures] = []
    for edition in args.editions:
        with Postgres(timescaledb=edition == "timescaledb") as postgres:
            if edition == "timescaledb" and not postgres.timescale:
                log(f"timescaledb skipped: {postgres.timescale_reason}")
                continue
            if args.shared_buffers != "default":
                asyncio.run(_configure(postgres.dsn, args.shared_buffers))
                postgres.stop()
                postgres.start()
            log(f"throwaway {postgres.server} at {postgres.dsn}")
            results += asyncio.run(bench(postgres.dsn, postgres.server.split(" with ")[-1], args))
    return summarize(results, args)


async def _configure(dsn: str, shared_buffers: str) -> None:
    if not re.fullmatch(r"[0-9]+(kB|MB|GB)", shared_buffers):
        raise SystemExit(f"--shared-buffers: {shared_buffers!r} is not a size like 512MB or 1GB")
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}'")
    finally:
        await connection.close()


if __name__ == "__main__":
    sys.exit(main())
