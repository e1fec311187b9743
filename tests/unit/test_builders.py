"""The router's child objects, built from examples/shadowdeployment.yaml and compared with golden files.

`UPDATE_GOLDEN=1 pytest tests/unit/test_builders.py` rewrites tests/golden/*.yaml; review the diff.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowgate_operator import builders
from shadowgate_operator.api import Phase, ShadowDeployment, TrafficMode
from shadowgate_operator.builders import OperatorSettings
from shadowgate_operator.rollout import weight_for
from shadowgate_router.config import CONFIG_KEY, RouterConfig
from tests.admission_cases import load_example, merge_patch

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UID = "6f1c2a57-0d1e-4c55-9a1b-2f3e4d5c6b7a"
SETTINGS = OperatorSettings(router_image="registry.example/shadowgate:0.1.0")


def stored(patch: dict[str, Any] | None = None) -> ShadowDeployment:
    """The example as the API server hands it to the operator: namespaced, with a uid and a status."""
    base = {
        "metadata": {"namespace": "models", "uid": UID, "generation": 1},
        "status": {"phase": "Progressing", "currentStep": 0, "currentWeight": 5},
    }
    return ShadowDeployment.model_validate(merge_patch(merge_patch(load_example(), base), patch or {}))


class _GoldenDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's JSON) as literal blocks, so a golden diff reads line by line."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_GoldenDumper.add_representer(str, _represent_str)


def by_kind() -> dict[str, dict[str, Any]]:
    return {manifest["kind"].lower(): manifest for manifest in builders.router_objects(stored(), SETTINGS)}


@pytest.mark.parametrize(
    "kind", ["serviceaccount", "role", "rolebinding", "configmap", "deployment", "service", "networkpolicy"]
)
def test_matches_golden(kind: str) -> None:
    text = yaml.dump(by_kind()[kind], Dumper=_GoldenDumper, sort_keys=True, default_flow_style=False, width=120)
    path = GOLDEN / f"{kind}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), f"{kind} differs from {path}; if intended, rerun with UPDATE_GOLDEN=1"


def test_every_child_is_named_labelled_and_owned() -> None:
    for manifest in builders.router_objects(stored(), SETTINGS):
        metadata = manifest["metadata"]
        assert (metadata["name"], metadata["namespace"]) == ("fraud-detector-router", "models")
        assert metadata["labels"] == {
            "app.kubernetes.io/name": "shadowgate-router",
            "app.kubernetes.io/instance": "fraud-detector",
            "app.kubernetes.io/managed-by": "shadowgate",
        }
        assert metadata["ownerReferences"] == [
            {
                "apiVersion": "shadowgate.io/v1alpha1",
                "kind": "ShadowDeployment",
                "name": "fraud-detector",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_children_need_the_stored_uid() -> None:
    with pytest.raises(ValueError, match="has no uid"):
        builders.service(stored({"metadata": {"uid": None}}))


def test_role_reads_only_its_own_config_map() -> None:
    (rule,) = builders.role(stored())["rules"]
    assert rule["resourceNames"] == ["fraud-detector-router"]
    assert rule["verbs"] == ["get", "list", "watch"]


def test_service_selects_the_pods_of_the_deployment() -> None:
    objects = by_kind()
    pod_labels = objects["deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["service"]["spec"]["selector"].items() <= pod_labels.items()
    assert objects["deployment"]["spec"]["selector"]["matchLabels"] == objects["service"]["spec"]["selector"]


def test_grpc_is_served_for_protocol_v2_and_reaches_each_server_s_grpc_port() -> None:
    sd = stored({"spec": {"production": {"grpcPort": 8001}, "candidate": {"grpcPort": 8001}}})
    ports = {port["name"]: port for port in builders.service(sd)["spec"]["ports"]}
    assert ports["grpc"] == {
        "name": "grpc",
        "port": 8081,
        "targetPort": "grpc",
        "protocol": "TCP",
        "appProtocol": "kubernetes.io/h2c",
    }
    (container,) = builders.deployment(sd, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert {"name": "grpc", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    config = builders.router_config(sd)
    assert config.production.grpc_address == "fraud-v1.models.svc:8001"
    by_url = stored({"spec": {"candidate": {"service": None, "url": "http://[fd00::7]:8000", "grpcPort": 8001}}})
    assert builders.router_config(by_url).candidate.grpc_address == "[fd00::7]:8001"
    assert builders.router_config(stored()).production.grpc_address is None, "no grpcPort: no gRPC upstream"

    v1 = stored({"spec": {"protocol": "v1"}})
    assert [port["name"] for port in builders.service(v1)["spec"]["ports"]] == ["http"]


def test_deployment_wires_secrets_config_and_identity() -> None:
    pod = by_kind()["deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["SHADOWGATE_DSN"]["valueFrom"]["secretKeyRef"] == {"name": "fraud-detector-db", "key": "dsn"}
    assert env["SHADOWGATE_OUTCOME_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "fraud-detector-outcomes",
        "key": "token",
    }
    assert env["SHADOWGATE_ROUTER_CONFIGMAP"]["value"] == "fraud-detector-router"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert pod["serviceAccountName"] == "fraud-detector-router"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}


def test_image_override_and_default_resources() -> None:
    sd = stored({"spec": {"router": {"image": "mirror.local/router:dev", "resources": None}}})
    (container,) = builders.deployment(sd, SETTINGS)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "mirror.local/router:dev"
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}


def test_config_map_round_trips_through_the_router_contract() -> None:
    data = builders.config_map(stored())["data"]
    config = RouterConfig.from_configmap_data(data)
    assert config == builders.router_config(stored())
    assert config.production.url == "http://fraud-v1.models.svc:8080"
    assert config.candidate.model_name == "fraud"
    assert (config.mode, config.weight, config.phase) == (TrafficMode.SHADOW, 5, "Progressing")
    assert (config.timeout_seconds, config.mirror_timeout_seconds) == (10.0, 5.0)
    assert config.prediction_path == "outputs[0].data[0]"
    assert set(data) == {CONFIG_KEY}


@pytest.mark.parametrize(
    ("phase", "mode", "weight"),
    [
        (Phase.PENDING, TrafficMode.SHADOW, 0),
        (Phase.PROGRESSING, TrafficMode.SHADOW, 5),
        (Phase.PAUSED, TrafficMode.SHADOW, 5),
        (Phase.PROMOTED, TrafficMode.CANARY, 100),
        (Phase.ROLLED_BACK, TrafficMode.SHADOW, 0),
        (Phase.FAILED, TrafficMode.SHADOW, 0),
    ],
)
def test_routing_by_phase(phase: Phase, mode: TrafficMode, weight: int) -> None:
    """The router follows the weight of the one rule (rollout.weight_for), as a planned status carries it."""
    sd = stored({"status": {"phase": phase.value}})
    planned = stored({"status": {"phase": phase.value, "currentWeight": weight_for(sd.spec, sd.status)}})
    assert builders.routing(planned) == (mode, weight)


def test_a_weight_change_changes_the_config_revision_only_through_content() -> None:
    five = builders.router_config(stored())
    ten = builders.router_config(stored({"status": {"currentWeight": 10}}))
    assert five.revision != ten.revision
    assert five.revision == builders.router_config(stored()).revision


def test_settings_from_environment() -> None:
    settings = OperatorSettings.from_env({"SHADOWGATE_ROUTER_IMAGE": "r/x:1", "SHADOWGATE_IMAGE_PULL_POLICY": ""})
    assert (settings.router_image, settings.image_pull_policy) == ("r/x:1", "IfNotPresent")
    assert OperatorSettings.from_env({}).router_image.startswith("shadowgate:")


def test_the_cluster_role_named_in_permission_problems() -> None:
    assert OperatorSettings.from_env({}).cluster_role == "shadowgate-operator"
    assert OperatorSettings.from_env({"SHADOWGATE_CLUSTER_ROLE": "ops-shadowgate"}).cluster_role == "ops-shadowgate"


def test_spec_router_image_must_be_one_the_operator_allows() -> None:
    assert SETTINGS.image_problem(stored()) is None  # no image in spec: the operator's own
    own = stored({"spec": {"router": {"image": SETTINGS.router_image}}})
    assert SETTINGS.image_problem(own) is None
    other = stored({"spec": {"router": {"image": "attacker.example/steal-secrets:latest"}}})
    problem = SETTINGS.image_problem(other)
    assert problem is not None and "'attacker.example/steal-secrets:latest' is not an image" in problem
    assert "SHADOWGATE_ALLOWED_ROUTER_IMAGES" in problem
    allowing = OperatorSettings.from_env(
        {
            "SHADOWGATE_ROUTER_IMAGE": "r/x:1",
            "SHADOWGATE_ALLOWED_ROUTER_IMAGES": " r/x:2 , attacker.example/steal-secrets:latest,",
        }
    )
    assert allowing.allowed_router_images == ("r/x:2", "attacker.example/steal-secrets:latest")
    assert allowing.image_problem(other) is None


@pytest.mark.parametrize(
    ("labels", "allowed"),
    [
        ({"shadowgate.io/router-secret": "true"}, True),
        ({"shadowgate.io/router-secret": "false"}, False),
        ({"shadowgate.io/router-secret": "True"}, False),  # label values are exact
        ({"app": "db"}, False),
        (None, False),
    ],
)
def test_only_a_secret_labelled_for_routers_is_one_a_router_gets(labels: dict[str, str] | None, allowed: bool) -> None:
    secret = {"metadata": {"name": "db", "namespace": "models", "labels": labels}, "data": {"dsn": "aHVudGVyMg=="}}
    problem = builders.secret_problem(secret, "spec.database.secretRef")
    assert (problem is None) == allowed
    if problem is not None:
        assert problem.startswith("Secret models/db (spec.database.secretRef) is not labelled ")
        assert problem.endswith("kubectl label secret db -n models shadowgate.io/router-secret=true")
        assert "aHVudGVyMg==" not in problem and "hunter2" not in problem


def test_the_router_network_policy_opens_its_ports_and_closes_cloud_metadata() -> None:
    policy = by_kind()["networkpolicy"]["spec"]
    deployment = by_kind()["deployment"]["spec"]["template"]["spec"]["containers"][0]
    names = [port["name"] for port in deployment["ports"]]
    assert "metrics" in names
    # Traffic ports from anywhere; /metrics only from namespaces labelled for scrapers.
    assert policy["ingress"][0] == {"ports": [{"port": name, "protocol": "TCP"} for name in names if name != "metrics"]}
    assert policy["ingress"][1] == {
        "from": [{"namespaceSelector": {"matchLabels": {"shadowgate.io/metrics-scraper": "true"}}}],
        "ports": [{"port": "metrics", "protocol": "TCP"}],
    }
    blocks = [peer["ipBlock"] for peer in policy["egress"][0]["to"] if "ipBlock" in peer]
    assert {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32", "100.100.100.200/32"]} in blocks
    assert {"namespaceSelector": {}} in policy["egress"][0]["to"]  # pods, where ipBlock does not match them
    assert policy["podSelector"]["matchLabels"] == builders.selector_labels(stored())
    without = OperatorSettings.from_env({"SHADOWGATE_ROUTER_NETWORK_POLICY": "false"})
    assert "NetworkPolicy" not in [child["kind"] for child in builders.router_objects(stored(), without)]


def test_a_child_is_in_place_when_the_api_server_holds_every_field_it_sets() -> None:
    """What a resync compares (builders.in_place): the fields the operator sets, not what the API server or
    others add; a quantity by its amount. tests/cluster/test_reconciler.py checks it on what a real API server
    holds."""
    deployment = by_kind()["deployment"]
    live = copy.deepcopy(deployment)
    container = live["spec"]["template"]["spec"]["containers"][0]
    live["metadata"] |= {"resourceVersion": "7", "annotations": {"deployment.kubernetes.io/revision": "1"}}
    live["status"] = {"replicas": 2}
    container |= {"terminationMessagePath": "/dev/termination-log"}  # defaults the API server adds
    container["readinessProbe"]["httpGet"]["scheme"] = "HTTP"
    assert builders.in_place(deployment, live)
    assert not builders.in_place(deployment, None)  # deleted

    def edited(change: Any) -> bool:
        changed = copy.deepcopy(live)
        change(changed)
        return builders.in_place(deployment, changed)

    pod = ("spec", "template", "spec")
    assert not edited(lambda d: _at(d, *pod, "containers")[0].update(image="attacker.example/x:1"))
    assert not edited(lambda d: _at(d, *pod, "containers")[0]["env"].pop())  # one env var removed
    assert not edited(lambda d: _at(d, *pod, "containers")[0]["env"].append({"name": "X", "value": "1"}))
    assert not edited(lambda d: _at(d, "metadata", "labels").pop("app.kubernetes.io/managed-by"))
    assert not edited(lambda d: _at(d, "spec").update(replicas=0))
    assert not edited(lambda d: _at(d, *pod, "securityContext").update(runAsNonRoot="true"))  # same text, not a bool
    # Quantities as the API server writes them back: the same amount in its own form.
    requests = {"cpu": "0.5", "memory": "0.125Gi"}
    asked = builders.router_objects(stored({"spec": {"router": {"resources": {"requests": requests}}}}), SETTINGS)[4]
    held = copy.deepcopy(asked)
    _at(held, *pod, "containers")[0]["resources"]["requests"] = {"cpu": "500m", "memory": "128Mi"}
    assert builders.in_place(asked, held)
    _at(held, *pod, "containers")[0]["resources"]["requests"]["cpu"] = "501m"
    assert not builders.in_place(asked, held)
    # An empty map the API server leaves out (the NetworkPolicy's "any namespace" peer) is in place.
    policy = by_kind()["networkpolicy"]
    trimmed = copy.deepcopy(policy)
    trimmed["spec"]["egress"][0]["to"][2] = {}
    assert builders.in_place(policy, trimmed)
    trimmed["spec"]["egress"][0]["to"].pop()
    assert not builders.in_place(policy, trimmed)


def _at(manifest: dict[str, Any], *path: str) -> Any:
    for key in path:
        manifest = manifest[key]
    return manifest
