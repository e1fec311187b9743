"""The metric queries against real PostgreSQL: seeded rows, and every number checked against a plain-Python
reading of the definitions in analysis/sql.py (written from the docstring, not from the SQL).

The seed covers errors, timeouts, 4xx answers, a side not called, missing and duplicate outcomes (a later
correction, and a late-arriving one with an older time that must not win), outcomes just inside and just
outside the leeway, rows outside the window, and other deployments and namespaces sharing request ids.
The incremental analysis is checked batch by batch against the whole-window query and the reference,
including outcomes recorded before their prediction, a spooled prediction stamped long ago, a write
transaction still open while the analysis runs, and rows from before `recorded_at` existed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import math
import random
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shadowgate_operator import timescale
from shadowgate_operator.analysis.sql import (
    CLOCK_SKEW,
    KEY_BUCKETS,
    OUTCOME_LEEWAY,
    SANE_LIMIT,
    Options,
    recorded_between_query,
    whole_window_query,
)
from shadowgate_operator.analysis.window import WindowAnalysis, recorded_horizon, window_metrics
from shadowgate_operator.api import Metric, TrafficMode
from shadowgate_operator.metrics import (
    LATENCY_RELATIVE_ACCURACY,
    Clustered,
    LatencySketch,
    Moments,
    SegmentMetrics,
    SideMetrics,
    WindowMetrics,
)
from tests.support.databases import EDITIONS, own_database

pytestmark = pytest.mark.database

NS, DEPLOYMENT = "team-a", "pricer"
# Hours before the run, never days: whatever the retention and compression horizons, TimescaleDB's jobs
# leave the seed alone while the tests run (a fixed date drifts past the retention window).
SINCE = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=6)
UNTIL = SINCE + dt.timedelta(hours=1)
MODES = (TrafficMode.SHADOW, TrafficMode.CANARY)


# --- a database of our own, on TimescaleDB and on plain PostgreSQL ----------------------------------


@pytest.fixture(scope="module", params=EDITIONS)
def queries_dsn(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, migrated database for this module: no other test's rows, nobody else's writers. Every
    test runs three times: with the timescaledb extension (hypertables, compression), on its Apache-only
    edition (hypertables) and on plain PostgreSQL."""
    with own_database(request, request.param, "test_queries") as dsn:
        yield dsn


@pytest.fixture
async def connection(queries_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(queries_dsn)
    try:
        yield connection
    finally:
        await connection.close()


# --- rows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    prediction: float | None = None
    confidence: float | None = None
    latency_ms: float | None = None
    status: int | None = None
    error: str | None = None


NOT_CALLED = Side()


@dataclass(frozen=True)
class Prediction:
    time: dt.datetime
    request_id: str
    production: Side
    candidate: Side
    namespace: str = NS
    deployment: str = DEPLOYMENT
    sticky_key: str | None = None
    segment: str | None = None


@dataclass(frozen=True)
class Outcome:
    time: dt.datetime
    request_id: str
    outcome: float
    namespace: str = NS
    deployment: str = DEPLOYMENT


async def insert(
    connection: asyncpg.Connection,
    predictions: Iterable[Prediction] = (),
    outcomes: Iterable[Outcome] = (),
    *,
    legacy: bool = False,
) -> None:
    """Insert as the router does: recorded_at left to its default (legacy: NULL, as before migration 0003)."""
    recorded = ", recorded_at" if legacy else ""
    null = ", NULL" if legacy else ""
    await connection.executemany(
        f"""INSERT INTO predictions (time, namespace, deployment, request_id, served_by, mode, weight,
                production_prediction, production_confidence, production_latency_ms, production_status,
                production_error, candidate_prediction, candidate_confidence, candidate_latency_ms,
                candidate_status, candidate_error, sticky_key, segment{recorded})
            VALUES ($1, $2, $3, $4, 'production', 'shadow', 50, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                    $16{null})""",
        [
            (p.time, p.namespace, p.deployment, p.request_id,
             p.production.prediction, p.production.confidence, p.production.latency_ms, p.production.status,
             p.production.error, p.candidate.prediction, p.candidate.confidence, p.candidate.latency_ms,
             p.candidate.status, p.candidate.error, p.sticky_key, p.segment)
            for p in predictions
        ],
    )  # fmt: skip
    await connection.executemany(
        f"INSERT INTO outcomes (time, namespace, deployment, request_id, outcome{recorded})"
        f" VALUES ($1, $2, $3, $4, $5{null})",
        [(o.time, o.namespace, o.deployment, o.request_id, o.outcome) for o in outcomes],
    )


def _latency(rng: random.Random) -> float:
    # Multiples of 1/8 survive the trip through `real` exactly, so Python sees what SQL sees.
    return rng.choice([0.0, rng.randint(1, 8) / 8, rng.randint(8, 4000) / 8])


def _value(rng: random.Random) -> float:
    # Zeros (for the sign rule), exact classes, values on both sides of 0.5, negatives.
    return rng.choice([0.0, 1.0, 0.5, rng.uniform(-2, 2), rng.uniform(0, 1), rng.uniform(0, 1)])


def _side(rng: random.Random, *, mirrored: bool) -> Side:
    roll = rng.random()
    if not mirrored and roll < 0.2:
        return NOT_CALLED
    if roll < 0.27:
        return Side(latency_ms=_latency(rng), status=rng.choice([500, 503]))
    if roll < 0.31:
        return Side(latency_ms=1000.0, error="timeout")
    if roll < 0.33:
        return Side(latency_ms=_latency(rng), status=400)
    if roll < 0.34:
        return Side(latency_ms=_latency(rng), status=200, error="bad_response")
    if roll < 0.35:
        return Side(latency_ms=_latency(rng), status=200, error="no_prediction")
    confidence = rng.choice([None, rng.uniform(0, 1), 0.0, 1.0])
    return Side(prediction=_value(rng), confidence=confidence, latency_ms=_latency(rng), status=200)


def seed(
    rng: random.Random, deployment: str = DEPLOYMENT, count: int = 300, start: dt.datetime = SINCE
) -> tuple[list[Prediction], list[Outcome]]:
    """Requests inside [start, start + 1h) with their outcomes, and everything that must be left out."""
    predictions: list[Prediction] = []
    outcomes: list[Outcome] = []
    for i in range(count):
        time = start + dt.timedelta(seconds=i * 3600 / count)
        request_id = f"req-{i}"
        predictions.append(
            Prediction(time, request_id, _side(rng, mirrored=True), _side(rng, mirrored=False), deployment=deployment)
        )
        roll = rng.random()
        if roll < 0.25:
            continue  # no outcome (yet)
        outcome_time = time + dt.timedelta(seconds=rng.uniform(0, 120))
        outcomes.append(Outcome(outcome_time, request_id, _value(rng), deployment=deployment))
        if roll < 0.35:  # a correction, later: it wins
            outcomes.append(
                Outcome(outcome_time + dt.timedelta(seconds=5), request_id, _value(rng), deployment=deployment)
            )
        elif roll < 0.42:  # arrives later but is stamped earlier: it loses
            outcomes.append(
                Outcome(outcome_time - dt.timedelta(seconds=5), request_id, _value(rng), deployment=deployment)
            )
    # Outcomes stamped before the window: within the leeway they count, beyond it they do not.
    outcomes.append(Outcome(start - OUTCOME_LEEWAY + dt.timedelta(seconds=1), "req-1", 0.25, deployment=deployment))
    outcomes.append(Outcome(start - OUTCOME_LEEWAY - dt.timedelta(seconds=1), "req-2", 0.75, deployment=deployment))
    # Outside the window in time; other deployments and namespaces with the same request ids.
    ok = Side(prediction=0.9, latency_ms=3.0, status=200)
    for i in range(10):
        predictions.append(Prediction(start - dt.timedelta(minutes=5 + i), f"old-{i}", ok, ok, deployment=deployment))
        outcomes.append(Outcome(start - dt.timedelta(minutes=4), f"old-{i}", 0.0, deployment=deployment))
        predictions.append(
            Prediction(start + dt.timedelta(hours=2, minutes=i), f"late-{i}", ok, ok, deployment=deployment)
        )
        outcomes.append(Outcome(start + dt.timedelta(hours=2, minutes=i + 1), f"late-{i}", 0.0, deployment=deployment))
        for namespace, other in ((NS, f"{deployment}-other"), (f"{NS}-other", deployment)):
            predictions.append(Prediction(start + dt.timedelta(minutes=i), f"req-{i}", ok, ok, namespace, other))
            outcomes.append(Outcome(start + dt.timedelta(minutes=i), f"req-{i}", 0.0, namespace, other))
    return predictions, outcomes


# --- the reference: the definitions of analysis/sql.py, in plain Python ---------------------------------


def _called(side: Side) -> bool:
    return side.status is not None or side.error is not None


def _failed(side: Side) -> bool:
    return (side.status is not None and side.status >= 500) or side.error is not None


def _answered(side: Side) -> bool:
    return side.prediction is not None and side.error is None and (side.status is None or side.status < 400)


def _loss(metric: Metric, side: Side, y: float) -> float:
    x = side.prediction
    assert x is not None
    if metric is Metric.MAE:
        return abs(x - y)
    if metric is Metric.RMSE:
        return (x - y) ** 2
    if metric is Metric.ACCURACY:
        return float((x >= 0.5) != (y >= 0.5))
    if metric is Metric.DIRECTIONAL_ACCURACY:
        return float((x > 0) - (x < 0) != (y > 0) - (y < 0))
    p = min(max(side.confidence if side.confidence is not None else x, 1e-15), 1 - 1e-15)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _agree(metric: Metric, a: Side, b: Side) -> bool:
    x, z = a.prediction, b.prediction
    assert x is not None and z is not None
    if metric in (Metric.MAE, Metric.RMSE):
        return abs(x - z) <= 1e-9 * max(1.0, abs(x), abs(z))
    if metric is Metric.ACCURACY:
        return (x >= 0.5) == (z >= 0.5)
    if metric is Metric.DIRECTIONAL_ACCURACY:
        return (x > 0) - (x < 0) == (z > 0) - (z < 0)
    pa = a.confidence if a.confidence is not None else x
    pb = b.confidence if b.confidence is not None else z
    return (pa >= 0.5) == (pb >= 0.5)


def _moments(values: list[float]) -> Moments:
    """Count, sum and sum of squares (what segments keep)."""
    return Moments(len(values), sum(values), sum(v * v for v in values)) if values else Moments()


def _metric_value(metric: Metric, losses: list[float]) -> float | None:
    if not losses:
        return None
    mean = sum(losses) / len(losses)
    if metric is Metric.RMSE:
        return math.sqrt(mean)
    if metric in (Metric.ACCURACY, Metric.DIRECTIONAL_ACCURACY):
        return 1 - mean
    return mean


def percentile_cont(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def sketched(value: float) -> float:
    """What the histogram keeps of one latency: its logarithmic bucket's representative (DDSketch)."""
    gamma = (1 + LATENCY_RELATIVE_ACCURACY) / (1 - LATENCY_RELATIVE_ACCURACY)
    bucket = math.ceil(math.log(max(value, 0.001)) / math.log(gamma))
    return 2 * gamma**bucket / (gamma + 1)


@dataclass(frozen=True)
class Expected:
    metrics: WindowMetrics
    latencies: tuple[list[float], list[float]]
    """The exact latencies of each side, to bound the histogram's error."""


def _sane(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and abs(value) <= SANE_LIMIT


def _answer_sane(side: Side) -> bool:
    return _sane(side.prediction) and (side.confidence is None or _sane(side.confidence))


def _bucket(key: str) -> int:
    """The SQL's key bucket: the first 32 bits of md5, low bits."""
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) & (KEY_BUCKETS - 1)


def _powers(values: list[float]) -> Moments:
    if not values:
        return Moments()
    return Moments(
        len(values), sum(values), sum(v**2 for v in values), sum(v**3 for v in values), sum(v**4 for v in values)
    )


def reference(
    predictions: Iterable[Prediction],
    outcomes: Iterable[Outcome],
    metric: Metric,
    mode: TrafficMode,
    since: dt.datetime = SINCE,
    until: dt.datetime | None = UNTIL,
    deployment: str = DEPLOYMENT,
    fallback_to_production: bool = True,
    *,
    options: Options | None = None,
    step_since: dt.datetime | None = None,
    first_recorded: Mapping[str, dt.datetime] | None = None,
) -> Expected:
    """The definitions of analysis/sql.py in plain Python. `predictions` in the order they were recorded;
    `first_recorded`: when each request id's first outcome was recorded (None: long after every
    prediction, as for every seeded row)."""
    options = options or Options(fallback=fallback_to_production)
    step_since = step_since or since

    def inside(time: dt.datetime, low: dt.datetime) -> bool:
        return low <= time and (until is None or time <= until)

    window = [p for p in predictions if (p.namespace, p.deployment) == (NS, deployment) and inside(p.time, since)]
    latest: dict[str, Outcome] = {}
    for o in outcomes:
        if (o.namespace, o.deployment) != (NS, deployment) or not inside(o.time, since - OUTCOME_LEEWAY):
            continue
        if o.request_id not in latest or o.time > latest[o.request_id].time:
            latest[o.request_id] = o
    paired = mode is TrafficMode.SHADOW
    losses: tuple[list[float], list[float]] = ([], [])
    differences: list[float] = []
    keyed: dict[int, list[float]] = {}
    segments: dict[str, list[list[float]]] = {}
    scored = pairs = agreements = quarantined = repeats = 0
    seen: set[str] = set()
    cap = options.loss_cap if options.loss_cap is not None else math.inf
    for p in window:
        first = p.request_id not in seen
        seen.add(p.request_id)
        recorded = (first_recorded or {}).get(p.request_id)
        scorable = first and (recorded is None or p.time <= recorded + CLOCK_SKEW)
        if not scorable:
            repeats += 1
            continue
        p_ok = _answered(p.production) and _answer_sane(p.production)
        c_ok = _answered(p.candidate) and _answer_sane(p.candidate)
        if p_ok and c_ok:
            pairs += 1
            agreements += _agree(metric, p.production, p.candidate)
        outcome = latest.get(p.request_id)
        if outcome is None:
            continue
        y_sane = _sane(outcome.outcome) and (metric is not Metric.LOG_LOSS or 0 <= outcome.outcome <= 1)
        insane_answer = any(_answered(side) and not _answer_sane(side) for side in (p.production, p.candidate))
        if not y_sane or insane_answer:
            quarantined += 1
        if not y_sane:
            continue
        # Intention to treat: what the user got on a request given to the candidate stays the candidate's.
        candidate_failed = _called(p.candidate) and not _answered(p.candidate) and p_ok
        candidate_failed = candidate_failed and (
            (p.candidate.status is not None and p.candidate.status >= 500)
            or p.candidate.error not in (None, "no_prediction")
        )
        fallback = candidate_failed and (not paired or options.fallback)
        served = c_ok or fallback
        candidate_answer = p.candidate if c_ok else p.production
        counted = [p_ok and served] * 2 if paired else [p_ok and not _called(p.candidate), served]
        scored += any(counted)
        side_losses = [
            min(_loss(metric, side, outcome.outcome), cap) if use else None
            for side, use in zip((p.production, candidate_answer), counted, strict=True)
        ]
        for index, loss in enumerate(side_losses):
            if loss is not None:
                losses[index].append(loss)
        difference = None
        if paired and counted[0]:
            production_loss, candidate_loss = side_losses
            assert production_loss is not None and candidate_loss is not None
            difference = production_loss - candidate_loss
            differences.append(difference)
        if any(counted):
            series = [side_losses[0], side_losses[1], difference]
            if options.clustered:
                group = keyed.setdefault(_bucket(p.sticky_key or p.request_id), [0.0] * 6)
                for index, value in enumerate(series):
                    if value is not None:
                        group[2 * index] += 1
                        group[2 * index + 1] += value
            if options.segmented:
                parts = segments.setdefault((p.segment or "(none)")[:128], [[], [], []])
                for index, value in enumerate(series):
                    if value is not None:
                        parts[index].append(value)

    def side(index: int) -> tuple[SideMetrics, list[float]]:
        calls = [(p.production, p.candidate)[index] for p in window if p.time >= step_since]
        called = [s for s in calls if _called(s)]
        latencies = [s.latency_ms for s in called if s.latency_ms is not None]
        sketch = [sketched(value) for value in latencies]
        return SideMetrics(
            requests=len(called),
            errors=sum(_failed(s) for s in called),
            latency_p50_ms=percentile_cont(sketch, 0.5),
            latency_p95_ms=percentile_cont(sketch, 0.95),
            latency_p99_ms=percentile_cont(sketch, 0.99),
            loss=_powers(losses[index]),
            metric_value=_metric_value(metric, losses[index]),
        ), latencies

    clusters = None
    if options.clustered:
        if paired:
            clusters = (Clustered.of((round(v[4]), v[5]) for v in keyed.values()), Clustered())
        else:
            clusters = (
                Clustered.of((round(v[0]), v[1]) for v in keyed.values()),
                Clustered.of((round(v[2]), v[3]) for v in keyed.values()),
            )
    segment_metrics = tuple(
        sorted(
            (
                SegmentMetrics(
                    name,
                    production=_moments(parts[0]),
                    candidate=_moments(parts[1]),
                    difference=_moments(parts[2]) if paired else Moments(),
                )
                for name, parts in segments.items()
            ),
            key=lambda segment: (-segment.samples, segment.name),
        )
    )
    (production, production_latencies), (candidate, candidate_latencies) = side(0), side(1)
    return Expected(
        WindowMetrics(
            production=production,
            candidate=candidate,
            scored=scored,
            paired=paired,
            loss_difference=_powers(differences) if paired else Moments(),
            agreement=(agreements / pairs if pairs else None) if paired else None,
            clusters=clusters,
            segments=segment_metrics,
            quarantined=quarantined,
            unscored_repeats=repeats,
        ),
        (production_latencies, candidate_latencies),
    )


def assert_moments(got: Moments, wanted: Moments) -> None:
    assert got.n == wanted.n
    for name in ("total", "total_squares", "total_cubes", "total_fourths"):
        assert getattr(got, name) == pytest.approx(getattr(wanted, name), rel=1e-9, abs=1e-9), name


def assert_matches(actual: WindowMetrics, expected: Expected) -> None:
    """Counts exactly; sums to rounding (SQL adds in another order); percentiles to the sketch's value
    and, independently, within its relative accuracy of the exact percentile."""
    want = expected.metrics
    approx = dict(rel=1e-9, abs=1e-9)
    assert (actual.scored, actual.paired) == (want.scored, want.paired)
    assert (actual.quarantined, actual.unscored_repeats) == (want.quarantined, want.unscored_repeats)
    assert actual.agreement == (None if want.agreement is None else pytest.approx(want.agreement))
    assert_moments(actual.loss_difference, want.loss_difference)
    if want.clusters is None:
        assert actual.clusters is None
    else:
        assert actual.clusters is not None
        for got_keys, wanted_keys in zip(actual.clusters, want.clusters, strict=True):
            assert got_keys.keys == wanted_keys.keys
            for name in ("squares", "cross", "counts", "cubes", "cross_squares", "cross_counts", "count_cubes"):
                assert getattr(got_keys, name) == pytest.approx(getattr(wanted_keys, name), rel=1e-9, abs=1e-6)
    assert [segment.name for segment in actual.segments] == [segment.name for segment in want.segments]
    for got_segment, wanted_segment in zip(actual.segments, want.segments, strict=True):
        for name in ("production", "candidate", "difference"):
            got_moments, wanted_moments = getattr(got_segment, name), getattr(wanted_segment, name)
            assert got_moments.n == wanted_moments.n
            assert got_moments.total == pytest.approx(wanted_moments.total, rel=1e-9, abs=1e-9)
            assert got_moments.total_squares == pytest.approx(wanted_moments.total_squares, rel=1e-9, abs=1e-9)
    for got_side, wanted_side, exact in zip(
        (actual.production, actual.candidate), (want.production, want.candidate), expected.latencies, strict=True
    ):
        assert (got_side.requests, got_side.errors) == (wanted_side.requests, wanted_side.errors)
        assert_moments(got_side.loss, wanted_side.loss)
        if wanted_side.metric_value is None:
            assert got_side.metric_value is None
        else:
            assert got_side.metric_value == pytest.approx(wanted_side.metric_value, **approx)
        for q, got, wanted in zip(
            (0.5, 0.95, 0.99),
            (got_side.latency_p50_ms, got_side.latency_p95_ms, got_side.latency_p99_ms),
            (wanted_side.latency_p50_ms, wanted_side.latency_p95_ms, wanted_side.latency_p99_ms),
            strict=True,
        ):
            if wanted is None:
                assert got is None
                continue
            assert got == pytest.approx(wanted, rel=1e-12)
            true = percentile_cont([max(value, 0.001) for value in exact], q)
            assert true is not None
            assert abs(got - true) <= LATENCY_RELATIVE_ACCURACY * true * (1 + 1e-9)


# --- the whole-window query -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeded(queries_dsn: str) -> tuple[list[Prediction], list[Outcome]]:
    predictions, outcomes = seed(random.Random(5))

    async def load() -> None:
        connection = await asyncpg.connect(queries_dsn)
        try:
            await insert(connection, predictions, outcomes)
        finally:
            await connection.close()

    asyncio.run(load())
    return predictions, outcomes


def test_the_seed_covers_every_case(seeded: tuple[list[Prediction], list[Outcome]]) -> None:
    """Guards the other tests against a seed that silently stopped exercising a branch."""
    predictions, outcomes = seeded
    sides = [side for p in predictions for side in (p.production, p.candidate)]
    assert any(s.status is not None and s.status >= 500 for s in sides)
    assert any(s.error == "timeout" for s in sides)
    assert any(s.status == 400 for s in sides)
    assert any(s.error == "no_prediction" for s in sides)
    assert any(s == NOT_CALLED for s in sides)
    assert any(s.prediction == 0.0 for s in sides) and any(s.confidence is not None for s in sides)
    ids = [o.request_id for o in outcomes if o.deployment == DEPLOYMENT and o.namespace == NS]
    assert len(ids) > len(set(ids))
    for metric in Metric:
        for mode in MODES:
            want = reference(predictions, outcomes, metric, mode).metrics
            assert want.scored > 50 and want.production.errors and want.candidate.errors
            assert want.production.loss.n > 0 and want.candidate.loss.n > 0
            if mode is TrafficMode.SHADOW:
                assert want.agreement is not None and 0 < want.agreement < 1
    mae = reference(predictions, outcomes, Metric.MAE, TrafficMode.CANARY).metrics
    assert mae.production.loss.n != mae.candidate.loss.n  # unpaired: each side on its own requests


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("metric", list(Metric), ids=str)
async def test_window_metrics_follow_the_definitions(
    connection: asyncpg.Connection,
    seeded: tuple[list[Prediction], list[Outcome]],
    metric: Metric,
    mode: TrafficMode,
) -> None:
    predictions, outcomes = seeded
    actual = await window_metrics(connection, NS, DEPLOYMENT, metric, mode, SINCE, UNTIL)
    assert_matches(actual, reference(predictions, outcomes, metric, mode))


async def test_without_fallback_a_failed_mirror_is_not_a_pair(
    connection: asyncpg.Connection, seeded: tuple[list[Prediction], list[Outcome]]
) -> None:
    predictions, outcomes = seeded
    for metric in (Metric.MAE, Metric.ACCURACY):
        actual = await window_metrics(
            connection, NS, DEPLOYMENT, metric, TrafficMode.SHADOW, SINCE, UNTIL, options=Options(fallback=False)
        )
        expected = reference(predictions, outcomes, metric, TrafficMode.SHADOW, fallback_to_production=False)
        assert_matches(actual, expected)
        assert expected.metrics.scored < reference(predictions, outcomes, metric, TrafficMode.SHADOW).metrics.scored


async def test_a_canary_fallback_stays_in_the_candidates_sample(connection: asyncpg.Connection) -> None:
    """Intention to treat (issue 11): the request the candidate failed on and production answered instead
    is scored for the candidate, with production's answer; production's sample is only its own requests."""
    start = SINCE + dt.timedelta(hours=2)  # in the past: a prediction made after its outcome was known is not scored
    ok = Side(prediction=1.0, latency_ms=5.0, status=200)
    hard = Side(prediction=9.0, latency_ms=5.0, status=200)
    rows = [
        Prediction(start, "own", ok, NOT_CALLED, deployment="fallbacks"),
        Prediction(start, "answered", NOT_CALLED, ok, deployment="fallbacks"),
        Prediction(start, "fell-back", hard, Side(latency_ms=5.0, status=503), deployment="fallbacks"),
    ]
    results = [Outcome(start + dt.timedelta(seconds=1), row.request_id, 0.0, deployment="fallbacks") for row in rows]
    await insert(connection, rows, results)
    metrics = await window_metrics(
        connection, NS, "fallbacks", Metric.MAE, TrafficMode.CANARY, start, start + dt.timedelta(minutes=1)
    )
    assert metrics.production.loss == Moments(1, 1.0, 1.0, 1.0, 1.0)
    assert metrics.candidate.loss == Moments(2, 10.0, 82.0, 730.0, 6562.0)
    assert (metrics.candidate.requests, metrics.candidate.errors, metrics.production.requests) == (2, 1, 2)


async def test_requests_the_candidates_breaker_skipped_count_as_its_failures(connection: asyncpg.Connection) -> None:
    """Issue 12: a call the router's circuit breaker skipped is recorded as `circuit_open`, with no status and
    no latency. It is a candidate request and an error (the error gate sees the candidate failing as before
    the breaker), it is scored for the candidate on production's fallback answer like any failure, never
    for production (issue 11), and no latency is made up for it."""
    start = SINCE + dt.timedelta(hours=3)
    ok, fallback = Side(prediction=1.0, latency_ms=5.0, status=200), Side(prediction=9.0, latency_ms=5.0, status=200)
    refused, skipped = Side(latency_ms=40.0, error="bad_response"), Side(error="circuit_open")
    canary = [
        Prediction(start, "own", ok, NOT_CALLED, deployment="breaker-canary"),
        Prediction(start, "refused", fallback, refused, deployment="breaker-canary"),
        *(Prediction(start, f"skipped-{n}", fallback, skipped, deployment="breaker-canary") for n in range(3)),
    ]
    shadow = [
        Prediction(start, "refused", ok, refused, deployment="breaker-shadow"),
        *(Prediction(start, f"skipped-{n}", ok, skipped, deployment="breaker-shadow") for n in range(3)),
    ]
    outcomes = [
        Outcome(start + dt.timedelta(seconds=1), row.request_id, 0.0, deployment=row.deployment)
        for row in (*canary, *shadow)
    ]
    await insert(connection, [*canary, *shadow], outcomes)
    until = start + dt.timedelta(minutes=1)

    metrics = await window_metrics(connection, NS, "breaker-canary", Metric.MAE, TrafficMode.CANARY, start, until)
    assert metrics.production.loss == Moments(1, 1.0, 1.0, 1.0, 1.0), "production's sample is its own request"
    assert metrics.candidate.loss.n == 4 and metrics.candidate.loss.total == 36.0
    assert (metrics.candidate.requests, metrics.candidate.errors) == (4, 4)
    assert metrics.candidate.latency is not None and metrics.candidate.latency.count == 1

    metrics = await window_metrics(connection, NS, "breaker-shadow", Metric.MAE, TrafficMode.SHADOW, start, until)
    assert (metrics.candidate.requests, metrics.candidate.errors, metrics.scored) == (4, 4, 4)
    assert metrics.candidate.latency is not None and metrics.candidate.latency.count == 1
    no_fallback = await window_metrics(
        connection, NS, "breaker-shadow", Metric.MAE, TrafficMode.SHADOW, start, until, options=Options(fallback=False)
    )
    assert (no_fallback.candidate.errors, no_fallback.scored) == (4, 0)


async def test_an_open_ended_window_and_an_empty_one(
    connection: asyncpg.Connection, seeded: tuple[list[Prediction], list[Outcome]]
) -> None:
    predictions, outcomes = seeded
    open_ended = await window_metrics(connection, NS, DEPLOYMENT, Metric.MAE, TrafficMode.SHADOW, SINCE, None)
    assert_matches(open_ended, reference(predictions, outcomes, Metric.MAE, TrafficMode.SHADOW, until=None))
    assert (
        open_ended.production.requests
        > reference(predictions, outcomes, Metric.MAE, TrafficMode.SHADOW).metrics.production.requests
    )

    empty = await window_metrics(connection, NS, "nobody", Metric.RMSE, TrafficMode.SHADOW, SINCE, UNTIL)
    nothing = SideMetrics(latency=LatencySketch())
    assert empty == WindowMetrics(production=nothing, candidate=nothing, scored=0, paired=True)


async def test_compressed_chunks_give_the_same_answers(connection: asyncpg.Connection) -> None:
    """On TimescaleDB the seed's chunks are compressed first (on plain PostgreSQL and the Apache edition
    the same checks run on uncompressed data): both queries still follow the definitions, and a late
    correction landing in a compressed chunk is read by the incremental analysis."""
    deployment = "compressed"
    start = SINCE - dt.timedelta(days=5)  # within the analysis's 7-day lookback on TimescaleDB
    predictions, outcomes = seed(random.Random(7), deployment, count=200, start=start)
    await insert(connection, predictions, outcomes)
    compressible = await connection.fetchval(
        "SELECT current_setting('timescaledb.license', true) = 'timescale'"
        " AND EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
    )
    if compressible:
        # Every chunk holding the seed (it may hold other tests' rows too: rows written into a compressed
        # chunk are read exactly as well).
        compressed = await connection.fetchval(
            """SELECT count(compress_chunk(format('%I.%I', chunk_schema, chunk_name)::regclass, true))
               FROM timescaledb_information.chunks
               WHERE hypertable_name IN ('predictions', 'outcomes') AND range_start <= $2 AND range_end > $1""",
            start - dt.timedelta(minutes=20),
            start + dt.timedelta(hours=3),
        )
        assert compressed >= 2
        assert await connection.fetchval(
            """SELECT bool_and(is_compressed) FROM timescaledb_information.chunks
               WHERE hypertable_name IN ('predictions', 'outcomes') AND range_start <= $2 AND range_end > $1""",
            start - dt.timedelta(minutes=20),
            start + dt.timedelta(hours=3),
        )
    for metric, mode in ((Metric.MAE, TrafficMode.SHADOW), (Metric.LOG_LOSS, TrafficMode.CANARY)):
        until = start + dt.timedelta(hours=1)
        whole = await window_metrics(connection, NS, deployment, metric, mode, start, until)
        assert_matches(whole, reference(predictions, outcomes, metric, mode, start, until, deployment))
    analysis = WindowAnalysis(NS, deployment, Metric.MAE, TrafficMode.SHADOW, start)
    await _check(connection, analysis, predictions, outcomes, Metric.MAE, TrafficMode.SHADOW)
    scored = next(o for o in outcomes if o.request_id.startswith("req-") and o.deployment == deployment)
    correction = replace(scored, time=scored.time + dt.timedelta(minutes=10), outcome=scored.outcome + 3)
    await insert(connection, [], [correction])
    outcomes.append(correction)
    await _check(connection, analysis, predictions, outcomes, Metric.MAE, TrafficMode.SHADOW)


async def test_with_compression_later_runs_read_back_no_further_than_its_horizon(
    connection: asyncpg.Connection,
) -> None:
    """On TimescaleDB with a compression policy, runs after the first read nothing stamped before the
    policy's horizon (compressed chunks have no index for request ids): a correction for a request older
    than that is left out, as the docstring says. Elsewhere every run reads it."""
    deployment = "lookback"
    horizon: dt.timedelta | None = await timescale.compression_horizon(connection)
    start = SINCE - dt.timedelta(days=10)
    predictions, outcomes = seed(random.Random(13), deployment, count=60, start=start)
    await insert(connection, predictions, outcomes)
    analysis = WindowAnalysis(NS, deployment, Metric.MAE, TrafficMode.SHADOW, start)
    await _check(connection, analysis, predictions, outcomes, Metric.MAE, TrafficMode.SHADOW)
    assert analysis.lookback == horizon

    scored = next(o for o in outcomes if o.request_id.startswith("req-") and o.deployment == deployment)
    correction = replace(scored, time=scored.time + dt.timedelta(minutes=10), outcome=scored.outcome + 3)
    before = analysis.metrics()
    await insert(connection, [], [correction])
    if horizon is None:
        await _check(connection, analysis, predictions, [*outcomes, correction], Metric.MAE, TrafficMode.SHADOW)
        return
    assert horizon == dt.timedelta(days=7)  # the default storage policy
    assert await analysis.refresh(connection) == before  # ten days old: not read again
    whole = await window_metrics(connection, NS, deployment, Metric.MAE, TrafficMode.SHADOW, start, None)
    assert_matches(whole, reference(predictions, [*outcomes, correction], Metric.MAE, TrafficMode.SHADOW, start,
                                    None, deployment))  # fmt: skip


# --- the incremental analysis -----------------------------------------------------------------------


async def first_recorded(connection: asyncpg.Connection, deployment: str, since: dt.datetime) -> dict[str, dt.datetime]:
    """When each request id's first outcome (within the leeway) was recorded, by the database's clock."""
    rows = await connection.fetch(
        "SELECT request_id, min(coalesce(recorded_at, time)) AS first FROM outcomes"
        " WHERE namespace = $1 AND deployment = $2 AND time >= $3 GROUP BY request_id",
        NS, deployment, since - OUTCOME_LEEWAY,
    )  # fmt: skip
    return {row["request_id"]: row["first"] for row in rows}


async def _check(
    connection: asyncpg.Connection,
    analysis: WindowAnalysis,
    predictions: list[Prediction],
    outcomes: list[Outcome],
    metric: Metric,
    mode: TrafficMode,
) -> WindowMetrics:
    """Refresh, then compare with the whole-window query and with the reference over every row so far."""
    incremental = await analysis.refresh(connection)
    expected = reference(
        predictions, outcomes, metric, mode, since=analysis.since, until=None, deployment=analysis.deployment,
        first_recorded=await first_recorded(connection, analysis.deployment, analysis.since),
    )  # fmt: skip
    assert_matches(incremental, expected)
    whole = await window_metrics(connection, NS, analysis.deployment, metric, mode, analysis.since, None)
    assert_matches(whole, expected)
    return incremental


@pytest.mark.parametrize(
    ("metric", "mode"),
    [
        (Metric.MAE, TrafficMode.SHADOW),
        (Metric.LOG_LOSS, TrafficMode.CANARY),
        (Metric.DIRECTIONAL_ACCURACY, TrafficMode.SHADOW),
    ],
    ids=str,
)
async def test_the_incremental_analysis_equals_the_whole_window_after_every_batch(
    connection: asyncpg.Connection, metric: Metric, mode: TrafficMode
) -> None:
    deployment = f"incremental-{metric}-{mode}"
    # The window starts an hour ago by the database's clock: some predictions are made "now" (after the
    # previous run: their outcomes are found by the hash join) and some earlier (found by index probes).
    now: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    since = now - dt.timedelta(hours=1)
    rng = random.Random(11)
    all_predictions, all_outcomes = seed(rng, deployment, count=240, start=since)
    window_predictions = [p for p in all_predictions if p.request_id.startswith("req-")]
    extra_predictions = [p for p in all_predictions if not p.request_id.startswith("req-")]
    by_request: dict[str, list[Outcome]] = {}
    for o in all_outcomes:
        by_request.setdefault(o.request_id, []).append(o)

    analysis = WindowAnalysis(NS, deployment, metric, mode, since)
    predictions: list[Prediction] = []
    outcomes: list[Outcome] = []

    async def add(new_predictions: list[Prediction], new_outcomes: list[Outcome]) -> None:
        await insert(connection, new_predictions, new_outcomes)
        predictions.extend(new_predictions)
        outcomes.extend(new_outcomes)

    # 1. The first run reads whatever is there: a quarter of the requests, some with outcomes, and one
    #    stamped by a router whose clock runs half a second ahead of the database's.
    first = window_predictions[:60]
    clock: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    answer = Side(prediction=0.75, confidence=0.8, latency_ms=4.5, status=200)
    ahead = Prediction(
        clock + dt.timedelta(seconds=0.5), "ahead", answer, replace(answer, prediction=-0.25), deployment=deployment
    )
    by_request["ahead"] = [Outcome(clock + dt.timedelta(seconds=1), "ahead", 1.0, deployment=deployment)]
    await add(
        [*first, ahead, *extra_predictions], [o for p in first[:30] for o in by_request.get(p.request_id, [])[:1]]
    )
    await _check(connection, analysis, predictions, outcomes, metric, mode)

    # 2. Outcomes for earlier predictions (rescored), and outcomes ahead of predictions not yet flushed.
    await add([], [o for p in [*first[30:], ahead] for o in by_request.get(p.request_id, [])[:1]])
    early = window_predictions[60:100]
    await add([], [o for p in early for o in by_request.get(p.request_id, [])])
    await _check(connection, analysis, predictions, outcomes, metric, mode)

    # 3. The predictions whose outcomes came first; corrections (newer, which win, and older, which lose)
    #    for step 1's requests; a spooled prediction stamped long ago (inside the window) with its outcome.
    await add(early, [o for p in first for o in by_request.get(p.request_id, [])[1:]])
    spooled = replace(window_predictions[100], time=since + dt.timedelta(seconds=1))
    await add([spooled], by_request.get(spooled.request_id, []))
    await _check(connection, analysis, predictions, outcomes, metric, mode)

    # 4. Requests made after the previous run (stamped more than CLOCK_SKEW after it), each with all its
    #    outcomes in the same batch, duplicates included; and outcomes of another deployment for the same
    #    request ids. Stamped within CLOCK_SKEW of when their outcomes are recorded (a request is made
    #    before its outcome is known: one made later is not scored, issue 12 D6).
    horizon = analysis.horizon
    assert horizon is not None
    # Until the database's clock has moved on: outcomes are recorded from there on.
    await connection.execute(
        "SELECT pg_sleep(greatest(0, extract(epoch FROM $1::timestamptz - clock_timestamp())))",
        horizon + dt.timedelta(seconds=0.2),
    )
    fresh = [
        replace(p, time=horizon + dt.timedelta(seconds=1.05 + i / 2000))
        for i, p in enumerate(window_predictions[101:200])
    ]
    fresh_outcomes = [
        replace(o, time=p.time + (o.time - original.time))
        for p, original in zip(fresh, window_predictions[101:200], strict=True)
        for o in by_request.get(p.request_id, [])
    ]
    await add(fresh, fresh_outcomes)
    await add([], [replace(o, deployment="someone-else") for o in fresh_outcomes])
    #    And the operator restarts: a new analysis goes on from the sums the last run saved.
    analysis = WindowAnalysis(NS, deployment, metric, mode, since)
    result = await _check(connection, analysis, predictions, outcomes, metric, mode)
    assert analysis.resumed

    # 5. Nothing new: the same answer, without reading the window again.
    runs = analysis.runs
    assert await analysis.refresh(connection) == result
    assert analysis.runs in (runs, runs + 1)
    assert result.scored > 50


async def test_a_write_still_open_is_counted_once_it_commits(connection: asyncpg.Connection, queries_dsn: str) -> None:
    """The horizon stops at an open write transaction: a row stamped before a run but committed after it
    is picked up by the next run, not skipped for good."""
    deployment = "open-writer"
    now: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    since = now - dt.timedelta(minutes=10)
    ok = Side(prediction=1.0, latency_ms=2.0, status=200)
    analysis = WindowAnalysis(NS, deployment, Metric.MAE, TrafficMode.SHADOW, since)
    await insert(connection, [Prediction(now - dt.timedelta(minutes=1), "first", ok, ok, deployment=deployment)])
    assert (await analysis.refresh(connection)).production.requests == 1

    writer = await asyncpg.connect(queries_dsn)
    try:
        transaction = writer.transaction()
        await transaction.start()
        started: dt.datetime = await writer.fetchval("SELECT now()")
        await insert(
            writer,
            [Prediction(now, "slow", ok, ok, deployment=deployment)],
            [Outcome(now, "slow", 0.5, deployment=deployment)],
        )
        await asyncio.sleep(0.05)
        assert await recorded_horizon(connection) <= started
        assert (await analysis.refresh(connection)).production.requests == 1
        await transaction.commit()
    finally:
        await writer.close()
    metrics = await analysis.refresh(connection)
    assert (metrics.production.requests, metrics.scored) == (2, 1)
    assert metrics.loss_difference == Moments(1, 0.0, 0.0)


async def test_rows_from_before_recorded_at_existed_are_read(connection: asyncpg.Connection) -> None:
    """Rows inserted before migration 0003 have no recorded_at: they count as recorded at their time."""
    deployment = "legacy"
    now: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    since = now - dt.timedelta(hours=1)
    predictions, outcomes = seed(random.Random(3), deployment, count=50, start=since)
    # Stamped before the migration, so none in the future.
    predictions = [p for p in predictions if p.time <= now]
    outcomes = [o for o in outcomes if o.time <= now]
    await insert(connection, predictions, outcomes, legacy=True)
    analysis = WindowAnalysis(NS, deployment, Metric.ACCURACY, TrafficMode.SHADOW, since)
    await _check(connection, analysis, predictions, outcomes, Metric.ACCURACY, TrafficMode.SHADOW)
    # A correction arriving now, for a legacy request, replaces its legacy outcome.
    scored = next(o for o in outcomes if o.request_id.startswith("req-") and o.time >= since)
    correction = replace(scored, time=scored.time + dt.timedelta(minutes=30), outcome=1 - scored.outcome)
    await insert(connection, [], [correction])
    outcomes.append(correction)
    await _check(connection, analysis, predictions, outcomes, Metric.ACCURACY, TrafficMode.SHADOW)


async def test_a_restarted_analysis_goes_on_from_the_saved_sums(connection: asyncpg.Connection) -> None:
    deployment = "restarts"
    now: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    since = now - dt.timedelta(minutes=10)
    ok = Side(prediction=1.0, latency_ms=2.0, status=200)
    await insert(connection, [Prediction(now - dt.timedelta(minutes=2), "a", ok, ok, deployment=deployment)])
    first = WindowAnalysis(NS, deployment, Metric.MAE, TrafficMode.SHADOW, since)
    assert (await first.refresh(connection)).production.requests == 1
    await insert(connection, [Prediction(now - dt.timedelta(minutes=1), "b", ok, ok, deployment=deployment)])
    assert (await first.refresh(connection)).production.requests == 2
    # Take "a" away behind the analysis's back: only sums carried over from the saved run still count it.
    await connection.execute("DELETE FROM predictions WHERE deployment = $1 AND request_id = 'a'", deployment)
    await insert(connection, [Prediction(now, "c", ok, ok, deployment=deployment)])

    restarted = WindowAnalysis(NS, deployment, Metric.MAE, TrafficMode.SHADOW, since)
    assert (await restarted.refresh(connection)).production.requests == 3
    assert restarted.resumed and restarted.runs == 1

    # A late save from the first operator cannot take the saved horizon back.
    assert first.horizon is not None and restarted.horizon is not None and first.horizon < restarted.horizon
    await first._save(connection)
    saved = await connection.fetchval("SELECT horizon FROM analysis_windows WHERE deployment = $1", deployment)
    assert saved == restarted.horizon

    # Another window (here another metric; a new step alike) does not reuse them: it reads the window whole.
    other = WindowAnalysis(NS, deployment, Metric.RMSE, TrafficMode.SHADOW, since)
    assert (await other.refresh(connection)).production.requests == 2
    assert not other.resumed
    unsaved = WindowAnalysis(NS, deployment, Metric.RMSE, TrafficMode.SHADOW, since, saved=False)
    assert (await unsaved.refresh(connection)).production.requests == 2 and not unsaved.resumed


async def test_a_writer_the_analysis_cannot_see_into_is_taken_as_old_as_the_allowance(
    connection: asyncpg.Connection, queries_dsn: str
) -> None:
    """Without pg_read_all_stats another role's transaction start is hidden: the horizon then assumes the
    writer has been open for the whole allowance, rather than trusting the clock."""
    suffix = secrets.token_hex(3)
    writer_role, analyst_role = f"sg_writer_{suffix}", f"sg_analyst_{suffix}"
    for role in (writer_role, analyst_role):
        await connection.execute(f'CREATE ROLE "{role}" LOGIN')
        await connection.execute(f'GRANT SELECT, INSERT ON predictions, outcomes TO "{role}"')

    def as_role(role: str) -> str:
        parts = urlsplit(queries_dsn)
        return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))

    writer = await asyncpg.connect(as_role(writer_role))
    analyst = await asyncpg.connect(as_role(analyst_role))
    try:
        transaction = writer.transaction()
        await transaction.start()
        started: dt.datetime = await writer.fetchval("SELECT now()")
        ok = Side(prediction=1.0, latency_ms=2.0, status=200)
        await insert(writer, [Prediction(started, "hidden", ok, ok, deployment="hidden-writer")])
        allowance = dt.timedelta(minutes=5)

        hidden = await recorded_horizon(analyst, allowance)
        clock: dt.datetime = await analyst.fetchval("SELECT clock_timestamp()")
        assert clock - allowance - dt.timedelta(seconds=5) <= hidden <= clock - allowance
        # The superuser sees the writer's start and waits for exactly that.
        assert await recorded_horizon(connection, allowance) == started
        await transaction.rollback()
        assert await recorded_horizon(analyst, allowance) >= clock
    finally:
        await writer.close()
        await analyst.close()
        for role in (writer_role, analyst_role):
            await connection.execute(f'REVOKE ALL ON predictions, outcomes FROM "{role}"')
            await connection.execute(f'DROP ROLE "{role}"')


# --- keys, segments, caps, quarantine, repeated ids, the step window --------------------------------


def _grouped_seed(rng: random.Random, deployment: str, start: dt.datetime, count: int) -> tuple[
    list[Prediction], list[Outcome]
]:  # fmt: skip
    """Requests from 25 accounts (some without a key) in three segments (some without one), with absurd
    values, reused request ids, and a prediction made after its outcome was known."""
    predictions: list[Prediction] = []
    outcomes: list[Outcome] = []
    for i in range(count):
        time = start + dt.timedelta(seconds=i * 3600 / count)
        key = None if rng.random() < 0.1 else f"acct-{rng.randrange(25)}"
        segment = rng.choice(["AAPL", "MSFT", "MSFT", None])
        production, candidate = _side(rng, mirrored=True), _side(rng, mirrored=False)
        if i % 37 == 5:
            candidate = Side(prediction=1e200, latency_ms=3.0, status=200)  # absurd answer: quarantined
        if i % 41 == 7:
            production = replace(production, confidence=math.inf) if production.prediction is not None else production
        request_id = f"req-{i}"
        predictions.append(Prediction(time, request_id, production, candidate, deployment=deployment,
                                      sticky_key=key, segment=segment))  # fmt: skip
        if rng.random() < 0.2:
            continue
        value = _value(rng)
        if i % 29 == 3:
            value = rng.choice([math.nan, math.inf, 1e300, -1e16])  # absurd outcomes: quarantined
        outcomes.append(
            Outcome(time + dt.timedelta(seconds=rng.uniform(0, 60)), request_id, value, deployment=deployment)
        )
        if i % 23 == 11:  # the same id sent again later with another answer: recorded, never scored
            again = Side(prediction=_value(rng), latency_ms=2.0, status=200)
            predictions.append(Prediction(time + dt.timedelta(seconds=30), request_id, again, again,
                                          deployment=deployment, sticky_key=key, segment=segment))  # fmt: skip
    return predictions, outcomes


@pytest.mark.parametrize(("metric", "mode"), [(Metric.MAE, TrafficMode.SHADOW), (Metric.LOG_LOSS, TrafficMode.CANARY)])
async def test_keys_segments_caps_quarantine_and_repeated_ids(
    connection: asyncpg.Connection, metric: Metric, mode: TrafficMode
) -> None:
    deployment = f"grouped-{metric}-{mode}"
    now: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    start = now - dt.timedelta(hours=2)
    predictions, outcomes = _grouped_seed(random.Random(17), deployment, start, 300)
    options = Options(loss_cap=0.8 if metric is Metric.MAE else 5.0, clustered=True, segmented=True)
    step = start + dt.timedelta(minutes=30)
    await insert(connection, predictions, outcomes)
    # A prediction made after its request's outcome was known (someone replaying a published id).
    known = Outcome(now - dt.timedelta(minutes=1), "published", 1.0, deployment=deployment)
    await insert(connection, outcomes=[known])
    ok = Side(prediction=0.6, confidence=0.6, latency_ms=2.0, status=200)
    replayed = Prediction(now + dt.timedelta(minutes=5), "published", ok, ok, deployment=deployment)
    await insert(connection, [replayed])
    everything, all_outcomes = [*predictions, replayed], [*outcomes, known]

    actual = await window_metrics(
        connection, NS, deployment, metric, mode, start, None, options=options, step_since=step
    )
    recorded = await first_recorded(connection, deployment, start)
    expected = reference(everything, all_outcomes, metric, mode, since=start, until=None, deployment=deployment,
                         options=options, step_since=step, first_recorded=recorded)  # fmt: skip
    assert_matches(actual, expected)
    assert actual.quarantined > 5 and actual.unscored_repeats > 5
    assert actual.clusters is not None and actual.clusters[0 if mode is TrafficMode.SHADOW else 1].keys > 10
    assert {segment.name for segment in actual.segments} == {"MSFT", "AAPL", "(none)"}
    assert actual.production.requests < sum(1 for p in everything if p.production != NOT_CALLED)  # the step's only
    losses = actual.production.loss
    assert losses.total <= options.loss_cap * losses.n  # type: ignore[operator]

    # The incremental analysis agrees, across a new step window.
    analysis = WindowAnalysis(NS, deployment, metric, mode, start, options=options, step_since=start, saved=False)
    result = await analysis.refresh(connection)
    assert result.production.requests == expected.metrics.production.requests + sum(
        1 for p in everything if start <= p.time < step and p.production != NOT_CALLED
    )
    analysis.move_step(step)
    assert_matches(await analysis.refresh(connection), expected)


LONGEST_OUTPUT = 8_000
"""Characters of the longest expression list (`Output:`) in any node of any analysis statement's plan. With
every step of the statement fenced (analysis/sql.py, OFFSET 0) the longest is some 3,000-4,000; without the
fences PostgreSQL substitutes each column's expression wherever it is used, and issue 11's power sums
grew it to 95,000 characters: a read ten times slower and 40 ms of planning, which no result shows."""


@pytest.mark.parametrize("whole_window", [True, False], ids=["whole-window", "slice"])
async def test_each_column_is_computed_once_per_row(connection: asyncpg.Connection, whole_window: bool) -> None:
    now: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    longest: dict[str, int] = {}
    for metric in Metric:
        for mode in MODES:
            for grouped in (False, True):
                options = Options(loss_cap=1.0, clustered=grouped, segmented=grouped)
                query = (
                    whole_window_query(NS, DEPLOYMENT, metric, mode, SINCE, None, options=options)
                    if whole_window
                    else recorded_between_query(NS, DEPLOYMENT, metric, mode, SINCE, now - dt.timedelta(seconds=5), now,
                                                options=options)
                )  # fmt: skip
                async with connection.transaction():
                    await connection.execute("SET LOCAL enable_nestloop = off")
                    plan = await connection.fetch(f"EXPLAIN (VERBOSE) {query.sql}", *query.arguments)
                outputs = [row[0] for row in plan if row[0].lstrip().startswith("Output:")]
                longest[f"{metric}/{mode}/{grouped}"] = max(map(len, outputs))
    assert len(longest) == len(Metric) * len(MODES) * 2
    assert max(longest.values()) <= LONGEST_OUTPUT, sorted(longest.items(), key=lambda item: -item[1])[:3]
