"""The split is a pure function of the sticky key: exact shares, reproducible, monotone in the weight."""

from __future__ import annotations

import random
import uuid

import pytest

from shadowgate_router.hashing import SPACE, point, salt_for, threshold, to_candidate

SALT = salt_for("models", "fraud-detector")
WEIGHTS = (5, 10, 20, 50)


def account_keys(count: int) -> list[bytes]:
    """Keys like a sticky header would carry: account numbers."""
    return [f"acct-{number:07d}".encode() for number in range(count)]


def request_ids(count: int, seed: int) -> list[bytes]:
    """Keys like the router's own request ids (uuid4 hex)."""
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4).hex.encode() for _ in range(count)]


def share(keys: list[bytes], weight: int, salt: bytes = SALT) -> float:
    limit = threshold(weight)
    return 100 * sum(to_candidate(key, salt, limit) for key in keys) / len(keys)


@pytest.mark.parametrize("kind", ["accounts", "request ids"])
def test_split_is_within_a_fifth_of_a_point_over_100k_keys(kind: str) -> None:
    keys = account_keys(100_000) if kind == "accounts" else request_ids(100_000, seed=4)
    for weight in WEIGHTS:
        assert share(keys, weight) == pytest.approx(weight, abs=0.2), f"{kind} at {weight}%"


def test_split_error_shrinks_like_binomial_noise_over_a_million_keys() -> None:
    """Not luck with one key set: with 10x the keys every share is within 0.1 point (over 5 sigma at 5%,
    2 sigma at 50%), which a biased hash would miss."""
    points = [point(key, SALT) for key in account_keys(1_000_000)]
    for weight in WEIGHTS:
        limit = threshold(weight)
        measured = 100 * sum(value < limit for value in points) / len(points)
        assert measured == pytest.approx(weight, abs=0.1), weight


def test_the_same_key_always_lands_on_the_same_side() -> None:
    keys = request_ids(2_000, seed=9)
    first = [to_candidate(key, SALT, threshold(20)) for key in keys]
    again = [to_candidate(key, salt_for("models", "fraud-detector"), threshold(20)) for key in keys]
    assert first == again
    assert any(first) and not all(first)


def test_raising_the_weight_keeps_every_candidate_key_on_the_candidate() -> None:
    keys = account_keys(50_000)
    previous: set[bytes] = set()
    for weight in (0, 1, 5, 10, 20, 50, 99, 100):
        chosen = {key for key in keys if to_candidate(key, SALT, threshold(weight))}
        assert previous <= chosen, f"a key left the candidate when the weight rose to {weight}%"
        previous = chosen
    assert previous == set(keys)


def test_zero_and_hundred_are_absolute() -> None:
    keys = request_ids(5_000, seed=1)
    assert not any(to_candidate(key, SALT, threshold(0)) for key in keys)
    assert all(to_candidate(key, SALT, threshold(100)) for key in keys)
    assert threshold(100) == SPACE


def test_deployments_split_independently() -> None:
    """Another deployment's 10% is a different 10%: overlap is about 10% of 10%, not all of it."""
    keys = account_keys(50_000)
    ours = {key for key in keys if to_candidate(key, SALT, threshold(10))}
    theirs = {key for key in keys if to_candidate(key, salt_for("models", "churn"), threshold(10))}
    assert len(ours & theirs) / len(ours) == pytest.approx(0.10, abs=0.02)


@pytest.mark.parametrize("weight", [-1, 101])
def test_weights_outside_0_to_100_are_errors(weight: int) -> None:
    with pytest.raises(ValueError, match="not a percentage"):
        threshold(weight)
