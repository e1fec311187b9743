"""LatencySketch: the logarithmic histogram behind the latency percentiles, checked against exact percentiles."""

from __future__ import annotations

import math
import random

import pytest

from shadowgate_operator.metrics import LATENCY_RELATIVE_ACCURACY, LatencySketch


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


def sketch_of(values: list[float]) -> LatencySketch:
    sketch = LatencySketch()
    sketch.add_buckets(sketch.bucket(value) for value in values)
    return sketch


def test_an_empty_sketch_has_no_percentiles() -> None:
    sketch = LatencySketch()
    sketch.add_buckets(None)
    assert sketch.count == 0
    assert sketch.quantile(0.5) is None


def test_one_value_is_every_percentile() -> None:
    sketch = sketch_of([42.0])
    for q in (0.0, 0.5, 0.99, 1.0):
        assert sketch.quantile(q) == pytest.approx(42.0, rel=LATENCY_RELATIVE_ACCURACY)


def test_percentiles_interpolate_between_neighbours_like_percentile_cont() -> None:
    sketch = sketch_of([10.0, 20.0])
    assert sketch.quantile(0.5) == pytest.approx(15.0, rel=LATENCY_RELATIVE_ACCURACY)
    assert sketch.quantile(0.25) == pytest.approx(12.5, rel=LATENCY_RELATIVE_ACCURACY)


@pytest.mark.parametrize("seed", range(5))
def test_every_percentile_is_within_the_relative_accuracy(seed: int) -> None:
    rng = random.Random(seed)
    # Heavy-tailed, several orders of magnitude, with ties and sub-microsecond values (floored).
    values = [rng.lognormvariate(2, 1.5) for _ in range(5000)] + [3.0] * 200 + [0.0] * 5
    sketch = sketch_of(values)
    assert sketch.count == len(values)
    floored = [max(value, 0.001) for value in values]
    for q in (0.0, 0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        got = sketch.quantile(q)
        want = exact_percentile(floored, q)
        assert got is not None
        assert abs(got - want) <= LATENCY_RELATIVE_ACCURACY * want * (1 + 1e-9), q


def test_sketches_add_up_like_their_values() -> None:
    """Runs of the analysis merge histograms by adding counts: the same as one histogram of all values."""
    rng = random.Random(9)
    first = [rng.uniform(1, 100) for _ in range(300)]
    second = [rng.uniform(50, 500) for _ in range(300)]
    merged = sketch_of(first)
    merged.add_buckets(merged.bucket(value) for value in second)
    assert merged.counts == sketch_of(first + second).counts
