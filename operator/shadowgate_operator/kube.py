"""Kubernetes API I/O for the operator: fetch, server-side apply, status replace, Events.

The only module of the operator that talks to the API server. Credentials come from kubeaccess.load
(the kubeconfig named by $KUBECONFIG, else the pod's service account); requests go through one async
httpx client, each counted by verb, kind and HTTP status when a counter is given (the exporter's
shadowgate_operator_api_requests_total). Objects are plain dicts (what the builders return).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import functools
import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from shadowgate_common import kubeaccess
from shadowgate_operator.api import GROUP, PLURAL, VERSION

# httpcore (1.0) imports sniffio at every request, to tell asyncio from trio; anyio 4 no longer brings it, and
# a failed import searches every sys.path entry again, each time: a fifth of the operator's CPU while it
# started 300 ShadowDeployments (bench/operator). None in sys.modules makes that import fail at once, and
# httpcore then takes asyncio, which is what runs here. Left alone when sniffio is installed.
if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

FIELD_MANAGER = "shadowgate-operator"
CONNECTIONS = 20
"""Requests to the API server at once (and connections kept): more wait their turn in Kube, not in httpx's
pool, whose bookkeeping runs over every request queued in it at each step (with 300 new objects' reconciles
waiting it cost more than their own code, bench/operator)."""
REPORTING_COMPONENT = "shadowgate-operator"

# apiVersion -> URL prefix; kind -> plural. Only the kinds the operator owns.
_PREFIXES = {
    "v1": "/api/v1",
    "apps/v1": "/apis/apps/v1",
    "rbac.authorization.k8s.io/v1": "/apis/rbac.authorization.k8s.io/v1",
    "networking.k8s.io/v1": "/apis/networking.k8s.io/v1",
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
    "NetworkPolicy": "networkpolicies",
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


def secret_value(secret: dict[str, Any] | None, key: str) -> str | None:
    """One key of a Secret as read from the API, decoded (bytes that are not UTF-8 become U+FFFD, for the
    caller to refuse); None when there is no Secret or no such key."""
    data = (secret or {}).get("data") or {}
    if key not in data:
        return None
    return base64.b64decode(data[key]).decode(errors="replace")


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


Counted = Callable[[str, str, int], None]
"""Called once per API request with (verb, kind, HTTP status; 0 when no answer came)."""


@dataclass
class Kube:
    access: kubeaccess.KubeAccess
    http: httpx.AsyncClient
    counted: Counted | None = None
    _turns: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONNECTIONS))
    _reading: dict[str, asyncio.Future[dict[str, Any] | None]] = field(default_factory=dict)
    """Reads in flight, by path (see get)."""

    @classmethod
    def connect(cls, kubeconfig: str | None = None, counted: Counted | None = None) -> Kube:
        """The API server of `kubeconfig`, else as kubeaccess.load finds it ($KUBECONFIG, the pod's service
        account, ~/.kube/config)."""
        access = kubeaccess.load(kubeconfig)
        http = httpx.AsyncClient(
            base_url=access.server,
            verify=access.verify,
            timeout=httpx.Timeout(30.0, connect=5.0),
            limits=httpx.Limits(max_connections=CONNECTIONS),
        )
        return cls(access, http, counted)

    async def close(self) -> None:
        await self.http.aclose()

    def _headers(self, content_type: str) -> dict[str, str]:
        # Re-read on every call: in-cluster tokens are rotated, exec plugins renew theirs.
        return {"Content-Type": content_type, "Accept": "application/json", **self.access.headers()}

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
        kind = what.partition(" ")[0]
        try:
            async with self._turns:
                response = await self.http.request(
                    method, path, params=query, json=body, headers=self._headers(content_type)
                )
        except httpx.HTTPError as exc:
            if self.counted is not None:
                self.counted(verb, kind, 0)
            raise KubeError(verb, what, 0, f"{type(exc).__name__}: {exc}") from None
        if self.counted is not None:
            self.counted(verb, kind, response.status_code)
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
        """The object, None when it does not exist. Reads of one object at the same time share one request
        (1,000 new ShadowDeployments naming the same two Secrets read each a few times, not 1,000): the answer
        may be as old as the moment the shared read was sent, and is shared, so it must not be changed."""
        path = _object_path(api_version, kind, namespace, name)
        shared = self._reading.get(path)
        if shared is None:
            shared = self._reading[path] = asyncio.ensure_future(self._get(f"{kind} {namespace}/{name}", path))
            shared.add_done_callback(functools.partial(self._read, path))
        return await asyncio.shield(shared)

    def _read(self, path: str, done: asyncio.Future[dict[str, Any] | None]) -> None:
        if self._reading.get(path) is done:
            del self._reading[path]
        if not done.cancelled():
            done.exception()  # retrieved: every caller waiting for it may have been cancelled

    async def _get(self, what: str, path: str) -> dict[str, Any] | None:
        try:
            return await self._call("get", what, "GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def get_secret_value(self, namespace: str, name: str, key: str) -> str | None:
        """One key of a Secret, decoded (see secret_value); None when the Secret or the key does not exist."""
        return secret_value(await self.get("v1", "Secret", namespace, name), key)

    async def post_event(
        self,
        involved: dict[str, Any],
        event_type: str,
        reason: str,
        message: str,
        now: dt.datetime,
        *,
        name: str | None = None,
        annotations: dict[str, str] | None = None,
    ) -> bool:
        """A core/v1 Event about `involved` (what `kubectl describe` and `kubectl get events` show).

        With a `name`, posting the same Event again is harmless: the API server keeps the first and this
        returns False. Returns True when the Event was created.
        """
        meta = involved["metadata"]
        if name is None:
            digest = hashlib.sha256(f"{meta['uid']}{reason}{message}{now.isoformat()}".encode()).hexdigest()[:10]
            name = f"{meta['name']}.{digest}"
        stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": meta["namespace"], "annotations": annotations or {}},
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
        try:
            await self._call(
                "create",
                f"Event {reason} for {meta['namespace']}/{meta['name']}",
                "POST",
                _object_path("v1", "Event", meta["namespace"]),
                body=event,
            )
        except KubeError as exc:
            if exc.status == 409:  # AlreadyExists: posted before (by this operator or the one before it)
                return False
            raise
        return True
