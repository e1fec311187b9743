"""The two outside concerns of the Reconciler, each behind one small interface (as Flagger's seams).

`Cluster` is the Kubernetes API (kube.Kube implements it); `Databases` and `Database` the
PostgreSQL/TimescaleDB side (store.Databases and store.Database). Tests drive the Reconciler in-process
with the real implementations against a real API server and PostgreSQL, and wrap them where they need
a fault that the real parts cannot produce on demand (an operator dying between two calls).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Protocol

from shadowgate_operator.analysis.window import WindowAnalysis
from shadowgate_operator.metrics import WindowMetrics
from shadowgate_operator.notify.messages import Outgoing
from shadowgate_operator.store import EventRow, MetricsRow


class Cluster(Protocol):
    async def get_shadowdeployment(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def replace_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """Raises KubeError with status 409 when the object changed since `body` was read."""
        ...

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]: ...

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def get_secret_value(self, namespace: str, name: str, key: str) -> str | None: ...

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
    ) -> bool: ...

    async def close(self) -> None: ...


class Database(Protocol):
    async def record_spec(
        self, namespace: str, deployment: str, generation: int, revision: str, spec: dict[str, Any]
    ) -> None: ...

    async def write(
        self, events: Sequence[EventRow], metrics: Sequence[MetricsRow], notifications: Sequence[Outgoing] = ()
    ) -> int:
        """History rows and the notifications announcing them, in one transaction; returns how many
        notifications were newly queued."""
        ...

    async def refresh(self, analysis: WindowAnalysis) -> WindowMetrics: ...


class Databases(Protocol):
    async def get(self, dsn: str) -> Database:
        """Raises store.DatabaseUnavailable (or one of dbaway.DATABASE_AWAY) when it cannot be used."""
        ...

    async def close(self) -> None: ...
