"""Identities with exactly the rights the manifests ship: a ServiceAccount, a Role (the namespaced default) or
a ClusterRole (the cluster-wide overlay), and a token kubeconfig.

The tests run the operator as that ServiceAccount (a bearer token from `kubectl create token`), never as
the admin, so a missing rule in manifests/operator/rbac.yaml (or the cluster-wide overlay's) fails them.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CLUSTER_ROLE = "shadowgate-operator"


def kustomize(kubectl: Kubectl, directory: str) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize manifests/<directory>` renders."""
    rendered = kubectl("kustomize", str(REPO_ROOT / "manifests" / directory)).stdout
    return [document for document in yaml.safe_load_all(rendered) if document]


def shipped(kubectl: Kubectl, kind: str, name: str, directory: str = "base") -> dict[str, Any]:
    """One object of manifests/<directory> as kustomize renders it."""
    for document in kustomize(kubectl, directory):
        if document["kind"] == kind and document["metadata"]["name"] == name:
            return document
    raise AssertionError(f"manifests/{directory} renders no {kind} {name}")


def token_kubeconfig(kubectl: Kubectl, admin_kubeconfig: str, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a token of the ServiceAccount `account`, as a pod of it would."""
    token = kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": "local", "user": account}}],
        "current-context": account,
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Identity:
    """A ServiceAccount bound to its own copy of a Role in its namespace (`cluster_wide`: of a ClusterRole,
    bound cluster-wide; cluster-scoped objects, deleted by `delete`)."""

    namespace: str
    account: str
    cluster_role: str
    """The name of its Role or ClusterRole (the operator names it in PermissionDenied messages)."""
    kubeconfig: Path
    cluster_wide: bool = True

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.account}"

    def can(self, kubectl: Kubectl, *request: str) -> bool:
        """`kubectl auth can-i <request> --as <this account>`."""
        answer = kubectl("auth", "can-i", *request, f"--as={self.user}", check=False)
        return answer.stdout.strip() == "yes"

    def grant(self, kubectl: Kubectl, rules: list[dict[str, Any]]) -> None:
        """Replace the role's rules."""
        metadata = {"name": self.cluster_role} | ({} if self.cluster_wide else {"namespace": self.namespace})
        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole" if self.cluster_wide else "Role",
            "metadata": metadata,
            "rules": rules,
        }
        kubectl("apply", "-f", "-", input=json.dumps(role))

    def delete(self, kubectl: Kubectl) -> None:
        if self.cluster_wide:
            kubectl("delete", "clusterrolebinding,clusterrole", self.cluster_role, "--ignore-not-found", check=False)


def make_identity(
    kubectl: Kubectl,
    admin_kubeconfig: str,
    namespace: str,
    rules: list[dict[str, Any]],
    directory: Path,
    *,
    cluster_wide: bool = True,
) -> Identity:
    """A ServiceAccount in `namespace` holding `rules` in that namespace through a Role (cluster_wide:
    everywhere, through a ClusterRole), of a fresh name."""
    suffix = secrets.token_hex(3)
    identity = Identity(
        namespace=namespace,
        account=f"operator-{suffix}",
        cluster_role=f"{SHIPPED_CLUSTER_ROLE}-test-{suffix}",
        kubeconfig=directory / f"operator-{suffix}.kubeconfig",
        cluster_wide=cluster_wide,
    )
    kubectl("create", "serviceaccount", identity.account, "-n", namespace)
    identity.grant(kubectl, copy.deepcopy(rules))
    if cluster_wide:
        kubectl(
            "create", "clusterrolebinding", identity.cluster_role,
            f"--clusterrole={identity.cluster_role}", f"--serviceaccount={namespace}:{identity.account}",
        )  # fmt: skip
    else:
        kubectl(
            "create", "rolebinding", identity.cluster_role, "-n", namespace,
            f"--role={identity.cluster_role}", f"--serviceaccount={namespace}:{identity.account}",
        )  # fmt: skip
    token_kubeconfig(kubectl, admin_kubeconfig, namespace, identity.account, identity.kubeconfig)
    return identity
