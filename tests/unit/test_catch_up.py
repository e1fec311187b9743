"""How often the operator catches a window's sums up: about CATCH_UP_ROWS rows per read, within bounds."""

from __future__ import annotations

import datetime as dt

import pytest

from shadowgate_operator.analysis.window import (
    CATCH_UP_MIN_SECONDS,
    CATCH_UP_ROWS,
    CATCH_UP_SECONDS,
    WindowAnalysis,
)
from shadowgate_operator.api import Metric, TrafficMode

SINCE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def after_a_run(rows: int, span: float) -> WindowAnalysis:
    analysis = WindowAnalysis("ns", "model", Metric.MAE, TrafficMode.SHADOW, SINCE)
    analysis.last_rows, analysis.last_span = rows, span
    return analysis


@pytest.mark.parametrize(
    ("rows", "span", "expected"),
    [
        (0, 0.0, CATCH_UP_SECONDS),  # nothing read yet
        (0, 5.0, CATCH_UP_SECONDS),  # an idle deployment
        (CATCH_UP_ROWS // 10, 5.0, CATCH_UP_SECONDS),  # quiet: never slower than the default
        (CATCH_UP_ROWS, 5.0, 5.0),
        (2 * CATCH_UP_ROWS, 5.0, 2.5),  # twice as busy: twice as often
        (100 * CATCH_UP_ROWS, 5.0, CATCH_UP_MIN_SECONDS),  # never more often than the floor
        (CATCH_UP_ROWS, 0.0, CATCH_UP_SECONDS),  # a first run (the whole window) says nothing of the rate
    ],
)
def test_the_pause_aims_at_a_fixed_number_of_rows_per_read(rows: int, span: float, expected: float) -> None:
    assert after_a_run(rows, span).catch_up_seconds() == pytest.approx(expected)
