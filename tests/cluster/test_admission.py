"""The CRD against a real kube-apiserver: what `kubectl apply` refuses and says, and what it fills in."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import kubernetes
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

from shadowgate_operator import builders
from shadowgate_operator.api import (
    AnalysisMetrics,
    ConditionStatus,
    ConditionType,
    Phase,
    ShadowDeployment,
)
from shadowgate_operator.conditions import set_condition, transition
from shadowgate_operator.rollout import with_columns
from tests.admission_cases import CASES, Case, load_example, merge_patch
from tests.conftest import Kubectl
from tests.support.fuzz import spec_patches

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("shadow_crd")]


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any], *, dry_run: bool = False) -> Any:
    args = ["apply", "-n", namespace, "-f", "-", *(["--dry-run=server"] if dry_run else [])]
    return kubectl(*args, input=yaml.safe_dump(manifest), check=False)


def read_back(kubectl: Kubectl, namespace: str, name: str = "fraud-detector") -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        kubectl("get", "shadowdeployment", name, "-n", namespace, "-o", "json").stdout
    )
    return document


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_invalid_manifest_is_refused_with_a_clear_message(kubectl: Kubectl, namespace: str, case: Case) -> None:
    result = apply(kubectl, namespace, case.manifest(), dry_run=True)
    assert result.returncode != 0, f"{case.id} was accepted"
    assert case.message in result.stderr


@pytest.mark.parametrize(
    "patch",
    [
        pytest.param({"spec": {"protocol": "json", "prediction": {"path": "result.score"}}}, id="json-with-path"),
        pytest.param(
            {
                "spec": {
                    "traffic": {"mode": "canary", "steps": [10, 50, 100], "fallbackToProduction": False},
                    "production": {"service": None, "url": "http://models.internal:8000", "modelName": "fraud_a"},
                    "candidate": {"service": None, "url": "http://models.internal:8000", "modelName": "fraud_b"},
                }
            },
            id="canary-one-server-two-models",
        ),
        pytest.param(
            {"spec": {"candidate": {"service": {"name": "fraud-v1", "namespace": "staging"}}}},
            id="same-service-name-other-namespace",
        ),
        pytest.param({"spec": {"analysis": {"interval": "5s", "maxStepDuration": "5s"}}}, id="interval-lower-edge"),
        pytest.param({"spec": {"analysis": {"interval": "1m", "maxStepDuration": None}}}, id="interval-upper-edge"),
        pytest.param(  # integers are quantities too; requests equal to limits (512Mi) is the edge
            {"spec": {"router": {"resources": {"requests": {"cpu": 1, "memory": 536870912}}}}}, id="int-quantity"
        ),
        pytest.param({"metadata": {"name": "f" * 56}}, id="longest-name"),
    ],
)
def test_valid_neighbours_are_accepted(kubectl: Kubectl, namespace: str, patch: dict[str, Any]) -> None:
    manifest = merge_patch(load_example(), patch)
    ShadowDeployment.model_validate(manifest)  # Python agrees
    result = apply(kubectl, namespace, manifest, dry_run=True)
    assert result.returncode == 0, result.stderr


def test_example_applies_and_the_server_fills_in_the_defaults(kubectl: Kubectl, namespace: str) -> None:
    result = apply(kubectl, namespace, load_example())
    assert result.returncode == 0, result.stderr
    stored = read_back(kubectl, namespace)
    spec = stored["spec"]
    assert spec["traffic"]["timeout"] == "10s" and spec["traffic"]["fallbackToProduction"] is True
    assert spec["analysis"]["confidence"] == 0.99
    assert spec["analysis"]["weights"] == {"quality": 0.7, "latency": 0.2, "errors": 0.1}
    assert spec["database"]["secretRef"]["key"] == "dsn"
    assert spec["outcomes"]["tokenSecretRef"]["key"] == "token"
    assert spec["paused"] is False
    assert "status" not in stored or stored["status"] == {}
    # What the server stored is what the types would have defaulted to: one source of defaults.
    assert ShadowDeployment.model_validate(stored).spec == ShadowDeployment.model_validate(load_example()).spec


def test_minimal_spec_gets_every_nested_default(kubectl: Kubectl, namespace: str) -> None:
    manifest = load_example()
    manifest["spec"] = {key: manifest["spec"][key] for key in ("production", "candidate", "database", "outcomes")}
    assert apply(kubectl, namespace, manifest).returncode == 0
    spec = read_back(kubectl, namespace)["spec"]
    assert spec["traffic"]["steps"] == [10] and spec["traffic"]["mode"] == "shadow"
    assert spec["analysis"]["interval"] == "30s" and spec["analysis"]["minSamples"] == 100
    assert spec["router"] == {
        "replicas": 2,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {}},
    }


def test_status_written_by_the_operator_is_accepted_and_shown(kubectl: Kubectl, namespace: str) -> None:
    assert apply(kubectl, namespace, load_example()).returncode == 0
    sd = ShadowDeployment.model_validate(read_back(kubectl, namespace))
    now = datetime.now(UTC)
    status = transition(
        sd.status, Phase.PROGRESSING, reason="StepStarted", message="5% mirrored", generation=1, now=now
    )
    status = status.model_copy(
        update={
            "conditions": set_condition(status.conditions, ConditionType.READY, ConditionStatus.TRUE, "Up", "", 1, now),
            "current_step": 0,
            "current_weight": 5,
            "samples": 250,
            "metrics": AnalysisMetrics(overall_score=0.42, p_value=0.03),
            "step_started_at": now,
        }
    )
    status = with_columns(sd.spec, status)  # Step and Score, as the operator writes them (minSamples is 200)
    patch = {"status": status.to_dict()}
    kubectl(
        "patch", "shadowdeployment", sd.name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps(patch),
    )  # fmt: skip
    stored = ShadowDeployment.model_validate(read_back(kubectl, namespace))
    assert stored.status.phase is Phase.PROGRESSING and stored.status.current_weight == 5
    assert stored.status.conditions == status.conditions
    row = kubectl("get", "shadow", sd.name, "-n", namespace, "--no-headers").stdout.split()
    assert row[:7] == ["fraud-detector", "shadow", "5", "Progressing", "True", "250", "0.42"]


def test_router_objects_are_accepted_by_the_server(kubectl: Kubectl, namespace: str) -> None:
    assert apply(kubectl, namespace, load_example()).returncode == 0
    sd = ShadowDeployment.model_validate(read_back(kubectl, namespace))
    objects = builders.router_objects(sd, builders.OperatorSettings(router_image="shadowgate:test"))
    result = kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(objects), check=False
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(objects)


# --- the pydantic types and the CRD's CEL rules agree (Hypothesis, against the real API server) --------


@pytest.fixture(scope="module")
def api_server(kubeconfig: str, shadow_crd: str) -> Iterator[httpx.Client]:
    """An HTTP client to the API server as the admin: a dry-run create is ~100x cheaper than `kubectl apply`."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    context.load_cert_chain(configuration.cert_file, configuration.key_file)
    with httpx.Client(base_url=configuration.host, verify=context, timeout=30) as client:
        yield client


def admitted(client: httpx.Client, namespace: str, manifest: dict[str, Any]) -> tuple[bool, str]:
    """Whether the API server would store `manifest` (a dry-run create with strict field validation)."""
    response = client.post(
        f"/apis/shadowgate.io/v1alpha1/namespaces/{namespace}/shadowdeployments",
        params={"dryRun": "All", "fieldValidation": "Strict"},
        json=manifest,
    )
    if response.status_code not in (201, 422, 400):
        raise AssertionError(f"unexpected answer {response.status_code}: {response.text}")
    return response.status_code == 201, response.json().get("message", "")


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(patch=spec_patches())
def test_the_types_and_the_crd_agree_on_random_specs(
    api_server: httpx.Client, namespace: str, patch: dict[str, Any]
) -> None:
    manifest = merge_patch(load_example(), patch)
    try:
        ShadowDeployment.model_validate(manifest)
        python, why = True, ""
    except ValidationError as exc:
        python, why = False, str(exc)
    server, message = admitted(api_server, namespace, manifest)
    assert python == server, f"pydantic {'accepts' if python else 'refuses'} ({why}), the API server " + (
        "accepts" if server else f"refuses: {message}"
    )
