"""What the inference protocols look like on the wire: which paths are inference calls, which are
passed through to the answering model server, how a path is rewritten for each server, and where the
predicted number sits in an answer.

Bodies are never rewritten: the router forwards the client's bytes and returns the server's bytes.
Only the model name in the path changes (the client calls the router by the production model's name,
the candidate may know the model under another one), and the number is read for recording.

Open Inference Protocol details followed here: model versions in the path
(``/v2/models/{name}/versions/{version}/infer``: the version is production's, so the candidate is called
without one, i.e. its server's default), and the binary tensor data extension (KServe / Triton): a body
that starts with a JSON header of ``Inference-Header-Content-Length`` bytes followed by raw tensors, as
tritonclient sends by default. Such bodies are forwarded untouched; only their JSON header is checked,
and a binary answer's outputs are decoded (little-endian, row-major) to record the prediction.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from shadowgate_router import boundedjson
from shadowgate_router.config import Protocol, RouterConfig, parse_json_path
from shadowgate_router.oip import inference_pb2


class Kind(Enum):
    INFER = "infer"
    """A prediction: split, mirrored and recorded."""
    PASSTHROUGH = "passthrough"
    """Everything else (readiness, metadata, model config, statistics, repository, generate, other
    extensions): answered by the answering model server, not mirrored, not recorded."""


@dataclass(frozen=True, slots=True)
class Match:
    kind: Kind
    model: str | None
    """The model name in the client's path (v1, v2); None when the path has none."""
    template: str
    """The path for a model server, with ``{model}`` where that server's model name goes."""
    unversioned: str = ""
    """The same for the candidate when the client named a (production) model version; else the template."""

    @property
    def candidate_template(self) -> str:
        return self.unversioned or self.template


class UnknownPath(ValueError):
    """No such endpoint for this protocol; the message says what is served instead."""


class WrongMethod(ValueError):
    """The path exists but not for this method; `allow` is the method it takes (the 405's Allow header)."""

    def __init__(self, allow: str) -> None:
        super().__init__(f"use {allow} on this path")
        self.allow = allow


class BadPathSegment(ValueError):
    """A path segment the router would forward verbatim is not a plain name (a 400, not a 404)."""


_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""A model version as servers name them (1, 2024-01-02, v1.2.3): no '..', no '/', no percent-encoding,
which a server decoding the path after the router would read as another path."""


_V2_MODEL = re.compile(r"^/v2/models/([^/]+)(/versions/[^/]+)?(/.*)?$")
_V2_SERVER = {"/v2", "/v2/health/live", "/v2/health/ready"}
_V2_SERVER_WIDE_MODELS = {"/v2/models/stats"}
"""Under /v2/models/ but about every model: Triton's statistics of all models."""
_V1_MODEL = re.compile(r"^/v1/models/([^/:]+)(:predict|:explain)?$")
_RESERVED = ("/outcomes", "/healthz", "/readyz", "/metrics")
_ANY = ""
"""Any method: the path is passed on and the model server judges the method."""


def _escape(path: str) -> str:
    return path.replace("{", "{{").replace("}", "}}")


def match(protocol: Protocol, method: str, path: str) -> Match:
    """Classify a request path; raises UnknownPath or WrongMethod with a reason for the client.

    v2: ``/v2/models/{name}[/versions/{v}]/infer`` (POST) is the inference call; every other path under
    ``/v2`` is passed on to the answering model server with its method and body: model metadata and
    readiness (GET), and whatever else the server has, e.g. Triton's and MLServer's ``.../config``,
    ``.../stats``, ``.../generate``, ``/v2/repository/...``, shared memory, trace and logging settings. A
    model name in the path is replaced by that server's own name.
    """
    if protocol is Protocol.V2:
        found = _V2_MODEL.match(path)
        if found and path not in _V2_SERVER_WIDE_MODELS:
            if found.group(2) and not _VERSION.fullmatch(found.group(2).removeprefix("/versions/")):
                raise BadPathSegment(
                    f"model version {found.group(2).removeprefix('/versions/')[:80]!r} is not a plain name: "
                    "letters, digits, '_', '.', '-' (not starting with '.'), at most 128"
                )
            name, version, suffix = found.group(1), _escape(found.group(2) or ""), _escape(found.group(3) or "")
            if suffix == "/infer":
                kind, wanted = Kind.INFER, "POST"
            elif suffix in ("", "/ready"):
                kind, wanted = Kind.PASSTHROUGH, "GET"
            else:
                kind, wanted = Kind.PASSTHROUGH, _ANY
            template = "/v2/models/{model}" + version + suffix
            return _need(method, wanted, Match(kind, name, template, "/v2/models/{model}" + suffix))
        if path in _V2_SERVER:
            return _need(method, "GET", Match(Kind.PASSTHROUGH, None, path))
        if path.startswith("/v2/"):
            return Match(Kind.PASSTHROUGH, None, _escape(path))
        raise UnknownPath(
            "Open Inference Protocol (v2) paths: POST /v2/models/{name}[/versions/{version}]/infer, "
            "GET /v2/models/{name}[/versions/{version}][/ready], GET /v2/health/live, GET /v2/health/ready, "
            "and the model server's other /v2 paths"
        )
    if protocol is Protocol.V1:
        found = _V1_MODEL.match(path)
        if found:
            name, suffix = found.group(1), found.group(2) or ""
            if suffix == ":predict":
                return _need(method, "POST", Match(Kind.INFER, name, "/v1/models/{model}:predict"))
            if suffix == ":explain":
                return _need(method, "POST", Match(Kind.PASSTHROUGH, name, "/v1/models/{model}:explain"))
            return _need(method, "GET", Match(Kind.PASSTHROUGH, name, "/v1/models/{model}"))
        if path == "/v1/models":
            return _need(method, "GET", Match(Kind.PASSTHROUGH, None, path))
        raise UnknownPath(
            "KServe v1 paths: POST /v1/models/{name}:predict, POST /v1/models/{name}:explain, "
            "GET /v1/models/{name}, GET /v1/models"
        )
    # Plain JSON: the path is the model server's own API, forwarded as it is.
    if path.startswith(_RESERVED) or not path.startswith("/"):
        raise UnknownPath(f"{path} is not a model path")
    template = _escape(path)
    if method == "POST":
        return Match(Kind.INFER, None, template)
    return _need(method, "GET", Match(Kind.PASSTHROUGH, None, template))


def _need(method: str, wanted: str, found: Match) -> Match:
    if wanted and method != wanted:
        raise WrongMethod(wanted)
    return found


def served_names(config: RouterConfig) -> frozenset[str]:
    """Model names a client may use in the path: either server's name for the model, or the deployment's."""
    return frozenset({config.production.model_name, config.candidate.model_name, config.deployment})


def decode_json(body: bytes) -> Any:
    """A peer's JSON, nesting bounded (boundedjson.loads): ValueError when malformed or too deep."""
    return boundedjson.loads(body)


def body_request_id(protocol: Protocol, document: object) -> bytes | None:
    """The request id a v2 body carries (``id``, as tritonclient's ``request_id=`` sets it), or a v1 body's
    top-level ``id`` if it has one; None for plain JSON (whose fields mean what that API says) and when absent."""
    if protocol is Protocol.JSON or not isinstance(document, dict):
        return None
    value = document.get("id")
    if isinstance(value, str) and value:
        return value.encode(errors="replace")
    if isinstance(value, int) and not isinstance(value, bool) and protocol is Protocol.V1:
        return str(value).encode()
    return None


INFERENCE_HEADER = b"inference-header-content-length"
"""The binary tensor data extension's header: how many bytes of the body are its JSON part."""

_TENSOR_FORMATS = {
    "BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q", "INT8": "b", "INT16": "h",
    "INT32": "i", "INT64": "q", "FP16": "e", "FP32": "f", "FP64": "d",
}  # fmt: skip
MAX_DECODED = 1024
"""Elements decoded per binary output: enough for any prediction path, bounded for huge tensors."""


def json_header_length(value: bytes, body_length: int) -> int:
    """The Inference-Header-Content-Length of a body of `body_length` bytes; ValueError says what is wrong."""
    try:
        length = int(value)
    except ValueError:
        raise ValueError(f"Inference-Header-Content-Length must be a number of bytes, not {value[:40]!r}") from None
    if not 0 < length <= body_length:
        raise ValueError(
            f"Inference-Header-Content-Length {length} does not fit a body of {body_length} bytes: it counts the "
            "JSON header at the start of the body"
        )
    return length


CONTENT_ENCODING = b"content-encoding"


def answer_format(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bytes | None]:
    """An answer's Inference-Header-Content-Length (the binary extension's JSON part) and Content-Encoding,
    each None when absent (header names lower-cased)."""
    json_length = coding = None
    for name, value in headers:
        if name == INFERENCE_HEADER:
            try:
                json_length = int(value)
            except ValueError:
                json_length = None
        elif name == CONTENT_ENCODING:
            coding = value
    return json_length, coding


def _decode_binary_outputs(document: object, binary: bytes) -> None:
    """Give each output sent as binary data (``parameters.binary_data_size``) its ``data``, in order."""
    outputs = document.get("outputs") if isinstance(document, dict) else None
    if not isinstance(outputs, list):
        return
    offset = 0
    for output in outputs:
        parameters = output.get("parameters") if isinstance(output, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if not isinstance(size, int) or size < 0:
            continue
        chunk, offset = binary[offset : offset + size], offset + size
        output["data"] = _tensor(output.get("datatype"), chunk)


def _tensor(datatype: object, chunk: bytes) -> list[object]:
    if datatype == "BYTES":  # each element: a 4-byte little-endian length, then its bytes
        items: list[object] = []
        at = 0
        while at + 4 <= len(chunk) and len(items) < MAX_DECODED:
            (length,) = struct.unpack_from("<I", chunk, at)
            items.append(chunk[at + 4 : at + 4 + length].decode(errors="replace"))
            at += 4 + length
        return items
    code = _TENSOR_FORMATS.get(datatype) if isinstance(datatype, str) else None
    if code is None:
        return []
    count = min(len(chunk) // struct.calcsize(code), MAX_DECODED)
    return list(struct.unpack_from(f"<{count}{code}", chunk))


class Extractor:
    """Reads the prediction (and confidence) out of a model server's answer for recording: JSON, or the
    JSON header and binary outputs of the binary tensor data extension."""

    def __init__(self, prediction_path: str, confidence_path: str | None) -> None:
        self.prediction = parse_json_path(prediction_path)
        self.confidence = parse_json_path(confidence_path) if confidence_path else None

    def __call__(self, body: bytes, json_length: int | None = None) -> tuple[float | None, float | None]:
        """(prediction, confidence); None where the answer has no number there (or is not JSON).
        `json_length`: the answer's Inference-Header-Content-Length, when it has one."""
        try:
            if json_length is None:
                document = decode_json(body)
            else:
                document = decode_json(body[:json_length])
                _decode_binary_outputs(document, body[json_length:])
        except (ValueError, struct.error):  # UnicodeDecodeError is a ValueError too
            return None, None
        return self.read(document)

    def read_grpc(self, answer: inference_pb2.ModelInferResponse) -> tuple[float | None, float | None]:
        """(prediction, confidence) of a gRPC answer: what `read` gives for grpc_answer_document(answer), reading
        only the outputs the paths name (GrpcAnswerView)."""
        view = GrpcAnswerView(answer)
        confidence = _number(view.walk(self.confidence)) if self.confidence else None
        return _number(view.walk(self.prediction)), confidence

    def read(self, document: object) -> tuple[float | None, float | None]:
        """(prediction, confidence) of an answer already decoded (a JSON document, or a gRPC answer as one)."""
        confidence = _number(_walk(document, self.confidence)) if self.confidence else None
        return _number(_walk(document, self.prediction)), confidence


_CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
"""Where the gRPC InferTensorContents keeps each datatype's elements (FP16 and BF16 travel raw only)."""


def grpc_answer_document(answer: inference_pb2.ModelInferResponse) -> dict[str, Any]:
    """A gRPC ModelInferResponse in the shape of the REST answer, so one prediction path reads both:
    ``{"model_name", "model_version", "id", "parameters", "outputs": [{"name", "datatype", "shape", "data"}]}``.
    ``data`` comes from the output's typed ``contents``, or from ``raw_output_contents`` (little-endian, the
    same decoding as the binary extension); at most MAX_DECODED elements each; BYTES become text."""
    return {
        "model_name": answer.model_name,
        "model_version": answer.model_version,
        "id": answer.id,
        "parameters": _parameters(answer.parameters),
        "outputs": _grpc_tensors(answer.outputs, answer.raw_output_contents),
    }


def grpc_request_document(request: inference_pb2.ModelInferRequest) -> dict[str, Any]:
    """A gRPC ModelInferRequest in the shape of the REST request body, so one path (segmentBy.path) reads
    both: ``{"id", "parameters", "inputs": [{"name", "datatype", "shape", "parameters", "data"}]}``, decoded
    as grpc_answer_document decodes outputs."""
    return {
        "id": request.id,
        "parameters": _parameters(request.parameters),
        "inputs": _grpc_tensors(request.inputs, request.raw_input_contents),
    }


def _grpc_tensors(tensors: Any, raw: Any) -> list[dict[str, object]]:
    documents = []
    for index, tensor in enumerate(tensors):
        documents.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": _parameters(tensor.parameters),
                "data": _tensor_data(tensor, raw[index] if index < len(raw) else None),
            }
        )
    return documents


def _tensor_data(tensor: Any, raw: bytes | None) -> list[object]:
    """One input's or output's ``data`` as the documents give it (`raw`: its raw contents, if any)."""
    datatype = tensor.datatype
    if raw is not None:
        return _tensor(datatype, raw)
    field = _CONTENTS_FIELDS.get(datatype)
    values = getattr(tensor.contents, field)[:MAX_DECODED] if field else []
    return [value.decode(errors="replace") for value in values] if datatype == "BYTES" else list(values)


class GrpcAnswerView:
    """What a path reads in grpc_answer_document(answer), building only the parts it walks through.

    Every field read from a protobuf message costs a Python object (several microseconds each with upb),
    and the whole document is some fifteen of them per output: the usual prediction paths
    (``outputs[N].data[M]``) read one output's data instead, and anything else falls back to the document."""

    __slots__ = ("_answer", "_data", "_document", "_outputs", "_raw")

    def __init__(self, answer: inference_pb2.ModelInferResponse) -> None:
        self._answer = answer
        self._outputs: Any = None
        self._raw: Any = None
        self._data: dict[int, list[object]] = {}
        self._document: dict[str, Any] | None = None

    def walk(self, path: tuple[str | int, ...]) -> object:
        if len(path) >= 3 and path[0] == "outputs" and path[2] == "data" and type(path[1]) is int and path[1] >= 0:
            index = path[1]
            data = self._data.get(index)
            if data is None:
                if self._outputs is None:
                    self._outputs = self._answer.outputs
                    self._raw = self._answer.raw_output_contents
                if index >= len(self._outputs):
                    return None
                raw = self._raw[index] if index < len(self._raw) else None
                data = self._data[index] = _tensor_data(self._outputs[index], raw)
            return _walk(data, path[3:])
        if self._document is None:
            self._document = grpc_answer_document(self._answer)
        return _walk(self._document, path)


def _parameters(parameters: Mapping[str, inference_pb2.InferParameter]) -> dict[str, object]:
    values: dict[str, object] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice else None
    return values


def walk_json(document: object, path: tuple[str | int, ...]) -> object:
    """The value at `path` (from config.parse_json_path) in a decoded JSON document, or None."""
    return _walk(document, path)


def _walk(document: object, path: tuple[str | int, ...]) -> object:
    for part in path:
        if isinstance(part, int):
            if not isinstance(document, list) or part >= len(document):
                return None
            document = document[part]
        else:
            if not isinstance(document, dict):
                return None
            document = document.get(part)
    return document


def _number(value: object) -> float | None:
    """Numbers, booleans (a classifier's yes/no) and numeric strings (v2 BYTES outputs) count."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None
