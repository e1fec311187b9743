"""The observe step of a reconcile: everything the plan needs, read with as few calls as it takes.

The object comes from the record (its watch keeps it; read again only after a conflict), the router
Deployment's availability from its watch (read directly until the watch has reported it), the DSN from
its Secret (read again at each resync, at every reconcile while it is missing or refused, or after the
database refused it; never watched), the database from a shared pool, and, when an analysis is due, the
current step's window (only the rows recorded since its last read). At a resync, after the plan, each
child is read to be compared with what is built (not_in_place). Every refusal is noted (`Denials`)
rather than raised: what can be done still is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shadowgate_operator.api import Phase, ShadowDeployment
from shadowgate_operator.builders import (
    GATE_URL_SECRET_FIELD,
    HELD_GATES,
    HELD_NOTIFICATIONS,
    URL_SECRET_FIELD,
    Manifest,
    OperatorSettings,
    in_place,
    secret_problem,
)
from shadowgate_operator.dbaway import DATABASE_AWAY, describe
from shadowgate_operator.exporter import OperatorMetrics
from shadowgate_operator.kube import KubeError, secret_value
from shadowgate_operator.metrics import WindowMetrics
from shadowgate_operator.ports import Cluster, Database, Databases
from shadowgate_operator.record import Denials, Rollout, Rollouts, child_key
from shadowgate_operator.rollout import Blocked, RouterState
from shadowgate_operator.store import DSN_FORM, DatabaseUnavailable, dsn_problem

logger = logging.getLogger(__name__)


@dataclass
class Observed:
    """What one reconcile found."""

    body: dict[str, Any]
    sd: ShadowDeployment
    analyse: bool
    database: Database | None
    data_problem: str | None
    window: WindowMetrics | None
    router: RouterState | None
    denials: Denials


@dataclass
class Observer:
    kube: Cluster
    databases: Databases
    settings: OperatorSettings
    metrics: OperatorMetrics
    rollouts: Rollouts

    async def observe(self, record: Rollout, analyse: bool | None) -> Observed | None:
        """What there is to act on: None when the object is gone, going or unreadable. `analyse` None:
        analyse when no analysis was ever decided (a new object)."""
        if record.body is None:
            record.body = await self.kube.get_shadowdeployment(record.namespace, record.name)
        if record.body is None:  # deleted; its children go with it (owner references)
            self.rollouts.drop(record.namespace, record.name)
            return None
        if record.body["metadata"].get("deletionTimestamp"):  # going: nothing more to do for it
            return None
        try:
            sd = record.shadow_deployment()
        except ValidationError as exc:  # admission validation makes this rare (stored before a CRD upgrade)
            logger.error("ShadowDeployment %s/%s is invalid, not reconciled: %s", *record.key, exc)
            return None
        record.resync_if_due()
        if analyse is None:
            analyse = sd.status.last_decision is None
        denials = Denials()
        database, problem = await self._database(record, sd, denials)
        window = None
        if analyse and database is not None and sd.status.phase is Phase.PROGRESSING:
            window, problem = await self._measure(record, database, sd)
        router = record.router
        if router is None and sd.status.phase is not None:
            # A new object (nothing in status) has no router yet: its Deployment's watch reports it once applied.
            router = await self._router_state(sd, denials)
        image_problem = self.settings.image_problem(sd)
        if image_problem is not None:  # the router keeps the image it has
            denials.invalid.append(Blocked("RouterImageNotAllowed", image_problem))
        return Observed(record.body, sd, analyse, database, problem, window, router, denials)

    async def not_in_place(self, children: list[Manifest], changed: set[str]) -> list[Manifest]:
        """At a resync: of `children` (in their order), those `changed` (kind/name) since last applied and the
        others that are missing or not as built (builders.in_place), each read: a GET, not a write, for one in
        place. One the operator may not read (a role from before it could) is applied, as before."""
        wanted = []
        for child in children:
            if child_key(child) not in changed:
                meta = child["metadata"]
                try:
                    found = await self.kube.get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])
                except KubeError as exc:
                    if not exc.forbidden:
                        raise
                    found = None
                if in_place(child, found):
                    continue
            wanted.append(child)
        return wanted

    def permission_problem(self, exc: KubeError) -> str:
        """What was refused and who can fix it, in words: the Ready condition's message and the Event's."""
        self.metrics.permission_denied.labels(exc.verb, exc.what.partition(" ")[0]).inc()
        return (
            f"The operator may not {exc.verb} {exc.what}: {exc.reason}. "
            f"Grant it in the operator's role {self.settings.cluster_role} "
            "(manifests/operator/rbac.yaml; cluster-wide: manifests/overlays/cluster-wide/rbac.yaml)."
        )

    async def _database(
        self, record: Rollout, sd: ShadowDeployment, denials: Denials
    ) -> tuple[Database | None, str | None]:
        """This object's database, or why there is none; its spec recorded there once per generation."""
        reference = sd.spec.database.secret_ref
        if record.dsn is None:
            # Every named Secret read, for its router-secret label, whenever the DSN is (at the first
            # reconcile, at each resync, and at every reconcile while one of them is refused).
            token = sd.spec.outcomes.token_secret_ref.name
            # Receivers' and gates' URLs: each Secret with the field that names it (a receiver's first).
            named_by = {gate.url_secret_ref.name: (GATE_URL_SECRET_FIELD, HELD_GATES) for gate in sd.spec.gates}
            receivers = sd.spec.notifications
            named_by |= {target.url_secret_ref.name: (URL_SECRET_FIELD, HELD_NOTIFICATIONS) for target in receivers}
            hooks = sorted(named_by)
            try:
                secret = await self.kube.get("v1", "Secret", sd.namespace, reference.name)
                token_secret = await self.kube.get("v1", "Secret", sd.namespace, token)
                hook_secrets = [await self.kube.get("v1", "Secret", sd.namespace, name) for name in hooks]
            except KubeError as exc:
                if not exc.permission_denied:
                    names = ", ".join([reference.name, token, *hooks])
                    return None, f"cannot read Secret {names}: {exc.reason}"
                problem = self.permission_problem(exc)
                denials.reads.append(problem)
                return None, problem
            unlabelled = {
                field: refusal
                for field, named in (
                    ("spec.database.secretRef", secret),
                    ("spec.outcomes.tokenSecretRef", token_secret),
                )
                if named is not None and (refusal := secret_problem(named, field)) is not None
            }
            denials.invalid += [Blocked("SecretNotAllowed", refusal) for refusal in unlabelled.values()]
            # A receiver's or a gate's Secret is never the router's: Ready says it is refused (the delivery worker
            # and the gatekeeper refuse it too, notify.deliver, gates.call), the router follows the spec meanwhile.
            hooks_unlabelled = [
                refusal
                for name, named in zip(hooks, hook_secrets, strict=True)
                if named is not None and (refusal := secret_problem(named, *named_by[name])) is not None
            ]
            denials.invalid += [
                Blocked("SecretNotAllowed", refusal, holds_router=False) for refusal in hooks_unlabelled
            ]
            if "spec.database.secretRef" in unlabelled:
                return None, unlabelled["spec.database.secretRef"]
            if secret is None:  # not created yet (applied after the object, say): read again at every reconcile
                return None, f"Secret {sd.namespace}/{reference.name} (spec.database.secretRef) does not exist"
            dsn = secret_value(secret, reference.key)
            if unlabelled or hooks_unlabelled:  # used now, read again at the next reconcile until labelled
                return await self._connect(record, sd, dsn, denials)
            record.dsn = dsn
        return await self._connect(record, sd, record.dsn, denials)

    async def _connect(
        self, record: Rollout, sd: ShadowDeployment, dsn: str | None, denials: Denials
    ) -> tuple[Database | None, str | None]:
        reference = sd.spec.database.secret_ref
        where = f"Secret {sd.namespace}/{reference.name}"
        if dsn is None:
            return None, f"{where} has no key {reference.key!r} (spec.database.secretRef)"
        unusable = dsn_problem(dsn)
        if unusable is not None:
            record.dsn = None  # read again at the next reconcile: someone may fix the Secret
            message = (
                f"{where} key {reference.key!r} (spec.database.secretRef) does not hold a PostgreSQL DSN: "
                f"{unusable}. Expected {DSN_FORM}."
            )
            denials.invalid.append(Blocked("InvalidDatabaseSecret", message))
            return None, message
        try:
            database = await self.databases.get(dsn)
        except DatabaseUnavailable as exc:
            record.dsn = None  # the Secret may have been fixed meanwhile: read it again next time
            return None, str(exc)
        generation = sd.metadata.generation or 0
        if record.recorded_generation != generation:
            try:
                await database.record_spec(
                    sd.namespace, sd.name, generation, sd.spec.candidate_revision(), sd.spec.to_dict()
                )
            except DATABASE_AWAY as exc:
                return None, f"cannot write to the database: {describe(exc)}"
            record.recorded_generation = generation
        return database, None

    async def _measure(
        self, record: Rollout, database: Database, sd: ShadowDeployment
    ) -> tuple[WindowMetrics | None, str | None]:
        """The current step's window, read incrementally (only rows recorded since the last read)."""
        window = record.window(sd)
        if window is None:
            return None, None
        try:
            return await database.refresh(window), None
        except DATABASE_AWAY as exc:
            return None, f"cannot query the database: {describe(exc)}"

    async def _router_state(self, sd: ShadowDeployment, denials: Denials) -> RouterState | None:
        """The router Deployment read directly, until its watch reports it (router_seen)."""
        try:
            deployment = await self.kube.get("apps/v1", "Deployment", sd.namespace, sd.router_name)
        except KubeError as exc:
            if not exc.permission_denied:
                raise
            denials.reads.append(self.permission_problem(exc))
            return None
        return None if deployment is None else RouterState.from_deployment(deployment)
