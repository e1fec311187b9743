"""kopf glue: watch events go to the Reconciler's records, and one loop per object runs the Reconciler.

- Every watch event of a ShadowDeployment updates its record (`Rollouts.seen`) and wakes its loop when
  the spec, the manual-verb annotation or the deletion state changed. No create/update handler runs:
  kopf stores no progress or last-handled state in the object.
- Every watch event of a router Deployment (label app.kubernetes.io/managed-by=shadowgate) gives its
  availability to the record (`Rollouts.router_seen`): Ready follows it without polling.
- A daemon per object is its loop: reconcile when woken or due (the analysis at spec.analysis.interval,
  a resync of its children every few minutes), sleep otherwise. Daemons need a finalizer (so kopf can
  stop them before the object goes): it is named shadowgate.io/finalizer, and the operator must run for a
  deletion to finish. When peering pauses this replica its loops stop; when it becomes the active one,
  they start again and their first reconcile re-applies every child and re-posts the Events of the
  transition in status (see service.py): whatever the replica before it left half-done is completed.
- The notification delivery worker (notify.deliver.Deliverer) runs as a task from startup to cleanup,
  beside the loops: it watches the notifications queue of each database as the Reconciler opens it, and
  its series are on the operator's /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import kopf

from shadowgate_operator.api import GROUP, PLURAL, VERSION
from shadowgate_operator.builders import MANAGER, OperatorSettings
from shadowgate_operator.exporter import OperatorMetrics
from shadowgate_operator.kube import REPORTING_COMPONENT, Kube, KubeError
from shadowgate_operator.notify.deliver import Deliverer, DeliveryMetrics
from shadowgate_operator.notify.queue import NotificationQueue
from shadowgate_operator.service import Reconciler
from shadowgate_operator.store import Databases

RESOURCE = (GROUP, VERSION, PLURAL)
ROUTERS = ("apps", "v1", "deployments")
PEERING_PLURALS = ("clusterkopfpeerings", "kopfpeerings")
RETRY_SECONDS = 5.0
FINALIZER = f"{GROUP}/finalizer"
FINALIZER_WAIT_SECONDS = 10.0
"""How long a new object's loop waits for kopf's finalizer before its first reconcile (see rollout_loop)."""


class LeanDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base (what it compares between watch events), built from the body without status and
    managedFields, which kopf drops anyway: it deep-copies the whole body first, at every watch event (a
    few milliseconds each with the operator's status and its field manager's entry in managedFields)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        meta = {key: value for key, value in (body.get("metadata") or {}).items() if key != "managedFields"}
        lean = {key: value for key, value in body.items() if key not in ("metadata", "status")}
        raw = cast(kopf.RawBody, {**lean, "metadata": meta})
        return super().build(body=kopf.Body(raw), extra_fields=extra_fields)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's bookkeeping goes into shadowgate.io annotations; spec is never written (GitOps sees no drift).
    settings.persistence.diffbase_storage = LeanDiffBase(prefix=GROUP, key="last-handled-configuration")
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.finalizer = FINALIZER
    # Transitions are recorded as Events by the Reconciler; kopf only reports its own failures.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = REPORTING_COMPONENT
    settings.watching.server_timeout = 300
    # Off for an operator watching named namespaces (`shadowgate operator` decides): kopf then needs no
    # cluster-wide rights; CRDs and namespaces must exist when it starts.
    settings.scanning.disabled = not getattr(memo, "scanning", True)
    settings.watching.client_timeout = 330
    settings.peering.lifetime = getattr(memo, "peering_lifetime", None) or settings.peering.lifetime
    if not settings.peering.standalone and settings.peering.name:
        # Watch only our own peering object, so the ClusterRole grants the peering resources by name alone.
        for plural in PEERING_PLURALS:
            settings.watching.field_selectors["kopf.dev", plural] = f"metadata.name={settings.peering.name}"
    # `shadowgate operator` puts its settings in the memo; anything else running these handlers gets defaults.
    metrics = getattr(memo, "operator_metrics", None) or OperatorMetrics()
    kube = Kube.connect(counted=metrics.count_request)
    notifier = Deliverer(
        secrets=kube, metrics=DeliveryMetrics(metrics.registry), namespaces=getattr(memo, "delivery_namespaces", None)
    )
    memo.reconciler = reconciler = Reconciler(
        kube=kube,
        settings=getattr(memo, "operator_settings", None) or OperatorSettings.from_env(),
        databases=Databases(
            run_migrations=getattr(memo, "run_migrations", True),
            opened=lambda pool: notifier.watch(NotificationQueue(pool)),
        ),
        metrics=metrics,
        notifier=notifier,
    )
    notifier.changed = reconciler.wake
    memo.delivery = asyncio.create_task(notifier.run(), name="shadowgate-notifications")


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    delivery: asyncio.Task[None] = memo.delivery
    delivery.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await delivery
    await memo.reconciler.close()  # lets the posts in flight finish, briefly


# The watch handlers are coroutines: kopf runs a plain function in a thread of its executor, which cost a
# thread hop per watch event and set the records' asyncio.Events from outside the event loop (not safe).
@kopf.on.event(*RESOURCE)
async def seen(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    memo.reconciler.rollouts.seen(dict(body), deleted=type == "DELETED")


@kopf.on.event(*ROUTERS, labels={"app.kubernetes.io/managed-by": MANAGER})
async def router_seen(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    if type != "DELETED":
        memo.reconciler.rollouts.router_seen(dict(body))


@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def rollout_loop(
    stopped: kopf.DaemonStopped, namespace: str | None, name: str, body: kopf.Body, memo: Any, logger: Any, **_: Any
) -> None:
    """One loop per ShadowDeployment: reconcile or do the light work in between, then sleep until woken or due."""
    reconciler: Reconciler = memo.reconciler
    namespace = namespace or ""
    reconciler.rollouts.seen(dict(body))
    record = reconciler.rollouts.get(namespace, name)
    stop = asyncio.ensure_future(stopped.wait())
    try:
        # kopf starts the loop of a new object at its first watch event, then adds its finalizer: a status
        # written from the copy without it would meet a conflict (409), a GET and a second plan. Wait for the
        # watch event that brings it (it wakes the record; bounded, in case it never comes).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINALIZER_WAIT_SECONDS):
                while not stopped and not record.settled(FINALIZER):
                    await _woken_or_stopped(record.wake, stop, None)
                    record.wake.clear()  # resume() wakes it for its first reconcile
        reconciler.resume(namespace, name)
        while not stopped:
            try:
                delay = await reconciler.tick(namespace, name)
            except KubeError as exc:
                logger.warning(f"reconcile postponed: {exc}")
                delay = RETRY_SECONDS
            await _woken_or_stopped(reconciler.rollouts.get(namespace, name).wake, stop, delay)
    finally:
        stop.cancel()


async def _woken_or_stopped(wake: asyncio.Event, stop: asyncio.Future[Any], seconds: float | None) -> None:
    """Until `wake` is set, the loop is stopped or `seconds` (None: no limit) have passed."""
    woken = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({woken, stop}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
