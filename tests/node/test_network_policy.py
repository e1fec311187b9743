"""The shipped NetworkPolicies under enforcement: kube-router's firewall on the local node, real pods.

The example (manifests/overlays/example: its own operator, two model servers, clients, a ShadowDeployment)
runs on TimescaleDB (hack/e2e/node-timescaledb) with its operator told to make no router NetworkPolicy
and without the operator's, so each test first shows the connection it then expects blocked working:
nothing can pass for want of a working network. Then the policy is applied (the router's as
`builders.network_policy` builds it for the ShadowDeployment the cluster holds, the operator's from
manifests/operator/networkpolicy.yaml) and, from a pod in a namespace labelled
`shadowgate.io/metrics-scraper=true` and from one in a namespace without the label:

- the outsider's connections to the metrics port are refused, the scraper's get `/metrics`;
- the traffic ports (router) and the probe port (operator) stay open to both;
- the router's and the operator's own new connections still reach what they need (DNS, the API server,
  the database, the model servers), and the router keeps answering and writing rows.

Connections go to the pods' own addresses (and, for the operator's metrics, through its Service as
well: the node's kube-proxy keeps the caller's address). Connections from the node itself always pass:
kube-router admits the node's own addresses (the kubelet's probes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowgate_dev.localenv import host
from shadowgate_dev.localenv.images import node_images
from shadowgate_dev.localenv.node import Node, claim_volume, kubectl, read_state
from shadowgate_operator import builders
from shadowgate_operator.api import ShadowDeployment
from shadowgate_operator.builders import OperatorSettings
from shadowgate_router.config import GRPC_PORT, HTTP_PORT, METRICS_PORT
from tests.support.operator import eventually

pytestmark = [pytest.mark.node, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_NS = "shadowgate-example"
SYSTEM_NS = "shadowgate-system"
SD = "fraud-detector"
ROUTER_SELECTOR = f"app.kubernetes.io/instance={SD},app.kubernetes.io/name=shadowgate-router"
OPERATOR_SELECTOR = "app.kubernetes.io/name=shadowgate-operator"
OPERATOR_HEALTH_PORT = 8080
OPERATOR_METRICS_PORT = 9090
SCRAPER_NS = "np-scraper"
OUTSIDER_NS = "np-outsider"
SHADOWGATE_IMAGE = "docker.io/library/shadowgate:0.1.0"  # what the example's `image: shadowgate` (0.1.0) is

# Run in a pod: try each HOST:PORT once (new connections, 3 s each), print which connected.
CONNECT = """
import json, socket, sys
result = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        result[target] = True
    except OSError:
        result[target] = False
print(json.dumps(result))
"""
# Run in a pod: GET a URL, print the body.
FETCH = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""
# Run in a pod: one inference request, print who answered.
INFER = """
import json, sys, urllib.request
body = {"inputs": [{"name": "features", "shape": [1, 3], "datatype": "FP64", "data": [0.5, -0.2, 1.0]}]}
request = urllib.request.Request(sys.argv[1] + "/v2/models/fraud/infer", data=json.dumps(body).encode(),
    headers={"Content-Type": "application/json", "X-Account-Id": "netpol-probe"})
with urllib.request.urlopen(request, timeout=10) as response:
    print(response.status, response.headers["X-Shadowgate-Served-By"])
"""


@dataclass
class Cluster:
    node: Node

    def kubectl(self, *args: str, input_text: str | None = None, timeout: float = 120) -> str:
        result = kubectl(self.node.kubeconfig, *args, input_text=input_text, timeout=timeout)
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "--server-side", "-f", "-", input_text="\n---\n".join(json.dumps(o) for o in objects))

    def python(self, namespace: str, target: str, script: str, *args: str) -> str:
        return self.kubectl("exec", "-n", namespace, target, "--", "python", "-c", script, *args, timeout=60)

    def connects(self, namespace: str, pod: str, *targets: str) -> dict[str, bool]:
        answer: dict[str, bool] = json.loads(self.python(namespace, pod, CONNECT, *targets))
        return answer

    def pod_ips(self, namespace: str, selector: str) -> list[str]:
        listed = json.loads(self.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))
        return [
            pod["status"]["podIP"]
            for pod in listed["items"]
            if pod["metadata"].get("deletionTimestamp") is None and pod["status"].get("podIP")
        ]

    def metric(self, namespace: str, pod: str, url: str, name: str) -> float:
        """The sum of every sample of `name` on the /metrics page at `url`, fetched from `pod`."""
        page = self.python(namespace, pod, FETCH, url)
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
        return sum(float(value) for value in pattern.findall(page))


def _example_without_policies(cluster: Cluster) -> list[dict[str, Any]]:
    """manifests/overlays/example as kustomize renders it, without the operator's NetworkPolicy and with
    its operator making no router NetworkPolicy: the tests apply both themselves."""
    rendered = cluster.kubectl("kustomize", str(REPO_ROOT / "manifests" / "overlays" / "example"))
    objects = [item for item in yaml.safe_load_all(rendered) if item and item["kind"] != "NetworkPolicy"]
    for item in objects:
        if item["kind"] == "Deployment" and item["metadata"]["name"] == "shadowgate-operator":
            container = item["spec"]["template"]["spec"]["containers"][0]
            container["env"].append({"name": "SHADOWGATE_ROUTER_NETWORK_POLICY", "value": "false"})
    return objects


def _probe_pod(namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}},
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "probe", "namespace": namespace},
            "spec": {
                "containers": [
                    {
                        "name": "probe",
                        "image": SHADOWGATE_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "infinity"],
                    }
                ],
                "terminationGracePeriodSeconds": 1,
            },
        },
    ]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    host.preflight()
    assert read_state() is None, "a local node is already running on this machine"
    images = node_images()  # `make e2e` builds them first; taken from the cache here
    node = Node()
    node.start()
    cluster = Cluster(node)
    try:
        for image in images:
            node.load_image(image.archive)
        cluster.kubectl("apply", "--server-side", "-k", str(REPO_ROOT / "manifests" / "crds"))
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/shadowdeployments.shadowgate.io",
            "crd/kopfpeerings.kopf.dev",
        )  # fmt: skip
        claimed = claim_volume(node.kubeconfig, SYSTEM_NS, "data-timescaledb-0", "20Gi")
        assert claimed.returncode == 0, claimed.stderr
        cluster.kubectl("apply", "--server-side", "-k", str(REPO_ROOT / "hack" / "e2e" / "node-timescaledb"))
        cluster.apply(*_example_without_policies(cluster))
        cluster.apply(*_probe_pod(SCRAPER_NS, {"shadowgate.io/metrics-scraper": "true"}), *_probe_pod(OUTSIDER_NS, {}))
        cluster.kubectl("rollout", "status", "statefulset/timescaledb", "-n", SYSTEM_NS, "--timeout=300s", timeout=320)
        for deployment in ("shadowgate-operator", "fraud-v1", "fraud-v2", "traffic"):
            cluster.kubectl(
                "rollout", "status", f"deployment/{deployment}", "-n", EXAMPLE_NS, "--timeout=300s", timeout=320
            )
        eventually(
            lambda: kubectl(node.kubeconfig, "get", "deployment", f"{SD}-router", "-n", EXAMPLE_NS).returncode == 0,
            120,
            "the operator to create the router Deployment",
            interval=0.5,
        )
        cluster.kubectl("rollout", "status", f"deployment/{SD}-router", "-n", EXAMPLE_NS, "--timeout=300s", timeout=320)
        for namespace in (SCRAPER_NS, OUTSIDER_NS):
            cluster.kubectl(
                "wait", "--for=condition=Ready", "pod/probe", "-n", namespace, "--timeout=120s", timeout=150
            )
        yield cluster
    finally:
        problems = node.stop()
        assert problems == [], problems


def _router_policy(cluster: Cluster) -> dict[str, Any]:
    """The router's NetworkPolicy as the operator builds it, for the ShadowDeployment the cluster holds."""
    stored = json.loads(cluster.kubectl("get", "shadowdeployment", SD, "-n", EXAMPLE_NS, "-o", "json"))
    metadata = stored["metadata"]
    sd = ShadowDeployment.model_validate(
        {
            **stored,
            "metadata": {key: metadata[key] for key in ("name", "namespace", "uid", "generation") if key in metadata},
        }
    )
    return builders.network_policy(sd, OperatorSettings.from_env({}))


def _operator_policy() -> dict[str, Any]:
    policy: dict[str, Any] = yaml.safe_load((REPO_ROOT / "manifests" / "operator" / "networkpolicy.yaml").read_text())
    policy["metadata"]["namespace"] = EXAMPLE_NS
    return policy


def test_the_router_policy_refuses_metrics_to_others_and_keeps_traffic_and_egress(cluster: Cluster) -> None:
    routers = cluster.pod_ips(EXAMPLE_NS, ROUTER_SELECTOR)
    assert len(routers) == 2, routers
    metrics = [f"{ip}:{METRICS_PORT}" for ip in routers]
    traffic = [f"{ip}:{port}" for ip in routers for port in (HTTP_PORT, GRPC_PORT)]

    # Without the policy every connection works: what is refused below is refused by the policy.
    assert cluster.connects(OUTSIDER_NS, "probe", *metrics, *traffic) == dict.fromkeys(metrics + traffic, True)

    policy = _router_policy(cluster)
    cluster.apply(policy)
    eventually(
        lambda: not any(cluster.connects(OUTSIDER_NS, "probe", *metrics).values()),
        90,
        "kube-router to refuse the outsider's connections to the routers' metrics port",
        interval=0.5,
    )
    assert cluster.connects(OUTSIDER_NS, "probe", *traffic) == dict.fromkeys(traffic, True)
    assert cluster.connects(SCRAPER_NS, "probe", *metrics, *traffic) == dict.fromkeys(metrics + traffic, True)
    for ip in routers:
        page = cluster.python(SCRAPER_NS, "probe", FETCH, f"http://{ip}:{METRICS_PORT}/metrics")
        assert "shadowgate_router_requests" in page
        # The router's traffic port answers anyone, from production (its egress to fraud-v1 by DNS name).
        assert cluster.python(OUTSIDER_NS, "probe", INFER, f"http://{ip}:{HTTP_PORT}").split() == ["200", "production"]

    # Egress: the router pods' own new connections (names through CoreDNS on the node's address).
    needs = [
        f"fraud-v1.{EXAMPLE_NS}.svc:8080",
        f"fraud-v2.{EXAMPLE_NS}.svc:8080",
        f"timescaledb.{SYSTEM_NS}.svc:5432",
        "kubernetes.default.svc:443",
    ]
    assert cluster.connects(EXAMPLE_NS, f"deployment/{SD}-router", *needs) == dict.fromkeys(needs, True)
    # And its work: rows keep reaching the database (the clients send 20 requests a second).
    first = routers[0]
    url = f"http://{first}:{METRICS_PORT}/metrics"
    written = cluster.metric(SCRAPER_NS, "probe", url, "shadowgate_router_rows_written_total")
    eventually(
        lambda: cluster.metric(SCRAPER_NS, "probe", url, "shadowgate_router_rows_written_total") > written,
        60,
        "the router to write more rows under its policy",
        interval=0.5,
    )

    # Taken away, the policy stops applying.
    cluster.kubectl("delete", "networkpolicy", policy["metadata"]["name"], "-n", EXAMPLE_NS)
    eventually(
        lambda: all(cluster.connects(OUTSIDER_NS, "probe", *metrics).values()),
        90,
        "the outsider's connections to the metrics port to work again without the policy",
        interval=0.5,
    )


def test_the_operator_policy_refuses_metrics_to_others_and_keeps_probes_and_egress(cluster: Cluster) -> None:
    operators = cluster.pod_ips(EXAMPLE_NS, OPERATOR_SELECTOR)
    assert len(operators) == 2, operators
    metrics = [f"{ip}:{OPERATOR_METRICS_PORT}" for ip in operators]
    health = [f"{ip}:{OPERATOR_HEALTH_PORT}" for ip in operators]
    service = f"shadowgate-operator-metrics.{EXAMPLE_NS}.svc:{OPERATOR_METRICS_PORT}"  # the Prometheus Service
    assert cluster.connects(OUTSIDER_NS, "probe", *metrics, *health, service) == dict.fromkeys(
        [*metrics, *health, service], True
    )

    cluster.apply(_operator_policy())
    eventually(
        lambda: not any(cluster.connects(OUTSIDER_NS, "probe", *metrics).values()),
        90,
        "kube-router to refuse the outsider's connections to the operator's metrics port",
        interval=0.5,
    )
    # Through the Service too: the node keeps the caller's pod address on Service traffic.
    assert cluster.connects(OUTSIDER_NS, "probe", *health, service) == {**dict.fromkeys(health, True), service: False}
    assert cluster.connects(SCRAPER_NS, "probe", *metrics, *health, service) == dict.fromkeys(
        [*metrics, *health, service], True
    )
    for ip in operators:
        page = cluster.python(SCRAPER_NS, "probe", FETCH, f"http://{ip}:{OPERATOR_METRICS_PORT}/metrics")
        assert "shadowgate_operator" in page

    # Egress: the API server (by the Service's name, as kopf does) and the database the ShadowDeployment names.
    needs = ["kubernetes.default.svc:443", f"timescaledb.{SYSTEM_NS}.svc:5432"]
    assert cluster.connects(EXAMPLE_NS, "deployment/shadowgate-operator", *needs) == dict.fromkeys(needs, True)
    # Restarted under the policy (new connections only), the operators become Ready and reconcile: a
    # change of the ShadowDeployment reaches its router Deployment.
    cluster.kubectl("rollout", "restart", "deployment/shadowgate-operator", "-n", EXAMPLE_NS)
    cluster.kubectl(
        "rollout", "status", "deployment/shadowgate-operator", "-n", EXAMPLE_NS, "--timeout=300s", timeout=320
    )
    patch = json.dumps({"spec": {"router": {"replicas": 3}}})
    cluster.kubectl("patch", "shadowdeployment", SD, "-n", EXAMPLE_NS, "--type=merge", "-p", patch)
    eventually(
        lambda: (
            cluster.kubectl("get", "deployment", f"{SD}-router", "-n", EXAMPLE_NS, "-o", "jsonpath={.spec.replicas}")
            == "3"
        ),
        120,
        "the restarted operator to scale the router Deployment to the ShadowDeployment's 3 replicas",
        interval=0.5,
    )
