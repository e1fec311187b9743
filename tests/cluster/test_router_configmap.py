"""The router reads its configuration from the ConfigMap the operator writes, through a watch, with only the
rights the operator's Role gives it (get/list/watch on that one ConfigMap, by resourceNames)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shadowgate_operator import builders
from shadowgate_operator.api import ShadowDeployment
from shadowgate_router.config import CONFIG_KEY, RouterConfig
from tests.admission_cases import load_example, merge_patch
from tests.conftest import Kubectl
from tests.support.router import ModelServer, Router, model_pair, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.database]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelServer, ModelServer]]:
    with model_pair(tmp_path_factory.mktemp("models")) as pair:
        yield pair


def shadow_deployment(namespace: str, servers: tuple[ModelServer, ModelServer], weight: int) -> ShadowDeployment:
    """The example ShadowDeployment as stored, pointing at the local model servers."""
    patch = {
        "metadata": {"namespace": namespace, "uid": "0b7c1c9e-1f6e-4d1b-9f3e-7a1d2c3b4a5f", "generation": 1},
        "spec": {
            "production": {"service": None, "url": servers[0].url},
            "candidate": {"service": None, "url": servers[1].url},
        },
        "status": {"phase": "Progressing", "currentStep": 0, "currentWeight": weight},
    }
    return ShadowDeployment.model_validate(merge_patch(load_example(), patch))


def apply(kubectl: Kubectl, *manifests: dict[str, Any]) -> None:
    """kubectl apply, without ownerReferences: the owner does not exist here and the GC would delete them."""
    items = [
        {
            **manifest,
            "metadata": {key: value for key, value in manifest["metadata"].items() if key != "ownerReferences"},
        }
        for manifest in manifests
    ]
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(items))


def service_account_kubeconfig(kubectl: Kubectl, admin_kubeconfig: str, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the router's ServiceAccount, as the router's pod would."""
    token = kubectl("create", "token", name, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "router", "user": {"token": token}}],
        "contexts": [{"name": "router", "context": {"cluster": "local", "user": "router"}}],
        "current-context": "router",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def revision(router: Router) -> str | None:
    answer = router.readiness()
    return str(answer.json()["revision"]) if answer.status_code == 200 else None


def wait_for_revision(router: Router, wanted: str, timeout: float) -> float:
    """Seconds until the router reports `wanted` (polled every 5 ms)."""
    started = time.monotonic()
    while revision(router) != wanted:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"revision {wanted} not applied within {timeout}s (has {revision(router)})")
        time.sleep(0.005)
    return time.monotonic() - started


def test_configmap_changes_apply_within_a_second_with_only_the_routers_rights(
    kubectl: Kubectl,
    kubeconfig: str,
    namespace: str,
    servers: tuple[ModelServer, ModelServer],
    tmp_path: Path,
    dsn: str,
) -> None:
    sd = shadow_deployment(namespace, servers, weight=5)
    apply(kubectl, builders.service_account(sd), builders.role(sd), builders.role_binding(sd))
    access = service_account_kubeconfig(kubectl, kubeconfig, namespace, sd.router_name, tmp_path / "router.kubeconfig")
    forbidden = kubectl("get", "configmaps", "-n", namespace, f"--kubeconfig={access}", check=False)
    assert forbidden.returncode != 0 and "forbidden" in forbidden.stderr, "the router's rights are not narrow"

    router = Router(
        tmp_path, dsn, "--configmap", sd.router_name, "--namespace", namespace, "--kubeconfig", str(access)
    ).start(ready=False)
    try:
        assert router.readiness().status_code == 503, "ready before any configuration"

        first = builders.config_map(sd)
        apply(kubectl, first)
        wait_for_revision(router, RouterConfig.from_configmap_data(first["data"]).revision, 5)

        for weight in (10, 20):
            changed = builders.config_map(shadow_deployment(namespace, servers, weight))
            wanted = RouterConfig.from_configmap_data(changed["data"]).revision
            started = time.monotonic()
            apply(kubectl, changed)
            # From the moment the API server has accepted the change (kubectl has returned): the part the
            # router answers for. kubectl's own start-up is printed beside it, not judged.
            stored = time.monotonic()
            wait_for_revision(router, wanted, 5)
            elapsed = time.monotonic() - stored
            assert elapsed < 1.0, f"weight {weight}% took {elapsed:.2f}s"
            print(
                f"weight {weight}%: applied {elapsed * 1000:.0f} ms after the API server stored it "
                f"({(time.monotonic() - started) * 1000:.0f} ms after kubectl apply started)"
            )
            assert router.metric("shadowgate_router_config_weight_percent") == weight

        bad = json.loads(changed["data"][CONFIG_KEY])
        bad["weight"] = 101
        kubectl(
            "patch", "configmap", sd.router_name, "-n", namespace, "--type=merge",
            "-p", json.dumps({"data": {CONFIG_KEY: json.dumps(bad)}}),
        )  # fmt: skip
        wait_until(lambda: router.metric("shadowgate_router_config_refused_total") == 1, 5, "the refusal")
        assert revision(router) == wanted, "a bad configuration replaced the good one"
        assert "weight: Input should be less than or equal to 100" in router.log()
        assert router.metric("shadowgate_router_config_watch_errors_total") == 0

        # The configuration in force routes traffic.
        answer = httpx.post(f"{router.url}/v2/models/fraud/infer", json={"inputs": [{"data": [1]}]})
        assert answer.status_code == 200 and answer.json()["outputs"][0]["data"][0] == 1
    finally:
        router.stop()


def test_a_kubeconfig_with_a_client_certificate_works_too(
    kubectl: Kubectl,
    kubeconfig: str,
    namespace: str,
    servers: tuple[ModelServer, ModelServer],
    tmp_path: Path,
    dsn: str,
) -> None:
    """How a developer runs a router against a cluster: their own kubeconfig (here the admin's client cert)."""
    sd = shadow_deployment(namespace, servers, weight=5)
    configmap = builders.config_map(sd)
    apply(kubectl, configmap)
    router = Router(
        tmp_path, dsn, "--configmap", sd.router_name, "--namespace", namespace, "--kubeconfig", kubeconfig
    ).start(ready=False)
    try:
        wait_for_revision(router, RouterConfig.from_configmap_data(configmap["data"]).revision, 10)
    finally:
        router.stop()
