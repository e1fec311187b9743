"""The kustomizations hack/e2e-scenario.sh applies besides manifests/: they build, change only what they
say, and the API server accepts them (server-side dry run, restricted Pod Security)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from shadowgate_dev.localenv.images import TIMESCALEDB_IMAGE
from tests.cluster.test_manifests import create_namespaces, dry_run
from tests.conftest import REPO_ROOT, Kubectl
from tests.support.rbac import kustomize

pytestmark = pytest.mark.cluster


def render(kubectl: Kubectl, directory: str) -> list[dict[str, Any]]:
    rendered = kubectl("kustomize", str(REPO_ROOT / directory)).stdout
    return [document for document in yaml.safe_load_all(rendered) if document]


def by_kind_and_name(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(document["kind"], document["metadata"]["name"]): document for document in documents}


def test_the_rollback_scenario_is_the_example_with_a_worse_candidate_canaried(
    kubectl: Kubectl, shadow_crd: str
) -> None:
    example = by_kind_and_name(kustomize(kubectl, "overlays/example"))
    rollback = by_kind_and_name(render(kubectl, "hack/e2e/rollback"))
    assert set(rollback) - set(example) == {("Deployment", "fraud-v3"), ("Service", "fraud-v3")}
    spec = rollback[("ShadowDeployment", "fraud-detector")]["spec"]
    assert spec["production"]["name"] == "fraud-v2" and spec["candidate"]["name"] == "fraud-v3"
    assert spec["traffic"]["mode"] == "canary"
    assert spec["analysis"] == example[("ShadowDeployment", "fraud-detector")]["spec"]["analysis"]
    # Everything else is the example, unchanged: a re-apply touches only the ShadowDeployment.
    for key, document in example.items():
        if key != ("ShadowDeployment", "fraud-detector"):
            assert rollback[key] == document, key
    # fraud-v3 runs the same sample program: the ConfigMap the example generated, by its hashed name.
    (sample,) = [name for kind, name in example if kind == "ConfigMap" and name.startswith("sample-")]
    pod = rollback[("Deployment", "fraud-v3")]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "sample", "configMap": {"name": sample}}]
    assert pod["containers"][0]["image"] == "shadowgate:0.1.0"
    assert {"name": "NOISE", "value": "0.45"} in pod["containers"][0]["env"]

    documents = list(rollback.values())
    others = create_namespaces(kubectl, documents)
    result = dry_run(kubectl, others)
    assert "deployment.apps/fraud-v3 serverside-applied (server dry run)" in result.stdout
    assert "Warning" not in result.stderr, result.stderr


def test_the_node_overlay_is_the_timescaledb_overlay_with_the_local_image(kubectl: Kubectl, shadow_crd: str) -> None:
    upstream = by_kind_and_name(kustomize(kubectl, "overlays/timescaledb"))
    local = by_kind_and_name(render(kubectl, "hack/e2e/node-timescaledb"))
    assert set(local) == set(upstream)
    container = local[("StatefulSet", "timescaledb")]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == TIMESCALEDB_IMAGE
    container["image"] = upstream[("StatefulSet", "timescaledb")]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert local == upstream
