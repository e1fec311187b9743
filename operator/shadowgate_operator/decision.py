"""The promotion / rollback decision: a pure function of spec, status, the step's metrics and the time.

`analyse()` returns a `Verdict`: the `Decision` (action and a reason in words that names each number and
the threshold it was compared with), the `AnalysisMetrics` to write to status (and to a
`deployment_metrics` row), and the sample count the decision went by. `decide()` is the same, decision
only.

The rules, in order (the first that applies wins):

1. No metrics (nothing measured yet): Wait; after maxStepDuration, Fail (nothing to judge).
2. Hard gates, as soon as the candidate has answered enough requests to judge them (even below
   minSamples): error rate > maxErrorRate once it has `MIN_REQUESTS_FOR_ERROR_GATE` requests (so one
   early failure cannot trip it), p99 latency > maxLatencyP99Ms once it has
   `MIN_REQUESTS_FOR_LATENCY_GATE` (a p99 of fewer requests is just the slowest one) -> RollBack.
3. Fewer than minSamples scored requests -> Wait, saying how many of how many; after maxStepDuration,
   Fail: the candidate could not be judged (are outcomes arriving?). Shadow mode counts scored pairs;
   canary mode counts the candidate's own scored requests (the smaller side, the one that limits the
   comparison).
4. overall score <= -rollbackThreshold -> RollBack. Quality counts in the score as far as the evidence
   goes (below), so a noisy early estimate does not roll back a good candidate, while a clear
   regression is stopped before it is significant at `confidence`.
5. The candidate is significantly *worse* on quality (always-valid p-value <= 1 - confidence) ->
   RollBack: it can no longer be shown better, waiting only prolongs it.
6. overall score >= promotionThreshold AND the candidate significantly better on quality (always-valid
   p-value <= 1 - confidence) -> Advance to the next step, or Promote after the last one.
7. maxStepDuration exceeded -> RollBack, inconclusive: the candidate was not shown better in time.
8. Otherwise Wait, saying which condition is missing.

The score. The overall score is the weighted sum of three components, each in [-1, 1], with
`analysis.weights` normalised (so the score is in [-1, 1] too). Quality is what a new model is for, so
it is scored on improvement; latency and errors are guardrails, scored on not getting worse:

- quality = evidence * improvement / 5%, clipped: 0 for no difference, 1 for 5% better or more, -1 for
  5% worse. improvement = (production - candidate) / production on the metric as users know it (MAE,
  RMSE, log loss), and on the error rate (1 - accuracy) for accuracy and directionalAccuracy.
  evidence = 1 - the always-valid p-value of the direction the estimate points in (stats.py): an
  improvement or a regression counts in full once it is established and not at all before the test
  has run. This keeps a noisy early estimate from rolling back a good candidate: without it, at 100
  scored requests a canary 10% better was rolled back in about a fifth of simulated runs, and an
  identical one in two thirds.
- latency = 1 - slowdown / 25%, clipped, with slowdown = max(0, p99 candidate / p99 production - 1):
  1 when the candidate's p99 is no slower, 0 at 25% slower, -1 at 50% slower or more.
- errors = 1 - 2 * excess / maxErrorRate, clipped, with excess = max(0, error rate candidate - error
  rate production): 1 when it fails no more often, 0 at half the error budget more, -1 at the budget.
  A component that cannot be measured (no latency recorded) counts as no regression (1).

Why this scale: the original service scored raw relative improvements, so a 10%-better model scored
0.07 and never reached the 0.7 threshold. Scoring the guardrails on "no worse" gives the defaults
(weights 0.7/0.2/0.1, thresholds 0.7/0.3) a plain meaning: with healthy latency and errors the score
is 0.3 + 0.7 * quality, so promotionThreshold 0.7 asks for about 3% better (and significantly better),
a candidate 5% better scores 1.0 once established, an equal one 0.3, and rollbackThreshold 0.3 rolls
back at about 4% worse with fair evidence (an always-valid p-value up to about 0.14), or sooner when it
is also slower or failing more. A regression on a guardrail costs score without blocking promotion
outright (a 10%-better model 25% slower scores 0.8), so noise in a p99 makes no cliffs. The score says
how large the difference is; the sequential test (stats.py) says whether it is real: promotion always
needs the quality test, latency and errors are not tested.

State across looks: the always-valid p-values are running minima within a step. They are read from
`status.metrics` when it belongs to the current step (`AnalysisMetrics.step`), so the caller only has
to write `Verdict.metrics` to status after each analysis; a new step starts from no evidence.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from shadowgate_operator.api import (
    Analysis,
    AnalysisMetrics,
    Decision,
    DecisionAction,
    Metric,
    ModelMetrics,
    ScoreComponents,
    ShadowDeploymentSpec,
    ShadowDeploymentStatus,
)
from shadowgate_operator.metrics import Moments, SideMetrics, WindowMetrics, metric_value
from shadowgate_operator.stats import (
    NO_EVIDENCE,
    Estimate,
    Evidence,
    paired_estimate,
    sequential_test,
    unpaired_estimate,
)

QUALITY_FULL_MARKS = 0.05
"""Relative improvement on the analysis metric that earns the quality component full marks (1.0)."""
LATENCY_ZERO_MARKS = 0.25
"""p99 slowdown (25% slower than production) at which the latency component falls to 0 (-1 at twice it)."""
ERRORS_BUDGET_FLOOR = 0.01
"""The error budget the errors component is measured against when maxErrorRate is 0."""
MIN_REQUESTS_FOR_ERROR_GATE = 20
"""The error-rate gate judges a candidate from this many requests on: one failure in the first few
requests is not a 5% error rate yet."""
MIN_REQUESTS_FOR_LATENCY_GATE = 100
"""The p99 gate judges a candidate from this many requests on: below 100 a p99 is the slowest request."""


@dataclass(frozen=True)
class Verdict:
    """What one analysis concluded: the decision and the numbers it was taken on."""

    decision: Decision
    metrics: AnalysisMetrics | None
    """For status.metrics (and a deployment_metrics row); None when there was nothing to measure. Write
    it back: the next analysis of the same step reads its p-values from there."""
    samples: int
    """Scored requests the decision counted against minSamples (for status.samples)."""
    gate: str | None = None
    """The hard gate the candidate failed, in words with its value and threshold (for a GateFailed Event),
    e.g. "Candidate error rate 12.0% (24 of 200 requests) exceeds maxErrorRate 5.0%"; None otherwise."""


def decide(
    spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, metrics: WindowMetrics | None, now: dt.datetime
) -> Decision:
    """What to do at this analysis interval, with the reason in words."""
    return analyse(spec, status, metrics, now).decision


def analyse(
    spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, metrics: WindowMetrics | None, now: dt.datetime
) -> Verdict:
    """The decision with the metrics it was taken on (see the module docstring for the rules)."""
    analysis = spec.analysis
    step = status.current_step or 0
    where = _where(spec, status)
    timed_out = _step_timed_out(analysis, status, now)

    def verdict(action: DecisionAction, reason: str, measured: AnalysisMetrics | None, samples: int) -> Verdict:
        return Verdict(Decision(action=action, reason=reason, time=now), measured, samples)

    if metrics is None:
        if timed_out:
            reason = (
                f"No analysis data after maxStepDuration {analysis.max_step_duration} at {where}: "
                "nothing was measured, so the candidate cannot be judged: failed."
            )
            return verdict(DecisionAction.FAIL, reason, None, 0)
        return verdict(DecisionAction.WAIT, f"Waiting at {where}: no analysis data yet.", None, 0)

    samples = _samples(metrics)
    gate = _hard_gate(analysis, metrics.candidate)
    ready = samples >= analysis.min_samples
    estimate = _estimate(metrics)
    previous = _previous_evidence(status)
    evidence = sequential_test(estimate, previous) if ready else previous
    tested = evidence is not NO_EVIDENCE  # a look that ran the test returns a new Evidence
    improvement = relative_improvement(analysis.metric, metrics.production.loss, metrics.candidate.loss)
    components, score = overall_score(analysis, improvement, metrics.production, metrics.candidate, evidence)
    measured = AnalysisMetrics(
        step=step,
        production=_model_metrics(analysis.metric, metrics.production),
        candidate=_model_metrics(analysis.metric, metrics.candidate),
        improvement=None if improvement is None else round(improvement, 6),
        overall_score=score,
        score_components=components,
        p_value=evidence.p_better if tested else None,
        p_value_worse=evidence.p_worse if tested else None,
        agreement=metrics.agreement,
    )

    if gate is not None:
        reason = f"{gate} at {where}: rolled back."
        return Verdict(Decision(action=DecisionAction.ROLL_BACK, reason=reason, time=now), measured, samples, gate)

    counted = "scored requests" if metrics.paired else "scored candidate requests"
    if not ready:
        if timed_out:
            reason = (
                f"Only {samples:,} of minSamples {analysis.min_samples:,} {counted} after maxStepDuration "
                f"{analysis.max_step_duration} at {where}: too few outcomes to judge the candidate "
                "(are outcomes being posted?): failed."
            )
            return verdict(DecisionAction.FAIL, reason, measured, samples)
        reason = f"Waiting for samples at {where}: {samples:,} of minSamples {analysis.min_samples:,} {counted}."
        return verdict(DecisionAction.WAIT, reason, measured, samples)

    alpha = 1.0 - analysis.confidence
    quality = _describe_quality(analysis.metric, metrics, improvement)
    over = f"over {samples:,} {counted}"

    if score <= -analysis.rollback_threshold:
        reason = (
            f"Overall score {score:.2f} <= -rollbackThreshold -{analysis.rollback_threshold:.2f} at {where} "
            f"({_describe_score(components)}); {quality}, {over}: rolled back."
        )
        return verdict(DecisionAction.ROLL_BACK, reason, measured, samples)
    if evidence.p_worse <= alpha:
        reason = (
            f"Candidate is significantly worse on {analysis.metric.value} at {where}: {quality}, "
            f"{_significance(evidence.p_worse, analysis.confidence)}, {over}; it cannot be shown better: "
            "rolled back."
        )
        return verdict(DecisionAction.ROLL_BACK, reason, measured, samples)
    better = _significance(evidence.p_better, analysis.confidence)
    if score >= analysis.promotion_threshold and evidence.p_better <= alpha:
        passed = (
            f"{where[0].upper()}{where[1:]} passed: overall score {score:.2f} >= promotionThreshold "
            f"{analysis.promotion_threshold:.2f} ({_describe_score(components)}); {quality}, {better}, {over}"
        )
        if step + 1 >= len(spec.traffic.steps):
            return verdict(DecisionAction.PROMOTE, f"{passed}: promoting the candidate.", measured, samples)
        next_weight = spec.traffic.steps[step + 1]
        reason = f"{passed}: advancing to step {step + 2} ({next_weight}% {spec.traffic.mode.value})."
        return verdict(DecisionAction.ADVANCE, reason, measured, samples)

    if score >= analysis.promotion_threshold:
        missing = (
            f"overall score {score:.2f} >= promotionThreshold {analysis.promotion_threshold:.2f} "
            "but not yet significant"
        )
    else:
        missing = f"overall score {score:.2f} below promotionThreshold {analysis.promotion_threshold:.2f}"
    if timed_out:
        reason = (
            f"Inconclusive after maxStepDuration {analysis.max_step_duration} at {where}: {missing} "
            f"({_describe_score(components)}); {quality}, {better}, {over}: rolled back."
        )
        return verdict(DecisionAction.ROLL_BACK, reason, measured, samples)
    reason = f"Collecting at {where}: {missing} ({_describe_score(components)}); {quality}, {better}, {over}."
    return verdict(DecisionAction.WAIT, reason, measured, samples)


# --- the parts ---------------------------------------------------------------------------------------


def relative_improvement(metric: Metric, production: Moments, candidate: Moments) -> float | None:
    """(production - candidate) / production on the metric as people read it (RMSE: the root of the
    mean squared error; accuracy: the error rate). None when either side has no scored requests, or
    when production is perfect and the candidate is not (no finite ratio)."""
    if production.mean is None or candidate.mean is None:
        return None
    value_production, value_candidate = _loss_scale(metric, production.mean), _loss_scale(metric, candidate.mean)
    if value_production <= 0.0:
        return 0.0 if value_candidate <= 0.0 else None
    return (value_production - value_candidate) / value_production


def overall_score(
    analysis: Analysis,
    improvement: float | None,
    production: SideMetrics,
    candidate: SideMetrics,
    evidence: Evidence = NO_EVIDENCE,
) -> tuple[ScoreComponents, float]:
    """The score components and their weighted sum, rounded to two decimals (the value compared with
    the thresholds is the one shown)."""
    if improvement is not None:
        quality = _clip(improvement / QUALITY_FULL_MARKS)
    else:  # production perfect and the candidate not, or nothing scored on a side yet
        quality = -1.0 if production.loss.mean is not None and candidate.loss.mean is not None else 0.0
    quality *= 1.0 - (evidence.p_better if quality > 0 else evidence.p_worse)
    latency = 1.0
    if production.latency_p99_ms and candidate.latency_p99_ms is not None:
        slowdown = max(0.0, candidate.latency_p99_ms / production.latency_p99_ms - 1.0)
        latency = _clip(1.0 - slowdown / LATENCY_ZERO_MARKS)
    errors = 1.0
    if production.error_rate is not None and candidate.error_rate is not None:
        budget = max(analysis.max_error_rate, ERRORS_BUDGET_FLOOR)
        excess = max(0.0, candidate.error_rate - production.error_rate)
        errors = _clip(1.0 - 2.0 * excess / budget)
    # + 0.0 turns a -0.0 (a negative estimate with no evidence) into 0.0 for people reading status.
    components = ScoreComponents(
        quality=round(quality, 3) + 0.0, latency=round(latency, 3) + 0.0, errors=round(errors, 3) + 0.0
    )
    w_quality, w_latency, w_errors = analysis.weights.normalized()
    score = round(w_quality * quality + w_latency * latency + w_errors * errors, 2) + 0.0
    return components, _clip(score)


def _loss_scale(metric: Metric, mean_loss: float) -> float:
    # rmse's per-request loss is the squared error: the metric is its root.
    return math.sqrt(max(mean_loss, 0.0)) if metric is Metric.RMSE else mean_loss


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value))


def _samples(metrics: WindowMetrics) -> int:
    if metrics.paired:
        return metrics.scored
    return min(metrics.production.loss.n, metrics.candidate.loss.n)


def _estimate(metrics: WindowMetrics) -> Estimate | None:
    production, candidate = metrics.production.loss, metrics.candidate.loss
    if metrics.paired:
        return paired_estimate(metrics.loss_difference, production, candidate)
    return unpaired_estimate(production, candidate)


def _previous_evidence(status: ShadowDeploymentStatus) -> Evidence:
    """The running p-values of this step's earlier analyses, if status holds them."""
    previous = status.metrics
    if previous is None or previous.step != (status.current_step or 0) or previous.p_value is None:
        return NO_EVIDENCE
    return Evidence(
        p_better=previous.p_value, p_worse=1.0 if previous.p_value_worse is None else previous.p_value_worse
    )


def _hard_gate(analysis: Analysis, candidate: SideMetrics) -> str | None:
    """Why the candidate fails a hard gate, or None."""
    rate = candidate.error_rate
    if candidate.requests >= MIN_REQUESTS_FOR_ERROR_GATE and rate is not None and rate > analysis.max_error_rate:
        return (
            f"Candidate error rate {rate:.1%} ({candidate.errors:,} of {candidate.requests:,} requests) "
            f"exceeds maxErrorRate {analysis.max_error_rate:.1%}"
        )
    limit, p99 = analysis.max_latency_p99_ms, candidate.latency_p99_ms
    if limit is not None and p99 is not None and candidate.requests >= MIN_REQUESTS_FOR_LATENCY_GATE and p99 > limit:
        return (
            f"Candidate p99 latency {p99:,.0f} ms (over {candidate.requests:,} requests) "
            f"exceeds maxLatencyP99Ms {limit:,.0f} ms"
        )
    return None


def _step_timed_out(analysis: Analysis, status: ShadowDeploymentStatus, now: dt.datetime) -> bool:
    limit = analysis.max_step_seconds
    started = status.step_started_at
    return limit is not None and started is not None and (now - started).total_seconds() >= limit


def _where(spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus) -> str:
    steps = spec.traffic.steps
    step = min(status.current_step or 0, len(steps) - 1)
    weight = status.current_weight if status.current_weight is not None else steps[step]
    return f"step {step + 1} of {len(steps)} ({weight}% {spec.traffic.mode.value})"


def _metric_value(metric: Metric, side: SideMetrics) -> float | None:
    # As measured (queries fill it in), else from the losses by the same definition.
    return side.metric_value if side.metric_value is not None else metric_value(metric, side.loss)


def _model_metrics(metric: Metric, side: SideMetrics) -> ModelMetrics:
    def finite(value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None

    return ModelMetrics(
        metric_value=finite(_metric_value(metric, side)),
        error_rate=side.error_rate,
        latency_p50_ms=finite(side.latency_p50_ms),
        latency_p99_ms=finite(side.latency_p99_ms),
    )


def _describe_quality(metric: Metric, metrics: WindowMetrics, improvement: float | None) -> str:
    production = _metric_value(metric, metrics.production)
    candidate = _metric_value(metric, metrics.candidate)
    values = f"{metric.value} {_number(production)} (production) vs {_number(candidate)} (candidate)"
    if improvement is None:
        return f"{values}, no relative change (production's loss is 0)"
    if improvement == 0.0:
        return f"{values}, no change"
    side = "better" if improvement > 0 else "worse"
    return f"{values}, {abs(improvement):.1%} {side}"


def _describe_score(components: ScoreComponents) -> str:
    return f"quality {components.quality:+.2f}, latency {components.latency:+.2f}, errors {components.errors:+.2f}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _significance(p_value: float, confidence: float) -> str:
    alpha = 1.0 - confidence
    compared = "<=" if p_value <= alpha else ">"
    return f"always-valid p-value {p_value:.2g} {compared} {alpha:.4g} (confidence {confidence:.4g})"
