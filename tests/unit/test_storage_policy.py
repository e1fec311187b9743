"""The storage policy's settings and what follows from them, without a database."""

from __future__ import annotations

import datetime as dt

import pytest

from shadowgate_operator.timescale import (
    DEFAULT_CHUNK_INTERVAL,
    DEFAULT_POLICY,
    Edition,
    StoragePolicy,
    chunk_interval,
    describe,
    parse_horizon,
)

DAY = dt.timedelta(days=1)


def test_horizons_read_as_days_hours_or_none() -> None:
    assert parse_horizon("90d") == 90 * DAY
    assert parse_horizon("36h") == dt.timedelta(hours=36)
    assert parse_horizon("none") is None and parse_horizon("Never") is None
    for bad in ("", "90", "1w", "-3d", "soon"):
        with pytest.raises(ValueError, match="is not a horizon"):
            parse_horizon(bad)
    assert [describe(value) for value in (None, DAY, 7 * DAY, dt.timedelta(hours=36))] == [
        "none",
        "1 day",
        "7 days",
        "36 hours",
    ]


def test_the_default_keeps_everything_and_compresses_after_a_week() -> None:
    assert StoragePolicy(retention=None, compress_after=7 * DAY) == DEFAULT_POLICY
    DEFAULT_POLICY.check()


def test_a_policy_that_would_drop_before_compressing_is_refused() -> None:
    StoragePolicy(retention=90 * DAY, compress_after=7 * DAY).check()
    StoragePolicy(retention=90 * DAY, compress_after=None).check()
    with pytest.raises(ValueError, match="must be shorter than retention"):
        StoragePolicy(retention=7 * DAY, compress_after=7 * DAY).check()
    with pytest.raises(ValueError, match="must be positive"):
        StoragePolicy(retention=dt.timedelta(0)).check()


def test_chunks_are_as_long_as_the_compression_horizon_where_compression_runs() -> None:
    full, apache, plain = Edition("2.22.1", "timescale"), Edition("2.22.1", "apache"), Edition(None, None)
    assert full.full and not apache.full and not plain.full
    assert chunk_interval(full, StoragePolicy(compress_after=2 * DAY)) == 2 * DAY
    assert chunk_interval(full, StoragePolicy(compress_after=None)) == DEFAULT_CHUNK_INTERVAL
    assert chunk_interval(apache, StoragePolicy(compress_after=2 * DAY)) == DEFAULT_CHUNK_INTERVAL
    assert "hypertables only" in apache.describe() and plain.describe().startswith("plain PostgreSQL")
