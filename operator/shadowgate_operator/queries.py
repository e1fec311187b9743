"""The metric queries: what one ShadowDeployment's current window looks like, read from `predictions`
and `outcomes` (the `WindowMetrics` contract of metrics.py).

Two ways to read the same definitions:

- `window_metrics(connection, ..., since, until)` reads the whole window in one statement: every
  prediction stamped in it, hash-joined to the latest outcome per request id. Its cost grows with the
  rows in the window (one to two seconds for 200,000 rows on a small shared machine): right for replay
  and tests, too slow to repeat every few seconds on a busy deployment.
- `WindowAnalysis` (and `WindowAnalyses`, one per ShadowDeployment, what the operator uses) keeps
  running sums and each run reads only the rows *recorded* since its previous run (`recorded_at`,
  migration 0003), up to a horizon that no open write transaction can still fall behind. New requests
  are added in full; a request whose latest outcome changed has its loss with the old outcome taken
  away and the new one added. Latency percentiles come from histograms, which add up. So a run costs
  what arrived since the last one (index probes and hash joins over those rows), whatever the size of
  the window or of the tables; the first run of a window reads it whole. It gives the same numbers as
  `window_metrics(since, until)` for any `until` past every row's time (bench/analysis checks this
  under load, tests/cluster/test_queries.py batch by batch), given the assumptions stated at
  WRITER_ALLOWANCE and CLOCK_SKEW.

Two things keep every read the operator makes small (bench/analysis: some 15-30 ms with 10 million rows
in the tables and 200,000 in the window): the sums are saved after each run (table analysis_windows), so
a restarted operator or a replica taking over goes on from them instead of reading the window whole; and
between analyses the operator catches a progressing window's sums up every few seconds
(`catch_up_seconds`: more often on busy deployments), so the read an analysis waits for covers seconds
of arrivals, not a whole interval's. The only whole reads left are of a new step's window, which has
just begun, and of a window whose saved sums are gone.

Definitions (all in SQL, portable: plain PostgreSQL 15 and TimescaleDB hypertables, compressed chunks
included). The *evidence window* is the predictions of (namespace, deployment) with `time >= since` (and
`<= until`), the *step window* those with `time >= step_since` as well (metrics.py says why there are
two); a side is one model, production or candidate.

- Called: the side was asked (its status or its error is set). `requests` counts them in the step
  window; `errors` those answered with HTTP status >= 500 or not at all (timeout, connection error, bad
  response).
- Answered: the side returned a prediction (not NULL, no error, status below 400) that is a sane number:
  finite and within SANE_LIMIT in absolute value, its confidence too.
- Outcome: the latest by `time` among the request id's outcomes timestamped from `since - OUTCOME_LEEWAY`
  (and up to `until`): a late correction replaces an earlier outcome. The leeway absorbs clock skew
  between whoever stamps the prediction and the outcome; an outcome cannot precede its request. An
  outcome that is not a sane number (or, for logLoss, outside [0, 1]) scores nothing.
- Quarantined: a scored request whose outcome or prediction is not a sane number: left out of every sum
  and counted, so one absurd value can neither overflow the sums nor move the decision (issue 12 D7).
- One scored prediction per request id (issue 12 D6): only the first prediction recorded for a request
  id in the window can be scored, and only if it was made before the id's first outcome was recorded
  (within CLOCK_SKEW). A client that sends a request id again, or sends one whose outcome is already
  known, is answered and recorded but never scored: inference traffic alone cannot move a decision.
  `unscored_repeats` counts them.
- Intention to treat: a request the candidate was given (mirrored in shadow mode, routed to it in
  canary mode) is scored for the candidate on what the user got, or would get once it is promoted: its
  answer, or, when it failed (no answer or a 5xx) and the router falls back (canary rows say so; in
  shadow mode `fallback`, spec.traffic.fallbackToProduction), production's answer. It never moves into
  production's sample; its failure counts in the candidate's error rate as well.
- Scored: shadow (paired): production answered, the candidate was served as above, and there is an
  outcome, so both losses are taken on the same requests and `loss_difference` = production loss -
  candidate loss per request. Canary (unpaired): production's losses over the requests it answered that
  were not given to the candidate, the candidate's over the requests given to it and served as above;
  `scored` counts requests scored on either side.
- Per-request loss, lower is better, with x the side's prediction, c its confidence, y the outcome:
  mae |x - y|; rmse (x - y)^2; accuracy 0/1 for (x >= 0.5) != (y >= 0.5); directionalAccuracy 0/1 for
  sign(x) != sign(y) (a zero on either side is its own sign, so a flat outcome counts as a miss for a
  non-zero prediction); logLoss -(y ln p + (1 - y) ln(1 - p)) with p = c if present else x (c is read
  as the probability of outcome 1), clipped to [1e-15, 1 - 1e-15]. Every loss is capped at the loss cap
  (`Options.loss_cap`, decision.loss_bound: spec.analysis.lossCap; for logLoss 9.21 unless set).
- Sums: per side and for the paired differences, the count and the sums of the first to fourth powers
  of the losses (the bounded test of stats.py needs all four; the rest, two).
- Keys (spec.traffic.stickyHeader set): each scored request's key (the recorded sticky_key, else its
  request id) hashed into one of KEY_BUCKETS buckets, and per bucket each series' count and sum: enough
  for a variance clustered by key (metrics.Clustered).
- Segments (spec.analysis.segmentBy set): per recorded segment value (NULL: "(none)"; past
  MAX_SEGMENTS distinct values: "(other)"), each series' count, sum and sum of squares.
- metric_value: the mean loss for mae and logLoss, its square root for rmse, 1 - mean loss (the share
  right) for the two accuracies.
- Agreement (shadow): among requests both sides answered (outcome or not), the share where they agree:
  same class at 0.5 (accuracy), same class of p (logLoss), same sign (directionalAccuracy), or within
  1e-9 relative to the larger magnitude, absolute below 1 (mae, rmse). None in canary mode.
- Latency percentiles: over every call of the side in the step window that has a latency, failures and
  timeouts included (a model that times out is slow). They come from a logarithmic histogram
  (`LatencySketch`, the DDSketch mapping) with relative accuracy `LATENCY_RELATIVE_ACCURACY`: histograms
  add up across runs, exact percentiles would need every value again each time.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any

import asyncpg

from shadowgate_operator import timescale
from shadowgate_operator.api import Metric, ShadowDeploymentSpec, TrafficMode
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

__all__ = ["LATENCY_FLOOR_MS", "LATENCY_RELATIVE_ACCURACY", "LatencySketch"]  # re-exported: tests, benches

logger = logging.getLogger(__name__)

OUTCOME_LEEWAY = dt.timedelta(minutes=1)
"""Outcomes stamped this long before the window still count (clock skew between router replicas and
clients); older ones belong to earlier requests."""

WRITER_ALLOWANCE = dt.timedelta(seconds=60)
"""How long `WindowAnalysis` waits for a write transaction that is still open, and how old it assumes
one to be when it may not see its start (another database role without pg_read_all_stats)."""

CLOCK_SKEW = dt.timedelta(seconds=1)
"""How far the router's clock (a prediction's `time`) may run ahead of the database's (`recorded_at`).
An outcome is recorded after its request was made, so an outcome of a prediction made after the previous
run (by more than this) can only have been recorded since: `WindowAnalysis` then finds it without an
index probe; and a prediction recorded by a moment was made by that moment plus this. A prediction made
more than this after its request id's first outcome was recorded is not scored (issue 12 D6). Beyond
this skew, a prediction whose row is flushed after its own outcome, or whose outcome arrives in a later
run, may go unscored by `WindowAnalysis` (`window_metrics` is not affected)."""

SANE_LIMIT = 1e15
"""Predictions, confidences and outcomes beyond this in absolute value (or not finite) are quarantined:
with every value within it, no sum of losses to the fourth power over any number of rows can overflow."""

KEY_BUCKETS = 1024
"""Sticky keys are hashed into this many buckets for the clustered variance: a bucket holds whole keys,
so it is a (coarser) cluster; the state stays bounded however many keys there are."""

MAX_SEGMENTS = 1000
"""Segment values tracked one by one; requests with further values count in "(other)"."""

QUANTILES = (0.5, 0.95, 0.99)

CATCH_UP_SECONDS = 5.0
"""Between analyses the operator brings a progressing window's sums up to date this often (service.py),
so the read an analysis waits for covers seconds of arrivals, not a whole interval's."""

CATCH_UP_ROWS = 1500
"""On a busy deployment it catches up more often, down to CATCH_UP_MIN_SECONDS, so that one read takes
about this many rows (new requests and rescored ones): some 20-30 ms on a small machine (bench/analysis)."""

CATCH_UP_MIN_SECONDS = 1.0

DEFINITION_VERSION = 3
"""Bump whenever what the sums mean changes (a loss, a flag, the histogram): saved sums of another
version (table analysis_windows) are then not reused, and the analysis starts over."""

WHOLE_WINDOW_WORK_MEM = "64MB"
"""work_mem for reading a whole window: its hash join and the latest-outcome sort stay in memory."""


# --- SQL --------------------------------------------------------------------------------------------
# Parameters of every statement: $1 namespace, $2 deployment, $3 since, $4 since - OUTCOME_LEEWAY,
# $5 ln(gamma) and $6 LATENCY_FLOOR_MS for the histogram, $7 whether the candidate's failures fall back
# to production (shadow mode; canary rows say so themselves), $8 the loss cap (NULL: none), $9 the step
# window's start, $10 CLOCK_SKEW; then those of each variant (below).

_COLUMNS = (
    "time, request_id, production_prediction, production_confidence, production_latency_ms, production_status, "
    "production_error, candidate_prediction, candidate_confidence, candidate_latency_ms, candidate_status, "
    "candidate_error, sticky_key, segment"
)
_PREDICTION_COLUMNS = ", ".join(f"p.{column}" for column in _COLUMNS.split(", "))

# The whole window at once. $11: predictions and outcomes stamped up to this time (NULL: no bound);
# $12: recorded up to this time (NULL: no bound; rows from before recorded_at existed count as recorded
# at their time). Latest outcome per request: one sort by request id ("C" collation: byte order is
# enough to group, and much cheaper than a linguistic one), then a hash join; the first prediction per
# request id (issue 12 D6) by a window function over the same kind of sort.
_WHOLE_WINDOW = f"""
rows AS (
    SELECT p.*, true AS is_new, latest.outcome AS outcome_after, NULL::float8 AS outcome_before,
        p.first_seen AND (latest.first_recorded IS NULL OR p.time <= latest.first_recorded + $10::interval)
            AS scorable
    FROM (
        SELECT {_PREDICTION_COLUMNS},
            row_number() OVER (PARTITION BY p.request_id COLLATE "C"
                               ORDER BY coalesce(p.recorded_at, p.time), p.time) = 1 AS first_seen
        FROM predictions p
        WHERE p.namespace = $1 AND p.deployment = $2
          AND p.time >= $3 AND p.time <= coalesce($11::timestamptz, 'infinity')
          AND coalesce(p.recorded_at, p.time) <= coalesce($12::timestamptz, 'infinity')
    ) p
    LEFT JOIN (
        SELECT DISTINCT ON (o.request_id COLLATE "C") o.request_id, o.outcome, o.first_recorded
        FROM (
            SELECT o.request_id, o.time, o.outcome,
                min(coalesce(o.recorded_at, o.time)) OVER (PARTITION BY o.request_id COLLATE "C") AS first_recorded
            FROM outcomes o
            WHERE o.namespace = $1 AND o.deployment = $2
              AND o.time >= $4 AND o.time <= coalesce($11::timestamptz, 'infinity')
              AND coalesce(o.recorded_at, o.time) <= coalesce($12::timestamptz, 'infinity')
        ) o
        ORDER BY o.request_id COLLATE "C", o.time DESC
    ) latest ON latest.request_id = p.request_id
)"""

# What changed between two moments of recording, ($11, $12]: predictions recorded in between (is_new:
# everything about them is added), and earlier predictions whose latest outcome may have changed
# because an outcome for their request id arrived in between (only their scored part changes: the
# loss with the latest outcome as of $12 is added, the one as of $11 taken away).
# A request's latest outcome as of $12 is the later of the latest recorded in between (`latest`, a hash
# join) and the latest recorded by $11 (`earlier`, an index probe, which is also the one as of $11).
# Predictions made after $11 + $10 (CLOCK_SKEW) skip the probe: their outcomes came later still. A
# prediction recorded by $11 was made by $11 + $10, which lets the index alone turn away the requests
# whose only prediction arrived in between. Only the first prediction recorded per request id is scored:
# a new one is first if it is the first of its id in between and none was recorded by $11 (an index
# probe); an earlier one being rescored is the first recorded of its id. The statement runs with nested
# loops disabled (see _settings), so its shape does not depend on row estimates, which are poor for rows
# recorded after the last ANALYZE: probes where written, hash joins elsewhere. Cost follows the rows
# recorded in between, not the window or the tables.
_RECORDED_BETWEEN = f"""
slice_outcomes AS MATERIALIZED (
    SELECT o.request_id, o.time, o.outcome, o.recorded_at
    FROM outcomes o
    WHERE o.namespace = $1 AND o.deployment = $2 AND o.recorded_at > $11 AND o.recorded_at <= $12 AND o.time >= $4
),
slice_latest AS (
    SELECT DISTINCT ON (s.request_id COLLATE "C") s.request_id, s.time, s.outcome, s.first_recorded
    FROM (
        SELECT s.*, min(s.recorded_at) OVER (PARTITION BY s.request_id COLLATE "C") AS first_recorded
        FROM slice_outcomes s
    ) s
    ORDER BY s.request_id COLLATE "C", s.time DESC
),
new_predictions AS (
    SELECT {_PREDICTION_COLUMNS}, p.time > $11 + $10::interval AS fresh,
        row_number() OVER (PARTITION BY p.request_id COLLATE "C" ORDER BY p.recorded_at, p.time) = 1 AS first_in_slice
    FROM predictions p
    WHERE p.namespace = $1 AND p.deployment = $2 AND p.recorded_at > $11 AND p.recorded_at <= $12
      AND p.time >= $3
),
arrived AS (
    SELECT n.{_COLUMNS.replace(", ", ", n.")}, true AS is_new, n.fresh,
        n.first_in_slice AND NOT EXISTS (
            SELECT 1 FROM predictions q
            WHERE q.namespace = $1 AND q.deployment = $2 AND q.request_id = n.request_id
              AND q.time >= $3 AND q.time <= $11 + $10::interval AND coalesce(q.recorded_at, q.time) <= $11
        ) AS first_seen
    FROM new_predictions n
    UNION ALL
    SELECT {_PREDICTION_COLUMNS}, false AS is_new, false AS fresh, true AS first_seen
    FROM slice_latest s
    CROSS JOIN LATERAL (
        SELECT {_COLUMNS} FROM predictions q
        WHERE q.namespace = $1 AND q.deployment = $2 AND q.request_id = s.request_id
          AND q.time >= $3 AND q.time <= $11 + $10::interval AND coalesce(q.recorded_at, q.time) <= $11
        ORDER BY coalesce(q.recorded_at, q.time), q.time
        LIMIT 1  -- the first recorded: the only one of its id that can be scored
    ) p
),
rows AS (
    SELECT a.*,
        CASE WHEN earlier.time IS NULL OR latest.time > earlier.time THEN latest.outcome ELSE earlier.outcome END
            AS outcome_after,
        CASE WHEN NOT a.is_new THEN earlier.outcome END AS outcome_before,
        -- A rescored prediction keeps its answer: outcomes recorded since cannot precede it.
        a.first_seen AND (least(earlier.first_recorded, latest.first_recorded) IS NULL
            OR a.time <= least(earlier.first_recorded, latest.first_recorded) + $10::interval) AS scorable
    FROM arrived a
    LEFT JOIN slice_latest latest ON latest.request_id = a.request_id
    LEFT JOIN LATERAL (
        SELECT (array_agg(o.outcome ORDER BY o.time DESC))[1] AS outcome, max(o.time) AS time,
            min(coalesce(o.recorded_at, o.time)) AS first_recorded
        FROM outcomes o
        WHERE NOT a.fresh AND o.namespace = $1 AND o.deployment = $2 AND o.request_id = a.request_id
          AND o.time >= $4 AND coalesce(o.recorded_at, o.time) <= $11
    ) earlier ON true
)"""

# Per-request loss of one side: {x} prediction, {c} confidence, {y} outcome.
_LOSS = {
    Metric.MAE: "abs({x} - {y})",
    Metric.RMSE: "({x} - {y}) * ({x} - {y})",
    Metric.ACCURACY: "CASE WHEN ({x} >= 0.5) = ({y} >= 0.5) THEN 0::float8 ELSE 1::float8 END",
    Metric.DIRECTIONAL_ACCURACY: "CASE WHEN sign({x}) = sign({y}) THEN 0::float8 ELSE 1::float8 END",
    Metric.LOG_LOSS: (
        "-({y} * ln(least(greatest(coalesce({c}, {x}), 1e-15::float8), 1 - 1e-15::float8))"
        " + (1 - {y}) * ln(1 - least(greatest(coalesce({c}, {x}), 1e-15::float8), 1 - 1e-15::float8)))"
    ),
}

# A number the analysis will use: finite and within SANE_LIMIT (NaN compares above every number in
# PostgreSQL, so abs(NaN) <= limit is false too). An outcome for logLoss must also be a probability.
_SANE = f"(abs({{v}}) <= {SANE_LIMIT:.0e}::float8)"
_SANE_OUTCOME = {metric: _SANE for metric in Metric}
_SANE_OUTCOME[Metric.LOG_LOSS] = f"({_SANE} AND {{v}} BETWEEN 0 AND 1)"

# Whether the two sides' predictions agree, per metric.
_AGREE = {
    Metric.MAE: "abs(production_prediction - candidate_prediction)"
    " <= 1e-9 * greatest(1, abs(production_prediction), abs(candidate_prediction))",
    Metric.ACCURACY: "(production_prediction >= 0.5) = (candidate_prediction >= 0.5)",
    Metric.DIRECTIONAL_ACCURACY: "sign(production_prediction) = sign(candidate_prediction)",
    Metric.LOG_LOSS: "(coalesce(production_confidence, production_prediction) >= 0.5)"
    " = (coalesce(candidate_confidence, candidate_prediction) >= 0.5)",
}
_AGREE[Metric.RMSE] = _AGREE[Metric.MAE]

# Which requests score a side ({side}_scored) and which count as scored at all, per mode. Intention to
# treat: a request the candidate was given stays in the candidate's sample, scored on what the user got
# (the candidate's answer, else production's fallback answer); it never moves to production's sample.
_SCORED = {
    TrafficMode.SHADOW: ("p_ok AND c_served", "p_ok AND c_served", "p_ok AND c_served"),
    TrafficMode.CANARY: ("p_ok AND NOT c_called", "c_served", "(p_ok AND NOT c_called) OR c_served"),
}

_AGGREGATE = """
flags AS (
    SELECT r.*,
        (production_status IS NOT NULL OR production_error IS NOT NULL) AS p_called,
        (coalesce(production_status >= 500, false) OR production_error IS NOT NULL) AS p_error,
        (production_prediction IS NOT NULL AND production_error IS NULL
            AND coalesce(production_status < 400, true)) AS p_answered,
        coalesce({p_sane} AND (production_confidence IS NULL OR {p_confidence_sane}), false) AS p_sane,
        (candidate_status IS NOT NULL OR candidate_error IS NOT NULL) AS c_called,
        (coalesce(candidate_status >= 500, false) OR candidate_error IS NOT NULL) AS c_error,
        (candidate_prediction IS NOT NULL AND candidate_error IS NULL
            AND coalesce(candidate_status < 400, true)) AS c_answered,
        coalesce({c_sane} AND (candidate_confidence IS NULL OR {c_confidence_sane}), false) AS c_sane,
        coalesce({y_after_sane}, false) AS y_after_sane,
        coalesce({y_before_sane}, false) AS y_before_sane,
        r.time >= $9 AS in_step
    FROM rows r
),
served AS (
    -- c_fallback: the candidate failed (no answer or a 5xx, as the router falls back) and production's
    -- answer is what the user got: in canary mode the row holds it; in shadow mode production answered
    -- anyway, and $7 says whether the router would fall back to it once the candidate answers.
    SELECT f.*,
        f.c_answered AND f.c_sane AS c_ok,
        f.p_answered AND f.p_sane AS p_ok,
        NOT f.c_answered AND f.c_called AND f.p_answered AND f.p_sane
            AND (coalesce(f.candidate_status >= 500, false)
                 OR f.candidate_error IS DISTINCT FROM 'no_prediction' AND f.candidate_error IS NOT NULL)
            AND ($7 OR f.p_called AND NOT {paired}) AS c_fallback,
        f.outcome_after IS NOT NULL AND (NOT f.y_after_sane OR f.p_answered AND NOT f.p_sane
            OR f.c_answered AND NOT f.c_sane) AS quarantine_after,
        f.outcome_before IS NOT NULL AND (NOT f.y_before_sane OR f.p_answered AND NOT f.p_sane
            OR f.c_answered AND NOT f.c_sane) AS quarantine_before
    FROM flags f
),
scoring AS (
    SELECT s.*, s.c_ok OR s.c_fallback AS c_served,
        CASE WHEN s.y_after_sane THEN s.outcome_after END AS y_after,
        CASE WHEN s.y_before_sane THEN s.outcome_before END AS y_before
    FROM served s
),
losses AS{materialized} (
    SELECT f.*, p_after - c_after AS d_after, p_before - c_before AS d_before
    FROM (
        SELECT f.*,
            CASE WHEN scorable AND {p_scored} AND y_after IS NOT NULL THEN least({p_loss_after}, $8::float8) END
                AS p_after,
            CASE WHEN scorable AND {p_scored} AND y_before IS NOT NULL THEN least({p_loss_before}, $8::float8) END
                AS p_before,
            CASE WHEN scorable AND {c_scored} AND y_after IS NOT NULL
                THEN least(CASE WHEN c_ok THEN {c_loss_after} ELSE {p_loss_after} END, $8::float8) END AS c_after,
            CASE WHEN scorable AND {c_scored} AND y_before IS NOT NULL
                THEN least(CASE WHEN c_ok THEN {c_loss_before} ELSE {p_loss_before} END, $8::float8) END AS c_before,
            scorable AND ({any_scored}) AS any_scored{group_columns}
        FROM scoring f
    ) f
)
SELECT
    count(*) AS rows_read,
    count(*) FILTER (WHERE is_new AND in_step AND p_called) AS production_requests,
    count(*) FILTER (WHERE is_new AND in_step AND p_error) AS production_errors,
    count(*) FILTER (WHERE is_new AND in_step AND c_called) AS candidate_requests,
    count(*) FILTER (WHERE is_new AND in_step AND c_error) AS candidate_errors,
    count(*) FILTER (WHERE is_new AND scorable AND p_ok AND c_ok) AS pairs,
    count(*) FILTER (WHERE is_new AND scorable AND p_ok AND c_ok AND {agree}) AS agreements,
    count(*) FILTER (WHERE any_scored AND y_after IS NOT NULL)
        - count(*) FILTER (WHERE any_scored AND y_before IS NOT NULL) AS scored,
    count(*) FILTER (WHERE scorable AND quarantine_after)
        - count(*) FILTER (WHERE scorable AND quarantine_before) AS quarantined,
    count(*) FILTER (WHERE is_new AND NOT scorable) AS unscored_repeats,
{power_sums},
    array_agg(ceil(ln(greatest(production_latency_ms::float8, $6)) / $5)::int)
        FILTER (WHERE is_new AND in_step AND p_called AND production_latency_ms IS NOT NULL) AS production_buckets,
    array_agg(ceil(ln(greatest(candidate_latency_ms::float8, $6)) / $5)::int)
        FILTER (WHERE is_new AND in_step AND c_called AND candidate_latency_ms IS NOT NULL) AS candidate_buckets{groups}
FROM losses"""


def _power_sums() -> str:
    """count and sums of the first to fourth powers of each series, new values minus replaced ones."""
    lines = []
    for name, short in (("production", "p"), ("candidate", "c"), ("difference", "d")):
        lines.append(f"    count({short}_after) - count({short}_before) AS {name}_n")
        for power, label in ((1, "total"), (2, "squares"), (3, "cubes"), (4, "fourths")):
            after = " * ".join([f"{short}_after"] * power)
            before = " * ".join([f"{short}_before"] * power)
            lines.append(f"    coalesce(sum({after}), 0) - coalesce(sum({before}), 0) AS {name}_{label}")
    return ",\n".join(lines)


_CONTRIBUTES = "(p_after IS NOT NULL OR p_before IS NOT NULL OR c_after IS NOT NULL OR c_before IS NOT NULL)"

# Per sticky-key bucket: each series' count and sum (the clustered variance needs no more). The bucket is
# the first 32 bits of md5 of the key: portable and the same in Python (tests), unlike hashtext().
_KEY_COLUMN = (
    f",\n            ('x' || substr(md5(coalesce(sticky_key, request_id)), 1, 8))::bit(32)::int & {KEY_BUCKETS - 1}"
    " AS key_bucket"
)
_KEYED = f""",
    (SELECT json_agg(json_build_array(k.key_bucket, k.p_n, k.p_t, k.c_n, k.c_t, k.d_n, k.d_t)) FROM (
        SELECT key_bucket,
            count(p_after) - count(p_before) AS p_n, coalesce(sum(p_after), 0) - coalesce(sum(p_before), 0) AS p_t,
            count(c_after) - count(c_before) AS c_n, coalesce(sum(c_after), 0) - coalesce(sum(c_before), 0) AS c_t,
            count(d_after) - count(d_before) AS d_n, coalesce(sum(d_after), 0) - coalesce(sum(d_before), 0) AS d_t
        FROM losses WHERE {_CONTRIBUTES} GROUP BY key_bucket
    ) k) AS keyed"""

# Per segment value: each series' count, sum and sum of squares.
_SEGMENT_COLUMN = ",\n            coalesce(left(segment, 128), '(none)') AS segment_value"
_SEGMENTED = f""",
    (SELECT json_agg(json_build_array(g.segment_value, g.p_n, g.p_1, g.p_2, g.c_n, g.c_1, g.c_2, g.d_n, g.d_1, g.d_2))
     FROM (
        SELECT segment_value,
            count(p_after) - count(p_before) AS p_n, coalesce(sum(p_after), 0) - coalesce(sum(p_before), 0) AS p_1,
            coalesce(sum(p_after * p_after), 0) - coalesce(sum(p_before * p_before), 0) AS p_2,
            count(c_after) - count(c_before) AS c_n, coalesce(sum(c_after), 0) - coalesce(sum(c_before), 0) AS c_1,
            coalesce(sum(c_after * c_after), 0) - coalesce(sum(c_before * c_before), 0) AS c_2,
            count(d_after) - count(d_before) AS d_n, coalesce(sum(d_after), 0) - coalesce(sum(d_before), 0) AS d_1,
            coalesce(sum(d_after * d_after), 0) - coalesce(sum(d_before * d_before), 0) AS d_2
        FROM losses WHERE {_CONTRIBUTES} GROUP BY segment_value
    ) g) AS segmented"""


@dataclass(frozen=True)
class Options:
    """What the sums are of, besides the metric and the mode (from the spec: `options_of`)."""

    fallback: bool = True
    """spec.traffic.fallbackToProduction: a failed candidate is scored on production's fallback answer."""
    loss_cap: float | None = None
    """The largest per-request loss (decision.loss_bound): every loss is capped at it; None: no cap."""
    clustered: bool = False
    """spec.traffic.stickyHeader is set: sum per sticky-key bucket too."""
    segmented: bool = False
    """spec.analysis.segmentBy is set: sum per segment too."""

    def describe(self) -> str:
        return (
            f"fallback={self.fallback} cap={self.loss_cap if self.loss_cap is not None else 'none'}"
            f" keys={self.clustered} segments={self.segmented}"
        )


def options_of(spec: ShadowDeploymentSpec) -> Options:
    """The Options a ShadowDeployment's analysis uses."""
    from shadowgate_operator.decision import loss_bound

    return Options(
        fallback=spec.traffic.fallback_to_production,
        loss_cap=loss_bound(spec.analysis),
        clustered=spec.traffic.sticky_header is not None,
        segmented=spec.analysis.segment_by is not None,
    )


@cache
def statement(
    whole_window: bool, metric: Metric, mode: TrafficMode, clustered: bool = False, segmented: bool = False
) -> str:
    """The SQL for one variant, metric, mode and grouping: fixed fragments put together, values all
    parameters."""
    loss = _LOSS[metric]
    p_scored, c_scored, any_scored = _SCORED[mode]
    production = {"x": "production_prediction", "c": "production_confidence"}
    candidate = {"x": "candidate_prediction", "c": "candidate_confidence"}
    grouped = clustered or segmented
    aggregate = _AGGREGATE.format(
        p_scored=p_scored,
        c_scored=c_scored,
        any_scored=any_scored,
        p_loss_after=loss.format(**production, y="y_after"),
        p_loss_before=loss.format(**production, y="y_before"),
        c_loss_after=loss.format(**candidate, y="y_after"),
        c_loss_before=loss.format(**candidate, y="y_before"),
        agree=_AGREE[metric],
        paired="true" if mode is TrafficMode.SHADOW else "false",
        p_sane=_SANE.format(v="production_prediction"),
        p_confidence_sane=_SANE.format(v="production_confidence"),
        c_sane=_SANE.format(v="candidate_prediction"),
        c_confidence_sane=_SANE.format(v="candidate_confidence"),
        y_after_sane=_SANE_OUTCOME[metric].format(v="outcome_after"),
        y_before_sane=_SANE_OUTCOME[metric].format(v="outcome_before"),
        power_sums=_power_sums(),
        # Referenced once, the CTE is inlined; by the groupings too, it is computed once and read thrice.
        materialized=" MATERIALIZED" if grouped else "",
        group_columns=(_KEY_COLUMN if clustered else "") + (_SEGMENT_COLUMN if segmented else ""),
        groups=(_KEYED if clustered else "") + (_SEGMENTED if segmented else ""),
    )
    rows = _WHOLE_WINDOW if whole_window else _RECORDED_BETWEEN
    return f"WITH{rows},{aggregate}"


@dataclass(frozen=True)
class Query:
    """One statement of the analysis with its arguments: what runs, and what `explain` shows."""

    sql: str
    arguments: tuple[Any, ...]
    whole_window: bool


def _common(
    namespace: str,
    deployment: str,
    since: dt.datetime,
    leeway: dt.timedelta,
    options: Options,
    step_since: dt.datetime | None,
) -> tuple[Any, ...]:
    gamma = LatencySketch().gamma
    return (
        namespace, deployment, since, since - leeway, math.log(gamma), LATENCY_FLOOR_MS, options.fallback,
        options.loss_cap, step_since or since, CLOCK_SKEW,
    )  # fmt: skip


def whole_window_query(
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
) -> Query:
    """The window in one statement: stamped in [since, until], recorded by `recorded_until` (None: no bound);
    the step window from `step_since` (None: the same as since)."""
    return Query(
        statement(True, metric, mode, options.clustered, options.segmented),
        (*_common(namespace, deployment, since, outcome_leeway, options, step_since), until, recorded_until),
        whole_window=True,
    )


def recorded_between_query(
    namespace: str,
    deployment: str,
    metric: Metric,
    mode: TrafficMode,
    since: dt.datetime,
    after: dt.datetime,
    upto: dt.datetime,
    *,
    outcome_leeway: dt.timedelta = OUTCOME_LEEWAY,
    options: Options = Options(),
    step_since: dt.datetime | None = None,
) -> Query:
    """What changed in the window [since, ...) between two moments of recording, (after, upto]."""
    return Query(
        statement(False, metric, mode, options.clustered, options.segmented),
        (*_common(namespace, deployment, since, outcome_leeway, options, step_since), after, upto),
        whole_window=False,
    )


# Each run's slice differs in size by orders of magnitude (a first run reads the whole window, later
# ones seconds of rows): plan each with its own values, never a cached generic plan.
# The whole window is hash joins and one sort whatever the estimates say: on a table never analysed (a
# fresh database, a new TimescaleDB chunk) the planner assumes a handful of rows and picks a nested loop
# that took 32 s instead of 70 ms on 8,600 rows.
_WHOLE_WINDOW_SETTINGS = (
    "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_nestloop = off; SET LOCAL jit = off; "
    f"SET LOCAL work_mem = '{WHOLE_WINDOW_WORK_MEM}'"
)
# Slices: LATERAL subqueries stay nested loops (nothing else can run them); every other join becomes a
# hash join. Rows recorded since the last ANALYZE are estimated at a handful, and a nested loop over a
# few thousand of them is quadratic. The penalty this puts on the plan's cost must not make PostgreSQL
# compile it (JIT takes a second; the statement runs in milliseconds).
_SLICE_SETTINGS = "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_nestloop = off; SET LOCAL jit = off"


async def _settings(connection: asyncpg.Connection, query: Query) -> None:
    await connection.execute(_WHOLE_WINDOW_SETTINGS if query.whole_window else _SLICE_SETTINGS)


async def _fetch(connection: asyncpg.Connection, query: Query) -> Mapping[str, Any]:
    async with connection.transaction():
        await _settings(connection, query)
        row: Mapping[str, Any] = await connection.fetchrow(query.sql, *query.arguments)
    return row


async def explain(connection: asyncpg.Connection, query: Query) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of a query, run as the analysis runs it: for benchmarks and for
    finding out why an analysis is slow. It executes the query (read-only)."""
    async with connection.transaction():
        await _settings(connection, query)
        rows = await connection.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {query.sql}", *query.arguments)
    return [row[0] for row in rows]


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
    window.add(await _fetch(connection, query))
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

    A new metric, mode, options or `since` is a new window: make a new WindowAnalysis (WindowAnalyses
    does). A new step window (`move_step`, shadow mode's later steps) keeps the evidence window's sums and
    starts the step's counts over: its first run after the move also reads the step's rows recorded up to
    the previous horizon (seconds of rows: the step has just begun).

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
            self._window.add_step(await _fetch(connection, step))
            self._step_pending = False
        if self.horizon is not None and horizon <= self.horizon:
            return self.metrics()
        row = await _fetch(connection, self.query(self.horizon, horizon))
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


class WindowAnalyses:
    """The operator's WindowAnalysis per ShadowDeployment, started over when its evidence window changes
    (a canary step moves `since`; a new metric, mode or option changes what is summed); a shadow step
    only moves its step window."""

    def __init__(
        self, *, outcome_leeway: dt.timedelta = OUTCOME_LEEWAY, writer_allowance: dt.timedelta = WRITER_ALLOWANCE
    ):
        self.outcome_leeway = outcome_leeway
        self.writer_allowance = writer_allowance
        self._analyses: dict[tuple[str, str], WindowAnalysis] = {}

    def analysis(
        self,
        namespace: str,
        deployment: str,
        metric: Metric,
        mode: TrafficMode,
        since: dt.datetime,
        *,
        options: Options = Options(),
        step_since: dt.datetime | None = None,
    ) -> WindowAnalysis:
        current = self._analyses.get((namespace, deployment))
        if current is None or (current.metric, current.mode, current.since, current.options) != (
            metric,
            mode,
            since,
            options,
        ):
            current = WindowAnalysis(
                namespace,
                deployment,
                metric,
                mode,
                since,
                outcome_leeway=self.outcome_leeway,
                writer_allowance=self.writer_allowance,
                options=options,
                step_since=step_since,
            )
            self._analyses[(namespace, deployment)] = current
        else:
            current.move_step(step_since or since)
        return current

    async def window_metrics(
        self,
        connection: asyncpg.Connection,
        namespace: str,
        deployment: str,
        metric: Metric,
        mode: TrafficMode,
        since: dt.datetime,
        *,
        options: Options = Options(),
        step_since: dt.datetime | None = None,
    ) -> WindowMetrics:
        """The current windows of one deployment, read incrementally."""
        analysis = self.analysis(namespace, deployment, metric, mode, since, options=options, step_since=step_since)
        return await analysis.refresh(connection)

    def catch_up_seconds(self, namespace: str, deployment: str) -> float:
        """When this deployment's sums should next be brought up to date (WindowAnalysis.catch_up_seconds)."""
        current = self._analyses.get((namespace, deployment))
        return CATCH_UP_SECONDS if current is None else current.catch_up_seconds()

    def forget(self, namespace: str, deployment: str) -> None:
        """Drop a deleted or finished deployment's sums."""
        self._analyses.pop((namespace, deployment), None)
