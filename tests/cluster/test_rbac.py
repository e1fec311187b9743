"""Least privilege, proven on a real API server with RBAC on.

The operator runs as a ServiceAccount holding exactly the Role of the default, namespaced install
(manifests/operator/rbac.yaml, in the one namespace it watches; not as the admin) and still does its
whole job, while it may touch nothing in any other namespace; the cluster-wide overlay's ClusterRole
runs the shipped cluster-wide Deployment; the Role the operator creates for each router lets the router
read its one ConfigMap and nothing else; a missing rule becomes a PermissionDenied condition and a
Warning Event.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shadowgate_dev.localenv.process import free_port
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import (
    OperatorProcess,
    analyses,
    apply,
    events_for,
    eventually,
    example,
    get_json,
    router_config,
    shadow,
    wait_phase,
)
from tests.support.rbac import REPO_ROOT, Identity, kustomize, make_identity, shipped, token_kubeconfig

pytestmark = [pytest.mark.cluster, pytest.mark.database]

CHILD_KINDS = "configmap,deployment,service,serviceaccount,role,rolebinding,networkpolicy"
# What kopf or the Reconciler log when the API refuses them something.
REFUSALS = ("forbidden", "Forbidden", "HTTP 403", "Not enough permissions")

MakeIdentity = Callable[..., Identity]


@pytest.fixture
def shipped_rules(kubectl: Kubectl) -> list[dict[str, Any]]:
    """The Role of the default install (manifests/base: the namespaced operator)."""
    rules: list[dict[str, Any]] = shipped(kubectl, "Role", "shadowgate-operator")["rules"]
    return rules


@pytest.fixture
def cluster_wide_rules(kubectl: Kubectl) -> list[dict[str, Any]]:
    """The ClusterRole of manifests/overlays/cluster-wide."""
    rules: list[dict[str, Any]] = shipped(kubectl, "ClusterRole", "shadowgate-operator", "overlays/cluster-wide")[
        "rules"
    ]
    return rules


@pytest.fixture
def identity(kubectl: Kubectl, kubeconfig: str, namespace: str, tmp_path: Path) -> Iterator[MakeIdentity]:
    """identity(rules): a ServiceAccount in the test's namespace with `rules` in that namespace (a Role);
    identity(rules, cluster_wide=True): everywhere (a ClusterRole). Removed afterwards."""
    made: list[Identity] = []

    def make(rules: list[dict[str, Any]], *, cluster_wide: bool = False) -> Identity:
        made.append(make_identity(kubectl, kubeconfig, namespace, rules, tmp_path, cluster_wide=cluster_wide))
        return made[-1]

    yield make
    for each in made:
        each.delete(kubectl)


def start_as(start_operator: StartOperator, who: Identity, *args: str) -> OperatorProcess:
    return start_operator(*args, kubeconfig=str(who.kubeconfig), env={"SHADOWGATE_CLUSTER_ROLE": who.cluster_role})


def assert_never_refused(operator: OperatorProcess) -> None:
    refused = [line for line in operator.log().splitlines() if any(word in line for word in REFUSALS)]
    assert refused == [], "the operator was refused something:\n" + "\n".join(refused)


def test_the_operator_does_its_whole_job_with_the_shipped_namespaced_role(
    kubectl: Kubectl,
    namespace: str,
    identity: MakeIdentity,
    shipped_rules: list[dict[str, Any]],
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
) -> None:
    operator_identity = identity(shipped_rules)
    # Least privilege, concretely: nothing outside its namespace (the complaint about the old
    # cluster-wide default: Secrets in kube-system, Deployments patched there) and nothing it does not use.
    for outside in (("get", "secrets"), ("patch", "deployments"), ("list", "shadowdeployments"), ("create", "roles")):
        assert not operator_identity.can(kubectl, *outside, "-n", "kube-system"), outside
    for cluster_scoped in (("list", "namespaces"), ("list", "customresourcedefinitions"), ("list", "nodes")):
        assert not operator_identity.can(kubectl, *cluster_scoped), cluster_scoped
    for request in (
        ("update", "shadowdeployments"),  # spec is the user's (GitOps)
        ("list", "secrets"),  # it reads the one Secret a ShadowDeployment names, never lists them
        ("delete", "deployments"),  # children go by garbage collection, not by the operator
        ("create", "pods"),
        ("create", "clusterrolebindings"),
        ("escalate", "roles"),
        ("bind", "roles"),
    ):
        assert not operator_identity.can(kubectl, *request, "-n", namespace), request
    assert operator_identity.can(kubectl, "get", "secrets/fraud-detector-db", "-n", namespace)

    operator = start_as(start_operator, operator_identity, "--namespace", namespace)
    apply_shadow(namespace, example("least"))

    created = wait_phase(kubectl, namespace, "least", "Progressing")
    uid = created["metadata"]["uid"]
    children = eventually(
        lambda: (
            (listing := get_json(kubectl, CHILD_KINDS, "-n", namespace, "-l", "app.kubernetes.io/instance=least"))
            and len(listing["items"]) == 7
            and listing["items"]
        ),
        60,
        "the router's seven children",
    )
    assert all(child["metadata"]["ownerReferences"][0]["uid"] == uid for child in children)
    # The analysis ran: the DSN Secret was readable and the database answered (no outcomes yet).
    decided = eventually(
        lambda: (
            (s := shadow(kubectl, namespace, "least")["status"]).get("lastDecision", {}).get("action") == "Wait" and s
        ),
        60,
        "the first analysis",
    )
    assert decided["lastDecision"]["reason"].startswith("Waiting")
    assert "cannot" not in decided["lastDecision"]["reason"]
    ready = {c["type"]: c for c in decided["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "RouterUnavailable")  # no kubelet here; no refusal

    kubectl("annotate", "shadowdeployment", "least", "-n", namespace, "shadowgate.io/action=promote")
    wait_phase(kubectl, namespace, "least", "Promoted")
    eventually(lambda: router_config(kubectl, namespace, "least")["weight"] == 100, 30, "the router at 100%")

    # Deleting waits for the operator to remove its finalizer; the garbage collector takes the children.
    kubectl("delete", "shadowdeployment", "least", "-n", namespace, "--timeout=30s")
    eventually(
        lambda: (
            get_json(kubectl, CHILD_KINDS, "-n", namespace, "-l", "app.kubernetes.io/instance=least")["items"] == []
        ),
        60,
        "the children to be garbage collected",
    )
    operator.assert_running()
    assert_never_refused(operator)


def test_the_router_may_read_its_own_configmap_and_nothing_else(
    kubectl: Kubectl,
    kubeconfig: str,
    namespace: str,
    identity: MakeIdentity,
    shipped_rules: list[dict[str, Any]],
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
    tmp_path: Path,
) -> None:
    operator = start_as(start_operator, identity(shipped_rules), "--namespace", namespace)
    apply_shadow(namespace, example("narrow"))
    wait_phase(kubectl, namespace, "narrow", "Progressing")
    eventually(lambda: get_json(kubectl, "rolebinding", "narrow-router", "-n", namespace), 30, "the RoleBinding")
    kubectl("create", "configmap", "someone-else", "-n", namespace, "--from-literal=secret-ish=value")

    router = f"system:serviceaccount:{namespace}:narrow-router"

    def can(*request: str) -> bool:
        answer = kubectl("auth", "can-i", *request, "-n", namespace, f"--as={router}", check=False)
        return answer.stdout.strip() == "yes"

    for verb in ("get", "list", "watch"):
        assert can(verb, "configmaps/narrow-router"), verb
    for request in (
        ("get", "configmaps/someone-else"),
        ("list", "configmaps"),  # every ConfigMap: only its own, by name
        ("patch", "configmaps/narrow-router"),  # reads its configuration, never writes it
        ("get", "secrets/fraud-detector-db"),  # the DSN reaches it as an environment variable, not by the API
        ("list", "secrets"),
        ("get", "shadowdeployments/narrow"),
        ("list", "pods"),
    ):
        assert not can(*request), request

    # The same with real requests, authenticated as the router's pod would be (a token of its ServiceAccount).
    access = token_kubeconfig(kubectl, kubeconfig, namespace, "narrow-router", tmp_path / "router.kubeconfig")

    def as_router(*args: str) -> subprocess.CompletedProcess[str]:
        return kubectl(*args, "-n", namespace, f"--kubeconfig={access}", check=False)

    own = as_router("get", "configmap", "narrow-router", "-o", "json")
    assert own.returncode == 0, own.stderr
    assert json.loads(json.loads(own.stdout)["data"]["config.json"])["deployment"] == "narrow"
    path = f"/api/v1/namespaces/{namespace}/configmaps?fieldSelector=metadata.name%3Dnarrow-router"
    watched = as_router("get", "--raw", f"{path}&watch=true&timeoutSeconds=1")
    assert watched.returncode == 0 and '"ADDED"' in watched.stdout, watched.stderr  # what the router's watch does
    for refused in (
        ("get", "configmap", "someone-else"),
        ("get", "configmaps"),
        ("get", "secret", "fraud-detector-db"),
        ("get", "secrets"),
    ):
        answer = as_router(*refused)
        assert answer.returncode != 0, refused
        assert "Forbidden" in answer.stderr and 'User "system:serviceaccount:' in answer.stderr, answer.stderr
    assert_never_refused(operator)


def test_a_missing_permission_is_a_condition_and_an_event(
    kubectl: Kubectl,
    dsn: str,
    namespace: str,
    identity: MakeIdentity,
    shipped_rules: list[dict[str, Any]],
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
) -> None:
    without_deployments = [rule for rule in shipped_rules if "deployments" not in rule["resources"]]
    assert len(without_deployments) == len(shipped_rules) - 1
    who = identity(without_deployments)
    metrics_port = free_port()
    operator = start_as(start_operator, who, "--namespace", namespace, "--metrics", f"127.0.0.1:{metrics_port}")
    analysis = example()["spec"]["analysis"] | {"interval": "5s"}
    apply_shadow(namespace, example("denied", analysis=analysis))

    def ready_condition() -> dict[str, Any] | None:
        conditions = shadow(kubectl, namespace, "denied").get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Ready"), None)

    # Reading the router Deployment is refused before the status write, applying it after: both are named.
    denied = eventually(
        lambda: (
            (c := ready_condition()) is not None and c["reason"] == "PermissionDenied" and "apply" in c["message"] and c
        ),
        60,
        "Ready=False with reason PermissionDenied",
    )
    assert denied["status"] == "False"
    message = denied["message"]
    # What was refused, to whom, and where to fix it.
    assert f"The operator may not apply Deployment {namespace}/denied-router" in message
    assert 'cannot patch resource "deployments" in API group "apps"' in message
    assert f"The operator may not get Deployment {namespace}/denied-router" in message  # for Ready's sake
    assert f'User "{who.user}"' in message
    assert f"Grant it in the operator's role {who.cluster_role} (manifests/operator/rbac.yaml;" in message

    # Everything else still happened: the rollout runs and the router's other children follow it.
    status = shadow(kubectl, namespace, "denied")["status"]
    assert (status["phase"], status["currentWeight"]) == ("Progressing", 5)
    assert router_config(kubectl, namespace, "denied")["weight"] == 5
    assert get_json(kubectl, "deployment", "denied-router", "-n", namespace) is None

    # One Warning per refused call: reading the router Deployment's state and applying it.
    warnings = [e for e in events_for(kubectl, namespace, "denied") if e["reason"] == "PermissionDenied"]
    assert sorted(w["message"].split(" Deployment ")[0] for w in warnings) == [
        "The operator may not apply",
        "The operator may not get",
    ]
    assert all(w["type"] == "Warning" and w["message"] in message for w in warnings)
    samples = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert 'shadowgate_operator_permission_denied_total{kind="Deployment",verb="apply"}' in samples
    assert f'shadowgate_rollout_phase{{name="denied",namespace="{namespace}",phase="Progressing"}} 1.0' in samples

    # Two more analyses: still refused, still running, and the Event is not repeated.
    first_seen = dt.datetime.fromisoformat(denied["lastTransitionTime"])
    analysed = analyses(dsn, namespace, "denied")
    eventually(lambda: analyses(dsn, namespace, "denied") >= analysed + 2, 60, "two more analyses")
    operator.assert_running()
    again = [e for e in events_for(kubectl, namespace, "denied") if e["reason"] == "PermissionDenied"]
    assert len(again) == len(warnings) == 2
    assert dt.datetime.fromisoformat((ready_condition() or {})["lastTransitionTime"]) == first_seen

    # Granting the rule heals it at the next analysis: the router Deployment appears, Ready follows the router.
    who.grant(kubectl, shipped_rules)
    eventually(lambda: get_json(kubectl, "deployment", "denied-router", "-n", namespace), 60, "the router Deployment")
    # Then Ready follows the router again (its pods never become available without a kubelet).
    eventually(lambda: (ready_condition() or {}).get("reason") == "RouterUnavailable", 60, "Ready to heal")


def test_the_cluster_wide_overlay_peers_with_its_args_and_its_cluster_role(
    kubectl: Kubectl,
    namespace: str,
    identity: MakeIdentity,
    cluster_wide_rules: list[dict[str, Any]],
    start_operator: StartOperator,
) -> None:
    """The cluster-wide overlay's Deployment arguments (--all-namespaces, --peering, liveness, metrics) under
    its ClusterRole.

    A placeholder peer with a higher priority keeps it standing by, so a cluster-wide replica in a shared
    test cluster touches no other test's objects while it proves it can read and join its peering.
    """
    peering = f"shadowgate-test-{secrets.token_hex(3)}"
    rules = [
        rule | {"resourceNames": [peering]} if rule.get("resourceNames") == ["shadowgate"] else rule
        for rule in cluster_wide_rules
    ]
    assert rules != cluster_wide_rules, "the peering rule is granted by name"
    who = identity(rules, cluster_wide=True)
    deployment = shipped(kubectl, "Deployment", "shadowgate-operator", "overlays/cluster-wide")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    liveness, metrics = free_port(), free_port()
    replaced = {
        "--peering=shadowgate": f"--peering={peering}",
        "--liveness=http://0.0.0.0:8080/healthz": f"--liveness=http://127.0.0.1:{liveness}/healthz",
        "--metrics=0.0.0.0:9090": f"--metrics=127.0.0.1:{metrics}",
    }
    assert container["args"][0] == "operator" and set(replaced) | {"--all-namespaces"} <= set(container["args"])
    assert "WATCH_NAMESPACE" not in [variable["name"] for variable in container["env"]]
    args = [replaced.get(arg, arg) for arg in container["args"][1:]]

    apply(kubectl, namespace, example("bystander"))  # in a watched namespace; a standby must leave it alone
    placeholder = {"priority": 2_000_000_000, "lifetime": 300, "lastseen": dt.datetime.now(dt.UTC).isoformat()}
    kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}
    ))  # fmt: skip
    try:
        kubectl("patch", "clusterkopfpeering", peering, "--type=merge", "-p", json.dumps(
            {"status": {"placeholder": placeholder}}
        ))  # fmt: skip
        operator = start_operator(
            *args,
            kubeconfig=str(who.kubeconfig),
            env={"POD_ID": "shadowgate-operator-test-pod", "SHADOWGATE_CLUSTER_ROLE": who.cluster_role},
        )
        eventually(
            lambda: (
                "shadowgate-operator-test-pod"
                in ((get_json(kubectl, "clusterkopfpeering", peering) or {}).get("status") or {})
            ),
            60,
            "the replica to join the peering",
        )
        assert httpx.get(f"http://127.0.0.1:{liveness}/healthz", timeout=5).status_code == 200
        assert "shadowgate_operator_events_total" in httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
        operator.assert_running()
        assert_never_refused(operator)
        bystander = shadow(kubectl, namespace, "bystander")
        assert "status" not in bystander and not bystander["metadata"].get("finalizers"), "a standby acted"
    finally:
        kubectl("delete", "clusterkopfpeering", peering, "--ignore-not-found", check=False)


def test_each_install_binds_its_role_to_its_own_service_account(
    kubectl: Kubectl, shadow_crd: str, namespace: str, tmp_path: Path
) -> None:
    """Kustomize writes the install's namespace into the binding's subject (the manifests name none), so the
    operator's ServiceAccount holds its Role wherever it is installed, and nothing anywhere else."""
    for directory, binding_kind in (("base", "RoleBinding"), ("overlays/cluster-wide", "ClusterRoleBinding")):
        documents = kustomize(kubectl, directory)
        deployment = next(d for d in documents if d["kind"] == "Deployment")
        binding = next(d for d in documents if d["kind"] == binding_kind)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "shadowgate-operator", "namespace": deployment["metadata"]["namespace"]}
        ], directory
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "shadowgate-operator"

    # manifests/operator in a namespace of one's own, the way the README says: an overlay naming it.
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    operator_directory = os.path.relpath(REPO_ROOT / "manifests" / "operator", overlay)  # kustomize wants it relative
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"namespace": namespace, "resources": [operator_directory]})
    )
    rendered = [d for d in yaml.safe_load_all(kubectl("kustomize", str(overlay)).stdout) if d]
    rbac = [d for d in rendered if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    assert len(rbac) == 3 and all(d["metadata"]["namespace"] == namespace for d in rbac)
    kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(rbac))

    account = f"system:serviceaccount:{namespace}:shadowgate-operator"

    def can(*request: str) -> bool:
        answer = kubectl("auth", "can-i", *request, f"--as={account}", check=False)
        return answer.stdout.strip() == "yes"

    # The authorizer reads RBAC from its informers: the new binding takes effect within moments.
    eventually(lambda: can("get", "secrets/fraud-detector-db", "-n", namespace), 30, "the RoleBinding in effect")
    for request in (
        ("watch", "shadowdeployments.shadowgate.io"),
        ("update", "shadowdeployments.shadowgate.io", "--subresource=status"),
        ("get", "secrets/fraud-detector-db"),
        ("patch", "deployments.apps"),
        ("create", "networkpolicies.networking.k8s.io"),
        ("patch", "kopfpeerings.kopf.dev/shadowgate"),
    ):
        assert can(*request, "-n", namespace), request
    for request in (("get", "secrets", "-n", "kube-system"), ("patch", "deployments.apps", "-n", "default"),
                    ("list", "namespaces"), ("list", "customresourcedefinitions.apiextensions.k8s.io")):  # fmt: skip
        assert not can(*request), request
