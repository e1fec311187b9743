"""Reconcile one ShadowDeployment: read it, plan, apply the router's objects, write status, record Events.

The Reconciler is the only place where the pure parts (rollout plan, builders) meet the Kubernetes API.
Calls for one object are serialised by a lock, and each starts from a fresh read of the object, so a
change handler and the analysis timer never act on a stale status.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from shadowgate_operator.api import ShadowDeployment
from shadowgate_operator.builders import OperatorSettings, router_objects
from shadowgate_operator.kube import Kube, KubeError
from shadowgate_operator.rollout import Plan, RouterState, plan_rollout

logger = logging.getLogger(__name__)

Key = tuple[str, str]
CONFLICT_RETRIES = 5


def utcnow() -> dt.datetime:
    # Whole seconds: status timestamps are RFC 3339 without fractions, so a re-read compares equal.
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class Reconciler:
    kube: Kube
    settings: OperatorSettings
    clock: Callable[[], dt.datetime] = utcnow
    _locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    _next_analysis: dict[Key, float] = field(default_factory=dict)
    _warned: set[tuple[str, str]] = field(default_factory=set)

    async def close(self) -> None:
        await self.kube.close()

    async def analyse_if_due(self, namespace: str, name: str) -> float:
        """Run the analysis when this object's interval has passed since the last one.

        Returns the seconds until the next analysis is due.
        """
        key = (namespace, name)
        if time.monotonic() >= self._next_analysis.get(key, 0.0):
            await self.reconcile(namespace, name, analyse=True)
        return max(0.5, self._next_analysis.get(key, time.monotonic() + 5.0) - time.monotonic())

    async def reconcile(self, namespace: str, name: str, *, analyse: bool = False) -> Plan | None:
        key = (namespace, name)
        async with self._locks.setdefault(key, asyncio.Lock()):
            for attempt in range(CONFLICT_RETRIES):
                try:
                    return await self._reconcile_once(namespace, name, analyse=analyse)
                except KubeError as exc:
                    # Someone wrote the object between our read and our status write (kopf's own
                    # annotations, a user's edit): plan again from a fresh read.
                    if exc.status != 409 or attempt == CONFLICT_RETRIES - 1:
                        raise
            return None

    async def _reconcile_once(self, namespace: str, name: str, *, analyse: bool) -> Plan | None:
        key = (namespace, name)
        body = await self.kube.get_shadowdeployment(namespace, name)
        if body is None:  # deleted meanwhile; its children go with it (owner references)
            self._locks.pop(key, None)
            self._next_analysis.pop(key, None)
            return None
        try:
            sd = ShadowDeployment.model_validate(body)
        except ValidationError as exc:
            # Admission validation makes this rare (e.g. an object stored before a CRD upgrade).
            logger.error("ShadowDeployment %s/%s is invalid, not reconciled: %s", namespace, name, exc)
            return None
        plan = plan_rollout(sd, self.clock(), analyse=analyse, router=await self._router_state(sd))
        planned = sd.model_copy(update={"status": plan.status})
        for child in router_objects(planned, self.settings):
            await self.kube.apply(child)
        await self._write_status(body, sd, plan)
        if analyse:
            self._next_analysis[key] = time.monotonic() + sd.spec.analysis.interval_seconds
        await self._record(body, plan)
        return plan

    async def _router_state(self, sd: ShadowDeployment) -> RouterState | None:
        deployment = await self.kube.get("apps/v1", "Deployment", sd.namespace, sd.router_name)
        if deployment is None:
            return None
        status = deployment.get("status") or {}
        return RouterState(
            available_replicas=int(status.get("availableReplicas") or 0),
            desired_replicas=int((deployment.get("spec") or {}).get("replicas") or 0),
        )

    async def _write_status(self, body: dict[str, Any], sd: ShadowDeployment, plan: Plan) -> None:
        new_status = plan.status.to_dict()
        if new_status == sd.status.to_dict():
            return  # nothing changed: no write, no churn
        await self.kube.replace_status({**body, "status": new_status})

    async def _record(self, body: dict[str, Any], plan: Plan) -> None:
        uid = body["metadata"]["uid"]
        for notice in plan.notices:
            if notice.reason == "InvalidAction":
                # The annotation stays until someone fixes it: warn once per value, not every interval.
                if (uid, notice.message) in self._warned:
                    continue
                self._warned.add((uid, notice.message))
            try:
                await self.kube.post_event(body, notice.type, notice.reason, notice.message, self.clock())
            except KubeError as exc:  # an Event is worth a log line, not a failed reconcile
                logger.warning("could not record Event %s: %s", notice.reason, exc)
