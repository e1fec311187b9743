"""Kubernetes API I/O for the operator: fetch, server-side apply, status replace, Events.

The only module that talks to the API server. Credentials come from the `kubernetes` package's
loaders (in-cluster service account, else kubeconfig); requests go through one async httpx client.
Objects are plain dicts (what the builders return).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import ssl
from dataclasses import dataclass
from typing import Any

import httpx
import kubernetes

from shadowgate_operator.api import GROUP, PLURAL, VERSION

FIELD_MANAGER = "shadowgate-operator"
REPORTING_COMPONENT = "shadowgate-operator"

# apiVersion -> URL prefix; kind -> plural. Only the kinds the operator owns.
_PREFIXES = {
    "v1": "/api/v1",
    "apps/v1": "/apis/apps/v1",
    "rbac.authorization.k8s.io/v1": "/apis/rbac.authorization.k8s.io/v1",
}
_PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Deployment": "deployments",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Event": "events",
    "Secret": "secrets",
}


class KubeError(RuntimeError):
    """An API call failed; `status` is the HTTP status (403 means the operator lacks a permission)."""

    def __init__(self, verb: str, what: str, status: int, reason: str):
        self.status = status
        self.verb = verb
        self.what = what
        self.reason = reason
        super().__init__(f"{verb} {what} failed: HTTP {status}: {reason}")

    @property
    def forbidden(self) -> bool:
        return self.status == 403

    @property
    def permission_denied(self) -> bool:
        """Refused because the operator's ServiceAccount lacks a permission (RBAC), not for another reason."""
        return self.forbidden and _RBAC_REFUSAL.search(self.reason) is not None


# How the API server words a refusal by RBAC: the authorizer ("User ... cannot patch resource ...") and
# escalation prevention (a Role granting what its creator does not hold). Other 403s (a namespace being
# deleted, a quota, an admission webhook) are not about the operator's rights.
_RBAC_REFUSAL = re.compile(r"\bcannot [a-z]+ resource\b|attempting to grant RBAC permissions not currently held")


def _object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    path = f"{_PREFIXES[api_version]}/namespaces/{namespace}/{_PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def _shadow_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json()["message"])
    except (ValueError, KeyError, TypeError):
        return response.reason_phrase


@dataclass
class Kube:
    configuration: kubernetes.client.Configuration
    http: httpx.AsyncClient

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        verify: ssl.SSLContext | bool = False
        if configuration.verify_ssl:
            verify = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                verify.load_cert_chain(configuration.cert_file, configuration.key_file)
        http = httpx.AsyncClient(
            base_url=configuration.host,
            verify=verify,
            timeout=httpx.Timeout(30.0, connect=5.0),
            limits=httpx.Limits(max_connections=20),
        )
        return cls(configuration, http)

    async def close(self) -> None:
        await self.http.aclose()

    def _headers(self, content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        # Re-read on every call: in-cluster tokens are rotated and the loader's hook refreshes them.
        bearer = self.configuration.auth_settings().get("BearerToken")
        if bearer and bearer.get("value"):
            headers["Authorization"] = str(bearer["value"])
        return headers

    async def _call(
        self,
        verb: str,
        what: str,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        try:
            response = await self.http.request(
                method, path, params=query, json=body, headers=self._headers(content_type)
            )
        except httpx.HTTPError as exc:
            raise KubeError(verb, what, 0, f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise KubeError(verb, what, response.status_code, _reason(response))
        result = response.json()
        return result if isinstance(result, dict) else {}

    async def get_shadowdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("get", f"ShadowDeployment {namespace}/{name}", "GET", _shadow_path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def replace_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """PUT the status subresource; the body's resourceVersion makes a concurrent writer fail with 409."""
        meta = body["metadata"]
        path = _shadow_path(meta["namespace"], meta["name"]) + "/status"
        return await self._call(
            "update", f"ShadowDeployment {meta['namespace']}/{meta['name']} status", "PUT", path, body=body
        )

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: idempotent, and a no-op apply does not bump resourceVersion (no churn)."""
        meta = obj["metadata"]
        path = _object_path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return await self._call(
            "apply",
            f"{obj['kind']} {meta['namespace']}/{meta['name']}",
            "PATCH",
            path,
            body=obj,
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(
                "get", f"{kind} {namespace}/{name}", "GET", _object_path(api_version, kind, namespace, name)
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def get_secret_value(self, namespace: str, name: str, key: str) -> str | None:
        """One key of a Secret, decoded (bytes that are not UTF-8 become U+FFFD, for the caller to refuse);
        None when the Secret or the key does not exist."""
        secret = await self.get("v1", "Secret", namespace, name)
        if secret is None or key not in (secret.get("data") or {}):
            return None
        return base64.b64decode(secret["data"][key]).decode(errors="replace")

    async def post_event(
        self, involved: dict[str, Any], event_type: str, reason: str, message: str, now: dt.datetime
    ) -> None:
        """A core/v1 Event about `involved` (what `kubectl describe` and `kubectl get events` show)."""
        meta = involved["metadata"]
        digest = hashlib.sha256(f"{meta['uid']}{reason}{message}{now.isoformat()}".encode()).hexdigest()[:10]
        stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{digest}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": REPORTING_COMPONENT},
            "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": REPORTING_COMPONENT,
            "action": reason,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self._call(
            "create",
            f"Event {reason} for {meta['namespace']}/{meta['name']}",
            "POST",
            _object_path("v1", "Event", meta["namespace"]),
            body=event,
        )
