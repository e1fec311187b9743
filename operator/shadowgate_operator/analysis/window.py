"""The running sums of an analysis window: read whole (`window_metrics`) or incrementally
(`WindowAnalysis`: only the rows recorded since its previous run), saved to and resumed from table
analysis_windows, and caught up between analyses (`CATCH_UP_*`). The definitions and statements are in sql.py."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import asyncpg

from shadowgate_operator import timescale
from shadowgate_operator.analysis.sql import (
    DEFINITION_VERSION,
    MAX_SEGMENTS,
    OUTCOME_LEEWAY,
    QUANTILES,
    Options,
    Query,
    fetch,
    recorded_between_query,
    whole_window_query,
)
from shadowgate_operator.api import Metric, TrafficMode
from shadowgate_operator.metrics import (
    LATENCY_FLOOR_MS,
    LATENCY_RELATIVE_ACCURACY,
    Clustered,
    LatencySketch,
    Moments,
    SegmentMetrics,
    SideMetrics,
    WindowMetrics,
    metric_value,
)

logger = logging.getLogger(__name__)

WRITER_ALLOWANCE = dt.timedelta(seconds=60)
"""How long `WindowAnalysis` waits for a write transaction that is still open, and how old it assumes
one to be when it may not see its start (another database role without pg_read_all_stats)."""

CATCH_UP_SECONDS = 5.0
"""Between analyses the operator brings a progressing window's sums up to date this often (service.py),
so the read an analysis waits for covers seconds of arrivals, not a whole interval's."""

CATCH_UP_ROWS = 1500
"""On a busy deployment it catches up more often, down to CATCH_UP_MIN_SECONDS, so that one read takes
about this many rows (new requests and rescored ones): some 20-30 ms on a small machine (bench/analysis)."""

CATCH_UP_MIN_SECONDS = 1.0


# --- running sums -----------------------------------------------------------------------------------

_STEP_FIELDS = ("production_requests", "production_errors", "candidate_requests", "candidate_errors")


@dataclass
class _Sums:
    """The additive part of a window: what one statement returns, and what runs add up."""

    production_requests: int = 0
    production_errors: int = 0
    candidate_requests: int = 0
    candidate_errors: int = 0
    pairs: int = 0
    agreements: int = 0
    scored: int = 0
    quarantined: int = 0
    unscored_repeats: int = 0
    production_n: int = 0
    production_total: float = 0.0
    production_squares: float = 0.0
    production_cubes: float = 0.0
    production_fourths: float = 0.0
    candidate_n: int = 0
    candidate_total: float = 0.0
    candidate_squares: float = 0.0
    candidate_cubes: float = 0.0
    candidate_fourths: float = 0.0
    difference_n: int = 0
    difference_total: float = 0.0
    difference_squares: float = 0.0
    difference_cubes: float = 0.0
    difference_fourths: float = 0.0

    def add(self, row: Mapping[str, Any], names: Iterable[str] | None = None) -> None:
        for name in names if names is not None else (each.name for each in fields(self)):
            setattr(self, name, getattr(self, name) + row[name])

    def moments(self, series: str) -> Moments:
        n = getattr(self, f"{series}_n")
        if not n:  # sums of differences between runs leave rounding dust where nothing is left
            return Moments()
        return Moments(
            n,
            getattr(self, f"{series}_total"),
            getattr(self, f"{series}_squares"),
            getattr(self, f"{series}_cubes"),
            getattr(self, f"{series}_fourths"),
        )


def _side(requests: int, errors: int, latency: LatencySketch, loss: Moments, metric: Metric) -> SideMetrics:
    p50, p95, p99 = (latency.quantile(q) for q in QUANTILES)
    return SideMetrics(
        requests=requests,
        errors=errors,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
        loss=loss,
        metric_value=metric_value(metric, loss),
        latency=LatencySketch(counts=dict(latency.counts)),
    )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@dataclass
class _Window:
    """Sums, histograms, key and segment groups of one window, turned into WindowMetrics on demand."""

    metric: Metric
    mode: TrafficMode
    options: Options = field(default_factory=Options)
    sums: _Sums = field(default_factory=_Sums)
    production_latency: LatencySketch = field(default_factory=LatencySketch)
    candidate_latency: LatencySketch = field(default_factory=LatencySketch)
    keyed: dict[int, list[float]] = field(default_factory=dict)
    """Per key bucket: production n, sum; candidate n, sum; difference n, sum."""
    segments: dict[str, list[float]] = field(default_factory=dict)
    """Per segment: production n, sum, squares; candidate the same; difference the same."""

    def add(self, row: Mapping[str, Any]) -> None:
        self.sums.add(row)
        self.add_step(row, counts=False)
        for bucket, *values in _json(row.get("keyed")) or ():
            self.keyed[int(bucket)] = [
                a + b for a, b in zip(self.keyed.get(int(bucket), [0.0] * 6), values, strict=True)
            ]
        for name, *values in _json(row.get("segmented")) or ():
            key = name if name in self.segments or len(self.segments) < MAX_SEGMENTS else "(other)"
            self.segments[key] = [a + b for a, b in zip(self.segments.get(key, [0.0] * 9), values, strict=True)]

    def add_step(self, row: Mapping[str, Any], *, counts: bool = True) -> None:
        """The step window's part of a row: calls, errors, latencies."""
        if counts:
            self.sums.add(row, _STEP_FIELDS)
        self.production_latency.add_buckets(row["production_buckets"])
        self.candidate_latency.add_buckets(row["candidate_buckets"])

    def reset_step(self) -> None:
        for name in _STEP_FIELDS:
            setattr(self.sums, name, 0)
        self.production_latency = LatencySketch()
        self.candidate_latency = LatencySketch()

    def state(self) -> dict[str, Any]:
        """Everything the window has summed, as JSON (floats round-trip exactly)."""
        return {
            "sums": {each.name: getattr(self.sums, each.name) for each in fields(self.sums)},
            "production_latency": {str(bucket): count for bucket, count in self.production_latency.counts.items()},
            "candidate_latency": {str(bucket): count for bucket, count in self.candidate_latency.counts.items()},
            "keyed": {str(bucket): values for bucket, values in self.keyed.items()},
            "segments": self.segments,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.sums = _Sums(**state["sums"])
        self.production_latency.counts = {int(b): int(n) for b, n in state["production_latency"].items()}
        self.candidate_latency.counts = {int(b): int(n) for b, n in state["candidate_latency"].items()}
        self.keyed = {int(bucket): list(values) for bucket, values in state.get("keyed", {}).items()}
        self.segments = {name: list(values) for name, values in state.get("segments", {}).items()}

    def metrics(self) -> WindowMetrics:
        s = self.sums
        paired = self.mode is TrafficMode.SHADOW
        clusters = None
        if self.options.clustered:
            if paired:
                clusters = (Clustered.of((round(v[4]), v[5]) for v in self.keyed.values()), Clustered())
            else:
                clusters = (
                    Clustered.of((round(v[0]), v[1]) for v in self.keyed.values()),
                    Clustered.of((round(v[2]), v[3]) for v in self.keyed.values()),
                )
        segments = tuple(
            sorted(
                (
                    SegmentMetrics(
                        name,
                        production=_moments(v[0], v[1], v[2]),
                        candidate=_moments(v[3], v[4], v[5]),
                        difference=_moments(v[6], v[7], v[8]) if paired else Moments(),
                    )
                    for name, v in self.segments.items()
                ),
                key=lambda segment: (-segment.samples, segment.name),
            )
        )
        return WindowMetrics(
            production=_side(
                s.production_requests, s.production_errors, self.production_latency, s.moments("production"),
                self.metric,
            ),
            candidate=_side(
                s.candidate_requests, s.candidate_errors, self.candidate_latency, s.moments("candidate"), self.metric
            ),
            scored=s.scored,
            paired=paired,
            loss_difference=s.moments("difference") if paired else Moments(),
            agreement=(s.agreements / s.pairs if paired and s.pairs else None),
            clusters=clusters,
            segments=segments,
            quarantined=s.quarantined,
            unscored_repeats=s.unscored_repeats,
        )  # fmt: skip


def _moments(n: float, total: float, squares: float) -> Moments:
    return Moments(round(n), total, squares) if round(n) else Moments()


async def window_metrics(
    connection: asyncpg.Connection,
    namespace: str,
    deployment: str,
    metric: Metric,
    mode: TrafficMode,
    since: dt.datetime,
    until: dt.datetime | None,
    *,
    recorded_until: dt.datetime | None = None,
    outcome_leeway: dt.timedelta = OUTCOME_LEEWAY,
    options: Options = Options(),
    step_since: dt.datetime | None = None,
) -> WindowMetrics:
    """One deployment's windows read whole: predictions stamped in [since, until] (the step window from
    `step_since`) and recorded by `recorded_until`, each with its latest outcome stamped in
    [since - outcome_leeway, until] and recorded by then (None: no bound).

    Cost grows with the rows in the window; for an analysis repeated every interval use WindowAnalysis.
    Replay uses this with `recorded_until`: what the operator could have read at that moment.
    """
    window = _Window(metric, mode, options)
    query = whole_window_query(
        namespace, deployment, metric, mode, since, until, recorded_until=recorded_until,
        outcome_leeway=outcome_leeway, options=options, step_since=step_since,
    )  # fmt: skip
    window.add(await fetch(connection, query))
    return window.metrics()


# --- incremental analysis ---------------------------------------------------------------------------

# Who may still commit rows stamped before now: transactions holding a write lock on either table.
# A row's recorded_at (clock_timestamp() default) is taken after its statement holds that lock, so a
# row stamped before a moment T comes either from a transaction that had finished by T, or from one
# that still holds the lock and started before the row. Writers are never waited for beyond the
# allowance; one whose start we may not see (another role, without pg_read_all_stats) is taken as that
# old. The clock is read before the locks (the lock scan depends on it, so it runs after): a writer that
# takes its lock after the clock read stamps its rows later than it.
_HORIZON = """
SELECT least(clock.now, writers.oldest)
FROM (SELECT clock_timestamp() AS now OFFSET 0) clock
CROSS JOIN LATERAL (
    SELECT min(greatest(activity.xact_start, clock.now - $1::interval)) AS oldest
    FROM pg_locks l
    LEFT JOIN pg_stat_activity activity ON activity.pid = l.pid
    WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'RowExclusiveLock'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.relation IN (to_regclass('predictions'), to_regclass('outcomes'))
      AND l.pid IS DISTINCT FROM pg_backend_pid()
) writers
"""


async def recorded_horizon(connection: asyncpg.Connection, allowance: dt.timedelta = WRITER_ALLOWANCE) -> dt.datetime:
    """The latest moment up to which every row recorded in `predictions` and `outcomes` is committed
    (or rolled back) and so visible to the next statement.

    Run outside a REPEATABLE READ transaction, so the next statement sees a newer snapshot than this one.
    """
    horizon: dt.datetime = await connection.fetchval(_HORIZON, allowance)
    return horizon


_LOAD_WINDOW = """
SELECT since, metric, mode, definition, horizon, state FROM analysis_windows WHERE namespace = $1 AND deployment = $2
"""

# Never moves a window's horizon back (a late save from an operator that lost its lease): a different
# window (a new step, metric, mode or definition) always replaces the row.
_SAVE_WINDOW = """
INSERT INTO analysis_windows AS saved (namespace, deployment, since, metric, mode, definition, horizon, state)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)
ON CONFLICT (namespace, deployment) DO UPDATE
SET since = excluded.since, metric = excluded.metric, mode = excluded.mode, definition = excluded.definition,
    horizon = excluded.horizon, state = excluded.state, updated_at = now()
WHERE (saved.since, saved.metric, saved.mode, saved.definition)
        IS DISTINCT FROM (excluded.since, excluded.metric, excluded.mode, excluded.definition)
    OR saved.horizon <= excluded.horizon
"""


class WindowAnalysis:
    """One ShadowDeployment's window, kept up to date by reading only the rows recorded since the last run.

    The first `refresh` reads the window as recorded up to the horizon (`recorded_horizon`) in one go;
    each later one reads the predictions and outcomes recorded between the previous horizon and the new
    one (indexes on (namespace, deployment, recorded_at)) and adds the change to running sums: new
    requests in full, and for requests whose latest outcome changed, the new loss minus the old one.
    Latency histograms add up the same way. Memory is the sums plus two histograms (a few thousand
    buckets at most), whatever the window's size.

    Equal to `window_metrics(since, until)` for an `until` past every row's time, under two conditions
    stated where they are relied on: writers leave `recorded_at` to its default, and no write transaction
    stays open longer than WRITER_ALLOWANCE (the router commits each batch at once; one held open longer
    and committed later is missed until the analysis starts over, e.g. at the next step or restart).

    On TimescaleDB with a compression policy, runs after the first read no rows stamped more than the
    policy's horizon (`lookback`, storage_policy.compress_after, default 7 days) before the previous run:
    compressed chunks have no index for request ids, and every chunk a run could touch costs each of its
    index probes (bench/analysis). So, in a window longer than that horizon, a prediction or outcome that
    reaches the database more than the horizon after its own time, or an outcome for a request made more
    than the horizon before it, is left out of the sums (`window_metrics`, hence replay, still reads it).
    Elsewhere there is no such bound.

    A new metric, mode, options or `since` is a new window: make a new WindowAnalysis (the operator's record
    of the ShadowDeployment does, record.Rollout.window). A new step window (`move_step`, shadow mode's
    later steps) keeps the evidence window's sums and starts the step's counts over: its first run after the
    move also reads the step's rows recorded up to the previous horizon (seconds of rows: the step has just
    begun).

    With `saved` (the default), the sums and horizon are saved in `analysis_windows` after every run, and
    a WindowAnalysis whose first run finds the same window saved there goes on from it: an operator that
    restarts, or a replica that takes over, reads only what was recorded since the last run of whichever
    operator saved it, not the whole window again. Saving is best effort (a failed save costs the next
    operator a whole read, never a wrong sum): the sums are always those of the rows recorded up to the
    saved horizon, whoever saved them.
    """

    def __init__(
        self,
        namespace: str,
        deployment: str,
        metric: Metric,
        mode: TrafficMode,
        since: dt.datetime,
        *,
        outcome_leeway: dt.timedelta = OUTCOME_LEEWAY,
        writer_allowance: dt.timedelta = WRITER_ALLOWANCE,
        saved: bool = True,
        options: Options = Options(),
        step_since: dt.datetime | None = None,
    ):
        self.namespace, self.deployment, self.metric, self.mode, self.since = (
            namespace,
            deployment,
            metric,
            mode,
            since,
        )
        self.outcome_leeway = outcome_leeway
        self.writer_allowance = writer_allowance
        self.options = options
        self.step_since = step_since or since
        self._step_pending = False
        """The step window moved after the first run: its rows recorded by the horizon are still to read."""
        self.horizon: dt.datetime | None = None
        """Every row recorded up to here is in the sums; None before the first refresh."""
        self.runs = 0
        self.last_rows = 0
        """Rows the last run read: requests recorded since the run before, and earlier ones rescored."""
        self.last_span = 0.0
        """Seconds of recording the last run covered (0 for a first run)."""
        self.saved = saved
        self.lookback: dt.timedelta | None = None
        """How far before the previous run later runs read (see the class docstring); set at the first run."""
        self._lookback_known = False
        self.resumed = False
        """Whether the sums came from analysis_windows (a run of an earlier operator) at the first run."""
        self._window = _Window(metric, mode, options)

    def move_step(self, step_since: dt.datetime) -> None:
        """A new step window within the same evidence window (shadow mode's next step)."""
        if step_since == self.step_since:
            return
        self.step_since = step_since
        self._window.reset_step()
        self._step_pending = self.horizon is not None

    @property
    def definition(self) -> str:
        """What the sums mean: saved sums are reused only under the same definition."""
        return (
            f"v{DEFINITION_VERSION} leeway={self.outcome_leeway.total_seconds():g}s"
            f" latency={LATENCY_RELATIVE_ACCURACY:g}/{LATENCY_FLOOR_MS:g}ms {self.options.describe()}"
        )

    async def refresh(self, connection: asyncpg.Connection) -> WindowMetrics:
        """Read what was recorded since the previous run and return the window's metrics.

        On an error nothing changes: the next refresh reads the same rows again.
        """
        if self.horizon is None and self.saved and not self.resumed:
            await self._resume(connection)
        if not self._lookback_known:
            self.lookback, self._lookback_known = await timescale.compression_horizon(connection), True
        horizon = await recorded_horizon(connection, self.writer_allowance)
        if self._step_pending and self.horizon is not None:
            step = whole_window_query(
                self.namespace, self.deployment, self.metric, self.mode, self.step_since, None,
                recorded_until=self.horizon, outcome_leeway=self.outcome_leeway, options=self.options,
            )  # fmt: skip
            self._window.add_step(await fetch(connection, step))
            self._step_pending = False
        if self.horizon is not None and horizon <= self.horizon:
            return self.metrics()
        row = await fetch(connection, self.query(self.horizon, horizon))
        self._window.add(row)
        self.last_rows = row["rows_read"]
        self.last_span = (horizon - self.horizon).total_seconds() if self.horizon is not None else 0.0
        self.horizon = horizon
        self.runs += 1
        if self.saved:
            await self._save(connection)
        return self.metrics()

    def catch_up_seconds(self) -> float:
        """How long to wait before the next run, so that it reads about CATCH_UP_ROWS rows at the rate
        the last run saw (between CATCH_UP_MIN_SECONDS and CATCH_UP_SECONDS)."""
        if self.last_rows == 0 or self.last_span <= 0:
            return CATCH_UP_SECONDS
        seconds = CATCH_UP_ROWS * self.last_span / self.last_rows
        return max(CATCH_UP_MIN_SECONDS, min(CATCH_UP_SECONDS, seconds))

    async def _resume(self, connection: asyncpg.Connection) -> None:
        try:
            saved = await connection.fetchrow(_LOAD_WINDOW, self.namespace, self.deployment)
        except (OSError, asyncpg.PostgresError) as exc:
            logger.warning(
                "%s/%s: cannot read the saved analysis (%s); reading the window whole",
                self.namespace,
                self.deployment,
                exc,
            )
            return
        if saved is None or (saved["since"], saved["metric"], saved["mode"], saved["definition"]) != (
            self.since,
            self.metric.value,
            self.mode.value,
            self.definition,
        ):
            return
        state = _json(saved["state"])
        self._window.restore(state)
        self.horizon = saved["horizon"]
        self.resumed = True
        if state.get("step_since") != self.step_since.isoformat():
            self._window.reset_step()
            self._step_pending = True

    async def _save(self, connection: asyncpg.Connection) -> None:
        assert self.horizon is not None
        try:
            await connection.execute(
                _SAVE_WINDOW,
                self.namespace,
                self.deployment,
                self.since,
                self.metric.value,
                self.mode.value,
                self.definition,
                self.horizon,
                json.dumps({**self._window.state(), "step_since": self.step_since.isoformat()}),
            )
        except (OSError, asyncpg.PostgresError) as exc:
            logger.warning(
                "%s/%s: cannot save the analysis (%s); a restart would read the window whole",
                self.namespace,
                self.deployment,
                exc,
            )

    def query(self, after: dt.datetime | None, upto: dt.datetime) -> Query:
        """The statement a refresh runs to go from rows recorded by `after` (None: nothing read yet,
        the whole window) to rows recorded by `upto`."""
        if after is None:
            # Open-ended in time: the record time bounds what is read.
            return whole_window_query(
                self.namespace,
                self.deployment,
                self.metric,
                self.mode,
                self.since,
                None,
                recorded_until=upto,
                outcome_leeway=self.outcome_leeway,
                options=self.options,
                step_since=self.step_since,
            )
        return recorded_between_query(
            self.namespace,
            self.deployment,
            self.metric,
            self.mode,
            self.since if self.lookback is None else max(self.since, after - self.lookback),
            after,
            upto,
            outcome_leeway=self.outcome_leeway,
            options=self.options,
            step_since=self.step_since,
        )

    def metrics(self) -> WindowMetrics:
        """The window as of the last refresh."""
        return self._window.metrics()
