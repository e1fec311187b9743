"""The decision, table by table: each rule with the numbers on either side of its threshold, in both
modes, with the original service's defaults and the example's settings."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shadowgate_operator.api import (
    AnalysisMetrics,
    DecisionAction,
    EvidenceState,
    Metric,
    Phase,
    QualityTest,
    ShadowDeploymentSpec,
    ShadowDeploymentStatus,
)
from shadowgate_operator.decision import (
    Verdict,
    analyse,
    decide,
    evidence_since,
    overall_score,
    relative_improvement,
)
from shadowgate_operator.metrics import LatencySketch, Moments, SegmentMetrics, SideMetrics, WindowMetrics
from shadowgate_operator.stats import NO_EVIDENCE, Evidence
from tests.admission_cases import load_example, merge_patch

T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
LATER = T0 + timedelta(minutes=10)
WAIT, ADVANCE, PROMOTE = DecisionAction.WAIT, DecisionAction.ADVANCE, DecisionAction.PROMOTE
ROLL_BACK, FAIL = DecisionAction.ROLL_BACK, DecisionAction.FAIL


def spec(analysis: dict[str, Any] | None = None, traffic: dict[str, Any] | None = None) -> ShadowDeploymentSpec:
    """The example (steps 5/10/20, shadow) with the original defaults for the analysis unless given."""
    document = merge_patch(load_example()["spec"], {"traffic": traffic or {}})
    document["analysis"] = analysis or {}
    return ShadowDeploymentSpec.model_validate(document)


def status(
    step: int = 0, metrics: AnalysisMetrics | None = None, evidence: EvidenceState | None = None
) -> ShadowDeploymentStatus:
    weight = [5, 10, 20][step]
    return ShadowDeploymentStatus(
        phase=Phase.PROGRESSING, current_step=step, current_weight=weight, step_started_at=T0, metrics=metrics,
        evidence=evidence,
    )  # fmt: skip


def losses(n: int, mean: float, sd: float) -> Moments:
    """n values with exactly this mean and sample standard deviation, spread like a normal sample (no
    skewness, kurtosis 3) as far as the higher power sums go."""
    variance = (n - 1) * sd * sd / n if n else 0.0
    return Moments(
        n,
        n * mean,
        n * (variance + mean * mean),
        n * (mean**3 + 3 * mean * variance),
        n * (mean**4 + 6 * mean * mean * variance + 3 * variance * variance),
    )


def side(
    mean: float | None = 1.0, n: int = 0, *, requests: int = 1000, errors: int = 0, p99: float | None = 100.0
) -> SideMetrics:
    return SideMetrics(
        requests=requests,
        errors=errors,
        latency_p50_ms=None if p99 is None else p99 / 4,
        latency_p99_ms=p99,
        loss=Moments() if mean is None else losses(n, mean, 0.8 * mean),
    )


def shadow(
    n: int,
    production: float = 1.0,
    candidate: float = 1.0,
    *,
    noise: float = 0.5,
    errors: int = 0,
    requests: int = 1000,
    p99: float = 100.0,
) -> WindowMetrics:
    """Shadow-mode metrics: n scored pairs, mean losses, and the spread of the per-request differences."""
    return WindowMetrics(
        production=side(production, n),
        candidate=side(candidate, n, requests=requests, errors=errors, p99=p99),
        scored=n,
        paired=True,
        loss_difference=losses(n, production - candidate, noise),
        agreement=0.9,
    )


def canary(n_production: int, n_candidate: int, production: float = 1.0, candidate: float = 1.0) -> WindowMetrics:
    return WindowMetrics(
        production=side(production, n_production),
        candidate=side(candidate, n_candidate),
        scored=n_production + n_candidate,
        paired=False,
    )


def run(
    metrics: WindowMetrics | None,
    *,
    analysis: dict[str, Any] | None = None,
    traffic: dict[str, Any] | None = None,
    step: int = 0,
    now: datetime = LATER,
    previous: AnalysisMetrics | None = None,
    evidence: EvidenceState | None = None,
) -> Verdict:
    return analyse(spec(analysis, traffic), status(step, previous, evidence), metrics, now)


def sketch(values: dict[float, int]) -> LatencySketch:
    """A latency histogram with `count` requests at each latency."""
    histogram = LatencySketch()
    for value, count in values.items():
        histogram.add_buckets([histogram.bucket(value)] * count)
    return histogram


def timed(side: SideMetrics, values: dict[float, int]) -> SideMetrics:
    """The side with these latencies (and their percentiles), as the SQL would return them."""
    histogram = sketch(values)
    return replace(
        side, latency=histogram, latency_p50_ms=histogram.quantile(0.5), latency_p99_ms=histogram.quantile(0.99)
    )


# --- no data, hard gates, minSamples -----------------------------------------------------------------


def test_no_metrics_waits_and_says_so() -> None:
    verdict = run(None)
    assert (verdict.decision.action, verdict.decision.reason) == (
        WAIT,
        "Waiting at step 1 of 3 (5% shadow): no analysis data yet.",
    )
    assert (verdict.metrics, verdict.samples) == (None, 0)


def test_no_metrics_after_max_step_duration_fails() -> None:
    verdict = run(None, analysis={"maxStepDuration": "1h"}, now=T0 + timedelta(hours=1))
    assert verdict.decision.action is FAIL
    assert verdict.decision.reason.startswith("No analysis data after maxStepDuration 1h at step 1 of 3")


@pytest.mark.parametrize(
    ("errors", "requests", "action", "reason"),
    [
        (24, 200, ROLL_BACK, "Candidate error rate 12.0% (24 of 200 requests) is above maxErrorRate 5.0% "
                             "(shown at gateConfidence 0.99) at step 1 of 3 (5% shadow): rolled back."),
        (10, 200, WAIT, "Waiting for samples"),  # 5.0% is not above 5.0%
        (16, 200, WAIT, "Waiting for samples"),  # 8% measured, not shown above 5%: could be noise
        (8, 20, ROLL_BACK, "Candidate error rate 40.0% (8 of 20 requests) is above maxErrorRate 5.0%"),
        (6, 20, WAIT, "Waiting for samples"),  # 30% of 20: not yet shown
    ],
)  # fmt: skip
def test_the_error_rate_gate_rolls_back_at_once_even_below_min_samples(
    errors: int, requests: int, action: DecisionAction, reason: str
) -> None:
    verdict = run(shadow(10, errors=errors, requests=requests))
    assert verdict.decision.action is action
    assert verdict.decision.reason.startswith(reason)
    assert (verdict.gate is not None) == (action is ROLL_BACK)
    if verdict.gate is not None:
        assert verdict.decision.reason == f"{verdict.gate} at step 1 of 3 (5% shadow): rolled back."


@pytest.mark.parametrize(
    ("limit", "slow", "requests", "action"),
    [
        (250, 30, 1000, ROLL_BACK),  # 3% slower than the limit: shown above 1%
        (250, 15, 1000, WAIT),  # 1.5%: its p99 is above the limit, but that is not shown yet
        (250, 8, 200, WAIT),
        (None, 300, 1000, WAIT),
    ],
)
def test_the_latency_gate(limit: int | None, slow: int, requests: int, action: DecisionAction) -> None:
    """maxLatencyP99Ms is a statement about the share of requests slower than it: more than 1% shown."""
    analysis = {} if limit is None else {"maxLatencyP99Ms": limit}
    metrics = shadow(10, requests=requests)
    metrics = replace(metrics, candidate=timed(metrics.candidate, {100.0: requests - slow, 400.0: slow}))
    verdict = run(metrics, analysis=analysis)
    assert verdict.decision.action is action
    if action is ROLL_BACK:
        assert verdict.decision.reason == (
            f"Candidate p99 latency 400 ms is above maxLatencyP99Ms {limit} ms: {slow} of {requests:,} requests "
            f"({slow / requests:.1%}) slower than {limit} ms, more than 1% (shown at gateConfidence 0.99) "
            "at step 1 of 3 (5% shadow): rolled back."
        )


def test_gates_come_before_a_passing_score() -> None:
    verdict = run(shadow(5000, 1.0, 0.8, errors=80, requests=1000))  # 8% of 1,000: shown above 5%
    assert verdict.decision.action is ROLL_BACK
    assert "error rate 8.0%" in verdict.decision.reason


@pytest.mark.parametrize(("n", "action"), [(99, WAIT), (100, ADVANCE)])
def test_the_original_min_samples_is_100_scored_requests(n: int, action: DecisionAction) -> None:
    verdict = run(shadow(n, 1.0, 0.5, noise=0.1))
    assert verdict.decision.action is action
    assert verdict.samples == n
    if action is WAIT:
        assert verdict.decision.reason == (
            "Waiting for samples at step 1 of 3 (5% shadow): 99 of minSamples 100 scored requests."
        )
        assert verdict.metrics is not None
        assert verdict.metrics.p_value is None  # the test has not run: nothing to carry over


def test_too_few_samples_by_max_step_duration_fails() -> None:
    verdict = run(shadow(37), analysis={"maxStepDuration": "2h"}, now=T0 + timedelta(hours=2, seconds=1))
    assert verdict.decision.action is FAIL
    assert verdict.decision.reason == (
        "Only 37 of minSamples 100 scored requests after maxStepDuration 2h at step 1 of 3 (5% shadow): "
        "too few outcomes to judge the candidate (are outcomes being posted?): failed."
    )


def test_canary_counts_the_candidates_scored_requests() -> None:
    verdict = run(canary(1900, 95), analysis={}, step=0)
    assert verdict.decision.action is WAIT
    assert verdict.samples == 95
    assert "95 of minSamples 100 scored candidate requests" in verdict.decision.reason


# --- the score and the test at the original defaults (0.7 / 0.3, weights 0.7 / 0.2 / 0.1) ------------


@pytest.mark.parametrize(
    ("candidate", "noise", "score", "action", "reason"),
    [
        # 2.86% better: quality 0.572 -> 0.3 + 0.7 * 0.572 = 0.70
        (0.9714, 0.1, 0.70, ADVANCE, "Step 1 of 3 (5% shadow) passed: overall score 0.70 >= promotionThreshold 0.70"),
        (0.9720, 0.1, 0.69, WAIT, "Collecting at step 1 of 3 (5% shadow): overall score 0.69 below promotionThreshold"),
        (0.90, 0.1, 1.00, ADVANCE, "Step 1 of 3 (5% shadow) passed: overall score 1.00"),
        (1.00, 0.1, 0.30, WAIT, "Collecting at step 1 of 3 (5% shadow): overall score 0.30 below"),  # equal
        (1.0429, 0.1, -0.30, ROLL_BACK, "Candidate is significantly worse on mae"),
        (1.0420, 0.1, -0.29, ROLL_BACK, "Candidate is significantly worse on mae"),  # above -0.30, but shown
        (1.0300, 0.45, 0.30, WAIT, "Collecting"),  # 3% worse, not shown: no verdict on noise, no score either
        (1.20, 0.1, -0.40, ROLL_BACK, "Candidate is significantly worse on mae"),
    ],
)
def test_thresholds_at_the_original_defaults(
    candidate: float, noise: float, score: float, action: DecisionAction, reason: str
) -> None:
    verdict = run(shadow(400, 1.0, candidate, noise=noise))
    assert verdict.metrics is not None
    assert verdict.metrics.overall_score == score
    assert verdict.decision.action is action
    assert verdict.decision.reason.startswith(reason)


def test_an_early_noisy_regression_is_not_rolled_back_on_its_point_estimate() -> None:
    # A canary 10% worse on its first 100 scored requests is within the noise of an equal one.
    verdict = run(canary(100, 100, 1.0, 1.1))
    assert verdict.metrics is not None and verdict.metrics.improvement == pytest.approx(-0.1)
    assert verdict.metrics.overall_score is not None and verdict.metrics.overall_score > -0.3
    assert verdict.decision.action is WAIT


def test_advancing_says_what_passed_and_where_it_goes() -> None:
    verdict = run(shadow(650, 0.412, 0.372, noise=0.1), analysis={"metric": "mae"})
    assert verdict.decision.action is ADVANCE
    reason = verdict.decision.reason
    assert reason.startswith(
        "Step 1 of 3 (5% shadow) passed: overall score 1.00 >= promotionThreshold 0.70 "
        "(quality +1.00, latency +1.00, errors +1.00); mae 0.412 (production) vs 0.372 (candidate), 9.7% better, "
        "always-valid p-value "
    )
    assert reason.endswith("<= 0.01 (confidence 0.99), over 650 scored requests: advancing to step 2 (10% shadow).")


@pytest.mark.parametrize(("step", "action"), [(0, ADVANCE), (1, ADVANCE), (2, PROMOTE)])
def test_the_last_step_promotes(step: int, action: DecisionAction) -> None:
    verdict = run(shadow(500, 1.0, 0.9, noise=0.3), step=step)
    assert verdict.decision.action is action
    if action is PROMOTE:
        assert verdict.decision.reason.startswith("Step 3 of 3 (20% shadow) passed")
        assert verdict.decision.reason.endswith(": promoting the candidate.")
    else:
        assert verdict.decision.reason.endswith(f"advancing to step {step + 2} ({[5, 10, 20][step + 1]}% shadow).")


def test_a_high_score_waits_until_it_is_significant() -> None:
    verdict = run(shadow(400, 1.0, 0.9, noise=0.7))
    assert verdict.decision.action is WAIT
    assert verdict.decision.reason.startswith(
        "Collecting at step 1 of 3 (5% shadow): overall score 0.98 >= promotionThreshold 0.70 but not yet significant"
    )
    assert "always-valid p-value 0.034 > 0.01 (confidence 0.99), over 400 scored requests." in verdict.decision.reason


def test_a_significant_but_small_improvement_waits_below_the_threshold() -> None:
    verdict = run(shadow(20_000, 1.0, 0.975, noise=0.3))
    assert verdict.metrics is not None and verdict.metrics.p_value is not None
    assert verdict.metrics.p_value < 0.01
    assert verdict.decision.action is WAIT
    assert "overall score 0.65 below promotionThreshold 0.70" in verdict.decision.reason


def test_a_significantly_worse_candidate_is_rolled_back_before_its_score_says_so() -> None:
    verdict = run(shadow(20_000, 1.0, 1.03, noise=0.3))
    assert verdict.metrics is not None and verdict.metrics.overall_score is not None
    assert verdict.metrics.overall_score > -0.3
    assert verdict.decision.action is ROLL_BACK
    assert verdict.decision.reason.startswith("Candidate is significantly worse on mae at step 1 of 3 (5% shadow)")
    assert "(rollbackConfidence 0.95)" in verdict.decision.reason
    assert verdict.decision.reason.endswith("over 20,000 scored requests: rolled back.")


def test_the_rollback_reason_names_the_score_and_threshold() -> None:
    """An established slowdown (lower bound of the candidate's p99 above production's upper bound) can
    bring the score down to the rollback threshold on its own."""
    metrics = shadow(300, 0.412, 0.412, noise=0.1)
    metrics = replace(
        metrics,
        production=timed(metrics.production, {100.0: 1000}),
        candidate=timed(metrics.candidate, {200.0: 1000}),
    )
    analysis = {"metric": "mae", "weights": {"quality": 0.5, "latency": 0.5, "errors": 0}}
    verdict = run(metrics, analysis=analysis)
    assert verdict.decision.action is ROLL_BACK
    assert verdict.decision.reason == (
        "Overall score -0.50 <= -rollbackThreshold -0.30 at step 1 of 3 (5% shadow) "
        "(quality +0.00, latency -1.00, errors +1.00); mae 0.412 (production) vs 0.412 (candidate), no change, "
        "over 300 scored requests: rolled back."
    )


# --- maxStepDuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "action"), [(timedelta(minutes=59), WAIT), (timedelta(hours=1), ROLL_BACK), (None, WAIT)]
)
def test_an_undecided_step_is_rolled_back_after_max_step_duration(
    elapsed: timedelta | None, action: DecisionAction
) -> None:
    analysis = {} if elapsed is None else {"maxStepDuration": "1h"}
    now = T0 + (elapsed or timedelta(days=30))
    verdict = run(shadow(5000, 1.0, 1.0), analysis=analysis, now=now)
    assert verdict.decision.action is action
    if action is ROLL_BACK:
        assert verdict.decision.reason.startswith(
            "Inconclusive after maxStepDuration 1h at step 1 of 3 (5% shadow): overall score 0.30 below "
            "promotionThreshold 0.70"
        )
        assert verdict.decision.reason.endswith("over 5,000 scored requests: rolled back.")


def test_a_passing_step_still_passes_after_max_step_duration() -> None:
    verdict = run(shadow(500, 1.0, 0.9, noise=0.3), analysis={"maxStepDuration": "1h"}, now=T0 + timedelta(hours=5))
    assert verdict.decision.action is ADVANCE


# --- state across looks: the running p-value ---------------------------------------------------------


def test_the_p_value_of_earlier_looks_at_the_window_counts() -> None:
    weak = shadow(400, 1.0, 0.95, noise=1.2)  # score passes, this look alone is not significant
    assert run(weak).decision.action is WAIT
    earlier = EvidenceState(since=T0, p_better=0.004, p_worse=0.9)
    verdict = run(weak, step=1, evidence=earlier)
    assert verdict.decision.action is ADVANCE
    assert "always-valid p-value 0.004 <= 0.01" in verdict.decision.reason
    assert verdict.metrics is not None
    assert (verdict.metrics.step, verdict.metrics.p_value) == (1, 0.004)
    assert verdict.evidence == EvidenceState(since=T0, p_better=0.004, p_worse=0.9)


def test_shadow_steps_carry_the_evidence_canary_steps_start_over() -> None:
    """Every shadow step asks the same paired question, so the evidence window is the analysis's; a
    canary step is a new split of the traffic and starts from nothing."""
    shadow_spec, canary_spec = spec(), spec(traffic={"mode": "canary"})
    second = ShadowDeploymentStatus(
        phase=Phase.PROGRESSING, current_step=1, current_weight=10, analysis_started_at=T0,
        step_started_at=T0 + timedelta(minutes=5),
    )  # fmt: skip
    assert evidence_since(shadow_spec, second) == T0
    assert evidence_since(canary_spec, second) == T0 + timedelta(minutes=5)
    earlier = EvidenceState(since=T0, p_better=0.004, p_worse=0.9)
    weak = shadow(400, 1.0, 0.95, noise=1.2)
    carried = analyse(shadow_spec, second.model_copy(update={"evidence": earlier}), weak, LATER)
    assert carried.decision.action is ADVANCE
    restarted = analyse(
        canary_spec, second.model_copy(update={"evidence": earlier}), canary(3000, 300, 1.0, 0.95), LATER
    )
    assert restarted.metrics is not None and restarted.metrics.p_value is not None
    assert restarted.metrics.p_value > 0.01
    assert restarted.evidence is not None and restarted.evidence.since == T0 + timedelta(minutes=5)


def test_verdict_metrics_carry_everything_status_shows() -> None:
    verdict = run(shadow(650, 0.4, 0.36, noise=0.1, errors=10, p99=110.0))
    metrics = verdict.metrics
    assert metrics is not None
    assert metrics.step == 0
    assert metrics.improvement == pytest.approx(0.1)
    assert metrics.production is not None and metrics.candidate is not None
    assert (metrics.production.metric_value, metrics.candidate.metric_value) == (pytest.approx(0.4), 0.36)
    assert (metrics.candidate.error_rate, metrics.candidate.latency_p99_ms) == (0.01, 110.0)
    assert metrics.score_components is not None
    # p99 110 vs 100 ms (percentiles only): 5 ms beyond latencyToleranceMs, 5% slower: 0.8. 1% errors of
    # 1,000 against none: not shown to exceed production's, so no excess counts.
    assert metrics.score_components.model_dump() == {"quality": 1.0, "latency": 0.8, "errors": 1.0}
    assert metrics.overall_score == pytest.approx(0.7 + 0.2 * 0.8 + 0.1 * 1.0)
    assert (metrics.test, metrics.units) == (QualityTest.NORMAL_MIXTURE, 650)
    assert metrics.p_value is not None and metrics.p_value < 1e-6
    assert metrics.p_value_worse == 1.0
    assert metrics.agreement == 0.9
    metrics.to_dict()  # valid for status: finite numbers within their bounds
    assert decide(spec(), status(), shadow(650, 0.4, 0.36, noise=0.1), LATER).action is ADVANCE


# --- canary: unpaired ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "n_candidate", "action"),
    [(0.9, 3000, ADVANCE), (0.9, 300, WAIT), (1.0, 3000, WAIT), (1.2, 3000, ROLL_BACK)],
)
def test_canary_compares_two_independent_samples(candidate: float, n_candidate: int, action: DecisionAction) -> None:
    verdict = run(canary(3000, n_candidate, 1.0, candidate), analysis={})
    assert verdict.decision.action is action
    assert f"over {n_candidate:,} scored candidate requests" in verdict.decision.reason


def skewed(n: int, mean: float, sd: float, skewness: float) -> Moments:
    """n values with this mean, standard deviation and skewness (power sums from the central moments)."""
    m2 = sd * sd
    m3 = skewness * sd**3
    m4 = (3.0 + 2.0 * skewness * skewness) * m2 * m2
    return Moments(
        n,
        n * mean,
        n * (mean**2 + m2),
        n * (mean**3 + 3 * mean * m2 + m3),
        n * (mean**4 + 6 * mean * mean * m2 + 4 * mean * m3 + m4),
    )


def skewed_canary(production: Moments, candidate: Moments) -> WindowMetrics:
    return WindowMetrics(
        production=replace(side(1.0, production.n), loss=production),
        candidate=replace(side(1.0, candidate.n), loss=candidate),
        scored=production.n + candidate.n,
        paired=False,
    )


def test_a_canary_of_right_skewed_losses_is_rolled_back_without_waiting_for_the_skewness() -> None:
    # The candidate's smaller sample of right-skewed losses makes production - candidate left-skewed: the
    # normal test overstates "better" and understates "worse" (stats.Estimate.skewness), so a candidate
    # shown worse is rolled back now, although 300 requests of skewness 4 are far from 100 x 4^2.
    verdict = run(skewed_canary(skewed(2000, 1.0, 1.5, 4.0), skewed(300, 1.9, 2.85, 4.0)), traffic={"mode": "canary"})
    assert verdict.decision.action is ROLL_BACK
    assert verdict.decision.reason.startswith("Candidate is significantly worse on mae")


def test_a_canary_of_right_skewed_losses_waits_before_it_counts_as_better() -> None:
    # The same skew, the candidate 20% better and significant on the normal test: "better" waits, and the
    # reason says which direction waits, why, and until when.
    metrics = skewed_canary(skewed(6000, 1.0, 1.5, 8.0), skewed(1000, 0.8, 1.2, 8.0))
    verdict = run(metrics, traffic={"mode": "canary"})
    assert verdict.decision.action is WAIT
    assert verdict.metrics is not None and verdict.metrics.p_value == 1.0
    reason = verdict.decision.reason
    assert "the estimate is skewed toward a worse candidate (skewness -0." in reason
    assert "which would overstate evidence that it is better: that evidence counts from about" in reason
    assert "evidence that it is worse counts already (1,000 scored requests a side now)" in reason
    # Unskewed, the same numbers pass the step.
    plain = skewed_canary(skewed(6000, 1.0, 1.5, 0.0), skewed(1000, 0.8, 1.2, 0.0))
    assert run(plain, traffic={"mode": "canary"}).decision.action is ADVANCE


def test_a_canary_of_right_skewed_losses_within_the_limit_is_judged_on_a_skew_corrected_z() -> None:
    # Skewness 2.5 on both sides, 9,000 production and 1,000 candidate requests: the estimate's skewness,
    # about -0.07, is within the limit, yet it makes z's upper tail about twice the normal's where the test
    # decides (stats.skew_corrected). The candidate 9.5% better at z 3.46: p 0.006 on a normal z, 0.016 on
    # the corrected one: not yet. The same numbers unskewed pass the step.
    def metrics(skew: float) -> WindowMetrics:
        return skewed_canary(skewed(9000, 1.0, 0.9, skew), skewed(1000, 0.905, 0.9 * 0.905, skew))

    verdict = run(metrics(2.5), traffic={"mode": "canary"})
    assert verdict.decision.action is WAIT
    assert verdict.metrics is not None and verdict.metrics.p_value is not None
    assert 0.01 < verdict.metrics.p_value < 0.03
    plain = run(metrics(0.0), traffic={"mode": "canary"})
    assert plain.decision.action is ADVANCE
    assert plain.metrics is not None and plain.metrics.p_value is not None and plain.metrics.p_value < 0.01


def test_canary_needs_more_samples_than_shadow_for_the_same_improvement() -> None:
    # Pairing removes the noise both losses share; without it the same 10% takes longer to establish.
    paired = run(shadow(300, 1.0, 0.9, noise=0.4))
    unpaired = run(canary(300, 300, 1.0, 0.9))
    assert (paired.decision.action, unpaired.decision.action) == (ADVANCE, WAIT)


# --- the parts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "production", "candidate", "improvement"),
    [
        (Metric.MAE, 0.5, 0.45, 0.1),
        (Metric.LOG_LOSS, 0.5, 0.55, -0.1),
        (Metric.RMSE, 1.0, 0.81, 0.1),  # mean squared errors 1.0 and 0.81: RMSE 1.0 vs 0.9
        (Metric.ACCURACY, 0.30, 0.27, 0.1),  # accuracy 0.70 -> 0.73: 10% fewer errors
        (Metric.DIRECTIONAL_ACCURACY, 0.4, 0.44, -0.1),
        (Metric.MAE, 0.0, 0.0, 0.0),
        (Metric.MAE, 0.0, 0.1, None),  # production perfect: no finite ratio
    ],
)
def test_relative_improvement_per_metric(
    metric: Metric, production: float, candidate: float, improvement: float | None
) -> None:
    result = relative_improvement(metric, losses(100, production, 0.1), losses(100, candidate, 0.1))
    assert result == (None if improvement is None else pytest.approx(improvement))


def test_accuracy_is_reported_as_accuracy_and_improves_on_its_error_rate() -> None:
    verdict = run(shadow(2000, 0.30, 0.27, noise=0.3), analysis={"metric": "accuracy"})
    assert "accuracy 0.7 (production) vs 0.73 (candidate), 10.0% better" in verdict.decision.reason


def test_a_perfect_production_model_cannot_be_beaten() -> None:
    verdict = run(shadow(500, 0.0, 0.1, noise=0.1))
    assert verdict.metrics is not None and verdict.metrics.score_components is not None
    assert verdict.metrics.improvement is None
    assert verdict.metrics.score_components.quality == -1.0
    assert verdict.decision.action is ROLL_BACK


@pytest.mark.parametrize(
    ("p99", "error_rates", "latency", "errors"),
    [
        (100.0, (0.0, 0.0), 1.0, 1.0),
        (80.0, (0.02, 0.0), 1.0, 1.0),  # faster and fewer errors: no extra credit, guardrails are met
        (125.0, (0.0, 0.025), 0.0, 0.0),  # 25% slower; half the 5% budget more errors
        (150.0, (0.0, 0.05), -1.0, -1.0),
        (400.0, (0.0, 0.04), -1.0, -0.6),
        (None, (0.0, 0.0), 1.0, 1.0),  # unmeasured: no regression seen
    ],
)
def test_score_components(p99: float | None, error_rates: tuple[float, float], latency: float, errors: float) -> None:
    """The scale, with so many requests that every rate is known to within a hair (the error component
    counts the excess shown: lower bound of the candidate's rate minus upper bound of production's)."""
    analysis = spec({"latencyToleranceMs": 0}).analysis
    n = 10_000_000
    production = SideMetrics(requests=n, errors=round(error_rates[0] * n), latency_p99_ms=100.0)
    candidate = SideMetrics(requests=n, errors=round(error_rates[1] * n), latency_p99_ms=p99)
    components, score = overall_score(analysis, 0.025, production, candidate, Evidence(p_better=0.0, p_worse=1.0))
    assert (components.quality, components.latency) == (0.5, latency)
    assert components.errors == pytest.approx(errors, abs=0.03)
    assert score == pytest.approx(0.7 * 0.5 + 0.2 * latency + 0.1 * errors, abs=0.011)


def test_a_few_milliseconds_of_p99_are_not_a_regression() -> None:
    """The latency guardrail counts the slowdown that is established and beyond latencyToleranceMs."""
    base = shadow(400)
    fast = timed(base.production, {10.0: 990, 12.0: 10})
    close = timed(base.candidate, {10.0: 980, 15.0: 20})  # p99 15 ms against 12: within 5 ms
    far = timed(base.candidate, {10.0: 900, 60.0: 100})  # p99 60 ms against 12, shown on 1,000 requests
    analysis = spec().analysis
    assert overall_score(analysis, 0.0, fast, close)[0].latency == 1.0
    assert overall_score(analysis, 0.0, fast, far)[0].latency == -1.0
    few = timed(base.candidate, {10.0: 95, 60.0: 5})  # the same shape on 100 requests: not shown
    assert overall_score(analysis, 0.0, fast, few)[0].latency == 1.0


@pytest.mark.parametrize(
    ("improvement", "evidence", "quality"),
    [
        (0.025, NO_EVIDENCE, 0.0),  # nothing tested yet: the estimate does not count
        (0.025, Evidence(p_better=0.2, p_worse=1.0), 0.4),
        (0.10, Evidence(p_better=0.5, p_worse=1.0), 0.5),
        (-0.10, Evidence(p_better=1.0, p_worse=0.1), 0.0),  # not shown at rollbackConfidence: does not count
        (-0.10, Evidence(p_better=1.0, p_worse=0.04), -1.0),
        (-0.10, Evidence(p_better=0.001, p_worse=1.0), 0.0),  # evidence for the other direction: none for this one
    ],
)
def test_quality_counts_as_far_as_the_evidence_goes(improvement: float, evidence: Evidence, quality: float) -> None:
    components, _ = overall_score(spec().analysis, improvement, SideMetrics(), SideMetrics(), evidence)
    assert components.quality == quality


def test_weights_shift_the_score() -> None:
    metrics = shadow(400, 1.0, 1.0, p99=150.0)  # equal quality, 50% slower
    default = run(metrics, analysis={"latencyToleranceMs": 0}).metrics
    weights = {"quality": 0, "latency": 1, "errors": 0}
    latency_only = run(metrics, analysis={"latencyToleranceMs": 0, "weights": weights}).metrics
    assert default is not None and latency_only is not None
    assert (default.overall_score, latency_only.overall_score) == (-0.1, -1.0)  # 0.7 * 0 + 0.2 * -1 + 0.1 * 1
    assert run(metrics, analysis={"latencyToleranceMs": 0, "weights": weights}).decision.action is ROLL_BACK


def test_scores_stay_within_bounds_for_extreme_inputs() -> None:
    for candidate in (0.0, 1e-9, 1e9):
        verdict = run(shadow(1000, 1.0, candidate, noise=1e-12))
        assert verdict.metrics is not None and verdict.metrics.overall_score is not None
        assert -1.0 <= verdict.metrics.overall_score <= 1.0
        assert all(math.isfinite(p) for p in (verdict.metrics.p_value or 0.0, verdict.metrics.p_value_worse or 0.0))


def test_decide_is_pure() -> None:
    metrics = shadow(400, 1.0, 0.95)
    assert run(metrics) == run(replace(metrics))


# --- segments (segmentBy) ------------------------------------------------------------------------------


def segmented(*segments: tuple[str, int, float]) -> WindowMetrics:
    """Shadow metrics 10% better overall (significantly), with these (name, pairs, candidate's mean loss
    against production's 1.0) segments."""
    return replace(
        shadow(500, 1.0, 0.9, noise=0.3),
        segments=tuple(
            SegmentMetrics(name, losses(n, 1.0, 0.8), losses(n, mean, 0.8 * mean), losses(n, 1.0 - mean, 0.3))
            for name, n, mean in segments
        ),
    )


SEGMENT_BY = {"segmentBy": {"header": "X-Instrument"}}


def test_a_segment_with_a_tenth_of_the_traffic_holds_the_step_before_it_has_min_samples() -> None:
    """The segments-shift situation: better on A, worse on B, B a sixth of the traffic so far. B has fewer
    than minSamples pairs, but too much traffic to pass without it."""
    verdict = run(segmented(("A", 420, 0.88), ("B", 80, 1.1)), analysis=SEGMENT_BY)
    assert verdict.decision.action is WAIT
    assert "segment 'B' (80 samples, 10.0% worse) is not yet shown within segmentTolerance 5% of production" in (
        verdict.decision.reason
    )
    assert verdict.metrics is not None
    assert [(s.name, s.judged, s.within_tolerance) for s in verdict.metrics.segments] == [
        ("A", True, True),
        ("B", True, False),
    ]


def test_a_small_segment_is_judged_once_it_has_min_samples() -> None:
    small = run(segmented(("A", 460, 0.88), ("B", 40, 1.1)), analysis=SEGMENT_BY)  # 8% of the pairs
    assert small.decision.action is ADVANCE
    assert small.metrics is not None
    assert [(s.name, s.judged, s.within_tolerance) for s in small.metrics.segments] == [
        ("A", True, True),
        ("B", False, None),
    ]
    better = run(segmented(("A", 380, 0.9), ("B", 120, 0.9)), analysis=SEGMENT_BY)
    assert better.decision.action is ADVANCE
    assert better.metrics is not None
    assert all(s.judged and s.within_tolerance for s in better.metrics.segments)
