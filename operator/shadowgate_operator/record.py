"""Everything the operator keeps about one ShadowDeployment, in one record.

A `Rollout` is created when the operator first sees the object and dropped, whole, when the object
goes: nothing about it lives anywhere else (no parallel maps keyed by name to forget in step). It
holds what the last reconcile observed and did, so the next one can skip what has not changed: the
object as last seen (watch events and the operator's own writes keep it current), the router
Deployment's availability (from its watch), the DSN and the database's spec row, a hash of each child
as last applied, when the next analysis and the next resync are due, the analysis window's running
sums, the API calls RBAC refused, the warnings already given, and history rows waiting for the database.

The record is a cache: losing it (a restart, a takeover) costs one full reconcile, never a decision.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from shadowgate_operator.analysis.sql import options_of
from shadowgate_operator.analysis.window import CATCH_UP_SECONDS, WindowAnalysis
from shadowgate_operator.api import Phase, ShadowDeployment, ShadowDeploymentStatus
from shadowgate_operator.builders import Manifest, router_inputs
from shadowgate_operator.decision import evidence_since
from shadowgate_operator.gates.call import Remembered
from shadowgate_operator.rollout import Blocked, Notice, RouterState
from shadowgate_operator.store import Rows

RESYNC_SECONDS = 600.0
"""How often every child is read and compared with what is built, and the DSN Secret read again: a child
deleted or edited by hand is applied again (builders.in_place), the others are not written."""


def digest(manifest: Manifest) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def child_key(manifest: Manifest) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


@dataclass
class Denials:
    """What kept one reconcile from doing all it meant to: API calls refused for lack of rights, each as
    a message naming what to grant, and the router's other blockers (`Blocked`)."""

    reads: list[str] = field(default_factory=list)
    """The DSN Secret, the router Deployment: known before planning."""
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

    def warnings(self) -> list[Notice]:
        """A Warning for each: said once while its cause stays (Rollout.say_once)."""
        return [
            *(Notice("Warning", "PermissionDenied", message) for message in self.all()),
            *(Notice("Warning", blocked.reason, blocked.message) for blocked in self.invalid),
            *(Notice("Warning", "RouterRefused", refusal) for refusal in self.refused),
        ]


@dataclass
class Rollout:
    namespace: str
    name: str
    body: dict[str, Any] | None = None
    """The object as last seen: from a watch event or the answer to the operator's own status write."""
    status: ShadowDeploymentStatus | None = None
    """The status as last written or read (the exporter's series are read from here)."""
    router: RouterState | None = None
    """The router Deployment as its watch last reported it (None: not seen yet)."""
    dsn: str | None = None
    recorded_generation: int | None = None
    """The generation whose spec is in the database's shadow_deployments."""
    applied: dict[str, str] = field(default_factory=dict)
    """Child (kind/name) -> digest of what was last applied."""
    built: tuple[tuple[Any, ...], list[tuple[str, str]]] | None = None
    """What the children were last built from (builders.router_inputs), and each one's kind/name and digest."""
    parsed: tuple[dict[str, Any], ShadowDeployment] | None = None
    """`body` as last validated (see shadow_deployment)."""
    resync_seconds: float = RESYNC_SECONDS
    resync_at: float = field(init=False)
    """time.monotonic() of the next resync. The first falls at a random point within one period after the
    record is made (the object first seen), the next ones a period apart (resync_if_due): objects created
    together (a batch applied at once, or every object at an operator's start) would otherwise resync
    together, a burst of reads once a period instead of an even trickle (bench/operator: 1,000 objects
    created within 90 s, each resyncing 480-720 s after creation, took 26% of a core while those lasted)."""
    check_children: bool = False
    """Set at a resync: the next reconcile reads each child and applies those not in place."""
    analysis_due: float | None = None
    """time.monotonic() of the next analysis; None until the first reconcile sets it."""
    analysis: WindowAnalysis | None = None
    denied: Denials = field(default_factory=Denials)
    warned: dict[str, set[str]] = field(default_factory=dict)
    """Reason -> messages of the warnings said while their cause stays (said again after it went)."""
    published: int = 0
    """The latest transition (status.lastTransition.sequence) whose Events and rows were handed out."""
    rows: Rows = field(default_factory=Rows)
    gate_replies: dict[str, Remembered] = field(default_factory=dict)
    """Gate name -> its latest reply (spec.gates), reused within an analysis interval."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when something happened that the loop of this object should act on now."""

    def __post_init__(self) -> None:
        self.resync_at = time.monotonic() + random.uniform(0.0, self.resync_seconds)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def rows_waiting(self) -> int:
        return self.rows.waiting

    def window(self, sd: ShadowDeployment) -> WindowAnalysis | None:
        """The analysis windows of `sd` (analysis.window.WindowAnalysis): the evidence window (decision.evidence_since:
        the analysis's start in shadow mode, the step's in canary mode) and the current step's. A new
        metric, mode, options (analysis.sql.options_of) or evidence start is a new WindowAnalysis; a new shadow
        step moves its step window only. None when `sd` is not progressing."""
        status = sd.status
        step_since = status.step_started_at or status.analysis_started_at
        if status.phase is not Phase.PROGRESSING or step_since is None:
            return None
        since = evidence_since(sd.spec, status) or step_since
        metric, mode, options = sd.spec.analysis.metric, sd.spec.traffic.mode, options_of(sd.spec)
        window = self.analysis
        if window is None or (window.since, window.metric, window.mode, window.options) != (
            since,
            metric,
            mode,
            options,
        ):
            window = self.analysis = WindowAnalysis(
                sd.namespace, sd.name, metric, mode, since, options=options, step_since=step_since
            )
        else:
            window.move_step(step_since)
        return window

    def catch_up_delay(self) -> float | None:
        """When the window's sums should next be brought up to date between analyses: soon after the step
        starts, then at the pace its arrivals set (WindowAnalysis.catch_up_seconds); never while it is idle
        (its last read found nothing new): the analysis reads what comes then."""
        window = self.analysis
        if window is None or (self.status is not None and self.status.phase is not Phase.PROGRESSING):
            return None
        if window.runs == 0:
            return CATCH_UP_SECONDS
        return window.catch_up_seconds() if window.last_rows > 0 else None

    def shadow_deployment(self) -> ShadowDeployment:
        """The body held, validated once per body: an idle object's body stays the same between analyses, and
        validating it (its CEL rules run in Python) was a sixth of an analysis's CPU. Raises ValidationError."""
        assert self.body is not None
        if self.parsed is None or self.parsed[0] is not self.body:
            self.parsed = (self.body, ShadowDeployment.model_validate(self.body))
        return self.parsed[1]

    def resync_if_due(self) -> None:
        """At the resync time, forget the DSN (the Secret is read again) and have the children checked: each
        read and compared with what is built, and applied only when missing or not as built."""
        now = time.monotonic()
        if now >= self.resync_at:
            self.check_children = True
            self.dsn = None
            # A period after it was due, not after now: each object keeps its phase. Resyncs held up together
            # (due while their objects' first reconciles waited for their applies, bench/operator) would
            # otherwise all move to where that wait ended, and bunch there again every period.
            self.resync_at += ((now - self.resync_at) // self.resync_seconds + 1) * self.resync_seconds

    def needs_apply(self, sd: ShadowDeployment, build: Callable[[], list[Manifest]]) -> list[Manifest]:
        """The children of `sd` (`build()`) whose manifest differs from what was last applied. Built and hashed
        only when what they are built from changed (builders.router_inputs) or one of them is not applied as
        built (refused, or forgotten at a start or a takeover): building them was a fifth of an idle analysis's CPU."""
        inputs = router_inputs(sd)
        built = self.built
        if built is not None and built[0] == inputs and all(self.applied.get(k) == h for k, h in built[1]):
            return []
        children = build()
        self.built = (inputs, [(child_key(child), digest(child)) for child in children])
        return [child for child, (key, hashed) in zip(children, self.built[1], strict=True)
                if self.applied.get(key) != hashed]  # fmt: skip

    def applied_ok(self, child: Manifest) -> None:
        self.applied[child_key(child)] = digest(child)

    def say_once(self, warnings: list[Notice], observed: AbstractSet[str]) -> list[Notice]:
        """Of these warnings (whose causes are present now), those not said yet. For each reason in
        `observed` (whose causes this reconcile looked at), said warnings whose cause went are forgotten,
        so that they are said again if it comes back."""
        new = [w for w in warnings if w.message not in self.warned.get(w.reason, set())]
        for reason in observed:
            self.warned[reason] = {w.message for w in warnings if w.reason == reason}
        for warning in new:
            self.warned.setdefault(warning.reason, set()).add(warning.message)
        return new

    def seen(self, body: dict[str, Any]) -> bool:
        """Keep the newer of `body` and the body held; True when the spec, the manual action, the deletion
        state or the finalizers changed, i.e. the loop should act now rather than at its next due time."""
        if self.body is not None and _older(body, self.body):
            return False
        before = self.body
        self.body = body
        if before is None:
            return True
        return any(
            _pick(before, path) != _pick(body, path)
            for path in (
                ("metadata", "generation"),
                ("metadata", "annotations", "shadowgate.io/action"),
                ("metadata", "deletionTimestamp"),
                ("metadata", "finalizers"),
            )
        )

    def settled(self, finalizer: str) -> bool:
        """Whether the body held carries `finalizer` (or is gone, or going): a status written from it then
        meets no conflict with the write that adds the finalizer."""
        meta = (self.body or {}).get("metadata") or {}
        return self.body is None or bool(meta.get("deletionTimestamp")) or finalizer in (meta.get("finalizers") or ())

    def next_delay(self, catch_up: float | None) -> float:
        """Seconds until the loop should run again: the next analysis (or catch-up) when progressing,
        the next resync otherwise."""
        now = time.monotonic()
        due = self.resync_at
        phase = self.status.phase_or_pending if self.status is not None else Phase.PENDING
        held = phase is Phase.PENDING and self.status is not None and self.status.gate is not None
        if (phase is Phase.PROGRESSING or held) and self.analysis_due is not None:  # held: its gates asked again
            due = min(due, self.analysis_due)
            if catch_up is not None:
                due = min(due, now + catch_up)
        return max(0.5, due - now)


def _older(candidate: dict[str, Any], held: dict[str, Any]) -> bool:
    """Whether `candidate` is an older version than `held` (etcd's resourceVersions are increasing integers;
    anything else is taken as newer, and a stale status write then fails with 409 and is planned again)."""
    new, old = _pick(candidate, ("metadata", "resourceVersion")), _pick(held, ("metadata", "resourceVersion"))
    if isinstance(new, str) and isinstance(old, str) and new.isdigit() and old.isdigit():
        return int(new) < int(old)
    return False


def _pick(body: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = body
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


@dataclass
class Rollouts:
    """The records of every ShadowDeployment this operator has seen, by (namespace, name)."""

    resync_seconds: float = RESYNC_SECONDS
    """The records' resync period (Rollout.resync_at)."""
    _records: dict[tuple[str, str], Rollout] = field(default_factory=dict)

    def get(self, namespace: str, name: str) -> Rollout:
        record = self._records.get((namespace, name))
        if record is None:
            record = self._records[namespace, name] = Rollout(namespace, name, resync_seconds=self.resync_seconds)
        return record

    def find(self, namespace: str, name: str) -> Rollout | None:
        return self._records.get((namespace, name))

    def drop(self, namespace: str, name: str) -> Rollout | None:
        return self._records.pop((namespace, name), None)

    def seen(self, body: dict[str, Any], deleted: bool = False) -> None:
        """A watch event of a ShadowDeployment: its record follows it (and goes with it), and its loop is
        woken when the spec, the manual verb or the deletion state changed."""
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        if deleted:
            self.drop(namespace, name)
        elif self.get(namespace, name).seen(body):
            self.get(namespace, name).wake.set()

    def router_seen(self, deployment: dict[str, Any]) -> None:
        """A watch event of a router Deployment: Ready follows its availability (the loop is woken)."""
        meta = deployment.get("metadata") or {}
        record = self.find(meta.get("namespace", ""), (meta.get("labels") or {}).get("app.kubernetes.io/instance", ""))
        if record is None:
            return
        state = RouterState.from_deployment(deployment)
        if state != record.router:
            record.router = state
            record.wake.set()

    def __iter__(self) -> Iterator[Rollout]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)
