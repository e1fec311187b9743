"""What the analysis reads from the database for one ShadowDeployment: the contract between the SQL
(analysis/) and the decision (decision.py, stats.py). Plain data, no I/O.

Two windows meet here. The *evidence window* is what the quality comparison is over: since the analysis
began in shadow mode (every shadow step asks the same paired question, so evidence carries from step to
step), since the step began in canary mode (each step is a new split). The *step window* is the current
step alone: the hard gates and guardrails (requests, errors, latency) judge the candidate at its current
share of traffic. In shadow mode's first step and in canary mode the two are the same.

Per-request losses are computed in SQL from the configured metric (capped at the declared loss cap), so
the statistics only ever see sums: counts and power sums of the losses, of the paired differences, per
sticky key (for a variance that respects how requests were grouped) and per segment.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from shadowgate_operator.api import Metric

LATENCY_RELATIVE_ACCURACY = 0.001
"""Latency percentiles are within 0.1% of the exact value (p99 of 250 ms: 249.75 to 250.25 ms)."""

LATENCY_FLOOR_MS = 0.001
"""Latencies below 1 microsecond are counted as 1 microsecond (the histogram has no bucket for zero)."""


@dataclass(frozen=True)
class Moments:
    """Count and power sums of a series of numbers: enough for its mean and variance (and, with the cubes
    and fourth powers, for the bounded test of stats.py)."""

    n: int = 0
    total: float = 0.0
    total_squares: float = 0.0
    total_cubes: float = 0.0
    total_fourths: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """Sample variance (n - 1), None below two values."""
        if self.n < 2:
            return None
        return max(0.0, (self.total_squares - self.total * self.total / self.n) / (self.n - 1))

    def __add__(self, other: Moments) -> Moments:
        return Moments(
            self.n + other.n,
            self.total + other.total,
            self.total_squares + other.total_squares,
            self.total_cubes + other.total_cubes,
            self.total_fourths + other.total_fourths,
        )

    def __sub__(self, other: Moments) -> Moments:
        return Moments(
            self.n - other.n,
            self.total - other.total,
            self.total_squares - other.total_squares,
            self.total_cubes - other.total_cubes,
            self.total_fourths - other.total_fourths,
        )


@dataclass(frozen=True)
class Clustered:
    """One series grouped by sticky key: what the cluster-robust variance of its mean, and the skewness of
    that mean, need.

    With T_g the sum and n_g the count of key g's values: `keys` = G, `squares` = sum of T_g^2, `cross` =
    sum of n_g T_g, `counts` = sum of n_g^2, and for the third power `cubes` = sum of T_g^3,
    `cross_squares` = sum of n_g T_g^2, `cross_counts` = sum of n_g^2 T_g, `count_cubes` = sum of n_g^3.
    Keys are hashed into a fixed number of buckets in SQL, and a bucket holding several keys is one coarser
    cluster: still a valid grouping (every key in one bucket). Every sum is computed from the buckets'
    (n_g, T_g), which the analysis keeps (analysis/window.py), so none needs its own SQL.
    """

    keys: int = 0
    squares: float = 0.0
    cross: float = 0.0
    counts: float = 0.0
    cubes: float = 0.0
    cross_squares: float = 0.0
    cross_counts: float = 0.0
    count_cubes: float = 0.0

    def variance_of_mean(self, n: int, mean: float) -> float | None:
        """sum_g (T_g - n_g mean)^2 / n^2 * G / (G - 1) (the CR1 sandwich); None below two keys."""
        if self.keys < 2 or n <= 0:
            return None
        return max(0.0, self.residual_squares(mean)) / (n * n) * self.keys / (self.keys - 1)

    def residual_squares(self, mean: float) -> float:
        """sum_g (T_g - n_g mean)^2: the keys' residual totals, squared."""
        return self.squares - 2.0 * mean * self.cross + mean * mean * self.counts

    def residual_cubes(self, mean: float) -> float:
        """sum_g (T_g - n_g mean)^3: the keys' residual totals, cubed (their skewness is the mean's)."""
        return (
            self.cubes - 3.0 * mean * self.cross_squares + 3.0 * mean * mean * self.cross_counts
            - mean**3 * self.count_cubes
        )  # fmt: skip

    @classmethod
    def of(cls, groups: Iterable[tuple[int, float]]) -> Clustered:
        """From (n_g, T_g) per key."""
        keys = 0
        squares = cross = counts = cubes = cross_squares = cross_counts = count_cubes = 0.0
        for n, total in groups:
            if n <= 0:
                continue
            keys += 1
            squares += total * total
            cross += n * total
            counts += n * n
            cubes += total**3
            cross_squares += n * total * total
            cross_counts += n * n * total
            count_cubes += n**3
        return cls(keys, squares, cross, counts, cubes, cross_squares, cross_counts, count_cubes)


@dataclass
class LatencySketch:
    """Counts of latencies per logarithmic bucket: bucket i holds (gamma^(i-1), gamma^i].

    This is DDSketch's mapping (Masson, Rim, Lee: "DDSketch: a fast and fully-mergeable quantile sketch
    with relative-error guarantees", VLDB 2019): every value in a bucket is within `relative_accuracy`
    of the bucket's representative 2 gamma^i / (gamma + 1), so any percentile read from it is too.
    Buckets are computed in SQL and merged here by adding counts.
    """

    relative_accuracy: float = LATENCY_RELATIVE_ACCURACY
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def gamma(self) -> float:
        return (1 + self.relative_accuracy) / (1 - self.relative_accuracy)

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def bucket(self, value: float) -> int:
        """The bucket of one latency, exactly as the SQL computes it (for tests and callers)."""
        return math.ceil(math.log(max(value, LATENCY_FLOOR_MS)) / math.log(self.gamma))

    def add_buckets(self, buckets: Iterable[int] | None) -> None:
        """Count one value in each of these buckets (one per latency, as the SQL returns them)."""
        for bucket, count in Counter(buckets or ()).items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count

    def value(self, bucket: int) -> float:
        gamma = self.gamma
        return 2 * gamma**bucket / (gamma + 1)

    def quantile(self, q: float) -> float | None:
        """The q-quantile with linear interpolation between neighbouring values, as percentile_cont
        does, each value read as its bucket's representative. None when empty."""
        total = self.count
        if total == 0:
            return None
        rank = q * (total - 1)
        low = math.floor(rank)
        low_value = high_value = None
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if low_value is None and seen > low:
                low_value = self.value(bucket)
            if seen > low + 1 or seen == total:
                high_value = self.value(bucket)
                break
        assert low_value is not None and high_value is not None
        return low_value + (rank - low) * (high_value - low_value)

    def above(self, limit: float) -> int:
        """How many values are certainly above `limit`: those in buckets whose lower edge is at least it."""
        first = math.ceil(math.log(max(limit, LATENCY_FLOOR_MS)) / math.log(self.gamma)) + 1
        return sum(count for bucket, count in self.counts.items() if bucket >= first)

    def ranked(self, rank: int) -> float | None:
        """The value of the rank-th smallest latency (1-based), as its bucket's representative."""
        if rank < 1:
            return None
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return self.value(bucket)
        return None


@dataclass(frozen=True)
class SideMetrics:
    """One model: its calls in the step window, its losses in the evidence window."""

    requests: int = 0
    """Requests this side was asked to answer in the step (answered, mirrored, or failed)."""
    errors: int = 0
    """Of those, answers with HTTP status >= 500, timeouts and connection errors."""
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    loss: Moments = Moments()
    """Per-request loss on scored requests (those with an outcome) of the evidence window; lower is better
    for every metric. Canary mode: the side's own sample (intention to treat, analysis/sql.py)."""
    metric_value: float | None = None
    """The configured metric itself on scored requests (MAE, RMSE, accuracy, ...), for people."""
    latency: LatencySketch | None = None
    """The step's latencies (None when the caller has only the percentiles): the gates count requests
    slower than a limit, and bound percentiles, from it."""

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class SegmentMetrics:
    """One value of spec.analysis.segmentBy (an instrument, a market) over the evidence window."""

    name: str
    """The value; "(none)" for requests without one, "(other)" for values beyond the tracked ones."""
    production: Moments = Moments()
    candidate: Moments = Moments()
    difference: Moments = Moments()
    """Paired only: production loss minus candidate loss on the segment's scored pairs."""

    @property
    def samples(self) -> int:
        """Scored pairs (shadow) or the smaller side's scored requests (canary)."""
        return self.difference.n if self.difference.n else min(self.production.n, self.candidate.n)


@dataclass(frozen=True)
class WindowMetrics:
    """Everything the decision needs about the current windows (see the module docstring)."""

    production: SideMetrics
    candidate: SideMetrics
    scored: int
    """Scored requests of the evidence window: predictions with an outcome. In shadow mode, the pairs."""
    paired: bool
    """True in shadow mode: both models answered the same requests, compare per request."""
    loss_difference: Moments = Moments()
    """Paired only: production loss minus candidate loss, per scored request (positive = candidate better)."""
    agreement: float | None = None
    """Shadow: share of paired requests where both predicted the same (rounded class / sign / within 1e-9)."""
    clusters: tuple[Clustered, Clustered] | None = None
    """With a sticky key (spec.traffic.stickyHeader): the paired differences grouped by key (shadow:
    (differences, empty)), or each side's losses grouped by key (canary: (production, candidate));
    None when every request is its own key."""
    segments: tuple[SegmentMetrics, ...] = ()
    """Per segment, largest first, when spec.analysis.segmentBy is set."""
    quarantined: int = 0
    """Scored requests left out of every sum because a prediction, confidence or outcome was not a finite
    number within the sane range (analysis.sql.SANE_LIMIT): counted, never scored."""
    unscored_repeats: int = 0
    """Predictions not scored because their request id was scored already, or because they were made
    after their outcome was known (issue 12 D6)."""


def metric_value(metric: Metric, loss: Moments) -> float | None:
    """The configured metric as people read it, from the mean per-request loss: the mean itself for mae
    and logLoss, its square root for rmse (the loss is the squared error), and 1 - the mean (the share
    right) for accuracy and directionalAccuracy. The one definition: the SQL's sums and the decision's
    messages both go through it."""
    mean = loss.mean
    if mean is None:
        return None
    if metric is Metric.RMSE:
        return math.sqrt(max(mean, 0.0))
    if metric in (Metric.ACCURACY, Metric.DIRECTIONAL_ACCURACY):
        return 1.0 - mean
    return mean
