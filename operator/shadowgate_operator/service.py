"""Reconcile one ShadowDeployment: read it, measure, plan, write status, apply the router's objects, record.

The Reconciler is the only place where the pure parts (rollout plan, decision, builders) meet the
Kubernetes API and the database. Calls for one object are serialised by a lock, and each starts from a
fresh read of the object, so a change handler and the analysis loop never act on a stale status.

Order matters for restarts: the planned status is written first (it is the record of what was
decided), then the router's objects are made to follow it, then Events and rows are recorded. An
operator killed in between finds the decision in status and completes it; it never decides twice.

An API call refused for lack of rights (RBAC) does not stop the reconcile: the other children are
still applied (a rollback's weight reaches the router even when, say, Deployments are refused), Ready
becomes False with reason PermissionDenied naming the call and the ClusterRole to fix, a Warning Event
says the same once, and the next reconcile tries again. A child the API server refuses for what it is
(RouterRefused: invalid, or turned away by an admission policy or a quota), a database Secret that
holds no DSN (InvalidDatabaseSecret) and a router image the operator does not allow
(RouterImageNotAllowed) are reported the same way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from pydantic import ValidationError

from shadowgate_operator.api import Metric, Phase, ShadowDeployment, TrafficMode
from shadowgate_operator.builders import Manifest, OperatorSettings, router_objects
from shadowgate_operator.exporter import OperatorMetrics
from shadowgate_operator.kube import Kube, KubeError
from shadowgate_operator.metrics import WindowMetrics
from shadowgate_operator.queries import WindowAnalyses
from shadowgate_operator.rollout import Blocked, Notice, Plan, RouterState, plan_rollout
from shadowgate_operator.store import (
    DSN_FORM,
    Databases,
    DatabaseUnavailable,
    EventRow,
    MetricsRow,
    Outbox,
    dsn_problem,
    record_spec,
)

logger = logging.getLogger(__name__)

Key = tuple[str, str]
CONFLICT_RETRIES = 5
# Warnings that repeat while their cause stays: recorded once per distinct message and object.
_ONCE = frozenset(
    {"InvalidAction", "DatabaseUnavailable", "PermissionDenied", "RouterRefused", "InvalidDatabaseSecret",
     "RouterImageNotAllowed"}
)  # fmt: skip
# The API server refuses the object itself (400 bad request, 403 from an admission policy or a quota,
# 422 invalid): retrying the same apply cannot help, a person must change something.
_REFUSALS = frozenset({400, 403, 422})


def utcnow() -> dt.datetime:
    # Whole seconds: status timestamps are RFC 3339 without fractions, so a re-read compares equal.
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class _Denials:
    """What kept one reconcile from doing all it meant to: API calls refused for lack of rights, each as
    a message naming what to grant, and the router's other blockers (`Blocked`)."""

    reads: list[str] = field(default_factory=list)
    """The DSN Secret, the router Deployment's state: known before planning."""
    applies: list[str] = field(default_factory=list)
    """Children that could not be applied: known only after the status is written."""
    refused: list[str] = field(default_factory=list)
    """Children the API server refused for what they are (not for rights): known after the status write."""
    invalid: list[Blocked] = field(default_factory=list)
    """What the spec names that the operator will not use (a Secret without a DSN, an image not allowed)."""

    def all(self) -> list[str]:
        return [*self.reads, *self.applies]

    def problem(self) -> str | None:
        return " ".join(self.all()) or None

    def blocked(self) -> Blocked | None:
        """For Ready: the spec's problems first (a person must change it), then the refused children."""
        if self.invalid:
            return Blocked(self.invalid[0].reason, " ".join(blocked.message for blocked in self.invalid))
        if self.refused:
            return Blocked("RouterRefused", " ".join(self.refused))
        return None

    def messages(self) -> list[str]:
        return [*self.all(), *self.refused, *(blocked.message for blocked in self.invalid)]


@dataclass(frozen=True)
class _Window:
    """Where a progressing deployment's sums are read from, and which window they are for."""

    pool: asyncpg.Pool
    metric: Metric
    mode: TrafficMode
    since: dt.datetime
    fallback: bool


@dataclass
class Reconciler:
    kube: Kube
    settings: OperatorSettings
    databases: Databases = field(default_factory=Databases)
    analyses: WindowAnalyses = field(default_factory=WindowAnalyses)
    clock: Callable[[], dt.datetime] = utcnow
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    _locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    _next_analysis: dict[Key, float] = field(default_factory=dict)
    _recorded_generation: dict[Key, int] = field(default_factory=dict)
    _warned: set[tuple[str, str]] = field(default_factory=set)
    _denied: dict[Key, _Denials] = field(default_factory=dict)
    _progressing: dict[Key, _Window] = field(default_factory=dict)
    outbox: Outbox = field(default_factory=Outbox)

    async def close(self) -> None:
        await self.databases.close()
        await self.kube.close()

    async def analyse_if_due(self, namespace: str, name: str) -> float:
        """Run the analysis when this object's interval has passed since the last one.

        Returns the seconds until the next analysis is due.
        """
        key = (namespace, name)
        if time.monotonic() >= self._next_analysis.get(key, 0.0):
            await self.reconcile(namespace, name, analyse=True)
        else:
            await self.catch_up(namespace, name)
        due = self._next_analysis.get(key, time.monotonic() + 5.0) - time.monotonic()
        if key in self._progressing:
            # Catch the sums up in between: the analysis then reads seconds of arrivals, not an interval's.
            due = min(due, self.analyses.catch_up_seconds(namespace, name))
        return max(0.5, due)

    async def catch_up(self, namespace: str, name: str) -> None:
        """Bring a progressing deployment's running sums up to what was recorded (no decision, no writes
        but the saved sums). Errors are left for the next analysis to report."""
        key = (namespace, name)
        async with self._locks.setdefault(key, asyncio.Lock()):
            window = self._progressing.get(key)
            if window is None:
                return
            try:
                async with window.pool.acquire() as connection:
                    await self.analyses.window_metrics(
                        connection, namespace, name, window.metric, window.mode, window.since, fallback=window.fallback
                    )
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                logger.debug("%s/%s: sums not caught up: %s", namespace, name, exc)
                return
            if self.outbox.waiting(key):
                await self._write_rows(window.pool, key)

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
            for memory in (
                self._locks,
                self._next_analysis,
                self._recorded_generation,
                self._denied,
                self._progressing,
            ):
                memory.pop(key, None)
            self.analyses.forget(namespace, name)
            self.metrics.forget(namespace, name)
            self.outbox.forget(key)
            return None
        try:
            sd = ShadowDeployment.model_validate(body)
        except ValidationError as exc:
            # Admission validation makes this rare (e.g. an object stored before a CRD upgrade).
            logger.error("ShadowDeployment %s/%s is invalid, not reconciled: %s", namespace, name, exc)
            return None
        now = self.clock()
        if analyse and key not in self._next_analysis:
            analyse = self._first_analysis_due(key, sd, now)
        earlier = self._denied.get(key, _Denials())
        denials = _Denials()  # what this reconcile is refused, read by read
        pool, data_problem = await self._database(sd, denials)
        window = None
        if analyse and pool is not None and sd.status.phase is Phase.PROGRESSING:
            window, data_problem = await self._measure(pool, sd, now)
        router = await self._router_state(sd, denials)
        image_problem = self.settings.image_problem(sd)
        if image_problem is not None:
            denials.invalid.append(Blocked("RouterImageNotAllowed", image_problem))
        # Applying comes after the status write: expect the refusals the last apply met.
        expected = _Denials(
            reads=denials.reads, applies=earlier.applies, refused=earlier.refused, invalid=denials.invalid
        )
        plan = plan_rollout(
            sd, now, analyse=analyse, router=router, metrics=window, data_problem=data_problem,
            permission_problem=expected.problem(), blocked=expected.blocked(),
        )  # fmt: skip
        body = await self._write_status(body, sd, plan)
        planned = sd.model_copy(update={"status": plan.status})
        for child in router_objects(planned, self.settings):
            if image_problem is None or child["kind"] != "Deployment":  # the router keeps the image it has
                await self._apply(child, denials)
        if (denials.problem(), denials.blocked()) != (expected.problem(), expected.blocked()):
            # Ready must say so now, not one interval later: plan again (pure; only Ready can differ).
            again = plan_rollout(
                planned, now, router=router, permission_problem=denials.problem(), blocked=denials.blocked()
            )
            body = await self._write_status(body, planned, again)
            planned = planned.model_copy(update={"status": again.status})
        self._remember_denials(key, body["metadata"]["uid"], earlier, denials)
        if analyse:
            self._next_analysis[key] = time.monotonic() + sd.spec.analysis.interval_seconds
        started = planned.status.step_started_at or planned.status.analysis_started_at
        if pool is not None and started is not None and planned.status.phase is Phase.PROGRESSING:
            spec = planned.spec
            self._progressing[key] = _Window(
                pool, spec.analysis.metric, spec.traffic.mode, started, spec.traffic.fallback_to_production
            )
        else:
            self._progressing.pop(key, None)
        notices = list(plan.notices)
        if data_problem is not None and data_problem not in denials.messages():
            notices.append(Notice("Warning", "DatabaseUnavailable", data_problem))
        notices += [Notice("Warning", "PermissionDenied", problem) for problem in denials.all()]
        notices += [Notice("Warning", blocked.reason, blocked.message) for blocked in denials.invalid]
        notices += [Notice("Warning", "RouterRefused", refusal) for refusal in denials.refused]
        self.metrics.observe(namespace, name, planned.status)
        await self._record(body, planned, notices)
        if window is not None:
            self._record_analysis(sd, plan, now)
        if pool is not None:
            await self._write_rows(pool, key)
        return plan

    def _first_analysis_due(self, key: Key, sd: ShadowDeployment, now: dt.datetime) -> bool:
        """After a (re)start, keep the interval since the last decision in status instead of analysing
        at once: a restart is invisible, and many resources do not all query the database together."""
        last = sd.status.last_decision
        interval = sd.spec.analysis.interval_seconds
        waited = (now - last.time).total_seconds() if last is not None else interval
        if waited >= interval:
            return True
        self._next_analysis[key] = time.monotonic() + interval - waited
        return False

    def _permission_problem(self, exc: KubeError) -> str:
        """What was refused and who can fix it, in words: the Ready condition's message and the Event's."""
        self.metrics.permission_denied.labels(exc.verb, exc.what.partition(" ")[0]).inc()
        return (
            f"The operator may not {exc.verb} {exc.what}: {exc.reason}. "
            f"Grant it in the ClusterRole {self.settings.cluster_role} (manifests/base/rbac.yaml)."
        )

    async def _apply(self, child: Manifest, denials: _Denials) -> None:
        """Server-side apply one child; a refusal (by RBAC, or of the object itself) is noted and the next
        child still applied."""
        try:
            await self.kube.apply(child)
        except KubeError as exc:
            if exc.permission_denied:
                denials.applies.append(self._permission_problem(exc))
            elif exc.status in _REFUSALS:
                denials.refused.append(f"The API server refused {exc.what}: {exc.reason}")
            else:
                raise

    def _remember_denials(self, key: Key, uid: str, earlier: _Denials, now: _Denials) -> None:
        if now.messages():
            self._denied[key] = now
        else:
            self._denied.pop(key, None)
        for resolved in set(earlier.messages()) - set(now.messages()):
            self._warned.discard((uid, resolved))  # refused again later: say so again

    async def _database(self, sd: ShadowDeployment, denials: _Denials) -> tuple[asyncpg.Pool | None, str | None]:
        """The pool for this resource's database, or why there is none."""
        reference = sd.spec.database.secret_ref
        try:
            dsn = await self.kube.get_secret_value(sd.namespace, reference.name, reference.key)
        except KubeError as exc:
            if exc.permission_denied:
                problem = self._permission_problem(exc)
                denials.reads.append(problem)
                return None, problem
            return None, f"cannot read Secret {reference.name}: {exc.reason}"
        if dsn is None:
            return (
                None,
                f"Secret {sd.namespace}/{reference.name} has no key {reference.key!r} (spec.database.secretRef)",
            )
        unusable = dsn_problem(dsn)
        if unusable is not None:
            message = (
                f"Secret {sd.namespace}/{reference.name} key {reference.key!r} (spec.database.secretRef) "
                f"does not hold a PostgreSQL DSN: {unusable}. Expected {DSN_FORM}."
            )
            denials.invalid.append(Blocked("InvalidDatabaseSecret", message))
            return None, message
        try:
            pool = await self.databases.pool(dsn)
        except DatabaseUnavailable as exc:
            return None, str(exc)
        key = (sd.namespace, sd.name)
        generation = sd.metadata.generation or 0
        if self._recorded_generation.get(key) != generation:
            try:
                spec = sd.spec.to_dict()
                await record_spec(pool, sd.namespace, sd.name, generation, sd.spec.candidate_revision(), spec)
                self._recorded_generation[key] = generation
            except (OSError, asyncpg.PostgresError) as exc:
                return None, f"cannot write to the database: {exc}"
        return pool, None

    async def _measure(
        self, pool: asyncpg.Pool, sd: ShadowDeployment, now: dt.datetime
    ) -> tuple[WindowMetrics | None, str | None]:
        """The current step's window, read incrementally (only rows recorded since the last analysis)."""
        since = sd.status.step_started_at or sd.status.analysis_started_at or now
        try:
            async with pool.acquire() as connection:
                window = await self.analyses.window_metrics(
                    connection,
                    sd.namespace,
                    sd.name,
                    sd.spec.analysis.metric,
                    sd.spec.traffic.mode,
                    since,
                    fallback=sd.spec.traffic.fallback_to_production,
                )
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            return None, f"cannot query the database: {type(exc).__name__}: {exc}"
        return window, None

    async def _router_state(self, sd: ShadowDeployment, denials: _Denials) -> RouterState | None:
        try:
            deployment = await self.kube.get("apps/v1", "Deployment", sd.namespace, sd.router_name)
        except KubeError as exc:
            if not exc.permission_denied:
                raise
            denials.reads.append(self._permission_problem(exc))
            return None
        if deployment is None:
            return None
        status = deployment.get("status") or {}
        return RouterState(
            available_replicas=int(status.get("availableReplicas") or 0),
            desired_replicas=int((deployment.get("spec") or {}).get("replicas") or 0),
        )

    async def _write_status(self, body: dict[str, Any], sd: ShadowDeployment, plan: Plan) -> dict[str, Any]:
        """The object as stored after writing the planned status (`body` itself when nothing changed)."""
        new_status = plan.status.to_dict()
        if new_status == sd.status.to_dict():
            return body  # nothing changed: no write, no churn
        return await self.kube.replace_status({**body, "status": new_status})

    async def _write_rows(self, pool: asyncpg.Pool, key: Key) -> None:
        """deployment_events and deployment_metrics rows of this reconcile and of earlier ones that found
        the database away (the Outbox keeps them until it is back)."""
        try:
            await self.outbox.flush(pool, key)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            logger.warning("%s/%s: %d rows wait for the database: %s", *key, self.outbox.waiting(key), exc)

    def _record_analysis(self, sd: ShadowDeployment, plan: Plan, now: dt.datetime) -> None:
        """One deployment_metrics row per analysis: the step it judged and what it decided (written by
        `_write_rows`)."""
        measured, decision = plan.status.metrics, plan.status.last_decision
        if decision is None:
            return
        row = MetricsRow(
            time=now,
            namespace=sd.namespace,
            deployment=sd.name,
            step=sd.status.current_step or 0,
            weight=sd.status.current_weight or 0,
            samples=plan.judged_samples if plan.judged_samples is not None else plan.status.samples or 0,
            metric=sd.spec.analysis.metric.value,
            production_value=measured.production.metric_value if measured and measured.production else None,
            candidate_value=measured.candidate.metric_value if measured and measured.candidate else None,
            improvement=measured.improvement if measured else None,
            overall_score=measured.overall_score if measured else None,
            p_value=measured.p_value if measured else None,
            decision=decision.action.value,
            reason=decision.reason,
            metrics=measured.to_dict() if measured else None,
        )
        self.outbox.add((sd.namespace, sd.name), metrics=[row])

    async def _record(self, body: dict[str, Any], sd: ShadowDeployment, notices: list[Notice]) -> None:
        """Kubernetes Events and deployment_events rows for what this reconcile did."""
        uid = body["metadata"]["uid"]
        now = self.clock()
        rows: list[EventRow] = []
        for notice in notices:
            if notice.reason in _ONCE:
                # The cause stays until someone fixes it: say it once per message, not every interval.
                if (uid, notice.message) in self._warned:
                    continue
                self._warned.add((uid, notice.message))
            self.metrics.events.labels(notice.type, notice.reason).inc()
            try:
                await self.kube.post_event(body, notice.type, notice.reason, notice.message, now)
            except KubeError as exc:  # an Event is worth a log line, not a failed reconcile
                logger.warning("could not record Event %s: %s", notice.reason, exc)
            status = sd.status
            rows.append(
                # Full precision (not the status clock's seconds): rows of one reconcile keep their order.
                EventRow(dt.datetime.now(dt.UTC), sd.namespace, sd.name, notice.reason, status.phase_or_pending.value,
                         status.current_step, status.current_weight, notice.message)
            )  # fmt: skip
        self.outbox.add((sd.namespace, sd.name), events=rows)
