"""bench/decision: how often the decision promotes or rolls back a candidate it should not, and how much
data it needs for one it should, on traffic shaped like a real desk's (issue 11).

Every row is 1,000 simulated rollouts (`--runs`) of one situation. A run draws requests one by one (the
outcome, each model's loss, latency and failures, the account and instrument), and every `every` counted
samples (a look: one analysis interval) the window's sums go to the project's own `decision.analyse()`
exactly as the operator hands them over, its status carried from look to look and from step to step
(`rollout.apply_decision`). The run ends at the first Promote, RollBack or Fail, or at `cap` counted
samples. Counted samples are what status.samples counts: scored pairs in shadow mode, the candidate's
scored requests in canary mode.

The requests: a regression target with heteroscedastic noise (each request's scale is lognormal, sigma
0.5, shared by both models), each model's error the shared part plus its own (correlated 0.85 unless a
row says otherwise), scored by MAE (the default metric). "10% better" scales the candidate's error by
0.9. For accuracy rows the loss is 0/1: the error is larger than the threshold that gives production a
30% error rate. Accounts (sticky keys) and instruments (segments) are drawn per request; an account may
have its own loss level and its own candidate effect. Latency is lognormal per side; failures are
Bernoulli, or the candidate's hardest requests.

Seeded and deterministic (each run has its own seed, so the figures do not depend on the number of
workers; `--seed` draws another set of runs, to see how much a figure owes to its seeds); numpy for the
requests, the operator's pure Python for the decision; runs on every core (`--workers`). Prints each row's
rates, the target it is held to, and the total runtime; exits 1 when a row misses its target.

The baseline, in the same run: the decision as it was before issue 11's analysis (`--baseline`, commit
6b4e836 by default: the normal-mixture mSPRT with plug-in variance, point-estimate hard gates, evidence
reset at every step, intention to treat already in). Its operator package and this bench as they were
then are taken from git (`git archive`) into a temporary directory and run there first, with the same
number of runs, on the same rows (a new row whose situation the old code cannot be configured for, e.g.
lossCap or segmentBy, is compared with the old row of the same traffic). `--baseline none` skips it.
`--baseline-bench current` runs this bench (with its newer rows) on the baseline's operator instead: a
change of the decision alone, measured on the same rows and seeds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import math
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "router")]

from shadowgate_operator.api import (  # noqa: E402
    DecisionAction,
    Phase,
    ShadowDeploymentSpec,
    ShadowDeploymentStatus,
    TrafficMode,
)
from shadowgate_operator.decision import analyse  # noqa: E402
from shadowgate_operator.metrics import (  # noqa: E402
    Clustered,
    LatencySketch,
    Moments,
    SegmentMetrics,
    SideMetrics,
    WindowMetrics,
)
from shadowgate_operator.rollout import apply_decision  # noqa: E402

CLUSTERED_FIELDS = frozenset(Clustered.__dataclass_fields__)

SEED = 20261125
"""The seed of the published figures; `--seed` replaces it (the runs' seeds are derived from it)."""
RUNS = 1000
BASELINE = "6b4e8364d80c36f8261a6215676e89cc7b62121e"
"""The last commit before issue 11's analysis: main with intention to treat for canary fallbacks."""
T0 = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
INTERVAL = dt.timedelta(seconds=30)
Array = npt.NDArray[np.float64]
Flags = npt.NDArray[np.bool_]


# --- the world a run draws its requests from ---------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """An instrument: its share of traffic before and after `World.shift_at`, and the candidate's error scale."""

    before: float
    after: float
    ratio: float


@dataclass(frozen=True)
class World:
    correlation: float = 0.85
    """Correlation of the two models' errors on the same request."""
    scale_sigma: float = 0.5
    """Spread (lognormal sigma) of the requests' scales: how heavy the losses' tail is (0: normal errors)."""
    ratio: float = 1.0
    """The candidate's error scale: 0.9 is 10% better, 1.1 10% worse."""
    metric: str = "mae"
    """mae (|error|) or accuracy (0/1: |error| above production's 70th percentile)."""
    accounts: int = 0
    """Sticky keys: each request comes from one of this many accounts (0: none, the request id is the key)."""
    account_level: float = 0.0
    """Spread (lognormal sigma) of the accounts' own loss levels, shared by both models."""
    account_effect: float = 0.0
    """Spread (sd) of the candidate's error scale across accounts, around `ratio`."""
    account_sizes: float = 0.0
    """Spread (lognormal sigma) of the accounts' shares of the traffic (0: every account alike). The shares
    are the lognormal's quantiles, the same in every run: a few large accounts and many small ones."""
    fail_hardest: float = 0.0
    """The candidate fails on this share of the hardest requests (largest scale): no answer."""
    rare_share: float = 0.0
    rare_loss: float = 0.0
    """On this share of requests the candidate's loss is `rare_loss`, whatever the outcome."""
    rare_scale: float = 0.0
    """Instead of `rare_loss`: on the rare requests the candidate's error is scaled by this, not `ratio`."""
    rare_production: bool = False
    """The rare loss (or scale) is production's instead (the candidate's mirror image)."""
    segments: tuple[Segment, ...] = ()
    shift_at: int = 0
    """Counted samples after which segment shares go from `before` to `after`."""
    error_production: float = 0.0
    error_candidate: float = 0.0
    p99_production: float = 100.0
    p99_candidate: float = 100.0
    """Latency is lognormal with sigma 0.5 and this p99 (ms)."""

    def draw(self, rng: np.random.Generator, n: int, shifted: bool) -> Requests:
        """n requests; per-request draws only (account-level draws come from `Accounts`)."""
        rho = self.correlation
        scale = np.exp(self.scale_sigma * rng.standard_normal(n))
        common = math.sqrt(rho) * rng.standard_normal(n)
        own = math.sqrt(1.0 - rho)
        error_p = scale * (common + own * rng.standard_normal(n))
        error_c = scale * (common + own * rng.standard_normal(n))
        segment = np.zeros(n, dtype=np.int64)
        ratio = np.full(n, self.ratio)
        if self.segments:
            shares = np.array([s.after if shifted else s.before for s in self.segments])
            segment = rng.choice(len(self.segments), size=n, p=shares / shares.sum())
            ratio = np.array([s.ratio for s in self.segments])[segment]
        sigma = 0.5
        z99 = 2.3263478740408408
        return Requests(
            scale=scale,
            error_p=error_p,
            error_c=error_c,
            ratio=ratio,
            segment=segment,
            account=self._accounts(rng, n),
            point=rng.random(n),
            rare=rng.random(n) < self.rare_share,
            fail_p=rng.random(n) < self.error_production,
            fail_c=rng.random(n) < self.error_candidate,
            latency_p=self.p99_production * np.exp(sigma * (rng.standard_normal(n) - z99)),
            latency_c=self.p99_candidate * np.exp(sigma * (rng.standard_normal(n) - z99)),
        )

    def _accounts(self, rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
        if not self.accounts:
            return np.full(n, -1, dtype=np.int64)
        if not self.account_sizes:
            return rng.integers(0, self.accounts, n)
        return np.searchsorted(_account_shares(self.accounts, self.account_sizes), rng.random(n)).astype(np.int64)


@functools.cache
def _account_shares(accounts: int, sigma: float) -> Array:
    """Cumulative traffic shares of `accounts` accounts sized like a lognormal(sigma)'s quantiles."""
    middle = np.array([_normal_quantile((k + 0.5) / accounts) for k in range(accounts)])
    sizes = np.exp(sigma * middle)
    cumulative = np.cumsum(sizes / sizes.sum())
    cumulative[-1] = 1.0
    return cumulative


@dataclass
class Requests:
    scale: Array
    error_p: Array
    error_c: Array
    ratio: Array
    segment: npt.NDArray[np.int64]
    account: npt.NDArray[np.int64]
    point: Array
    """Where the request's sticky key hashes to in [0, 1): the candidate's when below the weight."""
    rare: Flags
    fail_p: Flags
    fail_c: Flags
    latency_p: Array
    latency_c: Array


ACCURACY_THRESHOLD = 0.0
"""|error| above this is a miss; set at import to production's 70th percentile (a 30% error rate)."""


def _accuracy_threshold() -> float:
    rng = np.random.default_rng(1)
    world = World()
    requests = world.draw(rng, 400_000, False)
    return float(np.quantile(np.abs(requests.error_p), 0.7))


@dataclass
class Accounts:
    """The per-account draws of one run: loss level, candidate effect, and hash point."""

    level: Array
    effect: Array
    point: Array

    @classmethod
    def draw(cls, rng: np.random.Generator, world: World) -> Accounts:
        n = max(world.accounts, 1)
        return cls(
            level=np.exp(world.account_level * rng.standard_normal(n)),
            effect=world.account_effect * rng.standard_normal(n),
            point=rng.random(n),
        )


@dataclass
class Scored:
    """One batch of requests as the analysis sees them at a given weight (arrays per request)."""

    assigned: Flags
    """The candidate's share: mirrored (shadow) or answered by the candidate (canary)."""
    p_called: Flags
    p_ok: Flags
    c_ok: Flags
    c_failed: Flags
    fallback: Flags
    """The candidate failed and production answered instead (canary), or would have (shadow: fallbackToProduction)."""
    loss_p: Array
    loss_c: Array
    latency_p: Array
    latency_c: Array
    key: npt.NDArray[np.int64]
    segment: npt.NDArray[np.int64]


def score(world: World, accounts: Accounts, requests: Requests, weight: float, canary: bool, hard: float) -> Scored:
    """What happened to each request at this weight: who answered, the losses, the latencies."""
    r = requests
    if world.accounts:
        key = r.account
        assigned = accounts.point[key] < weight
        level = accounts.level[key]
        ratio = r.ratio + accounts.effect[key]
    else:
        key = np.arange(len(r.point))
        assigned = r.point < weight
        level = np.ones(len(r.point))
        ratio = r.ratio
    if world.rare_scale:
        if world.rare_production:
            level_p = level * np.where(r.rare, world.rare_scale, 1.0)
        else:
            level_p, ratio = level, np.where(r.rare, world.rare_scale, ratio)
    else:
        level_p = level
    error_p = level_p * r.error_p
    error_c = level * ratio * r.error_c
    if world.metric == "accuracy":
        loss_p = (np.abs(error_p) > ACCURACY_THRESHOLD).astype(np.float64)
        loss_c = (np.abs(error_c) > ACCURACY_THRESHOLD).astype(np.float64)
    else:
        loss_p, loss_c = np.abs(error_p), np.abs(error_c)
    if world.rare_loss and world.rare_production:
        loss_p = np.where(r.rare, world.rare_loss, loss_p)
    elif world.rare_loss:
        loss_c = np.where(r.rare, world.rare_loss, loss_c)
    c_failed = assigned & (r.fail_c | (r.scale > hard))
    p_called = np.ones(len(key), dtype=bool) if not canary else ~assigned | c_failed
    p_ok = p_called & ~r.fail_p
    return Scored(
        assigned=assigned,
        p_called=p_called,
        p_ok=p_ok,
        c_ok=assigned & ~c_failed,
        c_failed=c_failed,
        fallback=c_failed & p_ok,
        loss_p=loss_p,
        loss_c=loss_c,
        latency_p=r.latency_p,
        latency_c=r.latency_c,
        key=key,
        segment=r.segment,
    )


# --- the window: what analysis/window.py would return ---------------------------------------------

LATENCY_GAMMA = (1 + 0.001) / (1 - 0.001)
BUCKET_OFFSET = 0
BUCKETS = 4096
"""Latency histograms as dense arrays: buckets 0 .. 4095 (1 ms .. 3.6 s) with metrics.LatencySketch's mapping
(the SQL's go down to 1 microsecond; this bench's latencies are all within 1 ms .. 3.6 s)."""
KEY_BUCKETS = 1024
SERIES = ("p", "c", "d")


def _sketch(histogram: npt.NDArray[np.int64]) -> LatencySketch:
    (nonzero,) = np.nonzero(histogram)
    return LatencySketch(counts=dict(zip((nonzero - BUCKET_OFFSET).tolist(), histogram[nonzero].tolist(), strict=True)))


@dataclass
class Carried:
    """The evidence window's sums from earlier steps (shadow mode carries evidence across steps)."""

    powers: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((3, 5)))
    """Per series (production, candidate, difference): n and the sums of the first to fourth powers."""
    keys: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((3, 2, KEY_BUCKETS)))
    """Per series, per key bucket: n and sum."""
    segments: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((3, 3, 8)))
    """Per series, per segment: n, sum, sum of squares."""
    scored: int = 0
    samples: int = 0


class Stream:
    """One step's requests as the SQL sums them: running sums per request, so any prefix plus what
    earlier steps carried is a window."""

    def __init__(self, s: Scored, canary: bool, carried: Carried, sticky: bool, segmented: bool) -> None:
        self.canary, self.carried, self.sticky, self.segmented = canary, carried, sticky, segmented
        # Intention to treat: a request given to the candidate is scored for it on what the user got.
        served = s.c_ok | s.fallback
        if canary:
            p_scored, c_scored = s.p_ok & ~s.assigned, served
            samples = np.minimum(np.cumsum(p_scored) + carried.powers[0, 0], np.cumsum(c_scored) + carried.powers[1, 0])
            scored = np.cumsum(p_scored | c_scored)
        else:
            p_scored = c_scored = s.p_ok & served
            scored = np.cumsum(p_scored)
            samples = scored + carried.samples
        self.samples = samples.astype(np.int64)
        self.scored = scored + carried.scored
        loss_p = np.where(p_scored, s.loss_p, 0.0)
        loss_c = np.where(c_scored, np.where(s.c_ok, s.loss_c, s.loss_p), 0.0)
        d_scored = p_scored & c_scored if not canary else np.zeros(len(loss_p), dtype=bool)
        difference = np.where(d_scored, loss_p - loss_c, 0.0)
        self.values = {"p": (p_scored, loss_p), "c": (c_scored, loss_c), "d": (d_scored, difference)}
        self.powers = np.stack(
            [
                np.stack([np.cumsum(flags)] + [np.cumsum(values**k) for k in range(1, 5)])
                for flags, values in self.values.values()
            ]
        )  # (series, power, request)
        self.step = {
            "p_requests": np.cumsum(s.p_called), "p_errors": np.cumsum(s.p_called & ~s.p_ok),
            "c_requests": np.cumsum(s.assigned), "c_errors": np.cumsum(s.c_failed),
        }  # fmt: skip
        self.key = s.key % KEY_BUCKETS
        self.segment = s.segment
        self.bucket_p = np.where(s.p_called, np.ceil(np.log(s.latency_p) / math.log(LATENCY_GAMMA)), -1).astype(int)
        self.bucket_c = np.where(s.assigned, np.ceil(np.log(s.latency_c) / math.log(LATENCY_GAMMA)), -1).astype(int)
        self._done = 0
        self._histograms = (np.zeros(BUCKETS, dtype=np.int64), np.zeros(BUCKETS, dtype=np.int64))
        self._grouped_upto = 0
        self._keys = carried.keys.copy()
        self._segments = carried.segments.copy()

    def _grouped(self, upto: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Per key bucket and per segment sums after requests [0, upto), added up look by look."""
        done = self._grouped_upto
        if self.sticky and upto > done:
            keys = self.key[done:upto]
            for index, (flags, values) in enumerate(self.values.values()):
                self._keys[index, 0] += np.bincount(keys, weights=flags[done:upto], minlength=KEY_BUCKETS)
                self._keys[index, 1] += np.bincount(keys, weights=values[done:upto], minlength=KEY_BUCKETS)
        if self.segmented and upto > done:
            segment = self.segment[done:upto]
            for index, (flags, values) in enumerate(self.values.values()):
                batch = values[done:upto]
                for power, weights in enumerate((flags[done:upto], batch, batch * batch)):
                    self._segments[index, power] += np.bincount(segment, weights=weights, minlength=8)
        self._grouped_upto = max(done, upto)
        return self._keys, self._segments

    def _latency(self, upto: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Dense latency histograms (bucket + BUCKET_OFFSET) of the step's requests so far."""
        for buckets, histogram in zip((self.bucket_p, self.bucket_c), self._histograms, strict=True):
            batch = buckets[self._done : upto]
            batch = batch[batch >= 0] + BUCKET_OFFSET
            histogram += np.bincount(np.clip(batch, 0, BUCKETS - 1), minlength=BUCKETS)
        self._done = upto
        return self._histograms

    def sums(self, upto: int) -> Carried:
        """What the evidence window holds after requests [0, upto): carried plus this step's."""
        powers = self.carried.powers + self.powers[:, :, upto - 1]
        keys, segments = self._grouped(upto)
        return Carried(powers, keys.copy(), segments.copy(), int(self.scored[upto - 1]), int(self.samples[upto - 1]))

    def window(self, upto: int, sketches: Callable[[float | None, float | None], bool]) -> WindowMetrics:
        """The windows after requests [0, upto) with the definitions of analysis/sql.py. `sketches(p99
        production, p99 candidate)` says whether the decision will read the latency histograms (building
        them is the slowest part of a look; the percentiles always come)."""
        powers = self.carried.powers + self.powers[:, :, upto - 1]
        keys, grouped = self._grouped(upto)
        production_latency, candidate_latency = self._latency(upto)
        p99 = (_quantile(production_latency, 0.99), _quantile(candidate_latency, 0.99))
        with_sketches = sketches(*p99)

        def moments(index: int) -> Moments:
            n, s1, s2, s3, s4 = powers[index].tolist()
            return Moments(round(n), s1, s2, s3, s4) if round(n) else Moments()

        def side(prefix: str, index: int, histogram: npt.NDArray[np.int64]) -> SideMetrics:
            return SideMetrics(
                requests=int(self.step[f"{prefix}_requests"][upto - 1]),
                errors=int(self.step[f"{prefix}_errors"][upto - 1]),
                latency_p50_ms=_quantile(histogram, 0.5),
                latency_p99_ms=p99[index],
                loss=moments(index),
                latency=_sketch(histogram) if with_sketches else None,
            )

        clusters = None
        if self.sticky:

            def clustered(index: int) -> Clustered:
                """Clustered.of over the key buckets, vectorised (the sums an older Clustered has not are left
                out, so that a baseline's operator can run this bench)."""
                n, total = np.rint(keys[index, 0]), keys[index, 1]
                used = n > 0
                n, total = n[used], total[used]
                sums = {
                    "keys": int(used.sum()), "squares": float((total * total).sum()),
                    "cross": float((n * total).sum()), "counts": float((n * n).sum()),
                    "cubes": float((total**3).sum()), "cross_squares": float((n * total * total).sum()),
                    "cross_counts": float((n * n * total).sum()), "count_cubes": float((n**3).sum()),
                }  # fmt: skip
                return Clustered(**{name: value for name, value in sums.items() if name in CLUSTERED_FIELDS})

            clusters = (clustered(2), Clustered()) if not self.canary else (clustered(0), clustered(1))
        segments: tuple[SegmentMetrics, ...] = ()
        if self.segmented:
            found = []
            for segment in range(8):
                parts = [grouped[index, :, segment].tolist() for index in range(3)]
                if parts[0][0] or parts[1][0]:
                    found.append(
                        SegmentMetrics(
                            chr(ord("A") + segment),
                            *(Moments(round(n), s1, s2) if round(n) else Moments() for n, s1, s2 in parts),
                        )
                    )
            segments = tuple(sorted(found, key=lambda g: (-g.samples, g.name)))
        return WindowMetrics(
            production=side("p", 0, production_latency),
            candidate=side("c", 1, candidate_latency),
            scored=int(self.scored[upto - 1]),
            paired=not self.canary,
            loss_difference=moments(2) if not self.canary else Moments(),
            clusters=clusters,
            segments=segments,
        )


def _quantile(histogram: npt.NDArray[np.int64], q: float) -> float | None:
    """LatencySketch.quantile on a dense histogram (linear interpolation between bucket representatives)."""
    cumulative = np.cumsum(histogram)
    total = int(cumulative[-1])
    if total == 0:
        return None
    rank = q * (total - 1)
    low = math.floor(rank)
    low_bucket = int(np.searchsorted(cumulative, low + 1))
    high_bucket = int(np.searchsorted(cumulative, min(low + 2, total)))

    def value(index: int) -> float:
        return 2 * LATENCY_GAMMA ** (index - BUCKET_OFFSET) / (LATENCY_GAMMA + 1)

    return value(low_bucket) + (rank - low) * (value(high_bucket) - value(low_bucket))


# --- one run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One situation of the table: the world, the ShadowDeployment, how often it is looked at, and the
    figure it is held to."""

    key: str
    title: str
    world: World
    mode: TrafficMode = TrafficMode.SHADOW
    steps: tuple[int, ...] = (10,)
    analysis: dict[str, Any] = field(default_factory=dict)
    sticky: bool = False
    every: int = 50
    cap: int = 5000
    expect: str = "aa"
    """aa: no promotion wanted (held to <= 1%); better: promotion wanted; worse: rollback wanted;
    gate-aa: no rollback wanted (held to <= 2%); gate: rollback wanted; report: printed, not held."""
    target_median: int | None = None
    """better/worse: the median counted samples the decision must come within."""
    identical: bool = False
    """aa rows whose candidate is the same model: also held to rolled back <= 5%."""
    note: str = ""
    oracle: bool = False
    """Also run the oracle SPRT on the same requests (one shadow step): the floor any test reaches."""
    baseline: str | None = None
    """The baseline's row for the same traffic, when this row's key is new (default: the same key)."""

    def spec(self) -> ShadowDeploymentSpec:
        traffic: dict[str, Any] = {"mode": self.mode.value, "steps": list(self.steps)}
        if self.sticky:
            traffic["stickyHeader"] = "X-Account-Id"
        return ShadowDeploymentSpec.model_validate(
            {
                "production": {"name": "model-v1", "version": "1", "url": "http://production:8080"},
                "candidate": {"name": "model-v2", "version": "2", "url": "http://candidate:8080"},
                "traffic": traffic,
                "analysis": self.analysis,
                "database": {"secretRef": {"name": "db"}},
                "outcomes": {"tokenSecretRef": {"name": "outcomes"}},
            }
        )


@dataclass(frozen=True)
class Result:
    action: DecisionAction | None
    samples: int
    """Counted samples over all steps when the run ended."""
    requests: int
    """Candidate requests over all steps when the run ended."""
    gate: bool = False
    """The run ended on a hard gate (maxErrorRate, maxLatencyP99Ms), not on quality."""
    oracle: int | None = None
    """Oracle rows: the counted samples at which the oracle SPRT decided on the same requests (None: not
    within the cap)."""


HARD = 1e9


def _concat(first: Requests, second: Requests, cut: int) -> Requests:
    """The first `cut` requests of `first`, then `second` (same total length)."""
    n = len(first.point)
    return Requests(
        **{
            name: np.concatenate([getattr(first, name)[:cut], getattr(second, name)[: n - cut]])
            for name in Requests.__dataclass_fields__
        }
    )


def simulate(row: Row, spec: ShadowDeploymentSpec, base: int, seed: int) -> Result:
    """One rollout of `row`: steps, looks, the real decision, until it acts or the cap; its requests drawn
    from `seed` within the set of runs `base` (--seed)."""
    rng = np.random.default_rng([base, seed])
    world = row.world
    canary = row.mode is TrafficMode.CANARY
    segmented = spec.analysis.segment_by is not None
    accounts = Accounts.draw(rng, world)
    hard = float(np.exp(0.5 * _normal_quantile(1.0 - world.fail_hardest))) if world.fail_hardest else HARD
    status = ShadowDeploymentStatus(
        phase=Phase.PROGRESSING, current_step=0, current_weight=row.steps[0], step_started_at=T0,
        analysis_started_at=T0, analysis_revision=spec.analysis_revision(),
    )  # fmt: skip
    analysis = spec.analysis

    def needs_sketches(production: float | None, candidate: float | None) -> bool:
        """When decision.py reads the histograms: a latency gate, or a slowdown beyond the tolerance as
        measured (otherwise none can be established and it does not look)."""
        if analysis.max_latency_p99_ms is not None:
            return True
        return (
            production is not None and candidate is not None and candidate - production > analysis.latency_tolerance_ms
        )

    carried = Carried()
    done = total_requests = look = 0  # done: counted samples of finished canary steps (shadow carries them)
    oracle: int | None = None
    while True:
        weight = row.steps[status.current_step or 0] / 100.0
        n = int((row.cap - carried.samples) / weight * 1.3) + 400
        shifted = bool(world.shift_at) and done + carried.samples >= world.shift_at
        requests = world.draw(rng, n, shifted=shifted)
        if world.shift_at and not shifted:
            # Shares change once the rollout has counted shift_at samples: splice the stream there.
            before = Stream(score(world, accounts, requests, weight, canary, hard), canary, carried, False, False)
            cut = int(np.searchsorted(before.samples, world.shift_at - done, side="left"))
            requests = _concat(requests, world.draw(rng, n, shifted=True), min(cut, n))
        stream = Stream(score(world, accounts, requests, weight, canary, hard), canary, carried, row.sticky, segmented)
        samples = stream.samples
        first = (int(carried.samples) // row.every + 1) * row.every
        targets = np.arange(first, min(int(samples[-1]), row.cap - done) + 1, row.every)
        positions = np.searchsorted(samples, targets, side="left")
        if row.oracle and oracle is None:
            oracle = _oracle(row, spec, stream, targets, positions)
        advanced = False
        for position in positions:
            look += 1
            upto = int(position) + 1
            now = T0 + INTERVAL * look
            verdict = analyse(spec, status, stream.window(upto, needs_sketches), now)
            status = status.model_copy(
                update={"metrics": verdict.metrics, "samples": verdict.samples, "evidence": verdict.evidence}
            )
            status, _ = apply_decision(spec, status, verdict.decision, now)
            action = verdict.decision.action
            if action is DecisionAction.WAIT:
                continue
            total_requests += int(stream.step["c_requests"][upto - 1])
            if action is DecisionAction.ADVANCE and status.phase is Phase.PROGRESSING:
                # Shadow steps carry the evidence window on; canary steps start a new one.
                if canary:
                    done += int(samples[upto - 1])
                    carried = Carried()
                else:
                    carried = stream.sums(upto)
                advanced = True
                break
            return Result(action, done + int(samples[upto - 1]), total_requests, verdict.gate is not None, oracle)
        if not advanced:
            last = int(positions[-1]) + 1 if len(positions) else 0
            samples_at_end = done + (int(samples[last - 1]) if last else carried.samples)
            return Result(None, samples_at_end, total_requests, oracle=oracle)


_ORACLE_DRAWS = 1_000_000


def _oracle(
    row: Row, spec: ShadowDeploymentSpec, stream: Stream, targets: npt.NDArray[np.int64], positions: npt.NDArray[Any]
) -> int | None:
    """Wald's SPRT of "no difference" against the row's true difference of losses, told the true mean
    delta and standard deviation sigma of the per-request differences (from a million draws of the same
    world): log LR = (delta S_n - n delta^2 / 2) / sigma^2 over the same looks as the decision, at the same
    error rate (1 - rollbackConfidence for a worse candidate, 1 - confidence for a better one). For a
    known alternative no test with that error rate needs fewer samples on average (Wald, Wolfowitz 1948):
    it shows how close the decision, which does not know the effect, comes to what is possible."""
    delta, sigma = _true_difference(row.world)
    alpha = 1.0 - (spec.analysis.rollback_confidence if row.expect == "worse" else spec.analysis.confidence)
    sums = stream.powers[2, 1, positions]
    llr = (delta * sums - targets * delta * delta / 2) / (sigma * sigma)
    crossed = np.nonzero(llr >= math.log(1.0 / alpha))[0]
    return int(targets[crossed[0]]) if len(crossed) else None


_TRUE: dict[World, tuple[float, float]] = {}


def _true_difference(world: World) -> tuple[float, float]:
    """The mean and standard deviation of production's loss minus the candidate's on one request."""
    if world not in _TRUE:
        rng = np.random.default_rng([SEED, 0])
        scored = score(world, Accounts.draw(rng, world), world.draw(rng, _ORACLE_DRAWS, False), 1.0, False, HARD)
        difference = scored.loss_p - scored.loss_c
        _TRUE[world] = float(difference.mean()), float(difference.std())
    return _TRUE[world]


def _normal_quantile(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


# --- the rows ---------------------------------------------------------------------------------------

WORLD = World()
ROWS: tuple[Row, ...] = ()


def _rows() -> tuple[Row, ...]:
    canary, same = TrafficMode.CANARY, True
    levels = World(accounts=200, account_level=0.4)
    shift = World(segments=(Segment(0.8, 0.2, 0.9), Segment(0.2, 0.8, 1.1)), shift_at=600)
    accuracy = {"metric": "accuracy"}
    latency = {"maxLatencyP99Ms": 170}
    segment_by = {"segmentBy": {"header": "X-Instrument"}}
    return (
        # The issue's table.
        Row("canary-sticky-200", "canary 10% + stickyHeader, 200 accounts of different loss levels: identical",
            levels, mode=canary, sticky=True, identical=same),
        Row("canary-sticky-1000", "the same with 1,000 accounts", replace(levels, accounts=1000), mode=canary,
            sticky=True, identical=same),
        Row("canary-sticky-5000", "the same with 5,000 accounts", replace(levels, accounts=5000), mode=canary,
            sticky=True, identical=same),
        Row("shadow-sticky", "shadow + stickyHeader, 200 accounts, effect varies by account, zero overall",
            World(accounts=200, account_effect=0.1), sticky=True),
        # The skewness rule: the direction a skewed estimate overstates waits, the other does not
        # (stats.Estimate.skewness). Equal mean losses, the per-request differences strongly skewed
        # (skewness -2.6 and +2.1, normal errors): the first a candidate usually a little better and now
        # and then much worse, the second its mirror. Printed, not held: on paired differences this skewed
        # the normal test overstates its evidence whichever way the rule points (README).
        Row("skew-candidate-aa", "equal mean loss: the candidate's error x0.8 on 90% of requests, x2.8 on 10%",
            World(ratio=0.8, rare_share=0.1, rare_scale=2.8, scale_sigma=0.0), expect="report"),
        Row("skew-production-aa", "its mirror: the candidate's error x1.2, production's x3 on 10% of requests",
            World(ratio=1.2, rare_share=0.1, rare_scale=3.0, rare_production=True, scale_sigma=0.0),
            expect="report"),
        Row("sticky-worse-20", "canary 20% + stickyHeader, 1,000 accounts of skewed sizes and levels: 89% worse (e2e)",
            World(accounts=1000, account_level=0.4, account_sizes=1.0, ratio=1.89), mode=canary, steps=(20,),
            sticky=True, expect="worse"),
        Row("canary-fallback", "canary 10% + fallback: the candidate fails its hardest 2% of requests",
            World(fail_hardest=0.02), mode=canary),
        Row("rare-25", "10% better on 99.6% of requests, loss 25 on 0.4% (about 2% worse overall)",
            World(ratio=0.9, rare_share=0.004, rare_loss=25.0), expect="report"),
        Row("rare-50", "10% better on 99.8% of requests, loss 50 on 0.2% (about 4% worse overall)",
            World(ratio=0.9, rare_share=0.002, rare_loss=50.0), expect="report"),
        Row("segments-shift", "+10% on instrument A, -10% on B, traffic 80/20 shifting to 20/80, segmentBy",
            shift, analysis=segment_by),
        Row("segments-shift-off", "the same without segmentBy", shift, expect="report", baseline="segments-shift"),
        Row("rare-25-capped", "the rare-25 row with lossCap 30: a bounded loss", World(ratio=0.9, rare_share=0.004,
            rare_loss=25.0), analysis={"lossCap": 30}, baseline="rare-25"),
        Row("rare-50-capped", "the rare-50 row with lossCap 60", World(ratio=0.9, rare_share=0.002, rare_loss=50.0),
            analysis={"lossCap": 60}, baseline="rare-50"),
        Row("aa-10", "identical, a look every 10", WORLD, every=10, cap=2000, identical=same),
        Row("gate-errors-aa", "identical, both fail 3% of requests, maxErrorRate 5%",
            World(error_production=0.03, error_candidate=0.03), expect="gate-aa"),
        Row("gate-latency-aa", "identical, true p99 160 ms, maxLatencyP99Ms 170",
            World(p99_production=160.0, p99_candidate=160.0), analysis=latency, expect="gate-aa"),
        # Independent, well-behaved traffic.
        Row("aa-50", "identical, a look every 50", WORLD, identical=same),
        Row("better-10", "10% better", World(ratio=0.9), expect="better", target_median=500, oracle=True),
        Row("better-5", "5% better", World(ratio=0.95), expect="better"),
        Row("worse-10", "10% worse", World(ratio=1.1), expect="worse", target_median=300, oracle=True),
        Row("three-steps", "10% better, the demo's three shadow steps (5%, 20%, 50%)", World(ratio=0.9),
            steps=(5, 20, 50), expect="better", target_median=700),
        Row("canary-aa", "canary 10%: identical", WORLD, mode=canary, identical=same),
        Row("canary-better", "canary 10%: 10% better", World(ratio=0.9), mode=canary, expect="better"),
        Row("low-corr-aa", "errors correlated 0.2: identical", World(correlation=0.2), identical=same),
        Row("low-corr-better", "errors correlated 0.2: 10% better", World(correlation=0.2, ratio=0.9),
            expect="better"),
        Row("low-traffic", "low traffic: identical, a look every 5 scored requests", WORLD, every=5, cap=1000,
            identical=same),
        Row("accuracy-aa", "accuracy: identical", World(metric="accuracy"), analysis=accuracy, identical=same),
        Row("accuracy-better", "accuracy: 10% smaller errors", World(metric="accuracy", ratio=0.9),
            analysis=accuracy, expect="better"),
        # Hard gates that should trip.
        Row("gate-errors", "the candidate fails 10% of requests, maxErrorRate 5%",
            World(error_production=0.01, error_candidate=0.10), expect="gate"),
        Row("gate-latency", "the candidate's true p99 250 ms, maxLatencyP99Ms 170",
            World(p99_production=160.0, p99_candidate=250.0), analysis=latency, expect="gate"),
    )  # fmt: skip


# --- running the rows -------------------------------------------------------------------------------


def _run_chunk(task: tuple[int, int, int, int]) -> list[Result]:
    index, first, count, base = task
    row = ROWS[index]
    spec = row.spec()
    return [simulate(row, spec, base, index * 1_000_003 + run) for run in range(first, first + count)]


def _init() -> None:
    global ROWS, ACCURACY_THRESHOLD
    ROWS = _rows()
    ACCURACY_THRESHOLD = _accuracy_threshold()


@dataclass
class Summary:
    row: Row
    results: list[Result]

    def rate(self, action: DecisionAction) -> float:
        return sum(r.action is action for r in self.results) / len(self.results)

    def interval(self, action: DecisionAction) -> tuple[float, float]:
        """The Wilson 95% interval of `rate(action)`."""
        return wilson(sum(r.action is action for r in self.results), len(self.results))

    @property
    def gate_trips(self) -> int:
        return sum(r.gate for r in self.results)

    def median(self, action: DecisionAction) -> float | None:
        samples = [r.samples for r in self.results if r.action is action]
        return statistics.median(samples) if samples else None

    def median_requests(self, action: DecisionAction) -> float | None:
        samples = [r.requests for r in self.results if r.action is action]
        return statistics.median(samples) if samples else None

    def verdict(self) -> tuple[str, bool]:
        row = self.row
        promoted, rolled_back = self.rate(DecisionAction.PROMOTE), self.rate(DecisionAction.ROLL_BACK)
        if row.expect == "aa":
            if row.identical:
                return "promoted <= 1%, rolled back <= 5%", promoted <= 0.01 and rolled_back <= 0.05
            return "promoted <= 1%", promoted <= 0.01
        if row.expect == "better":
            median = self.median(DecisionAction.PROMOTE)
            limit = row.target_median
            ok = promoted >= 0.95 and (limit is None or (median is not None and median <= limit))
            return f"promoted >= 95%{f', median <= {limit}' if limit else ''}", ok
        if row.expect == "worse":
            median = self.median(DecisionAction.ROLL_BACK)
            limit = row.target_median
            ok = rolled_back >= 0.95 and (limit is None or (median is not None and median <= limit))
            return f"rolled back >= 95%{f', median <= {limit}' if limit else ''}", ok
        if row.expect == "gate-aa":
            trips = self.gate_trips / len(self.results)
            return "gate trips <= 2%, promoted <= 1%", trips <= 0.02 and promoted <= 0.01
        if row.expect == "gate":
            return "rolled back >= 95%", rolled_back >= 0.95
        return "printed with its assumption", True


def wilson(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (95% with the default z)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def _fmt_interval(interval: tuple[float, float]) -> str:
    return f"[{interval[0]:.1%}, {interval[1]:.1%}]"


def _fmt_count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


@dataclass(frozen=True)
class Baseline:
    """One row of the baseline's output."""

    promoted: float
    rolled_back: float
    median: str


_BASELINE_LINE = re.compile(r"^(\S+)\s+([\d.]+)%\s+(?:-\s+)?([\d.]+)%\s+(?:-\s+)?(\S+)\s+(\S+)\s+")
"""A row's line, as the baseline's bench prints it (this one: with "-" for its own baseline's columns)."""


def run_baseline(
    ref: str, keys: list[str], runs: int, workers: int, current_bench: bool = False, seed: int = SEED
) -> tuple[dict[str, Baseline], float]:
    """The bench and the operator as of `ref` (with `current_bench`, this bench and the operator as of
    `ref`), run with the same runs on the rows `keys`: its rates per row key, and its runtime in seconds.
    Only the current bench takes `seed`; the bench as of `ref` runs on its own."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-decision-baseline-") as directory:
        parts = ["operator", "router"] + ([] if current_bench else ["bench/decision"])
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", ref, *parts], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
        if current_bench:
            (Path(directory) / "bench/decision").mkdir(parents=True)
            (Path(directory) / "bench/decision/run.py").write_bytes(Path(__file__).read_bytes())
        old = subprocess.run(
            [sys.executable, str(Path(directory) / "bench/decision/run.py"), "--runs", str(runs),
             "--workers", str(workers), "--rows", ",".join(keys),
             *(["--baseline", "none", "--seed", str(seed)] if current_bench else [])],
            capture_output=True, text=True, cwd=directory,
        )  # fmt: skip
    found = {}
    for line in old.stdout.splitlines():
        match = _BASELINE_LINE.match(line)
        if match:
            key, promoted, rolled_back, median = match.group(1, 2, 3, 4)
            found[key] = Baseline(float(promoted) / 100, float(rolled_back) / 100, median)
    if not found:
        raise SystemExit(f"the baseline ({ref}) printed no rows:\n{old.stdout}\n{old.stderr}")
    return found, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument(
        "--seed", type=int, default=SEED,
        help=f"the seed the runs' seeds derive from (default {SEED}, the published figures')",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rows", help="comma-separated row keys (default: all)")
    parser.add_argument("--baseline", default=BASELINE, help="git commit of the baseline, or none")
    parser.add_argument("--baseline-runs", type=int, help="runs per row of the baseline (default: --runs)")
    parser.add_argument(
        "--baseline-bench", choices=("ref", "current"), default="ref",
        help="the bench the baseline runs: its own as of --baseline (default), or this one (rows added since "
        "included) with the baseline's operator",
    )  # fmt: skip
    args = parser.parse_args(argv)
    _init()
    chosen = [i for i, row in enumerate(ROWS) if not args.rows or row.key in args.rows.split(",")]
    baseline: dict[str, Baseline] = {}
    baseline_runs = args.baseline_runs or args.runs
    if args.baseline != "none":
        keys = sorted({ROWS[i].baseline or ROWS[i].key for i in chosen})
        if args.baseline_bench == "current":
            keys = sorted({ROWS[i].key for i in chosen})
        baseline, spent = run_baseline(
            args.baseline, keys, baseline_runs, args.workers, args.baseline_bench == "current", args.seed
        )
        print(f"baseline {args.baseline[:7]}: {len(baseline)} rows, {baseline_runs:,} runs each, in {spent:.0f} s")
    started = time.perf_counter()
    print(
        f"bench/decision: {args.runs:,} runs per row, seed {args.seed}, {args.workers} workers; counted samples = "
        "scored pairs (shadow) or the candidate's scored requests (canary); old = the baseline "
        f"({args.baseline[:7]}, {baseline_runs:,} runs), on the same traffic; [a, b]: Wilson 95% interval\n"
    )
    header = (
        f"{'row':<20} {'promoted':>9} {'(old)':>7} {'rolled back':>12} {'(old)':>7} {'median n':>9} {'(old)':>7} "
        f"{'(requests)':>11}  target"
    )
    print(header, flush=True)
    chunk = max(1, min(50, args.runs // 4))
    tasks = [
        (i, first, min(chunk, args.runs - first), args.seed) for i in chosen for first in range(0, args.runs, chunk)
    ]
    results: dict[int, list[Result]] = {i: [] for i in chosen}
    ok = True
    with multiprocessing.get_context("fork").Pool(args.workers, initializer=_init) as pool:
        # Tasks come back in order: a row is printed as soon as its last run is in.
        for (index, *_), chunk_results in zip(tasks, pool.imap(_run_chunk, tasks), strict=True):
            results[index].extend(chunk_results)
            if len(results[index]) == args.runs:
                ok = _print_row(Summary(ROWS[index], results[index]), baseline) and ok
    print(f"\nruntime {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


def _print_row(summary: Summary, baseline: dict[str, Baseline]) -> bool:
    """One row's two lines; whether it meets its target (on the rates measured)."""
    row = summary.row
    old = baseline.get(row.key) if row.key in baseline else baseline.get(row.baseline or row.key)
    action = DecisionAction.ROLL_BACK if row.expect in ("worse", "gate") else DecisionAction.PROMOTE
    target, passed = summary.verdict()
    print(
        f"{row.key:<20} {summary.rate(DecisionAction.PROMOTE):>9.1%} "
        f"{f'{old.promoted:.1%}' if old else '-':>7} "
        f"{summary.rate(DecisionAction.ROLL_BACK):>12.1%} {f'{old.rolled_back:.1%}' if old else '-':>7} "
        f"{_fmt_count(summary.median(action)):>9} {old.median if old else '-':>7} "
        f"{_fmt_count(summary.median_requests(action)):>11}  {target}: {'ok' if passed else 'MISSED'}"
    )
    runs = len(summary.results)
    trips = summary.gate_trips
    print(
        f"{'':<20} promoted {_fmt_interval(summary.interval(DecisionAction.PROMOTE))}, rolled back "
        f"{_fmt_interval(summary.interval(DecisionAction.ROLL_BACK))}, of which on a hard gate {trips / runs:.1%} "
        f"{_fmt_interval(wilson(trips, runs))}"
    )
    if row.oracle:
        found = [r.oracle for r in summary.results if r.oracle is not None]
        median = statistics.median(found) if found else None
        print(
            f"{'':<20} oracle SPRT on the same requests (knows the true effect; no test is faster on average): "
            f"decided in {len(found) / runs:.1%} of runs, median n {_fmt_count(median)}"
        )
    print(f"{'':<20} {row.title}{f' (old: {row.baseline})' if row.baseline else ''}", flush=True)
    return passed


if __name__ == "__main__":
    sys.exit(main())
