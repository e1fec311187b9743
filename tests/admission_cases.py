"""Invalid ShadowDeployments and what a person sees when they apply one.

One table for two tiers: tests/cluster/test_admission.py applies each case to a real API server and
expects `message` in kubectl's error; tests/unit/test_api.py expects the pydantic types to refuse the
same objects (with the same words when the rule is one of the types' CEL rules).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shadowdeployment.yaml"


def load_example() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return document


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, None deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


@dataclass(frozen=True)
class Case:
    id: str
    patch: dict[str, Any]
    """Merge patch applied to examples/shadowdeployment.yaml."""
    message: str
    """Substring of the error kubectl prints."""

    def manifest(self) -> dict[str, Any]:
        result: dict[str, Any] = merge_patch(load_example(), self.patch)
        return result


def _spec(**patch: Any) -> dict[str, Any]:
    return {"spec": patch}


CASES: tuple[Case, ...] = (
    Case("steps-decreasing", _spec(traffic={"steps": [10, 5]}), "traffic.steps must be strictly increasing"),
    Case("steps-repeated", _spec(traffic={"steps": [5, 5, 10]}), "traffic.steps must be strictly increasing"),
    Case("steps-empty", _spec(traffic={"steps": []}), "spec.traffic.steps in body should have at least 1 items"),
    Case("step-over-100", _spec(traffic={"steps": [50, 150]}), "should be less than or equal to 100"),
    Case("step-zero", _spec(traffic={"steps": [0, 10]}), "should be greater than or equal to 1"),
    Case("mode-unknown", _spec(traffic={"mode": "blue-green"}), 'supported values: "shadow", "canary"'),
    Case(
        "url-and-service",
        _spec(candidate={"url": "http://fraud-v2.example:8080"}),
        "set exactly one of url or service",
    ),
    Case("no-address", _spec(production={"service": None}), "set exactly one of url or service"),
    Case("url-not-http", _spec(candidate={"service": None, "url": "ftp://fraud-v2:21"}), "spec.candidate.url"),
    Case(
        "same-version",
        _spec(candidate={"version": "1.4.2"}),
        "candidate.version must differ from production.version",
    ),
    Case(
        "same-server",
        _spec(candidate={"service": {"name": "fraud-v1"}}),
        "candidate and production point at the same server and model",
    ),
    Case(
        "json-without-path",
        _spec(protocol="json"),
        "protocol json needs prediction.path",
    ),
    Case("prediction-path-malformed", _spec(prediction={"path": "outputs[0"}), "spec.prediction.path"),
    Case("interval-too-short", _spec(analysis={"interval": "2s"}), "analysis.interval must be between 5s and 60s"),
    Case("interval-too-long", _spec(analysis={"interval": "2m"}), "analysis.interval must be between 5s and 60s"),
    Case(
        "interval-not-a-duration", _spec(analysis={"interval": "thirty"}), "spec.analysis.interval in body should match"
    ),
    Case(
        "step-shorter-than-interval",
        _spec(analysis={"maxStepDuration": "10s"}),
        "analysis.maxStepDuration must be at least one analysis.interval",
    ),
    Case("timeout-zero", _spec(traffic={"timeout": "0s"}), "traffic.timeout must be between 10ms and 5m"),
    Case(
        "mirror-timeout-too-long",
        _spec(traffic={"mirrorTimeout": "10m"}),
        "traffic.mirrorTimeout must be between 10ms and 5m",
    ),
    Case(
        "step-duration-too-long",
        _spec(analysis={"maxStepDuration": "800h"}),
        "analysis.maxStepDuration must be between 5s and 720h",
    ),
    Case("promotion-threshold-zero", _spec(analysis={"promotionThreshold": 0}), "should be greater than 0"),
    Case(
        "rollback-threshold-over-one", _spec(analysis={"rollbackThreshold": 1.5}), "should be less than or equal to 1"
    ),
    Case(
        "weights-all-zero",
        _spec(analysis={"weights": {"quality": 0, "latency": 0, "errors": 0}}),
        "analysis.weights must not all be zero",
    ),
    Case("confidence-too-low", _spec(analysis={"confidence": 0.3}), "should be greater than or equal to 0.5"),
    Case("metric-unknown", _spec(analysis={"metric": "f1"}), 'supported values: "mae", "rmse"'),
    Case(
        "replicas-zero",
        _spec(router={"replicas": 0}),
        "spec.router.replicas in body should be greater than or equal to 1",
    ),
    Case(
        "quantity-malformed",
        _spec(router={"resources": {"limits": {"memory": "lots"}}}),
        "spec.router.resources.limits.memory",
    ),
    Case("database-missing", _spec(database=None), "spec.database: Required value"),
    Case("unknown-field", _spec(canaryWeight=50), 'unknown field "spec.canaryWeight"'),
    Case(
        "name-with-dots",
        {"metadata": {"name": "fraud.detector"}},
        "metadata.name must be a DNS label of at most 56 characters starting with a letter",
    ),
    Case(
        "name-too-long",
        {"metadata": {"name": "f" * 57}},
        "metadata.name must be a DNS label of at most 56 characters starting with a letter",
    ),
)
