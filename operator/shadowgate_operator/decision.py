"""The promotion / rollback decision: a pure function of spec, status, the windows' metrics and the time.

`analyse()` returns a `Verdict`: the `Decision` (action and a reason in words that names each number and
the threshold it was compared with), the `AnalysisMetrics` to write to status (and to a
`deployment_metrics` row), the tests' running state (`EvidenceState`, for status.evidence), and the sample
count the decision went by. `decide()` is the same, decision only.

Two windows (metrics.py): quality is judged over the *evidence window* (`evidence_since`: since the
analysis began in shadow mode, where every step asks the same paired question; since the step began in
canary mode), the hard gates and guardrails over the current step.

The rules, in order (the first that applies wins):

1. No metrics (nothing measured yet): Wait; after maxStepDuration, Fail (nothing to judge).
2. Hard gates, at any sample size: the candidate's error rate shown above maxErrorRate, or more than 1%
   of its requests shown slower than maxLatencyP99Ms (its p99 above the limit), each by an always-valid
   rate test at gateConfidence (stats.py) -> RollBack. A candidate within its gates trips one at most
   1 - gateConfidence of the time, however often it is looked at.
3. Fewer than minSamples counted samples in the evidence window -> Wait, saying how many of how many;
   after maxStepDuration, Fail: the candidate could not be judged (are outcomes arriving?). Shadow mode
   counts scored pairs; canary mode the candidate's own scored requests (the smaller side).
4. The candidate shown worse on quality at rollbackConfidence (always-valid p-value <= 1 -
   rollbackConfidence) -> RollBack: an identical candidate is rolled back at most that often.
5. overall score <= -rollbackThreshold -> RollBack. Every part of the score counts only as far as it is
   established (below), so this needs established regressions: a noisy estimate cannot roll back.
6. overall score >= promotionThreshold AND the candidate significantly better on quality (always-valid
   p-value <= 1 - confidence) AND it answered at least `MIN_STEP_REQUESTS` requests in this step (each
   step's gates saw it at that share) AND its measured error rate and p99 within the hard gates (over
   them but not yet shown: held, never moved on) AND, with segmentBy, every judged segment shown within
   segmentTolerance (`_segments`: those with minSamples, and those with `SEGMENT_SHARE` of the samples)
   -> Advance to the next step, or Promote after the last one.
7. maxStepDuration exceeded -> RollBack, inconclusive: the candidate was not shown better in time.
8. Otherwise Wait, saying which condition is missing.

Which quality test (stats.py): with a sticky key, the normal mixture with a variance clustered by key (at
least `stats.MIN_KEYS` keys a side); otherwise, for a bounded loss (`loss_bound`), the betting test, exact
at every sample size; otherwise the normal mixture (asymptotic; the assumption is stated in the README).
The normal mixture counts evidence in the direction a skewed estimate would overstate (better or worse,
by the sign of its skewness: `stats.Estimate.skewness`) only once the skewness is small; the other
direction counts from the floor (`MIN_OBSERVATIONS` units, `MIN_KEYS` keys). Either direction reads z
corrected for that skewness (`stats.skew_corrected`); rollback weighs regressions from 5% of the loss
(`stats.SMALLEST_REGRESSION`).

The score. The overall score is the weighted sum of three components, each in [-1, 1], with
`analysis.weights` normalised (so the score is in [-1, 1] too). Quality is what a new model is for, so
it is scored on improvement; latency and errors are guardrails, scored on not getting worse:

- quality = improvement / 5%, clipped, times the evidence for it: 0 for no difference, 1 for 5% better
  or more, -1 for 5% worse. improvement = (production - candidate) / production on the metric as users
  know it (MAE, RMSE, log loss), and on the error rate (1 - accuracy) for the accuracies. An improvement
  counts as far as the test supports it (times 1 - its p-value); a regression counts only once it is
  shown at rollbackConfidence (until then, 0): rolling back is for established regressions.
- latency = 1 - slowdown / 25%, clipped, with slowdown the p99 slowdown that is established and felt:
  (the candidate's p99 lower confidence bound - production's upper bound - latencyToleranceMs) /
  production's upper bound, at least 0, bounds at gateConfidence. 1 when no slowdown beyond the
  tolerance is shown, 0 at 25% slower, -1 at 50% slower or more.
- errors = 1 - 2 * excess / maxErrorRate, clipped, with excess the established excess of the
  candidate's error rate over production's (lower bound minus upper bound, at gateConfidence): 1 when it
  is not shown to fail more often, 0 at half the error budget more, -1 at the budget.
  A component that cannot be measured (no latency recorded) counts as no regression (1).

Why this scale: with healthy latency and errors the score is 0.3 + 0.7 * quality, so
promotionThreshold 0.7 asks for about 3% better (and significantly better), a candidate 5% better
scores 1.0 once established, an equal one 0.3. The score says how large the difference is; the
sequential test says whether it is real: promotion always needs the quality test.

State across looks: the p-values are running minima over the evidence window (status.evidence, carried
while `EvidenceState.since` is the current window's start), so the caller only has to write
`Verdict.metrics` and `Verdict.evidence` to status after each analysis.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from shadowgate_operator.api import (
    Analysis,
    AnalysisMetrics,
    CanaryBets,
    Decision,
    DecisionAction,
    EvidenceState,
    Metric,
    ModelMetrics,
    QualityTest,
    ScoreComponents,
    SegmentResult,
    ShadowDeploymentSpec,
    ShadowDeploymentStatus,
    TrafficMode,
)
from shadowgate_operator.metrics import Moments, SegmentMetrics, SideMetrics, WindowMetrics, metric_value
from shadowgate_operator.stats import (
    MIN_KEYS,
    MIN_OBSERVATIONS,
    NO_EVIDENCE,
    Estimate,
    Evidence,
    PowerSums,
    TwoArmBets,
    bounded_paired_evidence,
    normal_evidence,
    paired_estimate,
    quantile_bounds,
    rate_bounds,
    rate_log_evidence,
    unpaired_estimate,
)

QUALITY_FULL_MARKS = 0.05
"""Relative improvement on the analysis metric that earns the quality component full marks (1.0)."""
LATENCY_ZERO_MARKS = 0.25
"""p99 slowdown (25% slower than production) at which the latency component falls to 0 (-1 at twice it)."""
ERRORS_BUDGET_FLOOR = 0.01
"""The error budget the errors component is measured against when maxErrorRate is 0."""
MIN_STEP_REQUESTS = 100
"""A step passes only once the candidate has answered this many requests in it: each step's gates and
guardrails see it at that step's share (a p99 of fewer requests is just the slowest one)."""
SEGMENTS_JUDGED = 10
"""The largest segments (with at least minSamples) that can hold promotion back; status shows as many."""
SEGMENT_SHARE = 0.1
"""A segment with at least this share of the window's samples is judged even below minSamples: a step
cannot pass on the other segments' data while a tenth of the traffic is too new to be shown within
tolerance (a candidate worse on a fifth of the traffic would otherwise pass at minSamples overall, before
that fifth has minSamples of its own). Smaller segments are judged once they reach minSamples."""
LOG_LOSS_CLIP = -math.log(1e-15)
"""The SQL clips probabilities at 1e-15, so a request's log loss is at most 34.54 whatever lossCap says."""
LOG_LOSS_CAP = -math.log(1e-4)
"""logLoss's cap unless lossCap says otherwise: 9.21, a probability clipped at 1e-4. A model 99.99% sure
and wrong costs the same as one 99.9999% sure; in exchange the loss is bounded tightly enough for the
exact test to decide in a few hundred requests (bench/decision: at the 1e-15 clip it takes several times
as many)."""
P99 = 0.99


@dataclass(frozen=True)
class Verdict:
    """What one analysis concluded: the decision and the numbers it was taken on."""

    decision: Decision
    metrics: AnalysisMetrics | None
    """For status.metrics (and a deployment_metrics row); None when there was nothing to measure."""
    samples: int
    """Counted samples the decision went by against minSamples (for status.samples)."""
    gate: str | None = None
    """The hard gate the candidate failed, in words with its value and threshold (for a GateFailed Event),
    e.g. "Candidate error rate 12.0% (24 of 200 requests) is above maxErrorRate 5.0%"; None otherwise."""
    evidence: EvidenceState | None = None
    """For status.evidence: the tests' running state. Write it back: the next analysis goes on from it."""


def decide(
    spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, metrics: WindowMetrics | None, now: dt.datetime
) -> Decision:
    """What to do at this analysis interval, with the reason in words."""
    return analyse(spec, status, metrics, now).decision


def evidence_since(spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus) -> dt.datetime | None:
    """Where the evidence window starts: the analysis's start in shadow mode (evidence carries across
    steps), the step's start in canary mode (each step is a new split of the traffic)."""
    if spec.traffic.mode is TrafficMode.SHADOW:
        return status.analysis_started_at or status.step_started_at
    return status.step_started_at or status.analysis_started_at


def loss_bound(analysis: Analysis) -> float | None:
    """The largest per-request loss (the cap the SQL applies), or None for an unbounded loss."""
    if analysis.metric in (Metric.ACCURACY, Metric.DIRECTIONAL_ACCURACY):
        return 1.0
    if analysis.metric is Metric.LOG_LOSS:
        return min(analysis.loss_cap or LOG_LOSS_CAP, LOG_LOSS_CLIP)
    return analysis.loss_cap


def analyse(
    spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, metrics: WindowMetrics | None, now: dt.datetime
) -> Verdict:
    """The decision with the metrics it was taken on (see the module docstring for the rules)."""
    analysis = spec.analysis
    step = status.current_step or 0
    where = _where(spec, status)
    timed_out = _step_timed_out(analysis, status, now)

    if metrics is None:
        if timed_out:
            reason = (
                f"No analysis data after maxStepDuration {analysis.max_step_duration} at {where}: "
                "nothing was measured, so the candidate cannot be judged: failed."
            )
            return _verdict(DecisionAction.FAIL, reason, now, None, 0, status.evidence)
        reason = f"Waiting at {where}: no analysis data yet."
        return _verdict(DecisionAction.WAIT, reason, now, None, 0, status.evidence)

    samples = _samples(metrics)
    ready = samples >= analysis.min_samples
    quality = _quality(spec, status, metrics, ready)
    segments = _segments(spec, metrics, quality)
    evidence = quality.evidence
    improvement = relative_improvement(analysis.metric, metrics.production.loss, metrics.candidate.loss)
    components, score = overall_score(analysis, improvement, metrics.production, metrics.candidate, evidence)
    measured = AnalysisMetrics(
        step=step,
        production=_model_metrics(analysis.metric, metrics.production),
        candidate=_model_metrics(analysis.metric, metrics.candidate),
        improvement=None if improvement is None else round(improvement, 6),
        overall_score=score,
        score_components=components,
        p_value=evidence.p_better if quality.tested else None,
        p_value_worse=evidence.p_worse if quality.tested else None,
        agreement=metrics.agreement,
        test=quality.test,
        units=quality.units,
        quarantined=metrics.quarantined or None,
        unscored_repeats=metrics.unscored_repeats or None,
        segments=segments,
    )
    state = quality.state

    def verdict(action: DecisionAction, reason: str, gate: str | None = None) -> Verdict:
        return _verdict(action, reason, now, measured, samples, state, gate)

    gate = _hard_gate(analysis, metrics.candidate)
    if gate is not None:
        return verdict(DecisionAction.ROLL_BACK, f"{gate} at {where}: rolled back.", gate)

    counted = "scored requests" if metrics.paired else "scored candidate requests"
    if not ready:
        if timed_out:
            reason = (
                f"Only {samples:,} of minSamples {analysis.min_samples:,} {counted} after maxStepDuration "
                f"{analysis.max_step_duration} at {where}: too few outcomes to judge the candidate "
                "(are outcomes being posted?): failed."
            )
            return verdict(DecisionAction.FAIL, reason)
        reason = f"Waiting for samples at {where}: {samples:,} of minSamples {analysis.min_samples:,} {counted}."
        return verdict(DecisionAction.WAIT, reason)

    alpha = 1.0 - analysis.confidence
    described = _describe_quality(analysis.metric, metrics, improvement)
    over = f"over {samples:,} {counted}{quality.units_text}"

    if evidence.p_worse <= 1.0 - analysis.rollback_confidence:
        reason = (
            f"Candidate is significantly worse on {analysis.metric.value} at {where}: {described}, "
            f"{_significance(evidence.p_worse, analysis.rollback_confidence, 'rollbackConfidence')}, {over}: "
            "rolled back."
        )
        return verdict(DecisionAction.ROLL_BACK, reason)
    if score <= -analysis.rollback_threshold:
        reason = (
            f"Overall score {score:.2f} <= -rollbackThreshold -{analysis.rollback_threshold:.2f} at {where} "
            f"({_describe_score(components)}); {described}, {over}: rolled back."
        )
        return verdict(DecisionAction.ROLL_BACK, reason)
    better = _significance(evidence.p_better, analysis.confidence, "confidence")
    step_requests = metrics.candidate.requests
    holding = [segment for segment in segments if segment.judged and not segment.within_tolerance]
    over_gate = _over_gate(analysis, metrics.candidate)
    if (
        score >= analysis.promotion_threshold
        and evidence.p_better <= alpha
        and step_requests >= MIN_STEP_REQUESTS
        and not holding
        and over_gate is None
    ):
        passed = (
            f"{where[0].upper()}{where[1:]} passed: overall score {score:.2f} >= promotionThreshold "
            f"{analysis.promotion_threshold:.2f} ({_describe_score(components)}); {described}, {better}, {over}"
        )
        if step + 1 >= len(spec.traffic.steps):
            return verdict(DecisionAction.PROMOTE, f"{passed}: promoting the candidate.")
        next_weight = spec.traffic.steps[step + 1]
        reason = f"{passed}: advancing to step {step + 2} ({next_weight}% {spec.traffic.mode.value})."
        return verdict(DecisionAction.ADVANCE, reason)

    if score < analysis.promotion_threshold:
        missing = f"overall score {score:.2f} below promotionThreshold {analysis.promotion_threshold:.2f}"
    elif evidence.p_better > alpha:
        missing = (
            f"overall score {score:.2f} >= promotionThreshold {analysis.promotion_threshold:.2f} "
            "but not yet significant"
        )
    elif holding:
        missing = "significantly better, but " + "; ".join(
            f"segment {segment.name!r} ({segment.samples:,} samples, {_percent(segment.improvement)}) is not yet "
            f"shown within segmentTolerance {analysis.segment_tolerance:.0%} of production"
            for segment in holding[:3]
        )
    elif over_gate is not None:
        missing = f"significantly better, but {over_gate} (not yet shown at gateConfidence: rolled back once it is)"
    else:
        missing = (
            f"significantly better, but the candidate has answered {step_requests:,} of the "
            f"{MIN_STEP_REQUESTS} requests a step needs"
        )
    if quality.waiting_for:
        missing = f"{missing} ({quality.waiting_for})"
    if timed_out:
        reason = (
            f"Inconclusive after maxStepDuration {analysis.max_step_duration} at {where}: {missing} "
            f"({_describe_score(components)}); {described}, {better}, {over}: rolled back."
        )
        return verdict(DecisionAction.ROLL_BACK, reason)
    reason = f"Collecting at {where}: {missing} ({_describe_score(components)}); {described}, {better}, {over}."
    return verdict(DecisionAction.WAIT, reason)


def _verdict(
    action: DecisionAction,
    reason: str,
    now: dt.datetime,
    measured: AnalysisMetrics | None,
    samples: int,
    state: EvidenceState | None,
    gate: str | None = None,
) -> Verdict:
    return Verdict(Decision(action=action, reason=reason, time=now), measured, samples, gate, state)


# --- quality ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Quality:
    evidence: Evidence
    """Running minima, this look included when it ran the test."""
    tested: bool
    test: QualityTest
    units: int
    state: EvidenceState | None
    waiting_for: str | None = None
    """Why the test, or one direction of it, does not count yet, in words (too few keys; a skewed
    estimate), or None."""
    unit_name: str = ""

    @property
    def units_text(self) -> str:
        return f" from {self.units:,} {self.unit_name}" if self.unit_name else ""


def _quality(
    spec: ShadowDeploymentSpec, status: ShadowDeploymentStatus, metrics: WindowMetrics, ready: bool
) -> _Quality:
    """The quality test for this look, with the running state carried from earlier looks at the window."""
    since = evidence_since(spec, status)
    carried = status.evidence if status.evidence is not None and status.evidence.since == since else None
    previous = Evidence(carried.p_better, carried.p_worse) if carried is not None else NO_EVIDENCE
    production, candidate = metrics.production.loss, metrics.candidate.loss
    bound = loss_bound(spec.analysis)
    bets: TwoArmBets | None = None
    waiting_for = None
    unit_name = ""
    if metrics.clusters is not None:
        test = QualityTest.CLUSTERED_NORMAL_MIXTURE
        if metrics.paired:
            estimate = paired_estimate(metrics.loss_difference, production, candidate, metrics.clusters[0])
            keys = metrics.clusters[0].keys
        else:
            estimate = unpaired_estimate(production, candidate, metrics.clusters)
            keys = min(metrics.clusters[0].keys, metrics.clusters[1].keys)
        this = normal_evidence(estimate, minimum=MIN_KEYS)
        units, unit_name = keys, f"{spec.traffic.sticky_header or 'sticky'} keys"
        if keys < MIN_KEYS:
            side = "with pairs" if metrics.paired else "on the smaller side"
            waiting_for = f"{keys:,} keys {side}: the test needs {MIN_KEYS} for a variance clustered by key"
        else:
            waiting_for = _skew_wait(estimate, "keys")
    elif bound is not None:
        test = QualityTest.BETTING
        if metrics.paired:
            this = bounded_paired_evidence(metrics.loss_difference, bound)
            units = metrics.loss_difference.n
        else:
            share = (status.current_weight if status.current_weight is not None else spec.traffic.steps[0]) / 100
            bets = _bets_of(carried).look(production, candidate, share, bound)
            this = bets.evidence
            units = min(production.n, candidate.n)
    else:
        test = QualityTest.NORMAL_MIXTURE
        if metrics.paired:
            estimate = paired_estimate(metrics.loss_difference, production, candidate)
        else:
            estimate = unpaired_estimate(production, candidate)
        units = metrics.loss_difference.n if metrics.paired else min(production.n, candidate.n)
        this = normal_evidence(estimate)
        if units >= MIN_OBSERVATIONS:
            waiting_for = _skew_wait(estimate, "scored pairs" if metrics.paired else "scored requests a side")
    evidence = previous & this if ready else previous
    state = None
    if since is not None:
        state = EvidenceState(since=since, p_better=evidence.p_better, p_worse=evidence.p_worse, bets=_bets_state(bets))
    # p-values are shown once a look had minSamples, this one or an earlier one whose evidence is carried; a
    # state carried from looks with too few samples holds none (1, 1): showing it would only rewrite status.
    tested = ready or (carried is not None and min(carried.p_better, carried.p_worse) < 1.0)
    return _Quality(evidence, tested, test, units, state, waiting_for, unit_name)


def _skew_wait(estimate: Estimate | None, units: str) -> str | None:
    """Which direction of the normal test waits for the estimate's skewness (`stats.Estimate.skewness`),
    in words, or None."""
    if estimate is None:
        return None
    waiting = []
    if estimate.better_waits:
        waiting.append(("a worse candidate", "better", estimate.toward_worse))
    if estimate.worse_waits:
        waiting.append(("a better candidate", "worse", estimate.toward_better))
    if not waiting:
        return None
    parts = [
        f"the estimate is skewed toward {toward} (skewness {skew:+.2f}), which would overstate evidence that it "
        f"is {direction}: that evidence counts from about {estimate.units_needed(skew):,} {units}"
        for toward, direction, skew in waiting
    ]
    if len(waiting) == 1:
        parts.append(f"evidence that it is {'worse' if waiting[0][1] == 'better' else 'better'} counts already")
    return "; ".join(parts) + f" ({estimate.observations:,} {units} now)"


def _bets_of(state: EvidenceState | None) -> TwoArmBets:
    bets = state.bets if state is not None else None
    if bets is None:
        return TwoArmBets()

    def moments(values: list[float]) -> Moments:
        return Moments(int(values[0]), *values[1:5]) if len(values) == 5 else Moments()

    def sums(values: list[float]) -> PowerSums:
        return PowerSums(int(values[0]), *values[1:5]) if len(values) == 5 else PowerSums()

    production, candidate = moments(bets.production), moments(bets.candidate)
    return TwoArmBets(production, candidate, bets.centre, sums(bets.better), sums(bets.worse))


def _bets_state(bets: TwoArmBets | None) -> CanaryBets | None:
    if bets is None:
        return None

    def listed(values: Moments | PowerSums) -> list[float]:
        if isinstance(values, Moments):
            return [
                float(values.n), values.total, values.total_squares, values.total_cubes, values.total_fourths
            ]  # fmt: skip
        return [float(values.n), values.s1, values.s2, values.s3, values.s4]

    return CanaryBets(
        production=listed(bets.production),
        candidate=listed(bets.candidate),
        centre=bets.centre,
        better=listed(bets.better),
        worse=listed(bets.worse),
    )


# --- segments -----------------------------------------------------------------------------------------


def _segments(spec: ShadowDeploymentSpec, metrics: WindowMetrics, quality: _Quality) -> list[SegmentResult]:
    """The largest segments; those with minSamples are judged: the candidate must be shown, at confidence,
    no more than segmentTolerance worse in each (relative to production's mean loss there). All of them
    must pass, so no multiplicity correction is needed for the false-promotion rate (intersection-union):
    each test alone keeps it at 1 - confidence. The test is the normal mixture on the segment's estimate,
    this look only; with a sticky key its variance is scaled by the overall clustering's design effect.
    A segment with `SEGMENT_SHARE` of the samples is judged below minSamples too (and holds promotion until
    it has the data to be shown within tolerance)."""
    analysis = spec.analysis
    if analysis.segment_by is None or not metrics.segments:
        return []
    alpha = 1.0 - analysis.confidence
    inflation = _design_effect(metrics)
    total = sum(segment.samples for segment in metrics.segments)
    results = []
    for index, segment in enumerate(metrics.segments[:SEGMENTS_JUDGED]):
        improvement = relative_improvement(analysis.metric, segment.production, segment.candidate)
        large = total > 0 and segment.samples >= SEGMENT_SHARE * total
        judged = (segment.samples >= analysis.min_samples or large) and index < SEGMENTS_JUDGED
        within = p = None
        if judged:
            estimate = _segment_estimate(segment, metrics.paired)
            margin = analysis.segment_tolerance * abs(segment.production.mean or 0.0)
            if estimate is not None:  # no skewness: a segment's sums stop at the squares
                estimate = Estimate(
                    estimate.difference, estimate.variance * inflation, estimate.typical_loss, estimate.observations
                )
                p = normal_evidence(estimate.shifted(margin), minimum=MIN_OBSERVATIONS).p_better
                within = p <= alpha
            else:
                within = False
        results.append(
            SegmentResult(
                name=segment.name[:128],
                samples=segment.samples,
                improvement=None if improvement is None else round(improvement, 6),
                judged=judged,
                within_tolerance=within,
                p_value=p,
            )
        )
    return results


def _segment_estimate(segment: SegmentMetrics, paired: bool) -> Estimate | None:
    if paired:
        return paired_estimate(segment.difference, segment.production, segment.candidate)
    return unpaired_estimate(segment.production, segment.candidate)


def _design_effect(metrics: WindowMetrics) -> float:
    """How much the clustered variance exceeds the plain one overall (at least 1): segments' variances
    are scaled by it when a sticky key groups requests."""
    if metrics.clusters is None:
        return 1.0
    production, candidate = metrics.production.loss, metrics.candidate.loss
    if metrics.paired:
        clustered = paired_estimate(metrics.loss_difference, production, candidate, metrics.clusters[0])
        plain = paired_estimate(metrics.loss_difference, production, candidate)
    else:
        clustered = unpaired_estimate(production, candidate, metrics.clusters)
        plain = unpaired_estimate(production, candidate)
    if clustered is None or plain is None or plain.variance <= 0.0:
        return 1.0
    return max(1.0, clustered.variance / plain.variance)


def _percent(improvement: float | None) -> str:
    if improvement is None:
        return "no estimate"
    return f"{abs(improvement):.1%} {'better' if improvement >= 0 else 'worse'}"


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
    if quality > 0:
        quality *= 1.0 - evidence.p_better
    elif evidence.p_worse > 1.0 - analysis.rollback_confidence:
        quality = 0.0  # a regression counts once it is established
    latency = _latency_component(analysis, production, candidate)
    errors = _errors_component(analysis, production, candidate)
    # + 0.0 turns a -0.0 (a negative estimate with no evidence) into 0.0 for people reading status.
    components = ScoreComponents(
        quality=round(quality, 3) + 0.0, latency=round(latency, 3) + 0.0, errors=round(errors, 3) + 0.0
    )
    w_quality, w_latency, w_errors = analysis.weights.normalized()
    score = round(w_quality * quality + w_latency * latency + w_errors * errors, 2) + 0.0
    return components, _clip(score)


def _latency_component(analysis: Analysis, production: SideMetrics, candidate: SideMetrics) -> float:
    """1 - established p99 slowdown beyond the tolerance / 25%, clipped."""
    alpha = 1.0 - analysis.gate_confidence
    measured_c, measured_p = candidate.latency_p99_ms, production.latency_p99_ms
    if measured_c is not None and measured_p is not None and measured_c - measured_p <= analysis.latency_tolerance_ms:
        return 1.0  # no slowdown beyond the tolerance even as measured: none can be established
    if production.latency is not None and candidate.latency is not None:
        slow = quantile_bounds(candidate.latency, P99, alpha)[0]
        fast = quantile_bounds(production.latency, P99, alpha)[1]
    else:  # only the percentiles: as measured
        slow, fast = candidate.latency_p99_ms, production.latency_p99_ms
    if slow is None or not fast:
        return 1.0
    slowdown = max(0.0, slow - fast - analysis.latency_tolerance_ms) / fast
    return _clip(1.0 - slowdown / LATENCY_ZERO_MARKS)


def _errors_component(analysis: Analysis, production: SideMetrics, candidate: SideMetrics) -> float:
    """1 - 2 * established excess of the candidate's error rate over production's / maxErrorRate, clipped."""
    if not production.requests or not candidate.errors:
        return 1.0
    alpha = 1.0 - analysis.gate_confidence
    candidate_low = rate_bounds(candidate.errors, candidate.requests, alpha)[0]
    production_high = rate_bounds(production.errors, production.requests, alpha)[1]
    excess = max(0.0, candidate_low - production_high)
    budget = max(analysis.max_error_rate, ERRORS_BUDGET_FLOOR)
    return _clip(1.0 - 2.0 * excess / budget)


def _loss_scale(metric: Metric, mean_loss: float) -> float:
    # rmse's per-request loss is the squared error: the metric is its root.
    return math.sqrt(max(mean_loss, 0.0)) if metric is Metric.RMSE else mean_loss


def _clip(value: float) -> float:
    return max(-1.0, min(1.0, value))


def _samples(metrics: WindowMetrics) -> int:
    if metrics.paired:
        return metrics.scored
    return min(metrics.production.loss.n, metrics.candidate.loss.n)


def _hard_gate(analysis: Analysis, candidate: SideMetrics) -> str | None:
    """Why the candidate fails a hard gate (shown at gateConfidence), or None."""
    alpha = 1.0 - analysis.gate_confidence
    level = math.log(1.0 / alpha)
    rate = candidate.error_rate
    if rate is not None and rate_log_evidence(candidate.errors, candidate.requests, analysis.max_error_rate) >= level:
        return (
            f"Candidate error rate {rate:.1%} ({candidate.errors:,} of {candidate.requests:,} requests) "
            f"is above maxErrorRate {analysis.max_error_rate:.1%} "
            f"(shown at gateConfidence {analysis.gate_confidence:g})"
        )
    limit, sketch = analysis.max_latency_p99_ms, candidate.latency
    if limit is not None and sketch is not None and sketch.count:
        slower, total = sketch.above(limit), sketch.count
        if rate_log_evidence(slower, total, 1.0 - P99) >= level:
            p99 = candidate.latency_p99_ms
            shown = f"{p99:,.0f} ms" if p99 is not None else "unknown"
            return (
                f"Candidate p99 latency {shown} is above maxLatencyP99Ms {limit:,.0f} ms: {slower:,} of "
                f"{total:,} requests ({slower / total:.1%}) slower than {limit:,.0f} ms, more than 1% "
                f"(shown at gateConfidence {analysis.gate_confidence:g})"
            )
    return None


def _over_gate(analysis: Analysis, candidate: SideMetrics) -> str | None:
    """Why the candidate's measured error rate or p99 is over a hard gate, or None. Not a rollback (that
    needs the excess shown, `_hard_gate`), but no step passes while it holds: a candidate is never moved
    on with an estimate over its budget."""
    rate = candidate.error_rate
    if rate is not None and rate > analysis.max_error_rate:
        return f"its error rate {rate:.1%} is over maxErrorRate {analysis.max_error_rate:.1%}"
    limit, sketch = analysis.max_latency_p99_ms, candidate.latency
    if limit is not None and sketch is not None and sketch.count and sketch.above(limit) > (1.0 - P99) * sketch.count:
        return f"more than 1% of its requests are slower than maxLatencyP99Ms {limit:,.0f} ms"
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


def _significance(p_value: float, confidence: float, name: str) -> str:
    alpha = 1.0 - confidence
    compared = "<=" if p_value <= alpha else ">"
    return f"always-valid p-value {p_value:.2g} {compared} {alpha:.4g} ({name} {confidence:.4g})"
