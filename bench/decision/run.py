"""bench/decision: how often the decision promotes a candidate that is no better, and how fast it
promotes one that is, when it is looked at every interval.

Each run simulates one step of a rollout: scored requests arrive, and every `EVERY` scored requests
from `FIRST_LOOK` on (an analysis interval) the window's sufficient statistics go to the real
`decision.analyse()` with the original defaults (minSamples 100, promotionThreshold 0.7,
rollbackThreshold 0.3, confidence 0.99, weights 0.7/0.2/0.1), its status carried from look to look
as the operator carries it. The run ends at the first Promote or RollBack, or at `CAP` scored requests.
On the same runs (the same requests) it prints:

- a naive "above threshold" rule: promote at the first look where the relative improvement is at
  least 5% or 10% (what the original service did, at two thresholds), or where shadowgate's score,
  computed on the point estimates as if every difference were certain, is at least 0.7;
- the symmetric normal-mixture mSPRT of Johari et al. at alpha 0.01 (promote when its always-valid
  p-value <= 0.01 and the candidate looks better), the usual always-valid baseline.

The simulated outcomes: a regression target with heteroscedastic noise (each request's scale is
lognormal, sigma 0.5, shared by both models: some outcomes are simply harder), and each model's error
the shared part plus its own (errors of the two models correlated 0.8), scored by MAE. "10% better"
scales the candidate's error by 0.9. Shadow mode compares per-request losses of the same requests
(paired); canary mode sends half the requests to each model (unpaired, independent requests).
Latency and error rates are the same for both models, so the decision turns on quality.

Seeded and deterministic; pure Python; runs in about a minute. Exits 1 when the false promotion rate
of identical models exceeds 1 - confidence.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "router")]

from shadowgate_operator.api import (  # noqa: E402
    DecisionAction,
    Phase,
    ShadowDeploymentSpec,
    ShadowDeploymentStatus,
    TrafficMode,
)
from shadowgate_operator.decision import analyse, overall_score, relative_improvement  # noqa: E402
from shadowgate_operator.metrics import Moments, SideMetrics, WindowMetrics  # noqa: E402
from shadowgate_operator.stats import (  # noqa: E402
    MIN_OBSERVATIONS,
    Estimate,
    Evidence,
    mixture_width,
    paired_estimate,
    two_sided_log_evidence,
    unpaired_estimate,
)

SEED = 20261125
RUNS = 1000
FIRST_LOOK = 100
EVERY = 50
CAP = 5000
CORRELATION = 0.8
NOISE_SIGMA = 0.5
ALPHA = 0.01
T0 = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)


def make_spec(mode: TrafficMode) -> ShadowDeploymentSpec:
    """One step (so passing it promotes) and the original service's analysis defaults."""
    return ShadowDeploymentSpec.model_validate(
        {
            "production": {"name": "model-v1", "version": "1", "url": "http://production:8080"},
            "candidate": {"name": "model-v2", "version": "2", "url": "http://candidate:8080"},
            "traffic": {"mode": mode.value, "steps": [50 if mode is TrafficMode.CANARY else 10]},
            "analysis": {"metric": "mae"},
            "database": {"secretRef": {"name": "db"}},
            "outcomes": {"tokenSecretRef": {"name": "outcomes"}},
        }
    )


SPECS = {mode: make_spec(mode) for mode in TrafficMode}


# --- the simulated requests ---------------------------------------------------------------------------


@dataclass
class Sums:
    """Running sums of the scored requests so far (what the SQL returns as Moments)."""

    n_production: int = 0
    production: float = 0.0
    production_squares: float = 0.0
    n_candidate: int = 0
    candidate: float = 0.0
    candidate_squares: float = 0.0
    difference: float = 0.0
    difference_squares: float = 0.0

    def window(self, paired: bool) -> WindowMetrics:
        def side(n: int, total: float, squares: float) -> SideMetrics:
            return SideMetrics(requests=n, errors=0, latency_p50_ms=20.0, latency_p99_ms=100.0,
                               loss=Moments(n, total, squares))  # fmt: skip

        return WindowMetrics(
            production=side(self.n_production, self.production, self.production_squares),
            candidate=side(self.n_candidate, self.candidate, self.candidate_squares),
            scored=self.n_candidate if paired else self.n_production + self.n_candidate,
            paired=paired,
            loss_difference=Moments(self.n_candidate, self.difference, self.difference_squares)
            if paired
            else Moments(),
        )

    @property
    def improvement(self) -> float:
        production = self.production / self.n_production
        return (production - self.candidate / self.n_candidate) / production


def paired_requests(rng: random.Random, ratio: float, sums: Sums, count: int) -> None:
    """`count` requests answered by both models (shadow): absolute errors on the same outcomes."""
    gauss, exp = rng.gauss, math.exp
    shared, own = math.sqrt(CORRELATION), math.sqrt(1.0 - CORRELATION)
    for _ in range(count):
        scale = exp(NOISE_SIGMA * gauss(0.0, 1.0))
        common = shared * gauss(0.0, 1.0)
        production = abs(scale * (common + own * gauss(0.0, 1.0)))
        candidate = abs(ratio * scale * (common + own * gauss(0.0, 1.0)))
        difference = production - candidate
        sums.production += production
        sums.production_squares += production * production
        sums.candidate += candidate
        sums.candidate_squares += candidate * candidate
        sums.difference += difference
        sums.difference_squares += difference * difference
    sums.n_production += count
    sums.n_candidate += count


def canary_requests(rng: random.Random, ratio: float, sums: Sums, count: int) -> None:
    """`count` requests for each model (canary at 50%): each model answers its own requests."""
    gauss, exp = rng.gauss, math.exp
    for _ in range(count):
        production = abs(exp(NOISE_SIGMA * gauss(0.0, 1.0)) * gauss(0.0, 1.0))
        candidate = abs(ratio * exp(NOISE_SIGMA * gauss(0.0, 1.0)) * gauss(0.0, 1.0))
        sums.production += production
        sums.production_squares += production * production
        sums.candidate += candidate
        sums.candidate_squares += candidate * candidate
    sums.n_production += count
    sums.n_candidate += count


# --- the rules compared -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one rule did in one run: the action and the scored requests it was taken at."""

    action: DecisionAction | None = None
    samples: int = 0


Rule = Callable[[Sums, WindowMetrics, int], DecisionAction | None]


class Shadowgate:
    """The real decision, with its status carried from look to look."""

    def __init__(self, spec: ShadowDeploymentSpec) -> None:
        self.spec = spec
        steps = spec.traffic.steps
        self.status = ShadowDeploymentStatus(
            phase=Phase.PROGRESSING, current_step=0, current_weight=steps[0], step_started_at=T0
        )

    def __call__(self, sums: Sums, window: WindowMetrics, look: int) -> DecisionAction | None:
        verdict = analyse(self.spec, self.status, window, T0 + dt.timedelta(seconds=30 * look))
        self.status = self.status.model_copy(update={"metrics": verdict.metrics})
        action = verdict.decision.action
        return None if action is DecisionAction.WAIT else action


def naive_improvement(threshold: float) -> Rule:
    def rule(sums: Sums, window: WindowMetrics, look: int) -> DecisionAction | None:
        return DecisionAction.PROMOTE if sums.improvement >= threshold else None

    return rule


CERTAIN = Evidence(p_better=0.0, p_worse=0.0)


def naive_score(sums: Sums, window: WindowMetrics, look: int) -> DecisionAction | None:
    """shadowgate's score on the point estimates (as if every difference were certain) >= 0.7, no test."""
    analysis = SPECS[TrafficMode.SHADOW].analysis
    improvement = relative_improvement(analysis.metric, window.production.loss, window.candidate.loss)
    _, score = overall_score(analysis, improvement, window.production, window.candidate, CERTAIN)
    return DecisionAction.PROMOTE if score >= analysis.promotion_threshold else None


def two_sided_msprt(sums: Sums, window: WindowMetrics, look: int) -> DecisionAction | None:
    """Johari et al.'s symmetric normal mixture at the same scale; promote when significant and better."""
    estimate: Estimate | None
    if window.paired:
        estimate = paired_estimate(window.loss_difference, window.production.loss, window.candidate.loss)
    else:
        estimate = unpaired_estimate(window.production.loss, window.candidate.loss)
    if estimate is None or estimate.observations < MIN_OBSERVATIONS or estimate.difference <= 0:
        return None
    evidence = two_sided_log_evidence(estimate.z, mixture_width(estimate))
    return DecisionAction.PROMOTE if evidence >= math.log(1.0 / ALPHA) else None


RULE_NAMES = (
    "shadowgate decide(), confidence 0.99",
    "two-sided mSPRT, alpha 0.01 (baseline)",
    "naive: improvement >= 5%",
    "naive: improvement >= 10%",
    "naive: score >= 0.7 on point estimates",
)


def simulate(rng: random.Random, mode: TrafficMode, ratio: float) -> list[Outcome]:
    """One run: every rule looks at the same requests until it acts (or the cap)."""
    paired = mode is TrafficMode.SHADOW
    shadowgate = Shadowgate(SPECS[mode])
    rules: list[Rule] = [shadowgate, two_sided_msprt, naive_improvement(0.05), naive_improvement(0.10), naive_score]
    outcomes = [Outcome() for _ in rules]
    sums = Sums()
    generate = paired_requests if paired else canary_requests
    generate(rng, ratio, sums, FIRST_LOOK)
    look = 0
    while True:
        window = sums.window(paired)
        look += 1
        for index, rule in enumerate(rules):
            if outcomes[index].action is None:
                action = rule(sums, window, look)
                if action is not None:
                    outcomes[index] = Outcome(action, sums.n_candidate)
        if all(outcome.action is not None for outcome in outcomes) or sums.n_candidate >= CAP:
            return outcomes
        generate(rng, ratio, sums, EVERY)


# --- the report ---------------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    mode: TrafficMode
    ratio: float
    outcomes: list[list[Outcome]] = field(default_factory=list)

    def rate(self, rule: int, action: DecisionAction) -> float:
        return sum(run[rule].action is action for run in self.outcomes) / len(self.outcomes)

    def median(self, rule: int, action: DecisionAction) -> float | None:
        samples = [run[rule].samples for run in self.outcomes if run[rule].action is action]
        return statistics.median(samples) if samples else None

    def mean(self, rule: int, action: DecisionAction) -> float | None:
        samples = [run[rule].samples for run in self.outcomes if run[rule].action is action]
        return statistics.fmean(samples) if samples else None


def run_scenarios() -> Iterator[Scenario]:
    for name, mode, ratio in (
        ("identical", TrafficMode.SHADOW, 1.0),
        ("10% better", TrafficMode.SHADOW, 0.9),
        ("10% worse", TrafficMode.SHADOW, 1.1),
        ("identical", TrafficMode.CANARY, 1.0),
        ("10% better", TrafficMode.CANARY, 0.9),
    ):
        rng = random.Random(f"{SEED}-{mode.value}-{ratio}")
        scenario = Scenario(name, mode, ratio)
        scenario.outcomes = [simulate(rng, mode, ratio) for _ in range(RUNS)]
        yield scenario


def _percent(value: float) -> str:
    return f"{value:7.1%}"


def _count(value: float | None) -> str:
    return "      -" if value is None else f"{value:7,.0f}"


def main() -> int:
    started = time.perf_counter()
    print(
        f"bench/decision: {RUNS:,} runs per scenario, seed {SEED}; a look every {EVERY} scored requests "
        f"from {FIRST_LOOK} to {CAP:,}\n(canary: scored candidate requests, half the traffic each); MAE of "
        f"errors correlated {CORRELATION}, heteroscedastic outcomes (lognormal sigma {NOISE_SIGMA}).\n"
    )
    promote, roll_back = DecisionAction.PROMOTE, DecisionAction.ROLL_BACK
    scenarios = {(s.mode, s.name): s for s in run_scenarios()}
    ok = True
    for mode in TrafficMode:
        identical, better = scenarios[(mode, "identical")], scenarios[(mode, "10% better")]
        worse = scenarios.get((mode, "10% worse"))
        print(f"{mode.value} mode ({'paired' if mode is TrafficMode.SHADOW else 'unpaired'})")
        header = (
            f"  {'rule':<42} {'identical: promoted':>20} {'rolled back':>12}   "
            f"{'10% better: promoted':>21} {'median n':>9}"
        )
        if worse is not None:
            header += f"   {'10% worse: rolled back':>22} {'median n':>9}"
        print(header)
        for index, name in enumerate(RULE_NAMES):
            decides = index == 0
            line = (
                f"  {name:<42} {_percent(identical.rate(index, promote)):>20} "
                f"{_percent(identical.rate(index, roll_back)) if decides else '      -':>12}   "
                f"{_percent(better.rate(index, promote)):>21} {_count(better.median(index, promote)):>9}"
            )
            if worse is not None:
                line += (
                    f"   {_percent(worse.rate(index, roll_back)) if decides else '      -':>22} "
                    f"{_count(worse.median(index, roll_back)) if decides else '      -':>9}"
                )
            print(line)
        false_promotions = identical.rate(0, promote)
        verdict = "ok" if false_promotions <= ALPHA else "TOO HIGH"
        ok = ok and false_promotions <= ALPHA
        print(f"  false promotion rate of identical models {false_promotions:.1%} (limit {ALPHA:.0%}): {verdict}")
        print(
            f"  10% better: median {_count(better.median(0, promote)).strip()} scored requests to promote, "
            f"mean {_count(better.mean(0, promote)).strip()} (two-sided mSPRT: median "
            f"{_count(better.median(1, promote)).strip()}, mean {_count(better.mean(1, promote)).strip()}); "
            f"wrongly rolled back {better.rate(0, roll_back):.1%}\n"
        )
    print(f"{time.perf_counter() - started:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
