"""The always-valid sequential test behind every promotion: is the candidate's loss lower than production's?

The analysis looks at the same step again every interval and acts on the first look that passes, so a
fixed-sample test (a t-test at 1%) would be checked dozens of times and promote an identical model far
more often than 1% of the time. This module uses a test whose guarantee holds at every look at once.

Method: a one-sided normal-mixture sequential probability ratio test (mSPRT) on the difference of mean
losses, production minus candidate (positive = candidate better).

- Robbins (1970), "Statistical methods related to the law of the iterated logarithm": a mixture over
  the alternatives of likelihood ratios is a nonnegative martingale under the null, so by Ville's
  inequality it exceeds 1/alpha at *any* time with probability at most alpha.
- Johari, Pekelis, Walsh (2017/2022), "Always Valid Inference: Continuous Monitoring of A/B Tests":
  the normal-mixture mSPRT with a plug-in variance, and the always-valid p-value p_t = min(p_{t-1},
  1 / Lambda_t), which may be checked at every look without inflating false positives.
- Howard, Ramdas, McAuliffe, Sekhon (2021), "Time-uniform, nonparametric, nonasymptotic confidence
  sequences", Ann. Statist. 49(2): one-sided normal mixtures in closed form.
- Waudby-Smith, Arnold, Wu, Howard, Ramdas (2024), "Time-uniform central limit theory and asymptotic
  confidence sequences", Ann. Statist.: why plugging in the sample variance keeps the guarantee
  asymptotically for any losses with finite variance (no normality of the losses is assumed).

The statistic is written in "information time" so that one formula serves both modes: with the
estimate D of the mean difference and its variance V, the information is I = 1/V and the score is
S = D * I. Under the null the score process is asymptotically a Brownian motion in I, for which
exp(theta S - theta^2 I / 2) is a martingale for every theta, and a mixture of martingales is one too.
The mixture used here is N(0, tau^2) restricted to theta >= lower, tau = `MIXING_RELATIVE_EFFECT` and
lower = `SMALLEST_RELATIVE_EFFECT` of the typical loss; in closed form, with z = D / sqrt(V),
r = tau^2 I and c = lower / tau:

    log Lambda = -log(1 + r)/2 + z^2 r / (2 (1 + r)) + log Phi(z sqrt(r/(1+r)) - c sqrt(1+r)) - log Phi(-c)

Every component has theta >= 0, so Lambda is a supermartingale for any true difference <= 0: the
null "the candidate is not better" is composite and the test is valid for all of it. Putting no
weight on negative and on negligible improvements is what makes it faster than the symmetric mSPRT
(`two_sided_log_evidence`): bench/decision shows both on the same runs. The price: improvements
below lower/2 (1% of the loss) never become significant, and they could not pass a step anyway.
The same test mirrored (theta <= -lower) says when the candidate is significantly *worse*.

- Shadow mode (paired): both models answered the same request, so D is the mean of the per-request
  differences and V = s_D^2 / n. Pairing removes the outcome's own noise, which both losses share.
- Canary mode (unpaired): two independent samples, D = mean_p - mean_c and
  V = s_p^2 / n_p + s_c^2 / n_c (Welch), valid for any split of the traffic.

Assumptions, in words: the requests of one step are exchangeable (no drift within the step), losses
have a finite variance, each look sees everything since the step began (looks are nested), and enough
observations for the plug-in variance to be sensible (`MIN_OBSERVATIONS`). Functions here are pure and
take sufficient statistics (`Moments`); the running minimum of the p-value is handed in by the caller
(decision.py keeps it in the status of the step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shadowgate_operator.metrics import Moments

MIXING_RELATIVE_EFFECT = 0.1
"""The mixture's scale tau, relative to the typical per-request loss: the test is sharpest for
improvements of around 5% to 20%, and valid (only slower) for any other size."""

SMALLEST_RELATIVE_EFFECT = 0.02
"""The mixture puts no weight on improvements below 2% of the typical loss; improvements below half of
that (1%) never become significant. A faster test for the improvements that matter."""

MIN_OBSERVATIONS = 50
"""Below this many observations (pairs, or on the smaller side) the test reports no evidence (p = 1):
the plug-in variance of a handful of heavy-tailed losses is too unreliable, and because the running
minimum keeps every past p-value, one lucky early look would otherwise stick."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Estimate:
    """The estimated difference of mean losses, production minus candidate, and its variance."""

    difference: float
    """Positive means the candidate's loss is lower (better)."""
    variance: float
    """Variance of `difference` (not of a single loss): s^2/n paired, s_p^2/n_p + s_c^2/n_c unpaired."""
    typical_loss: float
    """Mean loss of the two models together, the scale the mixture is set against."""
    observations: int
    """Pairs (paired) or the smaller side's scored requests (unpaired)."""

    @property
    def z(self) -> float:
        return self.difference / math.sqrt(self.variance)


@dataclass(frozen=True)
class Evidence:
    """Always-valid p-values for both directions at one look (running minima over the step's looks)."""

    p_better: float
    """Small when the candidate's loss is lower than production's."""
    p_worse: float
    """Small when the candidate's loss is higher than production's."""


NO_EVIDENCE = Evidence(p_better=1.0, p_worse=1.0)


def _floored_variance(variance: float, difference: float, typical: float, n: int) -> float:
    # Identical losses on every request give a zero variance; a tiny floor keeps z finite.
    floor = 1e-12 * (typical * typical + difference * difference) / n
    return max(variance, floor, 1e-300)


def paired_estimate(differences: Moments, production: Moments, candidate: Moments) -> Estimate | None:
    """Shadow mode: per-request differences (production loss - candidate loss) on the same requests."""
    mean, variance = differences.mean, differences.variance
    if mean is None or variance is None:
        return None
    typical = _typical_loss(production, candidate)
    n = differences.n
    return Estimate(mean, _floored_variance(variance / n, mean, typical, n), typical, n)


def unpaired_estimate(production: Moments, candidate: Moments) -> Estimate | None:
    """Canary mode: two independent samples of losses (Welch's variance of the difference of means)."""
    if production.variance is None or candidate.variance is None:
        return None
    difference = _mean(production) - _mean(candidate)
    variance = production.variance / production.n + candidate.variance / candidate.n
    typical = _typical_loss(production, candidate)
    n = min(production.n, candidate.n)
    return Estimate(difference, _floored_variance(variance, difference, typical, n), typical, n)


def _mean(moments: Moments) -> float:
    return moments.mean or 0.0


def _typical_loss(production: Moments, candidate: Moments) -> float:
    means = [m for m in (production.mean, candidate.mean) if m is not None]
    return abs(sum(means) / len(means)) if means else 0.0


def log_normal_cdf(x: float) -> float:
    """log Phi(x), accurate far into the lower tail (where Phi itself underflows)."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Mills ratio asymptotics: Phi(x) ~ phi(x)/|x| * (1 - 1/x^2 + 3/x^4)
    x2 = x * x
    return -0.5 * x2 - math.log(-x) - _LOG_SQRT_2PI + math.log1p(-1.0 / x2 + 3.0 / (x2 * x2))


def one_sided_log_evidence(
    z: float, r: float, lower: float = SMALLEST_RELATIVE_EFFECT / MIXING_RELATIVE_EFFECT
) -> float:
    """log Lambda of the one-sided normal mixture (theta >= lower * tau).

    z is the standardised estimate, r = tau^2 * information the mixture's width in units of the
    estimate's precision, and lower the smallest effect weighed, in units of tau (0: a half-normal).
    """
    if r <= 0.0:
        return 0.0
    return (
        -0.5 * math.log1p(r)
        + 0.5 * z * z * r / (1.0 + r)
        + log_normal_cdf(z * math.sqrt(r / (1.0 + r)) - lower * math.sqrt(1.0 + r))
        - log_normal_cdf(-lower)
    )


def two_sided_log_evidence(z: float, r: float) -> float:
    """log Lambda of the symmetric normal-mixture mSPRT (Johari et al.), for comparison and tests."""
    if r <= 0.0:
        return 0.0
    return -0.5 * math.log1p(r) + 0.5 * z * z * r / (1.0 + r)


def _p_value(log_evidence: float) -> float:
    return 1.0 if log_evidence <= 0.0 else math.exp(-log_evidence)


def mixture_width(estimate: Estimate, relative_effect: float = MIXING_RELATIVE_EFFECT) -> float:
    """r = tau^2 / V with tau = relative_effect * typical loss."""
    tau = relative_effect * estimate.typical_loss
    return tau * tau / estimate.variance


def sequential_test(
    estimate: Estimate | None,
    previous: Evidence = NO_EVIDENCE,
    *,
    relative_effect: float = MIXING_RELATIVE_EFFECT,
    smallest_effect: float = SMALLEST_RELATIVE_EFFECT,
) -> Evidence:
    """The always-valid p-values after this look: this look's evidence, or `previous` where it was stronger.

    `previous` must come from earlier looks at the same step (nested data); a new step starts from
    NO_EVIDENCE. With too few observations this look adds nothing.
    """
    if estimate is None or estimate.observations < MIN_OBSERVATIONS:
        return previous
    z = estimate.z
    r = mixture_width(estimate, relative_effect)
    lower = smallest_effect / relative_effect
    return Evidence(
        p_better=min(previous.p_better, _p_value(one_sided_log_evidence(z, r, lower))),
        p_worse=min(previous.p_worse, _p_value(one_sided_log_evidence(-z, r, lower))),
    )
