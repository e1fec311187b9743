"""Which paths each protocol serves, how they are rewritten per model server, and reading the number."""

from __future__ import annotations

import json

import pytest

from shadowgate_router.config import Protocol
from shadowgate_router.protocols import Extractor, Kind, UnknownPath, WrongMethod, match


@pytest.mark.parametrize(
    ("protocol", "method", "path", "kind", "model", "template"),
    [
        (Protocol.V2, "POST", "/v2/models/fraud/infer", Kind.INFER, "fraud", "/v2/models/{model}/infer"),
        (Protocol.V2, "GET", "/v2/models/fraud/ready", Kind.PASSTHROUGH, "fraud", "/v2/models/{model}/ready"),
        (Protocol.V2, "GET", "/v2/models/fraud", Kind.PASSTHROUGH, "fraud", "/v2/models/{model}"),
        (Protocol.V2, "GET", "/v2/health/ready", Kind.PASSTHROUGH, None, "/v2/health/ready"),
        (Protocol.V1, "POST", "/v1/models/fraud:predict", Kind.INFER, "fraud", "/v1/models/{model}:predict"),
        (Protocol.V1, "GET", "/v1/models/fraud", Kind.PASSTHROUGH, "fraud", "/v1/models/{model}"),
        (Protocol.JSON, "POST", "/api/score", Kind.INFER, None, "/api/score"),
        (Protocol.JSON, "GET", "/api/health", Kind.PASSTHROUGH, None, "/api/health"),
    ],
)
def test_paths(protocol: Protocol, method: str, path: str, kind: Kind, model: str | None, template: str) -> None:
    found = match(protocol, method, path)
    assert (found.kind, found.model, found.template) == (kind, model, template)


def test_json_paths_with_braces_survive_the_template() -> None:
    assert match(Protocol.JSON, "POST", "/a{b}").template.format(model="x") == "/a{b}"


@pytest.mark.parametrize(
    ("protocol", "method", "path", "error", "says"),
    [
        (Protocol.V2, "POST", "/v1/models/fraud:predict", UnknownPath, "POST /v2/models/{name}/infer"),
        (Protocol.V2, "POST", "/v2/models/fraud/explain", UnknownPath, "v2"),
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
