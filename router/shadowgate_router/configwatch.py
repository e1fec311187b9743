"""Where the router's configuration comes from: a watch on its ConfigMap, or a local file for development.

Both hand the raw ConfigMap ``data`` to `offer`, which validates it and either applies it or refuses it
(the last good configuration stays). The watch lists with ``fieldSelector=metadata.name=<name>``
because the router's Role grants list and watch only through ``resourceNames``, then watches from the
listed resourceVersion, so a change reaches the router as one event, typically within milliseconds.
A broken stream is resumed from the last seen resourceVersion; "410 Gone" (history compacted) starts
over with a fresh list; errors back off up to 10 s and never stop the router from serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from shadowgate_common.kubeaccess import KubeAccess
from shadowgate_router.config import CONFIG_KEY

log = logging.getLogger(__name__)

Offer = Callable[[Mapping[str, str] | None, str], None]
"""offer(data, origin): validate and apply ConfigMap data; origin names it in logs."""

WATCH_SECONDS = 240
"""Server-side timeout of one watch call: the stream is renewed this often even when nothing happens."""


class _Gone(Exception):
    """The resourceVersion we resume from is too old: list again."""


class ConfigMapWatch:
    def __init__(
        self,
        access: KubeAccess,
        namespace: str,
        name: str,
        offer: Offer,
        on_error: Callable[[Exception], None] = lambda exc: None,
    ) -> None:
        self.access = access
        self.namespace = namespace
        self.name = name
        self.offer = offer
        self.on_error = on_error
        self.url = f"{access.server.rstrip('/')}/api/v1/namespaces/{namespace}/configmaps"
        self.selector = f"metadata.name={name}"

    async def run(self) -> None:
        backoff = 0.2
        version: str | None = None
        timeout = httpx.Timeout(10.0, read=WATCH_SECONDS + 30)
        async with httpx.AsyncClient(verify=self.access.verify, timeout=timeout) as client:
            while True:
                try:
                    if version is None:
                        version = await self._list(client)
                    version = await self._watch(client, version)
                    backoff = 0.2
                except _Gone:
                    version = None
                except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
                    self.on_error(exc)
                    log.warning(
                        "ConfigMap %s/%s: %s; retrying in %.1fs", self.namespace, self.name, _describe(exc), backoff
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    version = None

    async def _list(self, client: httpx.AsyncClient) -> str:
        response = await client.get(self.url, params={"fieldSelector": self.selector}, headers=self.access.headers())
        response.raise_for_status()
        listing = response.json()
        items = listing.get("items") or []
        if items:
            self.offer(items[0].get("data"), f"ConfigMap {self.namespace}/{self.name}")
        else:
            log.warning("ConfigMap %s/%s does not exist (yet); waiting for it", self.namespace, self.name)
        version: str = listing["metadata"]["resourceVersion"]
        return version

    async def _watch(self, client: httpx.AsyncClient, version: str) -> str:
        params = {
            "fieldSelector": self.selector,
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        async with client.stream("GET", self.url, params=params, headers=self.access.headers()) as response:
            if response.status_code == 410:
                raise _Gone()
            if response.status_code != 200:
                await response.aread()
                response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                event: dict[str, Any] = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise ValueError(f"watch error: {obj.get('message') or obj}")
                version = obj["metadata"]["resourceVersion"]
                if kind in ("ADDED", "MODIFIED"):
                    self.offer(obj.get("data"), f"ConfigMap {self.namespace}/{self.name}")
                elif kind == "DELETED":
                    log.warning(
                        "ConfigMap %s/%s was deleted; keeping the configuration in force", self.namespace, self.name
                    )
        return version


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        reason = exc.response.text[:300].strip()
        return f"HTTP {exc.response.status_code} from the API server: {reason}"
    return f"{type(exc).__name__}: {exc}"


class ConfigFile:
    """A local JSON file holding what the ConfigMap's config.json would; re-read when it changes."""

    def __init__(self, path: Path, offer: Offer, interval: float = 0.2) -> None:
        self.path = path
        self.offer = offer
        self.interval = interval

    async def run(self) -> None:
        seen: tuple[float, int] | None = None
        while True:
            try:
                status = self.path.stat()
                current = (status.st_mtime, status.st_size)
                if current != seen:
                    seen = current
                    self.offer({CONFIG_KEY: self.path.read_text()}, str(self.path))
            except OSError as exc:
                if seen is not None or not isinstance(exc, FileNotFoundError):
                    log.warning("cannot read %s: %s", self.path, exc)
                seen = None
            await asyncio.sleep(self.interval)
