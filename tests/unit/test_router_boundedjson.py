"""JSON from peers is refused past MAX_DEPTH levels of nesting, exactly, whatever the call stack; ordinary
documents (and brackets inside strings) pass; the callers turn the refusal into a 4xx or a missing
prediction, never an exception that escapes."""

from __future__ import annotations

import json
import sys

import pytest

from shadowgate_router import outcomes
from shadowgate_router.boundedjson import MAX_DEPTH, JsonTooDeep, loads, too_deep
from shadowgate_router.protocols import Extractor


def nested(depth: int, opener: str = "[", closer: str = "]") -> bytes:
    return (opener * depth + closer * depth).encode()


@pytest.mark.parametrize("depth", [1, MAX_DEPTH - 1, MAX_DEPTH])
def test_up_to_the_limit_decodes(depth: int) -> None:
    assert loads(nested(depth)) == json.loads(nested(depth))


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 100_000, 3_000_000])
def test_past_the_limit_is_refused_as_a_value_error(depth: int) -> None:
    with pytest.raises(JsonTooDeep, match=f"deeper than {MAX_DEPTH} levels") as refused:
        loads(nested(depth))
    assert isinstance(refused.value, ValueError)


def test_objects_and_arrays_count_alike_and_wide_documents_pass() -> None:
    mixed = b'{"a":' * 40 + b"[" * 30 + b"1" + b"]" * 30 + b"}" * 40
    assert too_deep(mixed) and not too_deep(mixed, limit=70)
    wide = json.dumps({"instances": [[n, n + 1] for n in range(10_000)]}).encode()
    assert loads(wide)["instances"][9_999] == [9_999, 10_000]


def test_brackets_inside_strings_do_not_count() -> None:
    document = {"note": "[" * 500 + '\\" {{{', "data": [[1]]}
    assert loads(json.dumps(document).encode()) == document


def test_a_limit_above_the_interpreter_s_stack_is_still_a_clean_refusal() -> None:
    deep = nested(sys.getrecursionlimit() + 100)
    with pytest.raises(JsonTooDeep):
        loads(deep, limit=10**9)


def test_malformed_and_non_utf8_are_value_errors_too() -> None:
    for body in (b"{nope", b"\xff\xfe", b"[" * 100 + b"}"):
        with pytest.raises(ValueError):
            loads(body)


def test_a_deep_answer_has_no_prediction_rather_than_an_error() -> None:
    extract = Extractor("outputs[0].data[0]", None)
    assert extract(nested(100_000)) == (None, None)
    assert extract(b'{"outputs":[{"data":[' + nested(200) + b"]}]}") == (None, None)


def test_deep_outcomes_are_refused_with_400() -> None:
    with pytest.raises(outcomes.OutcomeRefused, match="deeper than") as refused:
        outcomes.parse(b'{"outcomes": ' + nested(10_000) + b"}")
    assert refused.value.status == 400


class Watched(bytes):
    """A document whose whole-body passes fail the test: slices of it are plain bytes."""

    def count(self, *args: object) -> int:
        raise AssertionError("a pass over the whole document")

    def translate(self, *args: object) -> bytes:
        raise AssertionError("a pass over the whole document")


@pytest.mark.parametrize(
    "document",
    [nested(100_000), b'{"inputs": ' + nested(100_000) + b"}", b'{"a": "x]}", "b": {"c": [' + nested(70) + b"]}}"],
)
def test_a_document_that_opens_deep_is_refused_from_its_first_bytes(document: bytes) -> None:
    """D1/D2: a client's or a candidate's ``[[[[...`` costs the router a look at its head, not at its 200 KB."""
    assert too_deep(Watched(document))


@pytest.mark.parametrize(
    "document",
    [
        b'{"s": "' + b"[" * 600 + b'", "x": [1]}',  # a string of brackets running past the head
        rb'{"s": "\\", "x": ' + b"[" * 60 + b"1" + b"]" * 60 + b"}",  # an escaped backslash ends the string
        b"[" * 64 + b"]" * 64,
        b"[" + nested(40) + b"," + nested(40) + b"]",  # many brackets, none deeper than 41
    ],
)
def test_what_opens_with_many_brackets_but_is_not_deep_passes(document: bytes) -> None:
    assert not too_deep(document)
    assert loads(document) == json.loads(document)
