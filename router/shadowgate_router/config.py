"""The router's configuration: the one contract between the operator and the router.

The operator writes a `RouterConfig` as JSON under key ``config.json`` of the ConfigMap
``<shadowdeployment>-router``; every router replica watches that ConfigMap. A config that does not
validate is refused with a `RouterConfigError` and the router keeps serving with its last good one.
The operator imports this module (never the other way round), so the enums and the JSON-path grammar
below are shared by the CRD and the router.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field
from pydantic.alias_generators import to_camel

from shadowgate_router import boundedjson

CONFIG_KEY = "config.json"
"""The ConfigMap data key holding the JSON document."""

HTTP_PORT = 8080
"""The router listens here (named ``http``): traffic, outcomes, /healthz, /readyz."""
GRPC_PORT = 8081
"""And here (named ``grpc``) for gRPC: inference.GRPCInferenceService (protocol v2)."""
METRICS_PORT = 9090
"""And here (named ``metrics``) for Prometheus' /metrics only: clients of the traffic port do not see it."""

DRAIN_SECONDS = 20.0
"""On SIGTERM, how long the router waits for requests in flight and shadow copies (`--drain-seconds`)."""
FLUSH_SECONDS = 10.0
"""Then how long it tries to write what it holds to the database (`--flush-seconds`); the rest stays on disk."""


def shutdown_seconds(drain: float = DRAIN_SECONDS, flush: float = FLUSH_SECONDS) -> int:
    """The grace period a router pod needs: the whole shutdown, plus a margin for the process to exit."""
    return math.ceil(drain + flush) + 5


# Environment of a router pod, set by the operator's Deployment.
ENV_NAMESPACE = "POD_NAMESPACE"
ENV_CONFIGMAP = "SHADOWGATE_ROUTER_CONFIGMAP"
ENV_DSN = "SHADOWGATE_DSN"
ENV_OUTCOME_TOKEN = "SHADOWGATE_OUTCOME_TOKEN"
ENV_SPOOL_DIR = "SHADOWGATE_SPOOL_DIR"
"""Writable directory where rows wait on disk while the database is away."""

DEFAULT_MIRROR_DROP_HEADERS = ("Authorization", "Cookie")
"""Request headers not copied to the candidate's shadow calls unless the ShadowDeployment says otherwise."""

JSON_PATH_PATTERN = r"^([A-Za-z_][-A-Za-z0-9_]*|\[[0-9]+\])(\[[0-9]+\])*([.][A-Za-z_][-A-Za-z0-9_]*(\[[0-9]+\])*)*$"
"""Dotted keys with list indexes, e.g. ``outputs[0].data[0]`` or ``[0].score``."""

_PATH_TOKEN = re.compile(r"([A-Za-z_][-A-Za-z0-9_]*)|\[([0-9]+)\]")


class TrafficMode(StrEnum):
    """How the candidate takes part: shadow mirrors requests to it and ignores its answer;
    canary returns its answer for its share of requests."""

    SHADOW = "shadow"
    CANARY = "canary"


class Protocol(StrEnum):
    """The inference protocol both model servers speak: v2 is the Open Inference Protocol
    (KServe, Triton, MLServer); v1 is TensorFlow-Serving style {"instances"} -> {"predictions"};
    json is any JSON API, read through prediction.path."""

    V2 = "v2"
    V1 = "v1"
    JSON = "json"


def parse_json_path(path: str) -> tuple[str | int, ...]:
    """Split ``outputs[0].data[0]`` into ``("outputs", 0, "data", 0)``; ValueError when malformed."""
    if not re.fullmatch(JSON_PATH_PATTERN, path):
        raise ValueError(f"{path!r} is not a path like outputs[0].data[0]")
    return tuple(key if key else int(index) for key, index in _PATH_TOKEN.findall(path))


class RouterConfigError(ValueError):
    """The ConfigMap does not hold a usable router configuration; the message says what to fix."""


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, allow_inf_nan=False
    )


class Upstream(_Model):
    """One model server as the router reaches it."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    """Base URL; protocol paths are appended (``{url}/v2/models/{modelName}/infer``)."""
    model_name: str = Field(min_length=1)
    """The name the model server knows the model by."""
    grpc_address: str | None = Field(default=None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):[0-9]{1,5}$")
    """HOST:PORT of the model server's gRPC endpoint (plaintext HTTP/2), for protocol v2; None: no gRPC."""

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")


class RouterConfig(_Model):
    """What one router replica needs to route, record and label its traffic."""

    deployment: str = Field(min_length=1)
    """The ShadowDeployment's name (the ``deployment`` column of every recorded row)."""
    namespace: str = Field(min_length=1)
    mode: TrafficMode
    weight: int = Field(ge=0, le=100)
    """Percent of requests sent to the candidate: mirrored in shadow mode, answered by it in canary mode."""
    phase: str = Field(min_length=1)
    """The ShadowDeployment's phase, for logs and metrics only; routing follows mode and weight."""
    protocol: Protocol
    prediction_path: Annotated[str, Field(pattern=JSON_PATH_PATTERN)]
    """Where the predicted number is in a model's answer."""
    confidence_path: Annotated[str, Field(pattern=JSON_PATH_PATTERN)] | None = None
    production: Upstream
    candidate: Upstream
    sticky_header: str | None = Field(default=None, min_length=1)
    """Requests with the same value of this header go to the same side; None hashes the request id."""
    segment_header: str | None = Field(default=None, min_length=1)
    """Record this request header's value as the request's segment (spec.analysis.segmentBy.header)."""
    segment_path: Annotated[str, Field(pattern=JSON_PATH_PATTERN)] | None = None
    """Record the value at this path of the JSON request body as its segment (segmentBy.path)."""
    fallback_to_production: bool
    """Canary only: when the candidate fails, answer from production instead of returning its error."""
    timeout_seconds: float = Field(gt=0)
    """How long the answering model may take."""
    mirror_timeout_seconds: float = Field(gt=0)
    """How long a mirrored (shadow) candidate call may take before it is recorded as a timeout."""
    mirror_drop_headers: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_]*$")], ...] = (
        DEFAULT_MIRROR_DROP_HEADERS
    )
    """Request headers left out of shadow copies (compared case-insensitively): the client's credentials."""

    @property
    def candidate_answers_all(self) -> bool:
        """Every request is answered by the candidate (canary at 100%: how the operator routes a promoted
        rollout), so the paths that are not inference (metadata, readiness) go to it too."""
        return self.mode is TrafficMode.CANARY and self.weight == 100

    @computed_field  # type: ignore[prop-decorator]
    @property
    def revision(self) -> str:
        """Content hash, exported by the router as a metric label: which config each replica runs.

        Derived rather than stored, so a hand-edited ConfigMap cannot claim a stale revision.
        """
        content = self.model_dump(mode="json", by_alias=True, exclude={"revision"})
        digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())
        return digest.hexdigest()[:12]

    def to_configmap_data(self) -> dict[str, str]:
        """The ConfigMap ``data``: deterministic, indented JSON so `kubectl get -o yaml` stays readable."""
        content = self.model_dump(mode="json", by_alias=True)
        return {CONFIG_KEY: json.dumps(content, sort_keys=True, indent=2) + "\n"}

    @classmethod
    def from_configmap_data(cls, data: Mapping[str, str] | None) -> RouterConfig:
        """Parse a ConfigMap's ``data``; RouterConfigError lists every problem, one per line."""
        if not data or CONFIG_KEY not in data:
            raise RouterConfigError(f"the ConfigMap has no {CONFIG_KEY!r} key")
        try:
            document = boundedjson.loads(data[CONFIG_KEY])
        except ValueError as exc:
            raise RouterConfigError(f"{CONFIG_KEY} is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise RouterConfigError(f"{CONFIG_KEY} must hold a JSON object, not {type(document).__name__}")
        document.pop("revision", None)  # recomputed from the content
        try:
            return cls.model_validate(document)
        except ValidationError as exc:
            raise RouterConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"{CONFIG_KEY}: {where}: {error['msg']}")
    return "\n".join(problems)
