"""What the analysis reads from the database for one ShadowDeployment and window: the contract between
the SQL (queries.py) and the decision (decision.py, stats.py). Plain data, no I/O.

Per-request losses are computed in SQL from the configured metric, so the statistics only ever see
sums: the quality comparison needs n, the mean and the variance of the losses (paired differences in
shadow mode, each side on its own in canary mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shadowgate_operator.api import Metric


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of a series of numbers (enough for its mean and variance)."""

    n: int = 0
    total: float = 0.0
    total_squares: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """Sample variance (n - 1), None below two values."""
        if self.n < 2:
            return None
        return max(0.0, (self.total_squares - self.total * self.total / self.n) / (self.n - 1))


@dataclass(frozen=True)
class SideMetrics:
    """One model over the window."""

    requests: int = 0
    """Requests this side was asked to answer (answered, mirrored, or failed)."""
    errors: int = 0
    """Of those, answers with HTTP status >= 500, timeouts and connection errors."""
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    loss: Moments = Moments()
    """Per-request loss on scored requests (those with an outcome); lower is better for every metric."""
    metric_value: float | None = None
    """The configured metric itself on scored requests (MAE, RMSE, accuracy, ...), for people."""

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class WindowMetrics:
    """Everything the decision needs about the current step's window."""

    production: SideMetrics
    candidate: SideMetrics
    scored: int
    """Scored requests: predictions with an outcome. In shadow mode, those both sides answered."""
    paired: bool
    """True in shadow mode: both models answered the same requests, compare per request."""
    loss_difference: Moments = Moments()
    """Paired only: production loss minus candidate loss, per scored request (positive = candidate better)."""
    agreement: float | None = None
    """Shadow: share of paired requests where both predicted the same (rounded class / sign / within 1e-9)."""


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
