"""Where the Kubernetes API server is and how to authenticate to it: the one credential loader of the
operator (kube.Kube), `kubectl shadow`, the demo and the router (its ConfigMap watch).

`load()` looks where kubectl does: a kubeconfig named by argument or $KUBECONFIG, else the pod's
ServiceAccount when running in one, else ~/.kube/config. Server URL, CA, client certificate, token
or token file, basic auth are read here with PyYAML; users that authenticate through an ``exec`` plugin
or an ``auth-provider`` (cloud clusters) are handed to the kubernetes package's loader, imported only
then, so a command-line call or a router's start does not pay for importing the whole client. Bearer
tokens are re-read for each request: kubelet rotates a pod's ServiceAccount token, exec plugins renew
theirs. It imports nothing of shadowgate_operator or shadowgate_router (.importlinter).
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeAccessError(RuntimeError):
    """No usable credentials; the message says where they were looked for."""


@dataclass(frozen=True)
class KubeAccess:
    server: str
    verify: ssl.SSLContext | bool
    """A context with the cluster's CA (and the client certificate, if any), or False when the kubeconfig
    says insecure-skip-tls-verify."""
    authorization: Callable[[], str | None]
    """The Authorization header value for the next request (None for client-certificate auth)."""
    namespace: str = "default"
    """The namespace the kubeconfig's context names (the pod's own in a cluster), as kubectl defaults to."""

    def headers(self) -> dict[str, str]:
        value = self.authorization()
        return {"Authorization": value} if value else {}


def in_cluster_available() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT / "token").exists()


def load(kubeconfig: str | None = None, context: str | None = None) -> KubeAccess:
    """A kubeconfig if one is named (argument or $KUBECONFIG), else in-cluster, else ~/.kube/config."""
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    if path is None and in_cluster_available():
        return _in_cluster()
    return _from_kubeconfig(Path(path) if path else Path.home() / ".kube" / "config", context)


def _in_cluster() -> KubeAccess:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    token_path = SERVICE_ACCOUNT / "token"
    namespace_path = SERVICE_ACCOUNT / "namespace"
    namespace = namespace_path.read_text().strip() if namespace_path.exists() else "default"
    return KubeAccess(f"https://{host}:{port}", context, lambda: f"Bearer {token_path.read_text().strip()}", namespace)


def _named(entries: list[dict[str, Any]] | None, name: str, kind: str, path: Path) -> dict[str, Any]:
    for entry in entries or []:
        if entry.get("name") == name:
            found: dict[str, Any] = entry.get(kind) or {}
            return found
    raise KubeAccessError(f"{path}: no {kind} named {name!r}")


def _from_kubeconfig(path: Path, context_name: str | None) -> KubeAccess:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KubeAccessError(
            f"cannot read the kubeconfig {path}: {getattr(exc, 'strerror', None) or exc} "
            "(and not running in a pod: KUBERNETES_SERVICE_HOST is not set)"
        ) from None
    name = context_name or document.get("current-context")
    if not name:
        raise KubeAccessError(f"{path}: no current-context; pass --context")
    context = _named(document.get("contexts"), name, "context", path)
    cluster = _named(document.get("clusters"), context.get("cluster", ""), "cluster", path)
    user = _named(document.get("users"), context.get("user", ""), "user", path) if context.get("user") else {}
    namespace = str(context.get("namespace") or "default")
    if "exec" in user or "auth-provider" in user:
        return _with_kubernetes_package(path, name, namespace)
    base = path.parent

    def material(entry: dict[str, Any], key: str) -> bytes | None:
        if entry.get(f"{key}-data"):
            return base64.b64decode(str(entry[f"{key}-data"]))
        if entry.get(key):
            return (base / str(entry[key])).read_bytes()
        return None

    server = cluster.get("server")
    if not server:
        raise KubeAccessError(f"{path}: cluster of context {name!r} has no server")
    verify: ssl.SSLContext | bool
    if cluster.get("insecure-skip-tls-verify"):
        verify = False
    else:
        ca = material(cluster, "certificate-authority")
        verify = ssl.create_default_context(cadata=ca.decode() if ca else None)
        cert, key = material(user, "client-certificate"), material(user, "client-key")
        if cert and key:
            _load_chain(verify, cert, key)
    token: str | None = user.get("token")
    token_file = user.get("tokenFile")
    if token_file:
        token_path = base / token_file
        return KubeAccess(server, verify, lambda: f"Bearer {token_path.read_text().strip()}", namespace)
    if user.get("username") and user.get("password"):
        basic = base64.b64encode(f"{user['username']}:{user['password']}".encode()).decode()
        return KubeAccess(server, verify, lambda: f"Basic {basic}", namespace)
    return KubeAccess(server, verify, lambda: f"Bearer {token}" if token else None, namespace)


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads a client certificate only from files: write them privately, load, remove."""
    with tempfile.TemporaryDirectory(prefix="shadowgate-kube-") as directory:
        cert_path, key_path = Path(directory, "client.crt"), Path(directory, "client.key")
        for target, data in ((cert_path, cert), (key_path, key)):
            target.touch(mode=0o600)
            target.write_bytes(data)
        context.load_cert_chain(str(cert_path), str(key_path))


def _with_kubernetes_package(path: Path, context_name: str, namespace: str) -> KubeAccess:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(path), context=context_name, client_configuration=configuration
    )
    verify: ssl.SSLContext | bool = False
    if configuration.verify_ssl:
        verify = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file and configuration.key_file:
            verify.load_cert_chain(configuration.cert_file, configuration.key_file)

    def authorization() -> str | None:
        refresh = getattr(configuration, "refresh_api_key_hook", None)  # exec plugins renew tokens here
        if callable(refresh):
            refresh(configuration)
        value: str | None = configuration.api_key.get("authorization")
        return value

    return KubeAccess(configuration.host, verify, authorization, namespace)
