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
from typing import Any

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


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's bookkeeping goes into shadowgate.io annotations; spec is never written (GitOps sees no drift).
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
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


@kopf.on.event(*RESOURCE)
def seen(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    memo.reconciler.rollouts.seen(dict(body), deleted=type == "DELETED")


@kopf.on.event(*ROUTERS, labels={"app.kubernetes.io/managed-by": MANAGER})
def router_seen(type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    if type != "DELETED":
        memo.reconciler.rollouts.router_seen(dict(body))


@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def rollout_loop(
    stopped: kopf.DaemonStopped, namespace: str | None, name: str, body: kopf.Body, memo: Any, logger: Any, **_: Any
) -> None:
    """One loop per ShadowDeployment: reconcile or do the light work in between, then sleep until woken or due."""
    reconciler: Reconciler = memo.reconciler
    namespace = namespace or ""
    # The object as kopf started the loop for it: with the finalizer kopf added, which the watch event
    # `seen` got may not have yet (a status written from that older copy would meet a conflict).
    reconciler.rollouts.seen(dict(body))
    reconciler.resume(namespace, name)
    stop = asyncio.ensure_future(stopped.wait())
    try:
        while not stopped:
            try:
                delay = await reconciler.tick(namespace, name)
            except KubeError as exc:
                logger.warning(f"reconcile postponed: {exc}")
                delay = RETRY_SECONDS
            woken = asyncio.ensure_future(reconciler.rollouts.get(namespace, name).wake.wait())
            await asyncio.wait({woken, stop}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
    finally:
        stop.cancel()
