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


def _url(url: str, side: str = "candidate") -> dict[str, Any]:
    """The candidate (or production) reached at `url` instead of its Service."""
    return _spec(**{side: {"service": None, "url": url}})


def _resources(**resources: Any) -> dict[str, Any]:
    return _spec(router={"resources": resources})


# The words of each model URL rule (operator/shadowgate_operator/api.py URL_CHECKS), as kubectl shows them.
SCHEME = "url must start with http:// or https://"
CREDENTIALS = "url must not contain a user name or password"
NO_HOST = "url must name a host"
HOST_FORM = "url's host must be a DNS name"
PORT = "url's port must be a number from 1 to 65535"
BASE_URL = "url must be a base URL with at most a path"
IPV6 = "url's host in brackets must be an IPv6 address"
IPV4 = "url's host ends in a number, so it is read as an IPv4 address, but is not one"
UNROUTABLE = "url must not point at a link-local, multicast, broadcast or unspecified address or a cloud metadata"
AMOUNTS = "router.resources amounts must be Kubernetes quantities from 0"
OVER_LIMIT = "router.resources.requests must not exceed router.resources.limits"
RESOURCE_NAMES = "router.resources may name only cpu, memory and ephemeral-storage"
CONFIDENCE = "analysis.confidence must be from 0.5 to 0.9999"


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
    Case("url-not-http", _url("ftp://fraud-v2:21"), SCHEME),
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
    Case(
        "grpc-port-without-v2",
        _spec(protocol="v1", candidate={"grpcPort": 8081}),
        "grpcPort is for protocol v2",
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
    Case("confidence-too-low", _spec(analysis={"confidence": 0.3}), CONFIDENCE),
    Case(
        "rollback-confidence-one",
        _spec(analysis={"rollbackConfidence": 1.0}),
        "analysis.rollbackConfidence must be from 0.5 to 0.9999",
    ),
    Case(
        "gate-confidence-too-low", _spec(analysis={"gateConfidence": 0.2}), "analysis.gateConfidence must be from 0.5"
    ),
    Case(
        "segment-by-both",
        _spec(analysis={"segmentBy": {"header": "X-Instrument", "path": "parameters.instrument"}}),
        "segmentBy: set exactly one of header or path",
    ),
    Case("segment-by-neither", _spec(analysis={"segmentBy": {}}), "segmentBy: set exactly one of header or path"),
    Case("loss-cap-zero", _spec(analysis={"lossCap": 0}), "should be greater than 0"),
    Case("metric-unknown", _spec(analysis={"metric": "f1"}), 'supported values: "mae", "rmse"'),
    Case(
        "replicas-zero",
        _spec(router={"replicas": 0}),
        "spec.router.replicas in body should be greater than or equal to 1",
    ),
    Case("quantity-malformed", _resources(limits={"memory": "lots"}), AMOUNTS),
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
    # Issue 12, D11: URLs the router could not use, resources the API server refuses, words a person reads.
    Case("url-port-too-big", _url("http://h:99999"), PORT),
    Case("url-port-letters", _url("http://h:abc"), PORT),
    Case("url-port-zero", _url("http://fraud-v2:0"), PORT),
    Case("url-port-empty", _url("http://fraud-v2:/v2"), PORT),
    Case("url-port-negative", _url("http://fraud-v2:-80"), PORT),
    Case("url-bracket-unclosed", _url("http://[::1"), HOST_FORM),
    Case("url-bracket-unopened", _url("http://::1]:8080"), NO_HOST),
    Case("url-no-host", _url("http://:80"), NO_HOST),
    Case("url-nothing-after-scheme", _url("http://"), NO_HOST),
    Case("url-path-without-host", _url("http:///v2/models"), NO_HOST),
    Case("url-no-scheme", _url("fraud-v2:8080"), SCHEME),
    Case("url-upper-case-scheme", _url("HTTP://fraud-v2:8080"), SCHEME),
    Case("url-grpc-scheme", _url("grpc://fraud-v2:8001"), SCHEME),
    Case("url-password", _url("http://shadow:s3cret@fraud-v2:8080"), CREDENTIALS),
    Case("url-user", _url("https://shadow@fraud-v2:8443"), CREDENTIALS),
    Case("url-password-production", _url("http://admin:admin@fraud-v1:8080", "production"), CREDENTIALS),
    Case("url-query", _url("http://fraud-v2:8080/?token=abc"), BASE_URL),
    Case("url-fragment", _url("http://fraud-v2:8080/v2#models"), BASE_URL),
    Case("url-space-in-path", _url("http://fraud-v2:8080/a b"), BASE_URL),
    Case("url-bad-percent", _url("http://fraud-v2:8080/%zz"), BASE_URL),
    Case("url-underscore-host", _url("http://fraud_v2:8080"), HOST_FORM),
    Case("url-host-starts-with-dash", _url("http://-fraud.example:8080"), HOST_FORM),
    Case("url-host-trailing-dot", _url("http://fraud-v2.:8080"), HOST_FORM),
    Case("url-ipv6-malformed", _url("http://[fd00::1::2]:8080"), IPV6),
    Case("url-ipv4-in-brackets", _url("http://[10.0.0.7]:8080"), IPV6),
    Case("url-ipv4-mapped-metadata", _url("http://[::ffff:a9fe:a9fe]/latest"), IPV6),
    Case("url-ipv4-three-parts", _url("http://10.0.7:8080"), IPV4),
    Case("url-ipv4-out-of-range", _url("http://10.0.0.256:8080"), IPV4),
    Case("url-ipv4-leading-zero", _url("http://010.0.0.7:8080"), IPV4),
    Case("url-ipv4-as-one-number", _url("http://2852039166/latest/meta-data"), IPV4),
    Case("url-ipv4-in-hex", _url("http://0xa9fea9fe/latest/meta-data"), IPV4),
    Case("url-metadata-link-local", _url("http://169.254.169.254/latest/meta-data"), UNROUTABLE),
    Case("url-link-local-production", _url("http://169.254.10.1:8080", "production"), UNROUTABLE),
    Case("url-link-local-ipv6", _url("http://[fe80::1]:8080"), UNROUTABLE),
    Case("url-metadata-gcp-name", _url("http://metadata.google.internal/computeMetadata/v1"), UNROUTABLE),
    Case("url-metadata-gcp-name-upper-case", _url("http://Metadata.Google.Internal"), UNROUTABLE),
    Case("url-metadata-aws-ipv6", _url("http://[fd00:ec2::254]/latest"), UNROUTABLE),
    Case("url-metadata-alibaba", _url("http://100.100.100.200/latest/meta-data"), UNROUTABLE),
    Case("url-unspecified", _url("http://0.0.0.0:8080"), UNROUTABLE),
    Case("url-unspecified-ipv6", _url("http://[::]:8080"), UNROUTABLE),
    Case("url-multicast", _url("http://224.0.0.1:8080"), UNROUTABLE),
    Case("url-broadcast", _url("http://255.255.255.255:8080"), UNROUTABLE),
    Case("url-too-long", _url("http://fraud-v2:8080/" + "a" * 2100), "spec.candidate.url: Too long"),
    Case("cpu-negative", _resources(requests={"cpu": "-1"}), AMOUNTS),
    Case("cpu-negative-integer", _resources(limits={"cpu": -2}), AMOUNTS),
    Case("memory-empty", _resources(requests={"memory": ""}), AMOUNTS),
    Case("memory-plus-sign", _resources(requests={"memory": "+1Gi"}), AMOUNTS),
    Case("memory-huge-exponent", _resources(limits={"memory": "1e999"}), AMOUNTS),
    Case("memory-decimal-exponent", _resources(limits={"memory": "1e1.5"}), AMOUNTS),
    Case("memory-lower-case-suffix", _resources(limits={"memory": "512mi"}), AMOUNTS),
    Case("requests-over-limits", _resources(requests={"memory": "1Gi"}, limits={"memory": "512Mi"}), OVER_LIMIT),
    Case("cpu-request-over-limit", _resources(requests={"cpu": 2}, limits={"cpu": "1500m"}), OVER_LIMIT),
    Case("gpu", _resources(limits={"nvidia.com/gpu": 1}), RESOURCE_NAMES),
    Case("resource-name-unknown", _resources(requests={"cpus": "1"}), RESOURCE_NAMES),
    Case("confidence-one", _spec(analysis={"confidence": 1.0}), CONFIDENCE),
    Case("confidence-just-below-one", _spec(analysis={"confidence": 0.99999}), CONFIDENCE),
    # The schema's own checks on more fields: refused before, kept refused.
    Case("replicas-too-many", _spec(router={"replicas": 51}), "should be less than or equal to 50"),
    Case("min-samples-zero", _spec(analysis={"minSamples": 0}), "should be greater than or equal to 1"),
    Case("max-error-rate-over-one", _spec(analysis={"maxErrorRate": 1.5}), "should be less than or equal to 1"),
    Case("max-latency-zero", _spec(analysis={"maxLatencyP99Ms": 0}), "should be greater than 0"),
    Case("weight-negative", _spec(analysis={"weights": {"quality": -0.1}}), "should be greater than or equal to 0"),
    Case("sticky-header-space", _spec(traffic={"stickyHeader": "X Account"}), "spec.traffic.stickyHeader"),
    Case("protocol-unknown", _spec(protocol="grpc"), 'supported values: "v2", "v1", "json"'),
    Case("service-port-zero", _spec(candidate={"service": {"port": 0}}), "should be greater than or equal to 1"),
    Case(
        "service-port-too-big", _spec(candidate={"service": {"port": 70000}}), "should be less than or equal to 65535"
    ),
    Case("service-name-upper-case", _spec(candidate={"service": {"name": "Fraud-V2"}}), "spec.candidate.service.name"),
    Case("secret-name-invalid", _spec(database={"secretRef": {"name": "Bad_Name"}}), "spec.database.secretRef.name"),
    Case("secret-key-invalid", _spec(outcomes={"tokenSecretRef": {"key": "a/b"}}), "spec.outcomes.tokenSecretRef.key"),
    Case("version-empty", _spec(candidate={"version": ""}), "spec.candidate.version"),
    Case("model-name-with-space", _spec(candidate={"modelName": "fraud model"}), "spec.candidate.modelName"),
    Case("steps-too-many", _spec(traffic={"steps": list(range(1, 22))}), "must have at most 20 items"),
    Case("paused-not-boolean", _spec(paused="yes"), "spec.paused"),
    Case("mirror-timeout-words", _spec(traffic={"mirrorTimeout": "5 seconds"}), "spec.traffic.mirrorTimeout"),
    Case(
        "step-duration-too-short",
        _spec(analysis={"interval": "5s", "maxStepDuration": "1s"}),
        "analysis.maxStepDuration must be between 5s and 720h",
    ),
    Case("router-image-with-space", _spec(router={"image": "shadowgate :0.1.0"}), "spec.router.image"),
    Case("outcomes-missing", _spec(outcomes=None), "spec.outcomes: Required value"),
    Case("production-missing", _spec(production=None), "spec.production: Required value"),
    Case(
        "notification-names-repeated",
        _spec(notifications=[{"name": "team", "urlSecretRef": {"name": "hooks"}}] * 2),
        "each receiver in notifications needs its own name",
    ),
    Case(
        "notification-format-unknown",
        _spec(notifications=[{"name": "team", "format": "teams", "urlSecretRef": {"name": "hooks"}}]),
        'supported values: "cloudevents", "slack"',
    ),
    Case(
        "notification-event-lowercase",
        _spec(notifications=[{"name": "team", "urlSecretRef": {"name": "hooks"}, "events": ["promoted"]}]),
        "spec.notifications[0].events[0]",
    ),
    Case("notification-without-url", _spec(notifications=[{"name": "team"}]), "urlSecretRef: Required value"),
    Case(
        "gate-names-repeated",
        _spec(gates=[{"name": "smoke", "type": "preRollout", "urlSecretRef": {"name": "gates"}}] * 2),
        "each gate in gates needs its own name",
    ),
    Case(
        "gate-type-unknown",
        _spec(gates=[{"name": "smoke", "type": "pre-rollout", "urlSecretRef": {"name": "gates"}}]),
        'supported values: "preRollout", "confirmStep", "confirmPromotion", "postRollback"',
    ),
    Case(
        "gate-timeout-too-long",
        _spec(gates=[{"name": "smoke", "type": "confirmStep", "urlSecretRef": {"name": "gates"}, "timeout": "2m"}]),
        "gates[].timeout must be between 1s and 30s",
    ),
    Case(
        "gate-on-timeout-unknown",
        _spec(gates=[{"name": "smoke", "type": "confirmStep", "urlSecretRef": {"name": "gates"}, "onTimeout": "skip"}]),
        'supported values: "hold", "proceed"',
    ),
    Case("gate-without-url", _spec(gates=[{"name": "smoke", "type": "preRollout"}]), "urlSecretRef: Required value"),
    Case(
        "registry-without-registered-model",
        _spec(registry={"mlflow": {"trackingUri": "http://mlflow.mlops:5000"}}),
        "registry and candidate.registeredModel go together",
    ),
    Case(
        "registered-model-without-registry",
        _spec(candidate={"registeredModel": {"name": "fraud", "version": "2"}}),
        "registry and candidate.registeredModel go together",
    ),
    Case(
        "registry-alias-reserved",
        _spec(
            registry={"mlflow": {"trackingUri": "http://mlflow.mlops:5000"}, "alias": "v2"},
            candidate={"registeredModel": {"name": "fraud", "version": "2"}},
        ),
        "registry.alias must not be latest or v<number>",
    ),
    Case(
        "registry-tracking-uri-not-http",
        _spec(
            registry={"mlflow": {"trackingUri": "databricks://profile"}},
            candidate={"registeredModel": {"name": "fraud", "version": "2"}},
        ),
        "spec.registry.mlflow.trackingUri: Invalid value",
    ),
    Case(
        "registered-model-version-not-a-number",
        _spec(candidate={"registeredModel": {"name": "fraud", "version": "v2"}}),
        "spec.candidate.registeredModel.version",
    ),
)
