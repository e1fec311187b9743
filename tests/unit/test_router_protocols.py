"""Which paths each protocol serves, how they are rewritten per model server, and reading the number."""

from __future__ import annotations

import json
import struct

import pytest

from shadowgate_router.config import Protocol
from shadowgate_router.protocols import (
    BadPathSegment,
    Extractor,
    Kind,
    UnknownPath,
    WrongMethod,
    answer_format,
    body_request_id,
    json_header_length,
    match,
)


@pytest.mark.parametrize(
    ("protocol", "method", "path", "kind", "model", "template"),
    [
        (Protocol.V2, "POST", "/v2/models/fraud/infer", Kind.INFER, "fraud", "/v2/models/{model}/infer"),
        (Protocol.V2, "GET", "/v2/models/fraud/ready", Kind.PASSTHROUGH, "fraud", "/v2/models/{model}/ready"),
        (Protocol.V2, "GET", "/v2/models/fraud", Kind.PASSTHROUGH, "fraud", "/v2/models/{model}"),
        (Protocol.V2, "GET", "/v2/health/ready", Kind.PASSTHROUGH, None, "/v2/health/ready"),
        # The rest of the v2 / Triton / MLServer surface: passed on with the model's name swapped.
        (Protocol.V2, "GET", "/v2/models/fraud/config", Kind.PASSTHROUGH, "fraud", "/v2/models/{model}/config"),
        (Protocol.V2, "GET", "/v2/models/fraud/stats", Kind.PASSTHROUGH, "fraud", "/v2/models/{model}/stats"),
        (Protocol.V2, "POST", "/v2/models/fraud/generate", Kind.PASSTHROUGH, "fraud", "/v2/models/{model}/generate"),
        (Protocol.V2, "POST", "/v2/models/fraud/explain", Kind.PASSTHROUGH, "fraud", "/v2/models/{model}/explain"),
        (Protocol.V2, "GET", "/v2/models/stats", Kind.PASSTHROUGH, None, "/v2/models/stats"),
        (Protocol.V2, "POST", "/v2/repository/index", Kind.PASSTHROUGH, None, "/v2/repository/index"),
        (Protocol.V2, "POST", "/v2/logging", Kind.PASSTHROUGH, None, "/v2/logging"),
        (Protocol.V2, "GET", "/v2/systemsharedmemory/status", Kind.PASSTHROUGH, None, "/v2/systemsharedmemory/status"),
        (Protocol.V1, "POST", "/v1/models/fraud:explain", Kind.PASSTHROUGH, "fraud", "/v1/models/{model}:explain"),
        (Protocol.V1, "GET", "/v1/models", Kind.PASSTHROUGH, None, "/v1/models"),
        (Protocol.V1, "POST", "/v1/models/fraud:predict", Kind.INFER, "fraud", "/v1/models/{model}:predict"),
        (Protocol.V1, "GET", "/v1/models/fraud", Kind.PASSTHROUGH, "fraud", "/v1/models/{model}"),
        (Protocol.JSON, "POST", "/api/score", Kind.INFER, None, "/api/score"),
        (Protocol.JSON, "GET", "/api/health", Kind.PASSTHROUGH, None, "/api/health"),
    ],
)
def test_paths(protocol: Protocol, method: str, path: str, kind: Kind, model: str | None, template: str) -> None:
    found = match(protocol, method, path)
    assert (found.kind, found.model, found.template) == (kind, model, template)


@pytest.mark.parametrize(
    ("method", "path", "kind", "production", "candidate"),
    [
        (
            "POST",
            "/v2/models/fraud/versions/3/infer",
            Kind.INFER,
            "/v2/models/p/versions/3/infer",
            "/v2/models/c/infer",
        ),
        (
            "GET",
            "/v2/models/fraud/versions/3/ready",
            Kind.PASSTHROUGH,
            "/v2/models/p/versions/3/ready",
            "/v2/models/c/ready",
        ),
        ("GET", "/v2/models/fraud/versions/3", Kind.PASSTHROUGH, "/v2/models/p/versions/3", "/v2/models/c"),
        (
            "GET",
            "/v2/models/fraud/versions/3/config",
            Kind.PASSTHROUGH,
            "/v2/models/p/versions/3/config",
            "/v2/models/c/config",
        ),
        ("POST", "/v2/models/fraud/infer", Kind.INFER, "/v2/models/p/infer", "/v2/models/c/infer"),
    ],
)
def test_a_version_in_the_path_is_production_s(
    method: str, path: str, kind: Kind, production: str, candidate: str
) -> None:
    """The client names production's version; the candidate is called without one (its default)."""
    found = match(Protocol.V2, method, path)
    assert found.kind is kind and found.model == "fraud"
    assert found.template.format(model="p") == production
    assert found.candidate_template.format(model="c") == candidate


def test_a_405_names_the_allowed_method() -> None:
    with pytest.raises(WrongMethod) as refused:
        match(Protocol.V2, "PUT", "/v2/health/live")
    assert refused.value.allow == "GET"


@pytest.mark.parametrize(
    ("protocol", "document", "expected"),
    [
        (Protocol.V2, {"id": "trade-7", "inputs": []}, b"trade-7"),
        (Protocol.V2, {"inputs": []}, None),
        (Protocol.V2, {"id": "", "inputs": []}, None),
        (Protocol.V2, {"id": 7, "inputs": []}, None),  # the v2 id is a string
        (Protocol.V1, {"id": "r-1", "instances": []}, b"r-1"),
        (Protocol.V1, {"id": 12, "instances": []}, b"12"),
        (Protocol.V1, {"instances": []}, None),
        (Protocol.V2, [1, 2], None),
        (Protocol.JSON, {"id": "account-row-id"}, None),  # a plain API's fields mean what that API says
    ],
)
def test_the_request_id_a_body_carries(protocol: Protocol, document: object, expected: bytes | None) -> None:
    assert body_request_id(protocol, document) == expected


def test_json_paths_with_braces_survive_the_template() -> None:
    assert match(Protocol.JSON, "POST", "/a{b}").template.format(model="x") == "/a{b}"


@pytest.mark.parametrize(
    ("protocol", "method", "path", "error", "says"),
    [
        (
            Protocol.V2,
            "POST",
            "/v1/models/fraud:predict",
            UnknownPath,
            "POST /v2/models/{name}[/versions/{version}]/infer",
        ),
        (Protocol.V2, "GET", "/v2/models/fraud/versions/3/infer", WrongMethod, "use POST"),
        (Protocol.V2, "POST", "/v1/models/fraud:predict", UnknownPath, "the model server's other /v2 paths"),
        (Protocol.V2, "GET", "/v2/models/fraud/infer", WrongMethod, "use POST"),
        (Protocol.V2, "POST", "/v2/models/fraud/ready", WrongMethod, "use GET"),
        (Protocol.V1, "POST", "/v2/models/fraud/infer", UnknownPath, "POST /v1/models/{name}:predict"),
        (Protocol.V1, "DELETE", "/v1/models/fraud", WrongMethod, "use GET"),
        (Protocol.JSON, "POST", "/outcomes/x", UnknownPath, "not a model path"),
        (Protocol.JSON, "PUT", "/api/score", WrongMethod, "use GET"),
    ],
)
def test_refusals_say_what_is_served(
    protocol: Protocol, method: str, path: str, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=None) as refused:
        match(protocol, method, path)
    assert says in str(refused.value)


V2_ANSWER = {
    "model_name": "fraud",
    "outputs": [
        {"name": "score", "datatype": "FP32", "shape": [1], "data": [0.25]},
        {"name": "p", "datatype": "FP32", "shape": [2], "data": [0.1, 0.9]},
    ],
}


@pytest.mark.parametrize(
    ("answer", "path", "confidence_path", "expected"),
    [
        (V2_ANSWER, "outputs[0].data[0]", "outputs[1].data[1]", (0.25, 0.9)),
        ({"predictions": [3]}, "predictions[0]", None, (3.0, None)),
        ({"predictions": [[0.2, 0.8]]}, "predictions[0][1]", None, (0.8, None)),
        ({"result": {"fraud": True}}, "result.fraud", None, (1.0, None)),
        ({"outputs": [{"data": ["0.5"]}]}, "outputs[0].data[0]", None, (0.5, None)),
        ([{"score": 7}], "[0].score", None, (7.0, None)),
        ({"predictions": []}, "predictions[0]", None, (None, None)),
        ({"predictions": ["cat"]}, "predictions[0]", None, (None, None)),
        ({"predictions": {"0": 1}}, "predictions[0]", None, (None, None)),
        ({"result": None}, "result.score", "result.p", (None, None)),
    ],
)
def test_extraction(
    answer: object, path: str, confidence_path: str | None, expected: tuple[float | None, float | None]
) -> None:
    assert Extractor(path, confidence_path)(json.dumps(answer).encode()) == expected


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe", b'{"predictions": [NaN]}'])
def test_non_json_or_non_finite_answers_have_no_number(body: bytes) -> None:
    assert Extractor("predictions[0]", None)(body) == (None, None)


def binary_answer(outputs: list[tuple[str, str, bytes]]) -> tuple[bytes, int]:
    """An answer in the binary tensor data extension: JSON header, then each output's raw bytes."""
    header = json.dumps(
        {
            "model_name": "fraud",
            "outputs": [
                {"name": name, "datatype": datatype, "shape": [1], "parameters": {"binary_data_size": len(raw)}}
                for name, datatype, raw in outputs
            ],
        }
    ).encode()
    return header + b"".join(raw for _, _, raw in outputs), len(header)


@pytest.mark.parametrize(
    ("datatype", "raw", "expected"),
    [
        ("FP32", struct.pack("<2f", 0.25, 0.75), 0.25),
        ("FP64", struct.pack("<d", -1.5), -1.5),
        ("FP16", struct.pack("<e", 0.5), 0.5),
        ("INT64", struct.pack("<q", 7), 7.0),
        ("UINT8", bytes([3]), 3.0),
        ("BOOL", bytes([1]), 1.0),
        ("BYTES", struct.pack("<I", 5) + b"0.125", 0.125),
        ("BF16", b"\x80\x3f", None),  # not decoded: no number, recorded as such
    ],
)
def test_binary_outputs_are_read_little_endian(datatype: str, raw: bytes, expected: float | None) -> None:
    body, length = binary_answer([("score", datatype, raw)])
    assert Extractor("outputs[0].data[0]", None)(body, length) == (expected, None)


def test_binary_outputs_are_read_in_order_beside_json_ones() -> None:
    body, length = binary_answer(
        [("score", "FP32", struct.pack("<f", 2.0)), ("p", "FP64", struct.pack("<2d", 0.1, 0.9))]
    )
    assert Extractor("outputs[0].data[0]", "outputs[1].data[1]")(body, length) == (2.0, 0.9)
    headers = [(b"content-type", b"application/octet-stream"), (b"inference-header-content-length", b"%d" % length)]
    assert answer_format(headers) == (length, None)
    assert answer_format([(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]) == (None, b"gzip")


def test_a_truncated_binary_answer_has_no_prediction() -> None:
    body, length = binary_answer([("score", "FP64", struct.pack("<d", 2.0))])
    assert Extractor("outputs[0].data[0]", None)(body[:-3], length) == (None, None)
    assert Extractor("outputs[0].data[0]", None)(body, length + 5) == (None, None)  # header length wrong


@pytest.mark.parametrize(
    ("value", "size", "says"),
    [(b"abc", 10, "must be a number of bytes"), (b"0", 10, "does not fit"), (b"11", 10, "does not fit")],
)
def test_a_wrong_json_header_length_is_explained(value: bytes, size: int, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        json_header_length(value, size)
    assert json_header_length(b"10", 10) == 10


@pytest.mark.parametrize(
    "version",
    ["..", "%2e%2e", "1%2f..%2fadmin", "%2F", ".hidden", "a%00", "v{x}", "a" * 129],
)
def test_a_version_segment_that_is_not_a_plain_name_is_refused(version: str) -> None:
    """Issue 12: forwarded verbatim, '..' or '%2f' would be read as another path by a server that decodes it."""
    for suffix in ("/infer", "/ready", ""):
        method = "POST" if suffix == "/infer" else "GET"
        with pytest.raises(BadPathSegment, match="is not a plain name"):
            match(Protocol.V2, method, f"/v2/models/fraud/versions/{version}{suffix}")


@pytest.mark.parametrize("version", ["1", "2024-01-02", "v1.2.3", "latest_2", "a" * 128])
def test_plain_versions_pass(version: str) -> None:
    found = match(Protocol.V2, "POST", f"/v2/models/fraud/versions/{version}/infer")
    assert found.template.format(model="p") == f"/v2/models/p/versions/{version}/infer"
