"""POST /outcomes: the token check and what a body may hold."""

from __future__ import annotations

import json

import pytest

from shadowgate_router.outcomes import MAX_BATCH, OutcomeRefused, check_token, parse, to_rows


def test_token_is_required_and_checked() -> None:
    check_token("s3cret", b"Bearer s3cret")
    check_token("s3cret", b"bearer s3cret")
    for header, status in ((None, 401), (b"Bearer nope", 401), (b"Basic s3cret", 401), (b"s3cret", 401)):
        with pytest.raises(OutcomeRefused) as refused:
            check_token("s3cret", header)
        assert refused.value.status == status


def test_without_a_configured_token_everything_is_refused() -> None:
    with pytest.raises(OutcomeRefused) as refused:
        check_token(None, b"Bearer ")
    assert refused.value.status == 503


def test_one_a_list_or_a_wrapped_list() -> None:
    one = {"request_id": "t-1", "outcome": 1}
    assert [item.request_id for item in parse(json.dumps(one).encode())] == ["t-1"]
    assert len(parse(json.dumps([one, {**one, "request_id": "t-2"}]).encode())) == 2
    assert len(parse(json.dumps({"outcomes": [one]}).encode())) == 1
    assert parse(json.dumps({"requestId": "t-3", "outcome": 0.5}).encode())[0].request_id == "t-3"


def test_time_is_kept_to_the_microsecond_or_defaults_to_now() -> None:
    outcomes = parse(
        json.dumps(
            [
                {"request_id": "a", "outcome": 1, "time": "2026-01-02T03:04:05.123456+01:00"},
                {"request_id": "b", "outcome": 2, "time": 1_767_225_600},
                {"request_id": "c", "outcome": 3},
            ]
        ).encode()
    )
    rows = to_rows(outcomes, "ns", "dep", clock=lambda: 42)
    assert rows[0] == (1_767_319_445_123_456, "ns", "dep", "a", 1.0)
    assert rows[1][0] == 1_767_225_600_000_000
    assert rows[2] == (42, "ns", "dep", "c", 3.0)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "malformed JSON"),
        (b"[]", "the batch is empty"),
        (b'"x"', "send an outcome object"),
        (b'{"request_id": "a"}', "outcome: Field required"),
        (b'{"request_id": "a", "outcome": "1"}', "outcome: Input should be a valid number"),
        (b'{"request_id": "a", "outcome": true}', "outcome"),
        (b'{"request_id": "", "outcome": 1}', "request_id: String should have at least 1 character"),
        (b'{"request_id": "a", "outcome": 1, "time": "2026-01-01T00:00:00"}', "time: Input should have timezone"),
        (b'{"request_id": "a", "outcome": 1, "extra": 1}', "extra: Extra inputs are not permitted"),
        (b'[{"request_id": "a", "outcome": 1}, {"outcome": 1}]', "1.request_id: Field required"),
    ],
)
def test_bad_bodies_are_refused_with_the_reason(body: bytes, says: str) -> None:
    with pytest.raises(OutcomeRefused) as refused:
        parse(body)
    assert refused.value.status == 400
    assert says in str(refused.value)


def test_batches_are_bounded() -> None:
    body = json.dumps([{"request_id": str(n), "outcome": 1} for n in range(MAX_BATCH + 1)]).encode()
    with pytest.raises(OutcomeRefused) as refused:
        parse(body)
    assert refused.value.status == 413


@pytest.mark.parametrize("request_id", ["nul\u0000byte", "tab\there", "space here", "caf\u00e9"])
def test_request_ids_are_visible_ascii_like_the_ids_the_router_records(request_id: str) -> None:
    """Issue 12: a NUL in an id sent the recorder's whole batch down its one-row-at-a-time path."""
    with pytest.raises(OutcomeRefused, match="request_id: Value error, must be visible ASCII") as refused:
        parse(json.dumps([{"request_id": "fine", "outcome": 1}, {"request_id": request_id, "outcome": 1}]).encode())
    assert refused.value.status == 400


def test_two_different_outcomes_of_one_request_at_one_time_are_refused() -> None:
    same_time = "2026-01-02T03:04:05Z"
    retry = [{"request_id": "a", "outcome": 1, "time": same_time}] * 2
    assert len(parse(json.dumps(retry).encode())) == 2, "a repeat of the same outcome is a retry"
    conflicting = [
        {"request_id": "a", "outcome": 1, "time": same_time},
        {"request_id": "a", "outcome": 0, "time": same_time},
    ]
    with pytest.raises(OutcomeRefused, match="a correction needs a later time"):
        parse(json.dumps(conflicting).encode())
