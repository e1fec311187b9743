"""The analysis SQL: the definitions of every number in a window, and the statements that read them
from `predictions` and `outcomes` (the whole window at once, or what was recorded between two moments).

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
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import asyncpg

from shadowgate_operator.api import Metric, ShadowDeploymentSpec, TrafficMode
from shadowgate_operator.metrics import (
    LATENCY_FLOOR_MS,
    LatencySketch,
)

OUTCOME_LEEWAY = dt.timedelta(minutes=1)
"""Outcomes stamped this long before the window still count (clock skew between router replicas and
clients); older ones belong to earlier requests."""

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
# enough to group, and much cheaper than a linguistic one); the first prediction per request id (issue 12
# D6) by a window function over the same kind of sort. Joined on "C" equality (the same as the default's
# for text), both sides arrive in that order and merge-join without a hash of the window (~15% of the read).
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
                min(coalesce(o.recorded_at, o.time)) OVER (PARTITION BY o.request_id COLLATE "C"
                    ORDER BY o.time DESC ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS first_recorded
            FROM outcomes o
            WHERE o.namespace = $1 AND o.deployment = $2
              AND o.time >= $4 AND o.time <= coalesce($11::timestamptz, 'infinity')
              AND coalesce(o.recorded_at, o.time) <= coalesce($12::timestamptz, 'infinity')
        ) o
        ORDER BY o.request_id COLLATE "C", o.time DESC
    ) latest ON latest.request_id COLLATE "C" = p.request_id COLLATE "C"
    OFFSET 0
)"""

# What changed between two moments of recording, ($11, $12]: predictions recorded in between (is_new:
# everything about them is added), and earlier predictions whose latest outcome may have changed
# because an outcome for their request id arrived in between (only their scored part changes: the
# loss with the latest outcome as of $12 is added, the one as of $11 taken away).
# A request's latest outcome as of $12 is the later of the latest recorded in between (`latest`) and the
# latest recorded by $11 (`earlier`, which is also the one as of $11). Predictions made after $11 + $10
# (CLOCK_SKEW) are not looked up there: their outcomes came later still. A prediction recorded by $11 was
# made by $11 + $10, which lets the index alone turn away the requests whose only prediction arrived in
# between. Only the first prediction recorded per request id is scored: a new one is first if it is the
# first of its id in between and none was recorded by $11; an earlier one being rescored is the first
# recorded of its id. What was recorded by $11 is read for all the slice's request ids at once
# (`= ANY(array)`: one index scan per table, or per chunk on TimescaleDB, instead of one nested-loop probe
# per id, which cost a third more on TimescaleDB), then hash-joined. Each scan descends the request-id key
# once per id: it leads with request_id (migration 0009), so each step compares one column, not three.
# The statement runs with nested loops disabled (see _settings), so its shape does not depend on row
# estimates, which are poor for rows recorded after the last ANALYZE. Cost follows the rows recorded in
# between, not the window or the tables.
_RECORDED_BETWEEN = f"""
slice_outcomes AS MATERIALIZED (
    SELECT o.request_id, o.time, o.outcome, o.recorded_at
    FROM outcomes o
    WHERE o.namespace = $1 AND o.deployment = $2 AND o.recorded_at > $11 AND o.recorded_at <= $12 AND o.time >= $4
),
slice_latest AS (
    SELECT DISTINCT ON (s.request_id COLLATE "C") s.request_id, s.time, s.outcome, s.first_recorded
    FROM (
        SELECT s.*, min(s.recorded_at) OVER (PARTITION BY s.request_id COLLATE "C"
            ORDER BY s.time DESC ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS first_recorded
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
-- The request ids that may have rows recorded by $11: each is looked up once, all in one index scan per
-- table (= ANY of an array; on TimescaleDB one scan per chunk, not one per id).
slice_ids AS MATERIALIZED (
    SELECT array_agg(DISTINCT x.request_id) AS ids
    FROM (SELECT request_id FROM new_predictions UNION ALL SELECT request_id FROM slice_outcomes) x
),
prior_predictions AS MATERIALIZED (
    -- per id, the first prediction recorded by $11: the only one of its id that can be scored
    SELECT DISTINCT ON (q.request_id COLLATE "C") {_COLUMNS.replace(", ", ", q.").join(["q.", ""])}
    FROM predictions q
    WHERE q.namespace = $1 AND q.deployment = $2 AND q.request_id = ANY((SELECT ids FROM slice_ids)::text[])
      AND q.time >= $3 AND q.time <= $11 + $10::interval AND coalesce(q.recorded_at, q.time) <= $11
    ORDER BY q.request_id COLLATE "C", coalesce(q.recorded_at, q.time), q.time
),
arrived AS (
    SELECT n.{_COLUMNS.replace(", ", ", n.")}, true AS is_new, n.fresh,
        n.first_in_slice AND prior.request_id IS NULL AS first_seen
    FROM new_predictions n
    LEFT JOIN prior_predictions prior ON prior.request_id = n.request_id
    UNION ALL
    SELECT {_PREDICTION_COLUMNS}, false AS is_new, false AS fresh, true AS first_seen
    FROM slice_latest s
    JOIN prior_predictions p ON p.request_id = s.request_id
),
-- Per id, the outcomes recorded by $11: the latest (the one as of $11) and when the first was recorded.
-- Only first predictions need them (no other can be scored); those made after $11 + $10 skip it (their
-- outcomes came later still). The ids go in sorted and distinct, as the index scans want them (unsorted,
-- each chunk's scan sorts them again).
prior_outcomes AS MATERIALIZED (
    SELECT DISTINCT ON (o.request_id COLLATE "C") o.request_id, o.outcome, o.time, o.first_recorded
    FROM (
        SELECT o.request_id, o.outcome, o.time,
            min(coalesce(o.recorded_at, o.time)) OVER (PARTITION BY o.request_id COLLATE "C"
                ORDER BY o.time DESC ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS first_recorded
        FROM outcomes o
        WHERE o.namespace = $1 AND o.deployment = $2 AND o.time >= $4 AND coalesce(o.recorded_at, o.time) <= $11
          AND o.request_id = ANY((
              SELECT array_agg(DISTINCT a.request_id) FROM arrived a WHERE NOT a.fresh AND a.first_seen)::text[])
    ) o
    ORDER BY o.request_id COLLATE "C", o.time DESC
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
    LEFT JOIN prior_outcomes earlier ON NOT a.fresh AND earlier.request_id = a.request_id
    OFFSET 0
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

# Every step below (and `rows` above) ends in OFFSET 0, a planning fence: without it PostgreSQL pulls each
# subquery up into the next and substitutes a column's whole expression wherever it is used, with no
# common subexpressions. The fourth power of a loss then repeats the loss four times, itself repeating
# the outcome's CASE, the sanity flags and the scoring conditions: issue 11's power sums grew the final
# Aggregate's expressions to 95,000 characters, 85 ms of a 1,800-row read, 36-43 ms of planning, and the
# whole-window query to 5.4 s (bench/analysis, 2026-12-01). Fenced, each step's columns are computed
# once per row and the statement plans in a few ms (tests/cluster/test_queries.py checks the size).
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
    OFFSET 0
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
    OFFSET 0
),
scoring AS (
    SELECT s.*, s.c_ok OR s.c_fallback AS c_served,
        CASE WHEN s.y_after_sane THEN s.outcome_after END AS y_after,
        CASE WHEN s.y_before_sane THEN s.outcome_before END AS y_before
    FROM served s
    OFFSET 0
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
        OFFSET 0
    ) f
    OFFSET 0
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


# The whole window is planned with its own values each time (a first run reads the whole window, a step's
# window may have just begun): never a cached generic plan. It is hash joins and one sort whatever the
# estimates say: on a table never analysed (a fresh database, a new TimescaleDB chunk) the planner assumes
# a handful of rows and picks a nested loop that took 32 s instead of 70 ms on 8,600 rows.
_WHOLE_WINDOW_SETTINGS = (
    "SET LOCAL plan_cache_mode = force_custom_plan; SET LOCAL enable_nestloop = off; SET LOCAL jit = off; "
    f"SET LOCAL work_mem = '{WHOLE_WINDOW_WORK_MEM}'"
)
# Slices: LATERAL subqueries stay nested loops (nothing else can run them); every other join becomes a
# hash join. Rows recorded since the last ANALYZE are estimated at a handful, and a nested loop over a
# few thousand of them is quadratic. The penalty this puts on the plan's cost must not make PostgreSQL
# compile it (JIT takes a second; the statement runs in milliseconds).
# With its shape fixed so, a slice's plan does not depend on its values (range scans of the recorded_at
# indexes, request-id keys for the lookups, hash joins): one generic plan per connection serves every
# run. Planning each run anew was 15% of a read's CPU on TimescaleDB (perf; 3-4 ms, every chunk of both
# tables considered), 12% less CPU per read without it (bench/analysis, issue 13). On TimescaleDB the
# generic plan leaves the chunks outside the lookback out when it starts (ChunkAppend startup exclusion).
_SLICE_SETTINGS = "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_nestloop = off; SET LOCAL jit = off"


async def _settings(connection: asyncpg.Connection, query: Query) -> None:
    await connection.execute(_WHOLE_WINDOW_SETTINGS if query.whole_window else _SLICE_SETTINGS)


async def fetch(connection: asyncpg.Connection, query: Query) -> Mapping[str, Any]:
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
