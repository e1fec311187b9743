"""kopf glue: every handler hands the object's name to the Reconciler and returns.

Change handlers (create, update, resume) reconcile at once; a daemon per object runs the analysis at
the object's own spec.analysis.interval. Daemons need a finalizer (so kopf can stop them before the
object goes): it is named shadowgate.io/finalizer, and the operator must run for a deletion to finish.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from shadowgate_operator.api import ACTION_ANNOTATION, GROUP, PLURAL, VERSION
from shadowgate_operator.builders import OperatorSettings
from shadowgate_operator.exporter import OperatorMetrics
from shadowgate_operator.kube import REPORTING_COMPONENT, Kube, KubeError
from shadowgate_operator.service import Reconciler
from shadowgate_operator.store import Databases

RESOURCE = (GROUP, VERSION, PLURAL)
PEERING_PLURALS = ("clusterkopfpeerings", "kopfpeerings")


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
    settings.watching.client_timeout = 330
    if not settings.peering.standalone and settings.peering.name:
        # Watch only our own peering object, so the ClusterRole grants the peering resources by name alone.
        for plural in PEERING_PLURALS:
            settings.watching.field_selectors["kopf.dev", plural] = f"metadata.name={settings.peering.name}"
    # `shadowgate operator` puts its settings in the memo; anything else running these handlers gets defaults.
    metrics = getattr(memo, "operator_metrics", None) or OperatorMetrics()
    memo.reconciler = Reconciler(
        kube=Kube.connect(counted=metrics.count_request),
        settings=getattr(memo, "operator_settings", None) or OperatorSettings.from_env(),
        databases=Databases(run_migrations=getattr(memo, "run_migrations", True)),
        metrics=metrics,
    )


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.reconciler.close()


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
async def reconcile(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    try:
        await memo.reconciler.reconcile(namespace or "", name)
    except KubeError as exc:
        raise kopf.TemporaryError(str(exc), delay=5) from exc


def _action_pending(annotations: Any, status: Any, **_: Any) -> bool:
    """The action annotation holds a value the operator has not handled yet (status.lastAction)."""
    value = annotations.get(ACTION_ANNOTATION)
    return bool(value) and value != (status.get("lastAction") or {}).get("value")


# kopf's change detection ignores annotations, so manual verbs arrive through raw watch events.
@kopf.on.event(*RESOURCE, when=_action_pending)
async def manual_action(namespace: str | None, name: str, memo: Any, logger: Any, **_: Any) -> None:
    try:
        await memo.reconciler.reconcile(namespace or "", name)
    except KubeError as exc:
        logger.warning(f"{ACTION_ANNOTATION} not handled yet: {exc}")


@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def analysis_loop(stopped: Any, namespace: str | None, name: str, memo: Any, logger: Any, **_: Any) -> None:
    """One loop per ShadowDeployment: analyse, then sleep until its spec.analysis.interval is up again."""
    while not stopped:
        try:
            delay = await memo.reconciler.analyse_if_due(namespace or "", name)
        except KubeError as exc:
            logger.warning(f"analysis postponed: {exc}")
            delay = 5.0
        await stopped.wait(delay)
