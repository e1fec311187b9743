"""What the inference protocols look like on the wire: which paths are inference calls, which are
passed through to the answering model server, how a path is rewritten for each server, and where the
predicted number sits in an answer.

Bodies are never rewritten: the router forwards the client's bytes and returns the server's bytes.
Only the model name in the path changes (the client calls the router by the production model's name,
the candidate may know the model under another one), and the number is read for recording.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from shadowgate_router.config import Protocol, RouterConfig, parse_json_path


class Kind(Enum):
    INFER = "infer"
    """A prediction: split, mirrored and recorded."""
    PASSTHROUGH = "passthrough"
    """Readiness and metadata: answered by the answering model server, not recorded."""


@dataclass(frozen=True, slots=True)
class Match:
    kind: Kind
    model: str | None
    """The model name in the client's path (v1, v2); None when the path has none."""
    template: str
    """The path for a model server, with ``{model}`` where that server's model name goes."""


class UnknownPath(ValueError):
    """No such endpoint for this protocol; the message says what is served instead."""


class WrongMethod(ValueError):
    """The path exists but not for this method."""


_V2_MODEL = re.compile(r"^/v2/models/([^/]+)(/infer|/ready)?$")
_V2_SERVER = {"/v2", "/v2/health/live", "/v2/health/ready"}
_V1_MODEL = re.compile(r"^/v1/models/([^/:]+)(:predict)?$")
_RESERVED = ("/outcomes", "/healthz", "/readyz", "/metrics")


def match(protocol: Protocol, method: str, path: str) -> Match:
    """Classify a request path; raises UnknownPath or WrongMethod with a reason for the client."""
    if protocol is Protocol.V2:
        found = _V2_MODEL.match(path)
        if found:
            name, suffix = found.group(1), found.group(2) or ""
            if suffix == "/infer":
                return _need(method, "POST", Match(Kind.INFER, name, "/v2/models/{model}/infer"))
            return _need(method, "GET", Match(Kind.PASSTHROUGH, name, "/v2/models/{model}" + suffix))
        if path in _V2_SERVER:
            return _need(method, "GET", Match(Kind.PASSTHROUGH, None, path))
        raise UnknownPath(
            "Open Inference Protocol (v2) paths: POST /v2/models/{name}/infer, GET /v2/models/{name}, "
            "GET /v2/models/{name}/ready, GET /v2/health/live, GET /v2/health/ready"
        )
    if protocol is Protocol.V1:
        found = _V1_MODEL.match(path)
        if found:
            name, suffix = found.group(1), found.group(2) or ""
            if suffix:
                return _need(method, "POST", Match(Kind.INFER, name, "/v1/models/{model}:predict"))
            return _need(method, "GET", Match(Kind.PASSTHROUGH, name, "/v1/models/{model}"))
        raise UnknownPath("KServe v1 paths: POST /v1/models/{name}:predict, GET /v1/models/{name}")
    # Plain JSON: the path is the model server's own API, forwarded as it is.
    if path.startswith(_RESERVED) or not path.startswith("/"):
        raise UnknownPath(f"{path} is not a model path")
    template = path.replace("{", "{{").replace("}", "}}")
    if method == "POST":
        return Match(Kind.INFER, None, template)
    return _need(method, "GET", Match(Kind.PASSTHROUGH, None, template))


def _need(method: str, wanted: str, found: Match) -> Match:
    if method != wanted:
        raise WrongMethod(f"use {wanted} on this path")
    return found


def served_names(config: RouterConfig) -> frozenset[str]:
    """Model names a client may use in the path: either server's name for the model, or the deployment's."""
    return frozenset({config.production.model_name, config.candidate.model_name, config.deployment})


_DECODER = json.JSONDecoder()


def decode_json(body: bytes) -> Any:
    """json.loads for UTF-8 bytes without its encoding sniffing: two fewer Python calls on the hot path."""
    return _DECODER.decode(body.decode())


class Extractor:
    """Reads the prediction (and confidence) out of a model server's JSON answer for recording."""

    def __init__(self, prediction_path: str, confidence_path: str | None) -> None:
        self.prediction = parse_json_path(prediction_path)
        self.confidence = parse_json_path(confidence_path) if confidence_path else None

    def __call__(self, body: bytes) -> tuple[float | None, float | None]:
        """(prediction, confidence); None where the answer has no number there (or is not JSON)."""
        try:
            document = decode_json(body)
        except ValueError:  # UnicodeDecodeError is one too
            return None, None
        confidence = _number(_walk(document, self.confidence)) if self.confidence else None
        return _number(_walk(document, self.prediction)), confidence


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
