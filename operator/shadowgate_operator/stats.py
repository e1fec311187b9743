"""The sequential tests behind every promotion and rollback: is the candidate's loss lower (or higher) than
production's, does it fail more often than allowed, is its p99 above a limit?

The analysis looks at the same data again every interval and acts on the first look that passes, so a
fixed-sample test (a t-test at 1%) would be checked dozens of times and promote an identical model far
more often than 1% of the time. Every test here is *always valid*: its guarantee holds at every look at
once, because its evidence is a nonnegative supermartingale under the null hypothesis (Ville's
inequality: it ever exceeds 1/alpha with probability at most alpha), and its p-value is the running
minimum of 1/evidence over the looks (Johari, Pekelis, Walsh 2022; Howard, Ramdas, McAuliffe, Sekhon
2021; Ramdas, Grünwald, Vovk, Shafer 2023, "Game-theoretic statistics and safe anytime-valid inference").

Which test, and what its guarantee rests on (decision.py picks; README "How the operator decides"):

1. Bounded losses, requests assigned one by one (accuracy, directionalAccuracy, logLoss clipped at its
   cap, any metric with `analysis.lossCap`; no stickyHeader): a *betting* test, exact at every sample
   size with no assumption beyond independence of requests and the bound (Waudby-Smith, Ramdas 2023,
   "Estimating means of bounded random variables by betting", JRSS-B). With B the bound, x = D / B the
   scaled difference of losses (production minus candidate, so x >= -1), and a bet lambda in [0, 1), the
   wealth prod(1 + lambda x_i) is a nonnegative supermartingale whenever the candidate is not better
   (E[x] <= 0). It is taken from power sums only, through the bound

       ln(1 + y) >= y - y^2/2 + y^3/3 - c(lambda) y^4    for every y >= -lambda,
       c(lambda) = integral_0^1 s^3 / (1 - lambda s) ds

   (ln(1+y) - y + y^2/2 - y^3/3 = -y^4 * integral_0^1 s^3/(1 + y s) ds, decreasing in y), so the sums
   SQL already keeps per window (n and the sums of D, D^2, D^3, D^4) give a lower bound of the wealth of
   every constant bet, in any order the rows arrive. Their average over a fixed grid of bets (`BETS`)
   is the evidence. Shadow mode bets on the per-request differences; canary mode on
   (L - m) (1[production]/(1 - w) - 1[candidate]/w) with w the candidate's share and m the pooled mean
   loss of the earlier looks (a predictable centre, `TwoArmBets`), which has mean
   mu_production - mu_candidate whatever m is.
2. Everything else, and every test with a sticky key: a normal-mixture sequential probability ratio
   test on the estimate of the difference of mean losses and its variance (Robbins 1970; Johari et al.),
   whose guarantee is asymptotic: it needs the estimate to be close to normal, which the plug-in
   variance makes true as the number of independent units grows (Waudby-Smith, Arnold, Wu, Howard,
   Ramdas 2024, "Time-uniform central limit theory and asymptotic confidence sequences"). The units are
   requests, or sticky keys when requests are grouped: requests with one key land on one side and share
   the key's traits, so the variance is the cluster-robust (sandwich) one over keys (Liang, Zeger 1986;
   Cameron, Miller 2015), with at least `MIN_KEYS` keys on each side. For unbounded losses (mae, rmse
   without a cap) it assumes, in words: losses with a finite variance and no rare loss so large that
   `MIN_OBSERVATIONS` requests would usually miss it (bench/decision's rare-loss rows show what such a
   loss does). Declare `analysis.lossCap` to get test 1 instead. Skewness is the first way the normal
   approximation fails, and it fails in one direction: the direction the estimate's skewness makes too
   liberal counts only once that skewness is within `SKEW_LIMIT` (`Estimate.skewness`: computed on the
   units tested, requests or keys' totals, with `Estimate.guards`), the other from the floor; and within
   the limit z is corrected for it (`skew_corrected`, Hall 1992), since even a skewness of -0.05 doubles
   the normal tail where the test decides (bench/decision's canary rows promoted about 1% of identical
   candidates on the uncorrected z, twice the paired rows' 0.5%).
3. Rates (error rate above maxErrorRate; share of requests slower than maxLatencyP99Ms above 1%): a
   mixture of binomial likelihood ratios over alternatives above the threshold, exact at every sample
   size (Robbins 1970). Confidence bounds for rates and percentiles invert it.

The normal mixture in detail: with D the estimated difference (production minus candidate, positive =
candidate better) and V its variance, z = D / sqrt(V), the mixture is N(0, tau^2) restricted to
theta >= lower, tau = `MIXING_RELATIVE_EFFECT` and lower = `SMALLEST_RELATIVE_EFFECT` of the typical loss;
in closed form, with r = tau^2 / V and c = lower / tau:

    log Lambda = -log(1 + r)/2 + z^2 r / (2 (1 + r)) + log Phi(z sqrt(r/(1+r)) - c sqrt(1+r)) - log Phi(-c)

Every component has theta >= 0, so Lambda is a supermartingale for any true difference <= 0 (the null
"the candidate is not better" is composite and the test is valid for all of it); mirrored, it says when
the candidate is significantly worse, with lower = `SMALLEST_REGRESSION` there. Improvements below
lower/2 (1% of the loss) never become significant, they could not pass a step anyway; nor do regressions
below 2.5%.

Functions are pure and take sufficient statistics; running minima and the canary bets' state are handed
in by the caller (decision.py keeps them in status).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from shadowgate_operator.metrics import Clustered, LatencySketch, Moments

MIXING_RELATIVE_EFFECT = 0.1
"""The mixture's scale tau, relative to the typical per-request loss: the test is sharpest for
improvements of around 5% to 20%, and valid (only slower) for any other size."""

SMALLEST_RELATIVE_EFFECT = 0.02
"""The mixture puts no weight on improvements below 2% of the typical loss; improvements below half of
that (1%) never become significant. A faster test for the improvements that matter."""

SMALLEST_REGRESSION = 0.05
"""The rollback side's mixture (evidence that the candidate is worse) puts no weight on regressions below
5% of the typical loss, the size decision.py's quality score counts as a full regression
(QUALITY_FULL_MARKS): rolling back is for established regressions, and one below about 2.5% never becomes
significant on quality alone (its step times out instead, inconclusive). Still a supermartingale whenever
the candidate is not worse; bench/decision's 10%-worse row is rolled back one look sooner."""

MIN_OBSERVATIONS = 50
"""Below this many observations (pairs, or on the smaller side) the normal-mixture test reports no
evidence (p = 1): the plug-in variance of a handful of heavy-tailed losses is too unreliable, and because
the running minimum keeps every past p-value, one lucky early look would otherwise stick."""

MIN_KEYS = 50
"""With a sticky key, the normal-mixture test reports no evidence until each side has this many keys:
the cluster-robust variance of a few keys is as unreliable as the plain variance of a few requests
(a canary at 10% of 200 accounts has some 20 on the candidate: it cannot be judged, and says so)."""

SKEW_SAMPLES = 100
"""How skewed the estimate may be before the normal mixture's evidence in the direction its skewness
inflates stops counting: |skewness of the estimate| <= 1 / sqrt(SKEW_SAMPLES) = 0.1, i.e. for a mean of n
independent values of skewness g, n >= SKEW_SAMPLES g^2 (on top of MIN_OBSERVATIONS / MIN_KEYS). See
`Estimate.skewness` for why only one direction waits and which."""

SKEW_LIMIT = 1.0 / math.sqrt(SKEW_SAMPLES)

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def skewness(moments: Moments) -> float:
    """The sample skewness of the values behind `moments` (0 below three values or with no spread): their
    mean's skewness times sqrt(n), since k3 / k2^1.5 = (m3 / n^2) / (m2 / n)^1.5 = m3 / m2^1.5 / sqrt(n)."""
    cumulants = MeanCumulants.of(moments)
    return cumulants.skewness * math.sqrt(cumulants.units) if cumulants is not None else 0.0


@dataclass(frozen=True)
class MeanCumulants:
    """The plug-in second and third cumulants of a mean, and the independent units it averages: with u the
    units' residuals (each value minus the mean; with keys, each key's total minus its count times the
    mean) and n the values, mean - mu is about sum(u) / n, so k2 = sum(u^2) / n^2 and k3 = sum(u^3) / n^3."""

    k2: float
    k3: float
    units: int

    @classmethod
    def of(cls, moments: Moments, clusters: Clustered | None = None) -> MeanCumulants | None:
        """None below three units."""
        n, mean = moments.n, moments.mean
        if mean is None:
            return None
        if clusters is None:
            if n < 3:
                return None
            m2 = moments.total_squares / n - mean * mean
            m3 = moments.total_cubes / n - 3 * mean * moments.total_squares / n + 2 * mean**3
            return cls(max(0.0, m2) / n, m3 / (n * n), n)
        if clusters.keys < 3:
            return None
        return cls(
            max(0.0, clusters.residual_squares(mean)) / (n * n), clusters.residual_cubes(mean) / n**3, clusters.keys
        )

    def over(self, units: int) -> MeanCumulants:
        """The mean of as many units of this shape as `units` (the requests' shape counted over keys)."""
        mu2, mu3 = self.unit_moments
        return MeanCumulants(mu2 / units, mu3 / units**2, units)

    @property
    def skewness(self) -> float:
        """The mean's skewness, k3 / k2^1.5."""
        return _skewness_of(self.k2, self.k3)

    @property
    def unit_moments(self) -> tuple[float, float]:
        """The second and third central moments of one unit's residual, in the mean's scale: k2 = mu2 /
        units, k3 = mu3 / units^2."""
        return self.k2 * self.units, self.k3 * self.units**2


def _skewness_of(k2: float, k3: float) -> float:
    # Identical losses (no spread) have no skewness; neither does a spread lost to rounding.
    return k3 / k2**1.5 if k2 > 1e-300 else 0.0


def two_sample_skewness(production: MeanCumulants, candidate: MeanCumulants) -> tuple[float, float, float]:
    """The skewness of mean_production - mean_candidate: plug-in; as if the candidate were production's
    model; and the candidate's part alone, as if production's model (`Estimate.guards`). Variances add,
    third cumulants subtract."""
    plug_in = _skewness_of(production.k2 + candidate.k2, production.k3 - candidate.k3)
    (p2, p3), (c2, c3) = production.unit_moments, candidate.unit_moments
    units_p, units_c = production.units, candidate.units
    mu2 = (p2 * units_p + c2 * units_c) / (units_p + units_c)
    mu3 = (p3 * units_p + c3 * units_c) / (units_p + units_c)
    alike = _skewness_of(mu2 * (1 / units_p + 1 / units_c), mu3 * (1 / units_p**2 - 1 / units_c**2))
    candidate_alone = _skewness_of(mu2 / units_c, -mu3 / units_c**2)
    return plug_in, alike, candidate_alone


@dataclass(frozen=True)
class Estimate:
    """The estimated difference of mean losses, production minus candidate, and its variance."""

    difference: float
    """Positive means the candidate's loss is lower (better)."""
    variance: float
    """Variance of `difference` (not of a single loss): s^2/n paired, s_p^2/n_p + s_c^2/n_c unpaired,
    or the cluster-robust versions."""
    typical_loss: float
    """Mean loss of the two models together, the scale the mixture is set against."""
    observations: int
    """Independent units behind it: pairs (paired) or the smaller side's scored requests (unpaired), or
    the smaller side's keys when clustered."""
    skewness: float = 0.0
    """The skewness of `difference` as an estimator (its third cumulant over its variance^1.5, plug-in;
    `MeanCumulants`): g / sqrt(n) for a paired mean of n differences of skewness g, and for two samples

        (k3_production - k3_candidate) / (k2_production + k2_candidate)^1.5,  k2 = m2 / n, k3 = m3 / n^2

    (per side: m2, m3 the central moments of its losses, n its count; with keys, the same sums over the
    keys' residual totals, `MeanCumulants`), because difference = mean_production - mean_candidate adds
    the cumulants of two independent parts, the candidate's third with its sign flipped.

    Its sign says which direction of the normal test is too liberal. To first order the studentized
    z = difference / sqrt(variance) has P(z <= x) = Phi(x) + skewness (2 x^2 + 1) phi(x) / 6 (Edgeworth;
    Hall 1987, "Edgeworth expansion for Student's t statistic under minimal moment conditions"; for
    Welch's statistic the term is the same, since its numerator's third cumulant and the covariance of
    numerator and variance estimate are both k3_production - k3_candidate). With skewness > 0 (a long
    tail toward the candidate being better: in shadow mode, production's rare large losses) the LOWER
    tail of z is heavier than normal and the upper one lighter: a normal p-value overstates evidence that
    the candidate is worse and understates evidence that it is better. With skewness < 0 (the
    candidate's rare large losses; in canary mode also the candidate's smaller sample of right-skewed
    losses) the other way round. `normal_evidence` counts the overstated direction only once |skewness|
    <= `SKEW_LIMIT`; the other needs no more data than the floor. 0 when not computed (segments: their
    sums stop at the squares)."""
    two_samples: bool = False
    """Canary mode: production's and the candidate's own samples (not paired differences). Its skewness
    then comes mostly from the candidate's smaller sample, which meets its rare large losses and shows
    their skewness at once (the mirror of the case `guards` are for), so rollback is not eased by it
    (`normal_evidence`)."""
    guards: tuple[float, ...] = ()
    """The same skewness estimated other ways, where the plug-in one can point the wrong way; a direction
    waits when `skewness` or any of these says so.

    - Two samples, as if the candidate were production's model: both sides' units pooled for mu2 and mu3
      (one unit's central moments), then mu3 (1/U_p^2 - 1/U_c^2) / (mu2 (1/U_p + 1/U_c))^1.5, U a side's
      units. A small sample that has not yet met its losses' rare large values looks better and unskewed
      at once; under "the candidate is production's model" (where the false-promotion and false-rollback
      claims are tightest) the pooled moments have met them.
    - Two samples, the candidate's mean alone as if production's model: -mu3 / U_c^2 / (mu2 / U_c)^1.5 =
      -g / sqrt(U_c), g the pooled skewness (production's sample does not dilute it). For right-skewed
      losses this keeps promotion exactly where it was before the rule had a direction (U_c >= 100 g^2)
      while rollback waits for none of it: without it, bench/decision's canary-fallback (its false
      promotions at the 1% limit) promoted one identical candidate more in 350 runs.
    - With keys, the requests' skewness counted over the keys (per side: the losses' m2 and m3 with the
      keys as units, then as above, plug-in and pooled): a few hundred keys of a few requests each show
      their totals' skewness no better than as many requests would, and bench/decision's sticky canaries
      (1,000-5,000 accounts at 10%) promote an identical candidate about 1% of the time on the keys'
      skewness alone."""

    @property
    def toward_worse(self) -> float:
        """The most negative of the skewnesses: below -SKEW_LIMIT, evidence that the candidate is better waits."""
        return min((self.skewness, *self.guards))

    @property
    def toward_better(self) -> float:
        """The most positive of the skewnesses: above SKEW_LIMIT, evidence that the candidate is worse waits."""
        return max((self.skewness, *self.guards))

    @property
    def z(self) -> float:
        return self.difference / math.sqrt(self.variance)

    @property
    def better_waits(self) -> bool:
        """Evidence that the candidate is better does not count yet: the estimate is skewed toward worse."""
        return self.toward_worse < -SKEW_LIMIT

    @property
    def worse_waits(self) -> bool:
        """Evidence that the candidate is worse does not count yet: the estimate is skewed toward better."""
        return self.toward_better > SKEW_LIMIT

    def units_needed(self, skewness: float) -> int:
        """Units (as `observations` counts them) at which `skewness`, shrinking as 1 / sqrt(units), would be
        within `SKEW_LIMIT` if the data went on as so far."""
        return max(self.observations, math.ceil(SKEW_SAMPLES * skewness**2 * self.observations))

    def shifted(self, margin: float) -> Estimate:
        """The same estimate tested against "the candidate is worse by more than `margin`": D + margin."""
        return replace(self, difference=self.difference + margin)


@dataclass(frozen=True)
class Evidence:
    """Always-valid p-values for both directions at one look (running minima over the looks)."""

    p_better: float
    """Small when the candidate's loss is lower than production's."""
    p_worse: float
    """Small when the candidate's loss is higher than production's."""

    def __and__(self, other: Evidence) -> Evidence:
        """The running minimum of two looks' p-values."""
        return Evidence(min(self.p_better, other.p_better), min(self.p_worse, other.p_worse))


NO_EVIDENCE = Evidence(p_better=1.0, p_worse=1.0)


def _floored_variance(variance: float, difference: float, typical: float, n: int) -> float:
    # Identical losses on every request give a zero variance; a tiny floor keeps z finite.
    floor = 1e-12 * (typical * typical + difference * difference) / max(n, 1)
    return max(variance, floor, 1e-300)


def paired_estimate(
    differences: Moments, production: Moments, candidate: Moments, clusters: Clustered | None = None
) -> Estimate | None:
    """Shadow mode: per-request differences (production loss - candidate loss) on the same requests; with
    `clusters`, the variance is the cluster-robust one over the keys and `observations` their number."""
    mean, variance = differences.mean, differences.variance
    if mean is None or variance is None:
        return None
    typical = _typical_loss(production, candidate)
    n = differences.n
    cumulants = MeanCumulants.of(differences, clusters)
    skew = _skewness_of(cumulants.k2, cumulants.k3) if cumulants is not None else 0.0
    if clusters is None:
        return Estimate(mean, _floored_variance(variance / n, mean, typical, n), typical, n, skew)
    robust = clusters.variance_of_mean(n, mean)
    if robust is None:
        return None
    requests = MeanCumulants.of(differences)
    guards = () if requests is None else (requests.over(clusters.keys).skewness,)
    return Estimate(mean, _floored_variance(robust, mean, typical, n), typical, clusters.keys, skew, guards=guards)


def unpaired_estimate(
    production: Moments, candidate: Moments, clusters: tuple[Clustered, Clustered] | None = None
) -> Estimate | None:
    """Canary mode: two independent samples of losses (Welch's variance of the difference of means); with
    `clusters` (production's, candidate's), each side's variance is the cluster-robust one."""
    if production.variance is None or candidate.variance is None:
        return None
    difference = _mean(production) - _mean(candidate)
    typical = _typical_loss(production, candidate)
    p_cumulants = MeanCumulants.of(production, clusters[0] if clusters else None)
    c_cumulants = MeanCumulants.of(candidate, clusters[1] if clusters else None)
    skew, *others = two_sample_skewness(p_cumulants, c_cumulants) if p_cumulants and c_cumulants else (0.0,)
    guards = tuple(others)
    if clusters is None:
        variance = production.variance / production.n + candidate.variance / candidate.n
        n = min(production.n, candidate.n)
        return Estimate(
            difference,
            _floored_variance(variance, difference, typical, n),
            typical,
            n,
            skew,
            two_samples=True,
            guards=guards,
        )
    p_requests, c_requests = MeanCumulants.of(production), MeanCumulants.of(candidate)
    if p_requests and c_requests and clusters[0].keys and clusters[1].keys:
        guards += two_sample_skewness(p_requests.over(clusters[0].keys), c_requests.over(clusters[1].keys))
    p_robust = clusters[0].variance_of_mean(production.n, _mean(production))
    c_robust = clusters[1].variance_of_mean(candidate.n, _mean(candidate))
    if p_robust is None or c_robust is None:
        return None
    n = min(clusters[0].keys, clusters[1].keys)
    return Estimate(
        difference,
        _floored_variance(p_robust + c_robust, difference, typical, n),
        typical,
        n,
        skew,
        two_samples=True,
        guards=guards,
    )


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


def p_value(log_evidence: float) -> float:
    """1 / evidence, at most 1."""
    return 1.0 if log_evidence <= 0.0 else math.exp(-log_evidence)


def mixture_width(estimate: Estimate, relative_effect: float = MIXING_RELATIVE_EFFECT) -> float:
    """r = tau^2 / V with tau = relative_effect * typical loss."""
    tau = relative_effect * estimate.typical_loss
    return tau * tau / estimate.variance


def skew_corrected(z: float, skewness: float) -> float:
    """z with the first-order effect of the estimate's skewness removed: Hall's transformation (Hall 1992,
    "On the removal of skewness by transformation", JRSS-B 54), z + k z^2/3 + k^2 z^3/27 + k/6 with k the
    skewness (`Estimate.skewness`), is normal to order 1/n where z has P(z <= x) = Phi(x) + k (2x^2 + 1)
    phi(x) / 6 (its first two terms are that expansion's Cornish-Fisher inverse; the cubic one makes it
    increasing in z for every k: its derivative is (1 + k z / 3)^2)."""
    return z + skewness * z * z / 3 + skewness * skewness * z**3 / 27 + skewness / 6


def normal_evidence(
    estimate: Estimate | None,
    *,
    minimum: int = MIN_OBSERVATIONS,
    relative_effect: float = MIXING_RELATIVE_EFFECT,
    smallest_effect: float = SMALLEST_RELATIVE_EFFECT,
    smallest_regression: float = SMALLEST_REGRESSION,
) -> Evidence:
    """This look's p-values from the normal mixture (no running minimum); none below `minimum` units, and
    none yet in the direction the estimate's skewness makes too liberal (`Estimate.skewness`).

    Each direction reads z corrected for the estimate's skewness (`skew_corrected`), taken with the most
    cautious of its estimates for that direction (`Estimate.toward_worse`, `toward_better`) and at most
    `SKEW_LIMIT` in size: within the limit the normal mixture's evidence that the candidate is better is
    that of a normal z, not of a z whose upper tail a left-skewed estimate makes about twice as heavy at
    the boundary (bench/decision's canary rows, the candidate's small sample of right-skewed losses).
    Promotion's correction only ever lowers its z (a skewness toward better adds nothing). Rollback's takes
    it both ways on paired differences, so the direction their skewness understates is judged on a normal
    z too (bench/decision's 10%-worse row, left-skewed differences: rolled back a look sooner); with two
    samples only the lowering way (`Estimate.two_samples`)."""
    if estimate is None or estimate.observations < minimum:
        return NO_EVIDENCE
    z = estimate.z
    r = mixture_width(estimate, relative_effect)
    better = skew_corrected(z, max(-SKEW_LIMIT, min(0.0, estimate.toward_worse)))
    easing = 0.0 if estimate.two_samples else SKEW_LIMIT
    worse = skew_corrected(-z, max(-SKEW_LIMIT, min(easing, -estimate.toward_better)))
    return Evidence(
        p_better=1.0
        if estimate.better_waits
        else p_value(one_sided_log_evidence(better, r, smallest_effect / relative_effect)),
        p_worse=1.0
        if estimate.worse_waits
        else p_value(one_sided_log_evidence(worse, r, smallest_regression / relative_effect)),
    )


def sequential_test(
    estimate: Estimate | None,
    previous: Evidence = NO_EVIDENCE,
    *,
    relative_effect: float = MIXING_RELATIVE_EFFECT,
    smallest_effect: float = SMALLEST_RELATIVE_EFFECT,
) -> Evidence:
    """The normal mixture's always-valid p-values after this look: this look's evidence, or `previous`
    where it was stronger. `previous` must come from earlier looks at the same window (nested data)."""
    this = normal_evidence(estimate, relative_effect=relative_effect, smallest_effect=smallest_effect)
    return previous & this


# --- betting on bounded losses ------------------------------------------------------------------------


def _quartic_constant(bet: float) -> float:
    """c(lambda) = integral_0^1 s^3 / (1 - lambda s) ds = sum_k lambda^k / (k + 4)."""
    if bet < 0.5:
        return sum(bet**k / (k + 4) for k in range(60))
    return -(math.log1p(-bet) + bet + bet * bet / 2 + bet**3 / 3) / bet**4


BET_COUNT = 48
BETS: tuple[tuple[float, float, float], ...] = tuple(
    (bet, _quartic_constant(bet), -math.log(BET_COUNT))
    for bet in (
        math.exp(math.log(0.02) + i * (math.log(0.99) - math.log(0.02)) / (BET_COUNT - 1)) for i in range(BET_COUNT)
    )
)
"""The constant bets the wealth is averaged over: lambda from 0.02 to 0.99, evenly on a log scale, equal
weights; with each its quartic constant and log weight. A fixed grid (not chosen from the data), so the
average of supermartingales is one: small bets win on small effects, large ones on large effects."""


@dataclass(frozen=True)
class PowerSums:
    """n and the sums of x, x^2, x^3, x^4 of scaled observations x >= -1."""

    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0

    def __add__(self, other: PowerSums) -> PowerSums:
        return PowerSums(
            self.n + other.n, self.s1 + other.s1, self.s2 + other.s2, self.s3 + other.s3, self.s4 + other.s4
        )

    def negated(self) -> PowerSums:
        """The sums of -x (the other direction's bets; valid when also x <= 1)."""
        return PowerSums(self.n, -self.s1, self.s2, -self.s3, self.s4)

    @classmethod
    def scaled(cls, moments: Moments, scale: float) -> PowerSums:
        """The sums of x = value / scale from the values' Moments."""
        return cls(
            moments.n,
            moments.total / scale,
            moments.total_squares / scale**2,
            moments.total_cubes / scale**3,
            moments.total_fourths / scale**4,
        )


def bet_log_evidence(sums: PowerSums) -> float:
    """log of the average over `BETS` of the wealth lower bounds exp(l s1 - l^2 s2/2 + l^3 s3/3 - c l^4 s4):
    at least the log of a nonnegative supermartingale when every x >= -1 and E[x] <= 0."""
    if sums.n <= 0 or sums.s2 < 0.0 or sums.s4 < 0.0:
        return 0.0
    logs = [
        weight + bet * sums.s1 - bet * bet * sums.s2 / 2 + bet**3 * sums.s3 / 3 - quartic * bet**4 * sums.s4
        for bet, quartic, weight in BETS
    ]
    top = max(logs)
    return top + math.log(sum(math.exp(value - top) for value in logs))


def bounded_paired_evidence(differences: Moments, bound: float) -> Evidence:
    """Shadow mode, losses in [0, bound]: this look's p-values from the betting test on the per-request
    differences (production minus candidate), both directions."""
    if differences.n == 0 or bound <= 0.0:
        return NO_EVIDENCE
    sums = PowerSums.scaled(differences, bound)
    return Evidence(p_better=p_value(bet_log_evidence(sums)), p_worse=p_value(bet_log_evidence(sums.negated())))


@dataclass(frozen=True)
class TwoArmBets:
    """Canary mode, losses in [0, bound]: the betting test's state from one look to the next.

    Each look bets on the requests scored since the previous one (the *batch*): for a production request
    z = (L - m) / (1 - w), for a candidate request z = -(L - m) / w, with w the candidate's share and m the
    pooled mean loss up to the previous look (known before the batch: a predictable centre). Every z has
    mean mu_production - mu_candidate whatever m is, and is at least -b with b = max(m/(1-w), (B-m)/w), so
    x = z / b >= -1 and the betting bound applies; the other direction uses -z over its own b. The first
    look only sets m. Outcome corrections of earlier requests enter the look that reads them.
    """

    production: Moments = field(default_factory=Moments)
    """Production's losses up to the previous look."""
    candidate: Moments = field(default_factory=Moments)
    centre: float | None = None
    better: PowerSums = PowerSums()
    """Accumulated scaled sums for "the candidate is better"."""
    worse: PowerSums = PowerSums()

    def look(self, production: Moments, candidate: Moments, share: float, bound: float) -> TwoArmBets:
        """The state after betting on what arrived since the previous look."""
        batch_p, batch_c = production - self.production, candidate - self.candidate
        better, worse = self.better, self.worse
        m = self.centre
        if m is not None and 0.0 < share < 1.0 and bound > 0.0 and batch_p.n >= 0 and batch_c.n >= 0:
            m = min(max(m, 0.0), bound)
            w = share
            b_better = max(m / (1 - w), (bound - m) / w, 1e-12)
            b_worse = max((bound - m) / (1 - w), m / w, 1e-12)
            better = better + _batch_bets(batch_p, batch_c, m, 1.0 / ((1 - w) * b_better), -1.0 / (w * b_better))
            worse = worse + _batch_bets(batch_p, batch_c, m, -1.0 / ((1 - w) * b_worse), 1.0 / (w * b_worse))
        n = production.n + candidate.n
        centre = (production.total + candidate.total) / n if n else self.centre
        return TwoArmBets(production, candidate, centre, better, worse)

    @property
    def evidence(self) -> Evidence:
        return Evidence(p_better=p_value(bet_log_evidence(self.better)), p_worse=p_value(bet_log_evidence(self.worse)))


def _centred(moments: Moments, m: float) -> tuple[float, float, float, float]:
    """Sums of (L - m)^k, k = 1..4, from the power sums of L."""
    n, s1, s2, s3, s4 = moments.n, moments.total, moments.total_squares, moments.total_cubes, moments.total_fourths
    return (
        s1 - n * m,
        s2 - 2 * m * s1 + n * m * m,
        s3 - 3 * m * s2 + 3 * m * m * s1 - n * m**3,
        s4 - 4 * m * s3 + 6 * m * m * s2 - 4 * m**3 * s1 + n * m**4,
    )


def _batch_bets(production: Moments, candidate: Moments, m: float, a_p: float, a_c: float) -> PowerSums:
    """Sums of x^k for x = a_p (L - m) on production's requests and a_c (L - m) on the candidate's."""
    p, c = _centred(production, m), _centred(candidate, m)
    sums = [a_p ** (k + 1) * p[k] + a_c ** (k + 1) * c[k] for k in range(4)]
    if sums[1] < 0.0 or sums[3] < 0.0:  # corrections only, no new requests: nothing to bet on
        return PowerSums()
    return PowerSums(production.n + candidate.n, *sums)


# --- rates ----------------------------------------------------------------------------------------------

RATE_COUNT = 40
_RATE_OFFSETS = tuple(
    math.exp(math.log(0.02) + i * (math.log(8.0) - math.log(0.02)) / (RATE_COUNT - 1)) for i in range(RATE_COUNT)
)
"""Alternatives of the rate test, as log-odds above (or below) the threshold: 0.02 to 8, log-evenly."""


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def rate_log_evidence(events: int, trials: int, threshold: float, *, above: bool = True) -> float:
    """log of the evidence that the true rate is above `threshold` (or below, `above=False`) after `events`
    of `trials`: a mixture of binomial likelihood ratios over alternatives on that side, each a
    supermartingale while the rate is on the other side (Robbins 1970)."""
    if trials <= 0:
        return 0.0
    events = min(max(events, 0), trials)
    if above and threshold <= 0.0:
        return math.inf if events > 0 else 0.0
    if not above and threshold >= 1.0:
        return math.inf if events < trials else 0.0
    if (above and threshold >= 1.0) or (not above and threshold <= 0.0):
        return 0.0
    misses = trials - events
    logs = [events * event + misses * miss for event, miss in _rate_terms(threshold, above)]
    top = max(logs)
    return top + math.log(sum(math.exp(value - top) for value in logs)) - math.log(RATE_COUNT)


@functools.lru_cache(maxsize=4096)
def _rate_terms(threshold: float, above: bool) -> tuple[tuple[float, float], ...]:
    """Per alternative of the rate test: the log-likelihood ratio of one event and of one non-event. The
    quantile bounds ask about the same threshold dozens of times per look: computed once."""
    base = _logit(threshold)
    log_p0, log_q0 = math.log(threshold), math.log1p(-threshold)
    terms = []
    for offset in _RATE_OFFSETS:
        odds = base + offset if above else base - offset
        log_p1 = -math.log1p(math.exp(-odds)) if odds > -700 else odds
        log_q1 = -math.log1p(math.exp(odds)) if odds < 700 else -odds
        terms.append((log_p1 - log_p0, log_q1 - log_q0))
    return tuple(terms)


def rate_bounds(events: int, trials: int, alpha: float) -> tuple[float, float]:
    """A time-uniform (1 - alpha) confidence interval for a rate (each side alpha/2), by inverting
    `rate_log_evidence`: the rates it cannot reject."""
    if trials <= 0:
        return 0.0, 1.0
    level = math.log(2.0 / alpha)

    def solve(above: bool) -> float:
        low, high = 0.0, 1.0
        for _ in range(30):
            middle = (low + high) / 2
            rejected = rate_log_evidence(events, trials, middle, above=above) >= level
            # above: small thresholds are rejected; below: large ones are.
            if rejected == above:
                low = middle
            else:
                high = middle
        return low if above else high

    return solve(True), solve(False)


def quantile_bounds(sketch: LatencySketch, q: float, alpha: float) -> tuple[float | None, float | None]:
    """A time-uniform (1 - alpha) confidence interval for the q-quantile of the latencies, each side
    alpha/2: below it the share above is shown to exceed 1 - q, above it shown to be under 1 - q."""
    total = sketch.count
    if total == 0:
        return None, None
    level = math.log(2.0 / alpha)
    tail = 1.0 - q
    buckets = sorted(sketch.counts)
    from_here = [0] * (len(buckets) + 1)  # from_here[i]: values in buckets[i:]
    for index in range(len(buckets) - 1, -1, -1):
        from_here[index] = from_here[index + 1] + sketch.counts[buckets[index]]

    def shown_above(index: int) -> bool:  # values in buckets[index:] exceed its lower edge
        return rate_log_evidence(from_here[index], total, tail, above=True) >= level

    def shown_below(index: int) -> bool:  # only values in buckets[index + 1:] can exceed its upper edge
        return rate_log_evidence(from_here[index + 1], total, tail, above=False) >= level

    lower = upper = None
    # shown_above holds for the first buckets and stops holding (fewer values above): the last that holds.
    low, high = 0, len(buckets) - 1
    if shown_above(low):
        while low < high:
            middle = (low + high + 1) // 2
            if shown_above(middle):
                low = middle
            else:
                high = middle - 1
        lower = sketch.gamma ** (buckets[low] - 1)
    # shown_below starts holding at some bucket and holds from there on: the first that holds.
    low, high = 0, len(buckets) - 1
    if shown_below(high):
        while low < high:
            middle = (low + high) // 2
            if shown_below(middle):
                high = middle
            else:
                low = middle + 1
        upper = sketch.gamma ** buckets[low]
    return lower, upper
