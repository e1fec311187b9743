"""The metric queries against real PostgreSQL: seeded rows, and every number checked against a plain-Python
reading of the definitions in queries.py (written from the docstring, not from the SQL).

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
import math
import random
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shadowgate_operator import timescale
from shadowgate_operator.api import Metric, TrafficMode
from shadowgate_operator.metrics import Moments, SideMetrics, WindowMetrics
from shadowgate_operator.queries import (
    LATENCY_RELATIVE_ACCURACY,
    OUTCOME_LEEWAY,
    WindowAnalyses,
    WindowAnalysis,
    recorded_horizon,
    window_metrics,
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
                candidate_status, candidate_error{recorded})
            VALUES ($1, $2, $3, $4, 'production', 'shadow', 50, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14{null})""",
        [
            (p.time, p.namespace, p.deployment, p.request_id,
             p.production.prediction, p.production.confidence, p.production.latency_ms, p.production.status,
             p.production.error, p.candidate.prediction, p.candidate.confidence, p.candidate.latency_ms,
             p.candidate.status, p.candidate.error)
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


# --- the reference: the definitions of queries.py, in plain Python ---------------------------------


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


def reference(
    predictions: Iterable[Prediction],
    outcomes: Iterable[Outcome],
    metric: Metric,
    mode: TrafficMode,
    since: dt.datetime = SINCE,
    until: dt.datetime | None = UNTIL,
    deployment: str = DEPLOYMENT,
    fallback_to_production: bool = True,
) -> Expected:
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
    scored = pairs = agreements = 0
    for p in window:
        both = _answered(p.production) and _answered(p.candidate)
        if both:
            pairs += 1
            agreements += _agree(metric, p.production, p.candidate)
        outcome = latest.get(p.request_id)
        if outcome is None:
            continue
        # Intention to treat: what the user got on a request given to the candidate stays the candidate's.
        candidate_failed = _called(p.candidate) and not _answered(p.candidate) and _answered(p.production)
        candidate_failed = candidate_failed and (
            (p.candidate.status is not None and p.candidate.status >= 500)
            or p.candidate.error not in (None, "no_prediction")
        )
        fallback = candidate_failed and (not paired or fallback_to_production)
        served = _answered(p.candidate) or fallback
        candidate_answer = p.candidate if _answered(p.candidate) else p.production
        if paired:
            counted = [_answered(p.production) and served] * 2
        else:
            counted = [_answered(p.production) and not _called(p.candidate), served]
        scored += any(counted)
        side_losses = [
            _loss(metric, side, outcome.outcome) if use else None
            for side, use in zip((p.production, candidate_answer), counted, strict=True)
        ]
        for index, loss in enumerate(side_losses):
            if loss is not None:
                losses[index].append(loss)
        if paired and counted[0]:
            production_loss, candidate_loss = side_losses
            assert production_loss is not None and candidate_loss is not None
            differences.append(production_loss - candidate_loss)

    def side(index: int) -> tuple[SideMetrics, list[float]]:
        calls = [(p.production, p.candidate)[index] for p in window]
        called = [s for s in calls if _called(s)]
        latencies = [s.latency_ms for s in called if s.latency_ms is not None]
        sketch = [sketched(value) for value in latencies]
        return SideMetrics(
            requests=len(called),
            errors=sum(_failed(s) for s in called),
            latency_p50_ms=percentile_cont(sketch, 0.5),
            latency_p95_ms=percentile_cont(sketch, 0.95),
            latency_p99_ms=percentile_cont(sketch, 0.99),
            loss=_moments(losses[index]),
            metric_value=_metric_value(metric, losses[index]),
        ), latencies

    (production, production_latencies), (candidate, candidate_latencies) = side(0), side(1)
    return Expected(
        WindowMetrics(
            production=production,
            candidate=candidate,
            scored=scored,
            paired=paired,
            loss_difference=_moments(differences) if paired else Moments(),
            agreement=(agreements / pairs if pairs else None) if paired else None,
        ),
        (production_latencies, candidate_latencies),
    )


def assert_matches(actual: WindowMetrics, expected: Expected) -> None:
    """Counts exactly; sums to rounding (SQL adds in another order); percentiles to the sketch's value
    and, independently, within its relative accuracy of the exact percentile."""
    want = expected.metrics
    approx = dict(rel=1e-9, abs=1e-9)
    assert (actual.scored, actual.paired) == (want.scored, want.paired)
    assert actual.agreement == (None if want.agreement is None else pytest.approx(want.agreement))
    got, wanted = actual.loss_difference, want.loss_difference
    assert got.n == wanted.n
    assert got.total == pytest.approx(wanted.total, **approx)
    assert got.total_squares == pytest.approx(wanted.total_squares, **approx)
    for got_side, wanted_side, exact in zip(
        (actual.production, actual.candidate), (want.production, want.candidate), expected.latencies, strict=True
    ):
        assert (got_side.requests, got_side.errors) == (wanted_side.requests, wanted_side.errors)
        assert got_side.loss.n == wanted_side.loss.n
        assert got_side.loss.total == pytest.approx(wanted_side.loss.total, **approx)
        assert got_side.loss.total_squares == pytest.approx(wanted_side.loss.total_squares, **approx)
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
            connection, NS, DEPLOYMENT, metric, TrafficMode.SHADOW, SINCE, UNTIL, fallback=False
        )
        expected = reference(predictions, outcomes, metric, TrafficMode.SHADOW, fallback_to_production=False)
        assert_matches(actual, expected)
        assert expected.metrics.scored < reference(predictions, outcomes, metric, TrafficMode.SHADOW).metrics.scored


async def test_a_canary_fallback_stays_in_the_candidates_sample(connection: asyncpg.Connection) -> None:
    """Intention to treat (issue 11): the request the candidate failed on and production answered instead
    is scored for the candidate, with production's answer; production's sample is only its own requests."""
    start = SINCE + dt.timedelta(days=3)
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
    assert metrics.production.loss == Moments(1, 1.0, 1.0)
    assert metrics.candidate.loss == Moments(2, 10.0, 82.0)
    assert (metrics.candidate.requests, metrics.candidate.errors, metrics.production.requests) == (2, 1, 2)


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
    assert empty == WindowMetrics(production=SideMetrics(), candidate=SideMetrics(), scored=0, paired=True)


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
        predictions, outcomes, metric, mode, since=analysis.since, until=None, deployment=analysis.deployment
    )
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

    # 4. Requests made after the previous run (stamped ahead of it), each with all its outcomes in the
    #    same batch, duplicates included; and outcomes of another deployment for the same request ids.
    horizon = analysis.horizon
    assert horizon is not None
    fresh = [
        replace(p, time=horizon + dt.timedelta(seconds=2 + i / 10)) for i, p in enumerate(window_predictions[101:200])
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


async def test_analyses_start_over_when_the_window_changes(connection: asyncpg.Connection) -> None:
    deployment = "steps"
    now: dt.datetime = await connection.fetchval("SELECT clock_timestamp()")
    ok = Side(prediction=1.0, latency_ms=2.0, status=200)
    await insert(
        connection,
        [Prediction(now - dt.timedelta(minutes=m), f"r{m}", ok, ok, deployment=deployment) for m in (1, 2, 20)],
    )
    analyses = WindowAnalyses()
    step_one = now - dt.timedelta(minutes=30)
    assert (
        await analyses.window_metrics(connection, NS, deployment, Metric.MAE, TrafficMode.SHADOW, step_one)
    ).production.requests == 3
    first = analyses.analysis(NS, deployment, Metric.MAE, TrafficMode.SHADOW, step_one)
    assert analyses.analysis(NS, deployment, Metric.MAE, TrafficMode.SHADOW, step_one) is first
    step_two = now - dt.timedelta(minutes=10)
    assert (
        await analyses.window_metrics(connection, NS, deployment, Metric.MAE, TrafficMode.SHADOW, step_two)
    ).production.requests == 2
    assert analyses.analysis(NS, deployment, Metric.RMSE, TrafficMode.SHADOW, step_two) is not first
    analyses.forget(NS, deployment)
    assert analyses.analysis(NS, deployment, Metric.RMSE, TrafficMode.SHADOW, step_two).horizon is None


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
