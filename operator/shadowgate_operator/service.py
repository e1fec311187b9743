"""Reconcile one ShadowDeployment: observe, plan, act, over its record (record.Rollout).

The Reconciler is the one place where the pure parts (rollout plan, decision, builders) meet the
Kubernetes API and the database, each behind a small interface (ports.Cluster, ports.Databases).

- observe (observe.Observer): the object as last seen (no GET unless a write met a conflict), the DSN
  Secret and database (read again at each resync), the analysis window when an analysis is due, the
  router Deployment (from its watch), and what was refused;
- plan: pure: the status the object should have (rollout.plan_rollout) and the children whose
  manifests differ from what was last applied (a hash per child); at a resync also those that are not in
  the cluster as built (each read: deleted, or edited by hand);
- act: the status first (it is the record of what was decided), then the changed children, then the
  Events and history rows of the transition the status names (announce.Announcer), then warnings and
  the rows waiting for the database, with the transition's notifications queued in the same transaction
  (the delivery worker, `notifier`, posts them apart from the reconcile; its receivers that keep failing
  show as the NotificationsDelivered condition and a Warning).

Nothing is written when nothing changed: an idle rollout costs no API call, and a finished one
(Promoted, RolledBack, Failed) or a paused one is looked at again only at its resync or when its spec,
its manual-verb annotation or its router changes. An operator killed at any point leaves either the old
status (the next one decides again) or the new one with lastTransition, whose Events and rows the next
one posts under the same names (none lost, none doubled; see announce.py).

A refusal by RBAC does not stop a reconcile: the other children are still applied; Ready turns False
with reason PermissionDenied (at the next reconcile, which follows at once), and a Warning says it once.
A child the API server refuses for what it is (RouterRefused: invalid, or turned away by an admission
policy or a quota), a database Secret that holds no DSN (InvalidDatabaseSecret) and a router image the
operator does not allow (RouterImageNotAllowed) are reported the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shadowgate_operator import announce
from shadowgate_operator.announce import Announcer
from shadowgate_operator.api import ShadowDeployment
from shadowgate_operator.builders import Manifest, OperatorSettings, router_objects
from shadowgate_operator.conditions import notifications_condition
from shadowgate_operator.dbaway import DATABASE_AWAY, describe
from shadowgate_operator.exporter import OperatorMetrics
from shadowgate_operator.gates.call import Gatekeeper, GateMetrics
from shadowgate_operator.gates.verdict import GATE_WARNINGS
from shadowgate_operator.kube import KubeError
from shadowgate_operator.notify.deliver import Deliverer
from shadowgate_operator.observe import Observed, Observer
from shadowgate_operator.ports import Cluster, Database, Databases
from shadowgate_operator.record import Denials, Rollout, Rollouts, child_key
from shadowgate_operator.rollout import UNANNOUNCED, Notice, Plan, plan_rollout
from shadowgate_operator.store import DatabaseUnavailable

logger = logging.getLogger(__name__)

UNREACHABLE: tuple[type[BaseException], ...] = (DatabaseUnavailable, *DATABASE_AWAY)
REFUSALS = frozenset({400, 403, 422})
"""The API server refuses the object itself (bad request, an admission policy or a quota, invalid):
applying the same again cannot help, a person must change something."""
WARNED = frozenset(
    {
        "InvalidAction",
        "PermissionDenied",
        "RouterRefused",
        "InvalidDatabaseSecret",
        "RouterImageNotAllowed",
        "SecretNotAllowed",
        "NotificationFailing",
        *GATE_WARNINGS,
    }
)
"""Warnings said once while their cause stays; each reconcile looks at all their causes."""
CONFLICT_RETRIES = 5
ROWS_RETRY_SECONDS = 5.0
"""While history rows wait for the database, try again this often."""


def utcnow() -> dt.datetime:
    # Whole seconds: status timestamps are RFC 3339 without fractions, so a re-read compares equal.
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class Reconciler:
    kube: Cluster
    settings: OperatorSettings
    databases: Databases
    rollouts: Rollouts = field(default_factory=Rollouts)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    clock: Callable[[], dt.datetime] = utcnow
    notifier: Deliverer | None = None
    """The notification delivery worker (run beside the Reconciler by the kopf glue): woken when a
    transition's messages are queued; its failing receivers are read into status."""
    gatekeeper: Gatekeeper | None = None
    """Asks the gates (spec.gates) a plan names; one is made on the Kubernetes client if not given."""

    def __post_init__(self) -> None:
        self.metrics.follow(self.rollouts)
        if self.gatekeeper is None:
            self.gatekeeper = Gatekeeper(self.kube, GateMetrics(self.metrics.registry))
        self.announcer = Announcer(self.kube, self.metrics)
        self.observer = Observer(self.kube, self.databases, self.settings, self.metrics, self.rollouts)

    async def close(self) -> None:
        if self.notifier is not None:
            await self.notifier.close()
        if self.gatekeeper is not None:
            await self.gatekeeper.close()
        await self.databases.close()
        await self.kube.close()

    def wake(self, namespace: str, name: str) -> None:
        """Reconcile this object now (e.g. one of its receivers started or stopped failing)."""
        record = self.rollouts.find(namespace, name)
        if record is not None:
            record.wake.set()

    def resume(self, namespace: str, name: str) -> None:
        """The object's loop (re)starts in this replica (a start, or a takeover from another replica): what
        the record says was applied and announced may be stale, so the next reconcile does it all again."""
        record = self.rollouts.get(namespace, name)
        record.applied.clear()
        record.published = 0
        record.wake.set()

    async def tick(self, namespace: str, name: str) -> float:
        """What the object's loop runs: a reconcile when something changed or is due (with the analysis
        when its interval is up), else the light work in between. Returns the seconds until it is due again."""
        record = self.rollouts.get(namespace, name)
        woken, now = record.wake.is_set(), time.monotonic()
        record.wake.clear()
        due = record.analysis_due
        if woken or due is None or now >= due or now >= record.resync_at:
            await self.reconcile(record, analyse=None if due is None else now >= due)
        else:
            await self._between(record)
        delay = record.next_delay(record.catch_up_delay())
        return min(delay, ROWS_RETRY_SECONDS) if record.rows.waiting else delay

    async def reconcile(self, record: Rollout, *, analyse: bool | None = False) -> Plan | None:
        """One reconcile, the analysis included when `analyse` (None: when no analysis was ever decided,
        a new object: its first analysis comes at once and says what it waits for)."""
        async with record.lock:
            for attempt in range(CONFLICT_RETRIES):
                try:
                    observed = await self.observer.observe(record, analyse)
                    if observed is None:
                        return None
                    return await self._act(record, observed)
                except KubeError as exc:
                    # Someone wrote the object since it was seen (kopf, a user): plan again from a fresh read.
                    if exc.status != 409 or attempt == CONFLICT_RETRIES - 1:
                        raise
                    record.body = None
            return None

    async def _act(self, record: Rollout, seen: Observed) -> Plan:
        sd, now, analyse = seen.sd, self.clock(), seen.analyse
        # The transition in status first, if this operator has not announced it (its writer may have died
        # right after writing it): before a new transition replaces it in status.
        await self.announcer.publish(record, seen.body, sd)
        # Applying comes after the status write: expect the refusals the last apply met.
        expected = Denials(seen.denials.reads, record.denied.applies, record.denied.refused, seen.denials.invalid)
        planning = functools.partial(
            plan_rollout, sd, now, analyse=analyse, router=seen.router, metrics=seen.window,
            data_problem=seen.data_problem, permission_problem=expected.problem(), blocked=expected.blocked(),
            stamp=dt.datetime.now(dt.UTC),
        )  # fmt: skip
        plan = planning()
        if plan.asks and self.gatekeeper is not None:
            # A move its gates must let through: ask them (each within its timeout), plan again with the answers.
            interval = sd.spec.analysis.interval_seconds
            plan = planning(gates=await self.gatekeeper.ask(record.gate_replies, sd, plan.asks, interval))
        failing = [(f.receiver, f.detail) for f in self.notifier.failing(*record.key)] if self.notifier else []
        delivery = notifications_condition(
            plan.status, len(sd.spec.notifications), failing, sd.metadata.generation, now
        )
        plan = dataclasses.replace(plan, status=delivery)
        planned = sd.model_copy(update={"status": plan.status})
        body = seen.body
        if plan.status.to_dict() != sd.status.to_dict():
            body = record.body = await self.kube.replace_status({**body, "status": plan.status.to_dict()})
        record.status = plan.status
        if plan.again:  # postRollback gates: told at the next reconcile, once the router follows this status
            record.wake.set()
        denials = Denials(reads=seen.denials.reads, invalid=seen.denials.invalid)
        # An image not allowed or a Secret not labelled: the router keeps the Deployment (image, Secrets) it has.
        image_refused = any(
            blocked.reason in ("RouterImageNotAllowed", "SecretNotAllowed") and blocked.holds_router
            for blocked in denials.invalid
        )
        changed = record.needs_apply(planned, lambda: router_objects(planned, self.settings))
        if record.check_children:  # a resync: and those deleted or edited by hand (read, compared)
            built = router_objects(planned, self.settings)
            changed = await self.observer.not_in_place(built, {child_key(child) for child in changed})
            record.check_children = False
        for child in changed:
            if not (image_refused and child["kind"] == "Deployment"):
                await self._apply(record, child, denials)
        if (denials.problem(), denials.blocked()) != (expected.problem(), expected.blocked()):
            record.wake.set()  # Ready follows the refusals at the next reconcile, at once
        record.denied = denials
        self._schedule(record, planned, analyse, plan)
        record.window(planned)  # a new step's window starts now: caught up from the next tick
        await self.announcer.publish(record, body, planned)
        # Whose causes this reconcile looked at: the others' warnings are not forgotten yet.
        observed = WARNED | ({"DatabaseUnavailable"} if analyse or seen.data_problem else set())
        warnings = self._warnings(plan, seen, denials) + [
            Notice("Warning", "NotificationFailing", f"Notifications to receiver {receiver} keep failing: {detail}")
            for receiver, detail in failing
        ]
        await self.announcer.warn(record, body, planned, warnings, observed)
        if seen.window is not None and (plan.transition is None or plan.transition.analysed is None):
            judged = plan.judged_samples or 0
            row = announce.analysis_row(
                planned, now, sd.status.current_step or 0, sd.status.current_weight or 0, judged
            )
            record.rows.add(metrics=[row] if row else [])
        if seen.database is not None:
            await self._flush(record, seen.database)
        return plan

    def _schedule(self, record: Rollout, planned: ShadowDeployment, analyse: bool, plan: Plan) -> None:
        """The next analysis: an interval after this one. After a (re)start or a transition, an interval after
        status.lastDecision.time, when the decision last changed (a restart is invisible); when that is an
        interval or more ago (an idle rollout decides the same again and keeps the time), at a random moment
        within the next interval, so that many objects taken over together do not all query the database at once."""
        interval = planned.spec.analysis.interval_seconds
        if analyse or record.analysis_due is None or plan.transition is not None:
            last = planned.status.last_decision
            waited = 0.0 if analyse or last is None else (self.clock() - last.time).total_seconds()
            left = interval - waited if waited < interval else random.uniform(0.0, interval)
            record.analysis_due = time.monotonic() + left

    def _warnings(self, plan: Plan, seen: Observed, denials: Denials) -> list[Notice]:
        warnings = [notice for notice in plan.notices if notice.reason in UNANNOUNCED]
        problem = seen.data_problem
        if problem is not None and problem not in denials.messages():
            warnings.append(Notice("Warning", "DatabaseUnavailable", problem))
        return warnings + denials.warnings()

    async def _between(self, record: Rollout) -> None:
        """Between reconciles: history rows that wait for the database, and the running sums of a busy
        window brought up to date (so the read an analysis waits for covers seconds, not an interval)."""
        async with record.lock:
            if record.dsn is None or (not record.rows.waiting and record.analysis is None):
                return
            try:
                database = await self.databases.get(record.dsn)
                if record.rows.waiting:
                    await self._flush(record, database)
                if record.analysis is not None and record.catch_up_delay() is not None:
                    await database.refresh(record.analysis)
            except UNREACHABLE as exc:
                logger.debug("%s/%s: database not reached between analyses: %s", *record.key, exc)

    async def _flush(self, record: Rollout, database: Database) -> None:
        try:
            queued = await record.rows.flush(database.write)
            if queued and self.notifier is not None:
                self.notifier.wake()
        except DATABASE_AWAY as exc:
            logger.warning("%s/%s: %d rows wait for the database: %s", *record.key, record.rows.waiting, describe(exc))

    async def _apply(self, record: Rollout, child: Manifest, denials: Denials) -> None:
        """Server-side apply one child; a refusal (by RBAC, or of the object itself) is noted and the next
        child still applied."""
        try:
            await self.kube.apply(child)
        except KubeError as exc:
            if exc.permission_denied:
                denials.applies.append(self.observer.permission_problem(exc))
            elif exc.status in REFUSALS:
                denials.refused.append(f"The API server refused {exc.what}: {exc.reason}")
            else:
                raise
            return
        record.applied_ok(child)
