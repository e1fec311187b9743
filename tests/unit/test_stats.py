"""The always-valid sequential test: closed forms against integrals, monotone in the evidence, and valid
under continuous monitoring where a repeated fixed-sample test is not."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from shadowgate_operator.metrics import Clustered, LatencySketch, Moments
from shadowgate_operator.stats import (
    BETS,
    MIN_OBSERVATIONS,
    MIXING_RELATIVE_EFFECT,
    NO_EVIDENCE,
    SKEW_LIMIT,
    SMALLEST_REGRESSION,
    SMALLEST_RELATIVE_EFFECT,
    Estimate,
    Evidence,
    PowerSums,
    TwoArmBets,
    bet_log_evidence,
    bounded_paired_evidence,
    log_normal_cdf,
    mixture_width,
    normal_evidence,
    one_sided_log_evidence,
    p_value,
    paired_estimate,
    quantile_bounds,
    rate_bounds,
    rate_log_evidence,
    sequential_test,
    skew_corrected,
    skewness,
    two_sided_log_evidence,
    unpaired_estimate,
)


def moments(values: list[float]) -> Moments:
    return Moments(len(values), *(sum(v**k for v in values) for k in range(1, 5)))


def integrate(f: Callable[[float], float], low: float, high: float, steps: int = 20_000) -> float:
    """Simpson's rule."""
    h = (high - low) / steps
    total = f(low) + f(high)
    total += sum((4 if i % 2 else 2) * f(low + i * h) for i in range(1, steps))
    return total * h / 3


def mixture_by_integration(z: float, r: float, lower: float) -> float:
    """log of the mixture of exp(theta S - theta^2 I / 2) over N(0, tau^2) restricted to theta >= lower*tau,
    in units where tau = 1 and the information is I = r (so S = z sqrt(r))."""
    information, score = r, z * math.sqrt(r)

    def density(theta: float) -> float:
        return math.exp(theta * score - theta * theta * information / 2 - theta * theta / 2) / math.sqrt(2 * math.pi)

    mass = 0.5 * math.erfc(lower / math.sqrt(2))
    return math.log(integrate(density, lower, lower + 40) / mass)


@pytest.mark.parametrize(
    ("z", "r", "lower"),
    [(0.0, 1.0, 0.0), (2.5, 10.0, 0.0), (3.0, 40.0, 0.2), (-2.0, 5.0, 0.2), (1.0, 0.5, 1.0), (4.0, 100.0, 0.5)],
)
def test_the_closed_form_is_the_mixture_integral(z: float, r: float, lower: float) -> None:
    assert one_sided_log_evidence(z, r, lower) == pytest.approx(mixture_by_integration(z, r, lower), abs=1e-7)


def test_known_values() -> None:
    # z = 0, half-normal: 2 * Phi(0) / sqrt(1 + r) = 1 / sqrt(1 + r)
    assert one_sided_log_evidence(0.0, 3.0, 0.0) == pytest.approx(-math.log(2.0))
    # Johari et al.'s two-sided mSPRT: sqrt(1/(1+r)) exp(z^2 r / (2 (1+r)))
    assert two_sided_log_evidence(3.0, 8.0) == pytest.approx(-0.5 * math.log(9.0) + 9.0 * 8.0 / 18.0)
    # no information, no evidence
    assert one_sided_log_evidence(5.0, 0.0) == two_sided_log_evidence(5.0, 0.0) == 0.0


@pytest.mark.parametrize(("z", "r"), [(0.3, 2.0), (2.0, 10.0), (-1.5, 30.0)])
def test_the_half_normal_halves_are_the_symmetric_mixture(z: float, r: float) -> None:
    # Phi(x) + Phi(-x) = 1: the two one-sided mixtures add up to twice the two-sided one.
    both = math.exp(one_sided_log_evidence(z, r, 0.0)) + math.exp(one_sided_log_evidence(-z, r, 0.0))
    assert both == pytest.approx(2 * math.exp(two_sided_log_evidence(z, r)))


def test_one_sided_needs_less_evidence_than_two_sided_for_a_real_improvement() -> None:
    assert one_sided_log_evidence(3.5, 12.0) > two_sided_log_evidence(3.5, 12.0)


def test_evidence_grows_with_z_and_ignores_the_wrong_direction() -> None:
    values = [one_sided_log_evidence(z / 4, 20.0) for z in range(-40, 41)]
    assert values == sorted(values)
    assert one_sided_log_evidence(-3.0, 20.0) < -3.0  # strongly the other way: no evidence for "better"


def test_log_normal_cdf_is_accurate_and_finite_in_the_far_tail() -> None:
    for x in (-5.0, -1.0, 0.0, 2.0):
        assert log_normal_cdf(x) == pytest.approx(math.log(0.5 * math.erfc(-x / math.sqrt(2))))
    assert log_normal_cdf(-30.0001) == pytest.approx(log_normal_cdf(-29.9999), rel=1e-4)
    assert math.isfinite(log_normal_cdf(-200.0))


def test_paired_estimate_uses_the_per_request_differences() -> None:
    production, candidate = [3.0, 1.0, 2.0, 6.0], [2.0, 1.5, 1.0, 4.5]
    estimate = paired_estimate(
        moments([p - c for p, c in zip(production, candidate, strict=True)]), moments(production), moments(candidate)
    )
    assert estimate is not None
    assert estimate.difference == pytest.approx(0.75)  # differences 1, -0.5, 1, 1.5
    assert estimate.variance == pytest.approx((0.0625 + 1.5625 + 0.0625 + 0.5625) / 3 / 4)
    assert estimate.typical_loss == pytest.approx((3.0 + 2.25) / 2)
    assert estimate.observations == 4


def test_unpaired_estimate_is_welch() -> None:
    production, candidate = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0]
    estimate = unpaired_estimate(moments(production), moments(candidate))
    assert estimate is not None
    assert estimate.difference == pytest.approx(3.5 - 2.0)
    assert estimate.variance == pytest.approx(3.5 / 6 + 1.0 / 3)
    assert estimate.observations == 3


def test_estimates_need_two_values_per_side() -> None:
    assert paired_estimate(Moments(1, 1.0, 1.0), Moments(1, 2.0, 4.0), Moments(1, 1.0, 1.0)) is None
    assert unpaired_estimate(Moments(5, 5.0, 6.0), Moments(1, 1.0, 1.0)) is None


def test_identical_losses_give_no_evidence_and_a_constant_gain_is_certain() -> None:
    same = paired_estimate(Moments(100, 0.0, 0.0), Moments(100, 50.0, 30.0), Moments(100, 50.0, 30.0))
    assert sequential_test(same) == Evidence(1.0, 1.0)
    constant = paired_estimate(Moments(100, 10.0, 1.0), Moments(100, 50.0, 30.0), Moments(100, 40.0, 20.0))
    evidence = sequential_test(constant)
    assert evidence.p_better < 1e-12
    assert evidence.p_worse == 1.0


def _estimate(difference: float, n: int, sd: float = 1.0, typical: float = 2.0) -> Estimate:
    return Estimate(difference=difference, variance=sd * sd / n, typical_loss=typical, observations=n)


def test_the_p_value_falls_as_a_steady_improvement_accumulates() -> None:
    p_values = [sequential_test(_estimate(0.3, n)).p_better for n in (100, 200, 400, 800)]
    assert p_values == sorted(p_values, reverse=True)
    assert p_values[-1] < 1e-6 < p_values[0] < 1.0


def test_the_p_value_is_a_running_minimum() -> None:
    earlier = Evidence(p_better=0.004, p_worse=0.5)
    assert sequential_test(_estimate(0.0, 500), earlier) == Evidence(0.004, 0.5)
    stronger = sequential_test(_estimate(0.5, 500), earlier)
    assert stronger.p_better < 0.004
    assert stronger.p_worse == 0.5


def test_too_few_observations_or_no_estimate_add_nothing() -> None:
    earlier = Evidence(p_better=0.2, p_worse=0.3)
    assert sequential_test(_estimate(5.0, MIN_OBSERVATIONS - 1), earlier) == earlier
    assert sequential_test(None) == NO_EVIDENCE
    assert sequential_test(_estimate(5.0, MIN_OBSERVATIONS)).p_better < 1e-6


def test_the_mixture_width_is_relative_to_the_typical_loss() -> None:
    assert mixture_width(_estimate(0.0, 100, sd=1.0, typical=2.0), 0.1) == pytest.approx(0.2**2 * 100)


def _monitor(rng: random.Random, effect: float, looks: range, alpha: float) -> tuple[bool, bool]:
    """One simulated step of paired differences looked at every interval: (mSPRT rejected, a t-test at
    alpha repeated at every look rejected)."""
    total = squares = 0.0
    n = 0
    evidence = NO_EVIDENCE
    naive = False
    z_alpha = 2.3263 if alpha == 0.01 else 1.6449
    for end in looks:
        while n < end:
            x = effect + rng.gauss(0.0, 1.0)
            total, squares, n = total + x, squares + x * x, n + 1
        differences = Moments(n, total, squares)
        estimate = paired_estimate(differences, Moments(n, 2.0 * n, 5.0 * n), Moments(n, 2.0 * n, 5.0 * n))
        evidence = sequential_test(estimate, evidence)
        naive = naive or (estimate is not None and estimate.z > z_alpha)
        if evidence.p_better <= alpha and naive:
            break
    return evidence.p_better <= alpha, naive


def test_continuous_monitoring_keeps_false_positives_below_alpha() -> None:
    rng = random.Random(20260101)
    runs = [_monitor(rng, 0.0, range(50, 2001, 25), 0.05) for _ in range(400)]
    sequential = sum(s for s, _ in runs) / len(runs)
    repeated = sum(n for _, n in runs) / len(runs)
    assert sequential <= 0.05
    assert repeated > 0.15  # the same looks with a fixed-sample test: what peeking does


def test_a_real_improvement_is_found() -> None:
    rng = random.Random(7)
    found = [_monitor(rng, 0.2, range(50, 2001, 25), 0.01)[0] for _ in range(100)]
    assert sum(found) >= 95


# --- betting on bounded losses ---------------------------------------------------------------------------


def powers(values: list[float]) -> Moments:
    return Moments(
        len(values), sum(values), sum(v**2 for v in values), sum(v**3 for v in values), sum(v**4 for v in values)
    )


@pytest.mark.parametrize("bet", [bet for bet, _, _ in BETS[::7]] + [BETS[-1][0]])
def test_the_quartic_bound_is_below_the_log_wealth_everywhere(bet: float) -> None:
    """ln(1 + y) >= y - y^2/2 + y^3/3 - c y^4 for every y >= -bet: the lower bound the betting test sums."""
    quartic = next(c for b, c, _ in BETS if b == bet)
    for step in range(2001):
        y = -bet + step * (bet + 5.0) / 2000
        assert math.log1p(y) >= y - y * y / 2 + y**3 / 3 - quartic * y**4 - 1e-12, (bet, y)


def test_betting_evidence_is_the_average_wealth_bound_of_the_bets() -> None:
    rng = random.Random(3)
    x = [rng.uniform(-1, 1) * 0.5 + 0.1 for _ in range(300)]
    sums = PowerSums(len(x), sum(x), sum(v**2 for v in x), sum(v**3 for v in x), sum(v**4 for v in x))
    direct = [sum(math.log1p(bet * v) for v in x) for bet, _, _ in BETS]  # the wealth of each constant bet, exactly
    assert bet_log_evidence(sums) <= math.log(sum(math.exp(value) for value in direct) / len(BETS)) + 1e-9
    # A lower bound, and not a loose one: most of the evidence survives.
    assert bet_log_evidence(sums) > 0.8 * math.log(sum(math.exp(value) for value in direct) / len(BETS))


def test_the_bounded_test_is_valid_at_every_look_even_on_tiny_samples() -> None:
    """Identical models, 0/1 losses, a look after every request from the first: at most alpha promoted."""
    rng = random.Random(11)
    alpha, runs, promoted = 0.05, 400, 0
    for _ in range(runs):
        total = Moments()
        for _ in range(400):
            shared = rng.random() < 0.3
            production = float(shared != (rng.random() < 0.1))
            candidate = float(shared != (rng.random() < 0.1))
            d = production - candidate
            total = total + Moments(1, d, d * d, d**3, d**4)
            if bounded_paired_evidence(total, 1.0).p_better <= alpha:
                promoted += 1
                break
    assert promoted / runs <= alpha


def test_the_bounded_test_finds_a_real_improvement_and_its_direction() -> None:
    rng = random.Random(5)
    total = Moments()
    for _ in range(3000):
        shared = rng.random() < 0.3
        production = float(shared != (rng.random() < 0.15))
        candidate = float(shared != (rng.random() < 0.05))
        d = production - candidate
        total = total + Moments(1, d, d * d, d**3, d**4)
    evidence = bounded_paired_evidence(total, 1.0)
    assert evidence.p_better < 1e-3 and evidence.p_worse == 1.0


def test_canary_bets_are_valid_and_find_an_improvement() -> None:
    """Two arms at 20%: identical losses rarely reach alpha; a clearly better candidate does."""

    def run(candidate_error: float, seed: int) -> Evidence:
        rng = random.Random(seed)
        bets = TwoArmBets()
        production, candidate = Moments(), Moments()
        best = NO_EVIDENCE
        for _ in range(30):  # looks
            for _ in range(100):
                if rng.random() < 0.2:
                    loss = float(rng.random() < candidate_error)
                    candidate = candidate + Moments(1, loss, loss, loss, loss)
                else:
                    loss = float(rng.random() < 0.3)
                    production = production + Moments(1, loss, loss, loss, loss)
            bets = bets.look(production, candidate, 0.2, 1.0)
            best = best & bets.evidence
        return best

    false_promotions = sum(run(0.3, seed).p_better <= 0.05 for seed in range(200))
    assert false_promotions <= 10
    assert run(0.15, 1).p_better <= 0.01


# --- clusters, rates, percentiles ------------------------------------------------------------------------


def test_the_clustered_variance_is_the_sandwich_over_keys() -> None:
    groups = [(3, 1.0), (5, 4.0), (2, -1.0), (4, 2.0)]
    clustered = Clustered.of(groups)
    n, total = 14, 6.0
    mean = total / n
    expected = sum((t - k * mean) ** 2 for k, t in groups) / n**2 * 4 / 3
    assert clustered.variance_of_mean(n, mean) == pytest.approx(expected)
    assert Clustered.of([(3, 1.0)]).variance_of_mean(3, 1 / 3) is None


def test_keys_that_differ_make_the_clustered_estimate_wider() -> None:
    values = [1.0] * 50 + [-1.0] * 50  # two keys with opposite effects, zero overall... plus noise
    rng = random.Random(2)
    noisy = [v + rng.gauss(0, 0.1) for v in values]
    plain = paired_estimate(moments(noisy), moments([1.0] * 100), moments([1.0] * 100))
    clusters = Clustered.of([(50, sum(noisy[:50])), (50, sum(noisy[50:]))])
    keyed = paired_estimate(moments(noisy), moments([1.0] * 100), moments([1.0] * 100), clusters)
    assert plain is not None and keyed is not None
    assert keyed.variance > 10 * plain.variance and keyed.observations == 2


def test_the_clustered_third_power_sums_are_those_of_the_keys_residual_totals() -> None:
    groups = [(3, 1.0), (5, 4.0), (2, -1.0), (4, 2.0), (1, 7.5)]
    clustered = Clustered.of(groups)
    mean = sum(t for _, t in groups) / sum(k for k, _ in groups)
    assert clustered.residual_cubes(mean) == pytest.approx(sum((t - k * mean) ** 3 for k, t in groups))
    assert clustered.residual_squares(mean) == pytest.approx(sum((t - k * mean) ** 2 for k, t in groups))


# --- the skewness rule: which direction waits -----------------------------------------------------------
#
# The normal test of a skewed estimate errs on one side only (stats.Estimate.skewness): these tests draw
# data under the null, measure which tail of z is heavier than the normal's, and check that the estimate
# holds back exactly that direction. With the sign swapped anywhere (the Edgeworth direction, the
# difference's sign, a side's sign in the two-sample sum) they fail.


def _rare_large(rng: random.Random, share: float, size: float) -> float:
    """Mean 0, right-skewed (skewness about 5 at share 0.03, size 6): usually about -share * size, now and
    then `size` more."""
    return (size if rng.random() < share else 0.0) - share * size + rng.gauss(0.0, 0.3)


@dataclass
class Tails:
    """Under the null: how often z fell beyond +-2 (the normal's 2.3% each), how often each direction was
    held back, and of the runs in each tail, the share held back in that direction."""

    upper: float
    lower: float
    better_waits: float
    worse_waits: float
    upper_held: float
    lower_held: float


def _tails(draw: Callable[[random.Random], Estimate | None], runs: int) -> Tails:
    rng = random.Random(11)
    estimates = [draw(rng) for _ in range(runs)]
    assert all(estimates)
    upper = [e for e in estimates if e is not None and e.z > 2.0]
    lower = [e for e in estimates if e is not None and e.z < -2.0]
    return Tails(
        upper=len(upper) / runs,
        lower=len(lower) / runs,
        better_waits=sum(e is not None and e.better_waits for e in estimates) / runs,
        worse_waits=sum(e is not None and e.worse_waits for e in estimates) / runs,
        upper_held=sum(e.better_waits for e in upper) / max(len(upper), 1),
        lower_held=sum(e.worse_waits for e in lower) / max(len(lower), 1),
    )


def _paired(rng: random.Random, sign: float) -> Estimate | None:
    differences = [sign * _rare_large(rng, 0.03, 6.0) for _ in range(80)]
    return paired_estimate(moments(differences), moments([1.0] * 80), moments([1.0] * 80))


def test_a_right_skewed_paired_difference_holds_back_worse_and_only_worse() -> None:
    # Production now and then much worse (differences right-skewed): z's lower tail is the heavy one
    # (usually the rare values are missed, and the candidate looks worse with a small spread), so evidence
    # that the candidate is worse waits; evidence that it is better, in the light tail, does not.
    tails = _tails(lambda rng: _paired(rng, 1.0), runs=1500)
    # (A run that has met no rare value is in the heavy tail with a small skewness: no rule on the data can
    # hold it back; MIN_OBSERVATIONS and the README's assumption are about those.)
    assert tails.lower > 0.04 and tails.upper < 0.01  # one tail heavier than the normal's 2.3%, one lighter
    assert tails.worse_waits > 0.8 and tails.better_waits < 0.01


def test_a_left_skewed_paired_difference_holds_back_better_and_only_better() -> None:
    # The mirror image: the candidate now and then much worse.
    tails = _tails(lambda rng: _paired(rng, -1.0), runs=1500)
    assert tails.upper > 0.04 and tails.lower < 0.01
    assert tails.better_waits > 0.8 and tails.worse_waits < 0.01


@pytest.mark.parametrize("small", ["candidate", "production"])
def test_two_samples_of_one_skewed_loss_hold_back_the_smaller_samples_direction(small: str) -> None:
    # The same right-skewed losses on both sides: the smaller sample's mean is the more skewed. A small
    # candidate sample (canary) makes production - candidate left-skewed: evidence that the candidate is
    # better waits, including in the runs whose candidate sample has not met the rare losses yet (its own
    # skewness then looks small; `Estimate.guards` are not fooled).
    sizes = (600, 60) if small == "candidate" else (60, 600)

    def draw(rng: random.Random) -> Estimate | None:
        sides = [moments([1.0 + _rare_large(rng, 0.03, 6.0) for _ in range(n)]) for n in sizes]
        return unpaired_estimate(*sides)

    tails = _tails(draw, runs=800)
    if small == "candidate":
        assert tails.upper > 0.04 and tails.lower < 0.01
        assert tails.upper_held > 0.95 and tails.better_waits > 0.8
    else:
        assert tails.lower > 0.04 and tails.upper < 0.01
        assert tails.lower_held > 0.95 and tails.worse_waits > 0.8


def test_equal_samples_of_one_skewed_loss_leave_rollback_free() -> None:
    # Third cumulants of equal halves cancel in the difference: neither tail is heavy. Evidence that the
    # candidate is worse counts (it rarely waits); evidence that it is better still waits for the
    # candidate's own sample, as if production's model (Estimate.guards): promotion stays as strict as
    # before the rule had a direction.
    def draw(rng: random.Random) -> Estimate | None:
        sides = [moments([1.0 + _rare_large(rng, 0.03, 6.0) for _ in range(300)]) for _ in range(2)]
        return unpaired_estimate(*sides)

    tails = _tails(draw, runs=600)
    assert abs(tails.upper - tails.lower) < 0.02
    assert tails.worse_waits < 0.2 and tails.better_waits > 0.9


def test_with_keys_the_skewness_is_that_of_the_keys_totals_guarded_by_the_requests() -> None:
    # 200 keys of 100 requests each: every request's difference is skewed (skewness about 5), a key's
    # total of 100 much less so: the keys' totals, the units the clustered test averages, are nearly
    # symmetric. The requests' skewness counted over the keys (Estimate.guards) still holds back the
    # direction it overstates ("worse": the differences are right-skewed), and only that one.
    # The same keys with skewed key-level effects (one key in 20 much worse for the candidate): the keys'
    # totals are left-skewed, and "better" waits as well.
    rng = random.Random(5)

    def keyed(effects: list[float]) -> tuple[Estimate | None, Moments]:
        groups = [[effect + _rare_large(rng, 0.03, 6.0) for _ in range(100)] for effect in effects]
        values = moments([v for group in groups for v in group])
        clusters = Clustered.of((len(group), sum(group)) for group in groups)
        ones = Moments(values.n, values.n, values.n, values.n, values.n)
        return paired_estimate(values, ones, ones, clusters), values

    plain, values = keyed([0.0] * 200)
    assert skewness(values) > 3.5
    assert plain is not None and plain.observations == 200 and abs(plain.skewness) < SKEW_LIMIT
    assert plain.guards[0] > 3.5 / math.sqrt(200)
    assert plain.worse_waits and not plain.better_waits
    skewed, _ = keyed([-3.0 if key % 20 == 0 else 3.0 / 19 for key in range(200)])
    assert skewed is not None and skewed.skewness < -SKEW_LIMIT and skewed.better_waits


def test_normal_evidence_withholds_only_the_direction_that_waits() -> None:
    base = Estimate(difference=-0.3, variance=0.002, typical_loss=1.0, observations=400)
    worse = normal_evidence(base)
    assert worse.p_worse < 1e-3
    # Skewed toward a better candidate: evidence that it is worse waits, whatever z says.
    assert normal_evidence(replace(base, skewness=0.3)).p_worse == 1.0
    # Skewed toward a worse candidate: evidence that it is worse counts now (on a z corrected for that
    # skewness, at most SKEW_LIMIT's: the normal z understates it).
    assert normal_evidence(replace(base, skewness=-0.3)).p_worse <= worse.p_worse
    better = replace(base, difference=0.3)
    assert normal_evidence(replace(better, skewness=-0.3)).p_better == 1.0
    assert normal_evidence(replace(better, skewness=0.3)).p_better == normal_evidence(better).p_better < 1e-3
    # Within the limit, both count; units_needed says when the skewness would be within it.
    assert normal_evidence(replace(better, skewness=-0.9 * SKEW_LIMIT)).p_better < 1e-3
    assert better.units_needed(-0.25) == 2500  # 100 x 0.25^2 x 400
    # Two samples: either skewness holds a direction back.
    assert normal_evidence(replace(better, skewness=0.05, guards=(-0.3,))).p_better == 1.0
    assert normal_evidence(replace(base, skewness=0.3, guards=(-0.3,))).p_worse == 1.0


def _edgeworth_upper_tail(x: float, skew: float) -> float:
    """P(z > x) for a studentized estimate of skewness `skew`, to first order (Edgeworth; Hall 1987)."""
    density = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    return 0.5 * math.erfc(x / math.sqrt(2)) - skew * (2 * x * x + 1) * density / 6


@pytest.mark.parametrize("skew", [-0.02, -0.01, 0.01, 0.02])
def test_the_skew_correction_makes_an_edgeworth_tail_normal(skew: float) -> None:
    # z's tail beyond x is, to first order in the skewness, the normal's beyond skew_corrected(x): what is
    # left of the skewness's effect on the tail is of the second order (a fifth of it at most here).
    for x in (2.0, 2.5, 3.0, 3.5):
        tail = _edgeworth_upper_tail(x, skew)
        corrected = 0.5 * math.erfc(skew_corrected(x, skew) / math.sqrt(2))
        assert abs(corrected - tail) < 0.2 * abs(0.5 * math.erfc(x / math.sqrt(2)) - tail)


def test_the_skew_correction_is_increasing_and_reads_a_left_skewed_tail_as_heavier() -> None:
    # Skewness -0.08 at z = 3 (a canary's estimate near the promotion boundary): the tail is about twice
    # the normal's 0.13%; the corrected z, 2.75, says so.
    assert skew_corrected(3.0, -0.08) == pytest.approx(2.75, abs=0.01)
    assert 0.5 * math.erfc(skew_corrected(3.0, -0.08) / math.sqrt(2)) > 2 * 0.5 * math.erfc(3 / math.sqrt(2))
    # Increasing in z for every skewness (its derivative is (1 + k z / 3)^2), the identity without one.
    grid = [x / 10 for x in range(-100, 101)]
    for k in (-0.5, -0.1, 0.1, 0.5):
        values = [skew_corrected(x, k) for x in grid]
        assert all(b >= a for a, b in itertools.pairwise(values))
    assert skew_corrected(2.7, 0.0) == 2.7


def test_normal_evidence_reads_a_skew_corrected_z() -> None:
    # A canary's candidate sample of right-skewed losses makes the estimate left-skewed (-0.064, within
    # SKEW_LIMIT): promotion reads z = 3.46 as about 3.17, so p 0.006 becomes 0.016 and does not pass 0.01.
    better = Estimate(difference=0.1, variance=(0.1 / 3.46) ** 2, typical_loss=1.0, observations=1000)
    r = mixture_width(better)
    lower = SMALLEST_RELATIVE_EFFECT / MIXING_RELATIVE_EFFECT
    plain = p_value(one_sided_log_evidence(better.z, r, lower))
    assert normal_evidence(better).p_better == pytest.approx(plain) and plain < 0.01
    skewed = replace(better, skewness=-0.064)
    assert normal_evidence(skewed).p_better == pytest.approx(
        p_value(one_sided_log_evidence(skew_corrected(better.z, -0.064), r, lower))
    )
    assert 0.01 < normal_evidence(skewed).p_better < 0.03
    # The most skewed estimate counts (a guard), and a skewness toward better never eases promotion.
    assert normal_evidence(replace(better, skewness=-0.01, guards=(-0.064,))).p_better == pytest.approx(
        normal_evidence(skewed).p_better
    )
    assert normal_evidence(replace(better, skewness=0.064)).p_better == pytest.approx(plain)
    # Rollback takes the correction both ways: a left-skewed estimate understates "worse".
    worse = replace(better, difference=-0.1)
    assert normal_evidence(replace(worse, skewness=-0.064)).p_worse < normal_evidence(worse).p_worse
    assert normal_evidence(replace(worse, skewness=0.064)).p_worse > normal_evidence(worse).p_worse
    # Two samples: rollback only the lowering way (the candidate's small sample shows its rare large losses
    # and their skewness at once).
    canary = replace(worse, two_samples=True)
    assert normal_evidence(replace(canary, skewness=-0.064)).p_worse == pytest.approx(normal_evidence(worse).p_worse)
    assert normal_evidence(replace(canary, skewness=0.064)).p_worse > normal_evidence(worse).p_worse


def test_the_rollback_mixture_weighs_regressions_from_five_percent() -> None:
    # A 2% regression established beyond doubt is not a rollback on quality (below SMALLEST_REGRESSION / 2,
    # never significant), the same 2% improvement is significant; a 10% regression is shown sooner than a
    # mixture from 2% would show it.
    assert SMALLEST_REGRESSION == 0.05
    tiny = Estimate(difference=-0.02, variance=1e-8, typical_loss=1.0, observations=10**6)
    assert normal_evidence(tiny).p_worse == 1.0
    assert normal_evidence(replace(tiny, difference=0.02)).p_better < 1e-6
    worse = Estimate(difference=-0.095, variance=(0.095 / 2.66) ** 2, typical_loss=1.0, observations=300)
    from_two = p_value(one_sided_log_evidence(-worse.z, mixture_width(worse), 0.2))
    assert normal_evidence(worse).p_worse <= 0.05 < from_two


@pytest.mark.parametrize(("events", "trials", "threshold"), [(12, 100, 0.05), (3, 300, 0.01), (40, 50, 0.5)])
def test_the_rate_test_is_a_mixture_of_likelihood_ratios_above_the_threshold(
    events: int, trials: int, threshold: float
) -> None:
    above = rate_log_evidence(events, trials, threshold)
    below = rate_log_evidence(events, trials, threshold, above=False)
    rate = events / trials
    assert (above > 0) == (rate > threshold * 1.2) or abs(rate - threshold) < 0.05
    assert (above > 0) != (below > 0) or (above <= 0 and below <= 0)


def test_the_rate_test_holds_its_level_under_continuous_monitoring() -> None:
    rng = random.Random(7)
    tripped = 0
    for _ in range(300):
        events = 0
        for trial in range(1, 2001):
            events += rng.random() < 0.05
            if rate_log_evidence(events, trial, 0.05) >= math.log(100):
                tripped += 1
                break
    assert tripped / 300 <= 0.01 + 0.01  # alpha plus simulation noise


def test_rate_bounds_contain_the_rate_and_shrink() -> None:
    low, high = rate_bounds(30, 1000, 0.01)
    assert low < 0.03 < high
    narrow = rate_bounds(3000, 100_000, 0.01)
    assert narrow[1] - narrow[0] < (high - low) / 5
    assert rate_bounds(0, 0, 0.01) == (0.0, 1.0)


def test_quantile_bounds_bracket_the_p99() -> None:
    rng = random.Random(9)
    sketch = LatencySketch()
    values = [100 * math.exp(0.5 * rng.gauss(0, 1)) for _ in range(20_000)]
    sketch.add_buckets([sketch.bucket(v) for v in values])
    low, high = quantile_bounds(sketch, 0.99, 0.01)
    p99 = sketch.quantile(0.99)
    assert low is not None and high is not None and p99 is not None
    assert low < p99 < high
    assert (high - low) / p99 < 0.25
    few = LatencySketch()
    few.add_buckets([few.bucket(v) for v in values[:50]])
    assert quantile_bounds(few, 0.99, 0.01)[1] is None  # 50 requests cannot bound a p99 from above
