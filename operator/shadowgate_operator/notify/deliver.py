"""The delivery worker: posts queued notifications, at least once, with retries and backoff.

One `Deliverer` per operator serves the queue of every database it is told about (`watch`). It keeps up to
`concurrency` posts in flight, each in a task of its own, at most one per receiver (the queue hands out a
receiver's messages in order, one at a time): a receiver that hangs holds one slot for at most the
request timeout and delays only its own messages, never the others', and never the Reconciler, which
only inserts rows. Each attempt:

1. reads the receiver's URL from its Secret (so a rotated URL is used at once, and no URL is stored), only
   if the Secret is labelled shadowgate.io/router-secret=true like every Secret a ShadowDeployment names
   (builders.secret_problem): naming a Secret takes the right to create a ShadowDeployment, labelling it the
   right to write Secrets, so an unlabelled one is neither posted to nor quoted in an error; retried, as
   labelling it makes it usable;
2. posts the queued body as is (same id on every attempt);
3. 2xx: delivered. An answer that says this body can never be taken (a redirect, 400, 405, 410, 413, 415,
   422) or a URL the operator will not post to: abandoned at once. Anything else (5xx, 429, 401, 403,
   404, a timeout, a refused connection, a Secret not there yet): due again after a backoff (doubling
   from `first_delay` to `max_delay`, with jitter; at least what a Retry-After asks, within `max_delay`),
   until the message is `give_up_after` old. 401, 403 and 404 are retried because the URL is read again
   at each attempt: a Slack webhook revoked and replaced in the Secret works from the next attempt on.

A registry write-back (channel mlflow) goes the same way: its credentials are read from their Secret at
each attempt, and registry.mlflow.MlflowRegistry makes the (idempotent) calls; a refusal that cannot
change (a model or version not in the registry, a bad alias) is given up on, anything else retried.

Every failed attempt and every abandoned message is counted in the operator's metrics (`DeliveryMetrics`)
and logged with the receiver's answer. A receiver whose message failed `FAILING_AFTER` attempts in a row,
or was abandoned, is `failing` until one of its messages is delivered: the Reconciler shows it as a
Warning Event and the NotificationsDelivered condition of the ShadowDeployment (`changed` wakes it).
A worker that stops (or dies) with messages claimed leaves them to the next one when their lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from shadowgate_common.aio import wait_event
from shadowgate_operator.api import url_problems
from shadowgate_operator.builders import HELD_NOTIFICATIONS, URL_SECRET_FIELD, secret_problem
from shadowgate_operator.kube import secret_value
from shadowgate_operator.notify.messages import Channel, Outgoing
from shadowgate_operator.notify.queue import Claimed, NotificationQueue
from shadowgate_operator.registry import ModelVersionRef, Outcome
from shadowgate_operator.registry.mlflow import MlflowRegistry, RegistryError

logger = logging.getLogger(__name__)

USER_AGENT = "shadowgate-notifier/1"
KEEP_FINISHED = dt.timedelta(days=7)
"""Delivered and abandoned rows are kept this long: the record of what was said to whom."""
REFUSED_FOR_GOOD = frozenset({400, 405, 410, 413, 415, 422})
"""Answers that mean the same body will never be taken, wherever the URL points."""
REGISTRY_SECRET_FIELD = "spec.registry.mlflow.credentialsSecretRef"
HELD_REGISTRY = (
    "the operator reads only the Secrets labelled for it, and writes nothing back to the registry until then"
)
FAILING_AFTER = 3
"""Failed attempts in a row after which a receiver is reported failing (a Warning and a condition)."""


@dataclass(frozen=True)
class Failing:
    """A receiver whose deliveries keep failing: what its first failing attempt met, and when."""

    receiver: str
    detail: str
    since: dt.datetime


class SecretReader(Protocol):
    """Where receivers' URLs are read (kube.Kube): the Secret as the API server has it, None if there is none."""

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class RetryPolicy:
    first_delay: float = 2.0
    """Seconds before the second attempt; each later wait doubles."""
    max_delay: float = 300.0
    """Longest wait between two attempts."""
    give_up_after: float = 24 * 3600.0
    """A message this many seconds old is abandoned after its next failure."""
    timeout: float = 10.0
    """Seconds an attempt may take (connect, send, answer)."""
    lease: float = 60.0
    """Seconds a claimed message is held by its worker before another may take it (> timeout)."""

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """The wait after the `attempts`-th failed attempt: half the doubled delay plus a random half
        (so many messages failing together do not come back together), at least `retry_after`."""
        ceiling = min(self.max_delay, self.first_delay * 2.0 ** max(0, attempts - 1))
        wait = ceiling / 2 + random.uniform(0, ceiling / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait


class DeliveryMetrics:
    """The notification series of the operator's /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.delivered = Counter(
            "shadowgate_notifications_delivered",
            "Notifications a receiver accepted (2xx), by format (cloudevents, slack; mlflow: registry write-backs).",
            ["format"],
            registry=registry,
        )
        self.failures = Counter(
            "shadowgate_notification_failures",
            "Delivery attempts that failed, by format (cloudevents, slack, mlflow: a registry write-back) and cause "
            "(http_5xx, http_4xx, http_429, timeout, connect, http_3xx, transport, no_url, bad_url, "
            "secret_not_allowed, registry); most are retried.",
            ["format", "cause"],
            registry=registry,
        )
        self.abandoned = Counter(
            "shadowgate_notifications_abandoned",
            "Notifications given up on (refused for good, or still failing after the retry period), by format "
            "and the last attempt's cause.",
            ["format", "cause"],
            registry=registry,
        )
        self.waiting = Gauge(
            "shadowgate_notifications_waiting",
            "Notifications queued and not delivered yet, in every database this operator uses.",
            registry=registry,
        )


@dataclass(frozen=True)
class Attempt:
    """How one attempt ended."""

    ok: bool
    cause: str = ""
    """For a failure: a short word for the metrics label."""
    detail: str = ""
    """For a failure: what happened, in words (the receiver's status and answer)."""
    retry: bool = True
    retry_after: float | None = None


def usable_url(url: str) -> str | None:
    """Why the operator will not post to `url`, None when it will: http(s), a host, no user:password@, not a
    link-local or metadata address (the same rules as model URLs; a query string is allowed here)."""
    parts = urlsplit(url)
    if parts.fragment:
        return "the URL has a #fragment"
    problems = url_problems(urlunsplit(parts._replace(query="")))
    return problems[0] if problems else None


@dataclass(frozen=True)
class SecretFault:
    """Why a Secret a ShadowDeployment names gave no usable value, in a word and in words (never a value)."""

    cause: str
    """unreadable (the API server away or refusing), missing, not_allowed (not labelled), no_key, bad_url."""
    words: str


async def labelled_secret(
    secrets: SecretReader, namespace: str, name: str, field: str, held: str
) -> dict[str, Any] | SecretFault:
    """The Secret `name`, named by the spec's `field`, when the operator may use it (labelled
    shadowgate.io/router-secret=true: builders.secret_problem, saying what is `held` until then)."""
    try:
        secret = await secrets.get("v1", "Secret", namespace, name)
    except Exception as exc:  # the API server away or refusing: worth another try, not a crash
        return SecretFault("unreadable", f"cannot read Secret {name}: {exc}")
    if secret is None:
        return SecretFault("missing", f"Secret {namespace}/{name} not found")
    refused = secret_problem(secret, field, held)
    return SecretFault("not_allowed", refused) if refused is not None else secret


async def url_from_secret(
    secrets: SecretReader, namespace: str, name: str, key: str, field: str, held: str
) -> str | SecretFault:
    """A webhook's URL from key `key` of its labelled Secret (read at each call: a rotated URL is used at
    once, none is stored), stripped, if the operator will post to it (`usable_url`)."""
    secret = await labelled_secret(secrets, namespace, name, field, held)
    if isinstance(secret, SecretFault):
        return secret
    url = (secret_value(secret, key) or "").strip()
    if not url:
        return SecretFault("no_key", f"Secret {name} has no key {key!r}")
    problem = usable_url(url)
    return SecretFault("bad_url", f"Secret {name} key {key}: {problem}") if problem is not None else url


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, (parsedate_to_datetime(value) - dt.datetime.now(dt.UTC)).total_seconds())
    return None


@dataclass
class Deliverer:
    secrets: SecretReader
    metrics: DeliveryMetrics
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    concurrency: int = 8
    poll_seconds: float = 1.0
    """How often due messages are looked for when nothing wakes the worker."""
    http: httpx.AsyncClient | None = None
    changed: Callable[[str, str], None] | None = None
    """Called with (namespace, name) when a receiver of that ShadowDeployment starts or stops failing."""
    namespaces: tuple[str, ...] | None = None
    """Deliver only the messages of ShadowDeployments in these namespaces (the ones this operator watches);
    None for all. Operators watching other namespaces may share a database, and their receivers' Secrets are
    theirs to read."""
    _failing: dict[tuple[str, str], dict[str, Failing]] = field(default_factory=dict)
    _queues: dict[int, NotificationQueue] = field(default_factory=dict)
    _inflight: set[asyncio.Task[None]] = field(default_factory=set)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _counted_at: float = 0.0
    _pruned_at: float = 0.0
    _own_http: bool = False

    def __post_init__(self) -> None:
        if self.http is None:
            self.http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.policy.timeout),
                limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
            self._own_http = True

    def watch(self, queue: NotificationQueue) -> None:
        """Deliver this queue's messages too (idempotent: one queue per pool)."""
        self._queues.setdefault(id(queue.pool), queue)
        self.wake()

    def failing(self, namespace: str, name: str) -> list[Failing]:
        """The receivers of this ShadowDeployment whose deliveries keep failing now, by name."""
        return sorted(self._failing.get((namespace, name), {}).values(), key=lambda failing: failing.receiver)

    def _health(self, claimed: Claimed, failed: str | None) -> None:
        """Follow a receiver's health after an attempt: `failed` is what went wrong, None when delivered."""
        message = claimed.message
        key = (message.namespace, message.deployment)
        receivers = self._failing.setdefault(key, {})
        if failed is None:
            if receivers.pop(message.receiver, None) is None:
                return
            if not receivers:
                del self._failing[key]
        elif message.receiver not in receivers:
            receivers[message.receiver] = Failing(message.receiver, failed, dt.datetime.now(dt.UTC))
        else:
            return
        if self.changed is not None:
            self.changed(*key)

    def wake(self) -> None:
        """Look for due messages now (e.g. after queueing some) rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled; never raises for a database or receiver that misbehaves."""
        while True:
            self._wake.clear()
            claimed = await self.claim_and_start()
            free = self.concurrency - len(self._inflight)
            if claimed and free > 0:
                continue  # there may be more due
            await wait_event(self._wake, self.poll_seconds)

    async def claim_and_start(self) -> int:
        """Claim as many due messages as there are free slots and start posting them; returns how many."""
        started = 0
        for queue in list(self._queues.values()):
            free = self.concurrency - len(self._inflight)
            if free <= 0:
                break
            try:
                claimed = await queue.claim(free, self.policy.lease, self.namespaces)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.warning("notifications: cannot read the queue now (%s); trying again", type(exc).__name__)
                continue
            for each in claimed:
                task = asyncio.create_task(self._attempt(queue, each))
                self._inflight.add(task)
                task.add_done_callback(self._finished)
            started += len(claimed)
        await self._housekeeping()
        return started

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("notifications: an attempt failed unexpectedly", exc_info=task.exception())
        self.wake()

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the posts in flight to finish."""
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=seconds)

    async def close(self, grace: float = 5.0) -> None:
        """Let the posts in flight finish within `grace` seconds, cancel the rest (their messages are due
        again when their lease ends), and close the HTTP client if this worker made it."""
        await self.drain(grace)
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.wait(list(self._inflight))
        if self._own_http and self.http is not None:
            await self.http.aclose()

    async def _housekeeping(self) -> None:
        """Every 15 s the waiting gauge; every hour, finished rows older than `KEEP_FINISHED` go."""
        now = time.monotonic()
        if now - self._counted_at < 15.0:
            return
        self._counted_at = now
        prune, total = now - self._pruned_at >= 3600.0, 0
        if prune:
            self._pruned_at = now
        for queue in list(self._queues.values()):
            with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                total += await queue.waiting()
                if prune:
                    await queue.prune(KEEP_FINISHED)
        self.metrics.waiting.set(total)

    async def _attempt(self, queue: NotificationQueue, claimed: Claimed) -> None:
        message = claimed.message
        outcome = await self._post(claimed)
        label = message.format.value
        where = f"{message.namespace}/{message.deployment} -> {message.receiver}"
        try:
            if outcome.ok:
                self.metrics.delivered.labels(label).inc()
                self._health(claimed, None)
                await queue.delivered(claimed)
                logger.info("notification %s delivered to %s (attempt %d)", message.id, where, claimed.attempts)
                return
            self.metrics.failures.labels(label, outcome.cause).inc()
            age = (dt.datetime.now(dt.UTC) - claimed.created_at).total_seconds()
            if not outcome.retry or age >= self.policy.give_up_after:
                self.metrics.abandoned.labels(label, outcome.cause).inc()
                self._health(claimed, f"a message was given up on: {outcome.detail}")
                await queue.abandon(claimed, outcome.detail)
                logger.error(
                    "notification %s to %s abandoned after %d attempts: %s", message.id, where, claimed.attempts,
                    outcome.detail,
                )  # fmt: skip
                return
            delay = self.policy.delay(claimed.attempts, outcome.retry_after)
            if claimed.attempts >= FAILING_AFTER:
                self._health(claimed, f"{claimed.attempts} attempts failed, retried with backoff: {outcome.detail}")
            await queue.retry(claimed, outcome.detail, delay)
            logger.warning(
                "notification %s to %s: attempt %d failed (%s); next in %.1fs", message.id, where, claimed.attempts,
                outcome.detail, delay,
            )  # fmt: skip
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The outcome is lost with the database; the lease ends and the message is attempted again.
            logger.warning("notification %s to %s: outcome not recorded (%s)", message.id, where, type(exc).__name__)

    async def _post(self, claimed: Claimed) -> Attempt:
        message = claimed.message
        if message.format is Channel.MLFLOW:
            return await self._write_back(message)
        url = await url_from_secret(
            self.secrets, message.namespace, message.url_secret, message.url_key, URL_SECRET_FIELD, HELD_NOTIFICATIONS
        )
        if isinstance(url, SecretFault):
            # Retried (a Secret made, labelled or filled later is used at the next attempt), but a URL the
            # operator will not post to.
            cause = {"not_allowed": "secret_not_allowed", "bad_url": "bad_url"}.get(url.cause, "no_url")
            return Attempt(False, cause, url.words, retry=url.cause != "bad_url")
        assert self.http is not None
        try:
            response = await self.http.post(url, content=message.envelope.body, headers=message.envelope.headers)
        except httpx.TimeoutException:
            return Attempt(False, "timeout", f"no answer within {self.policy.timeout:g}s")
        except httpx.ConnectError as exc:
            return Attempt(False, "connect", f"cannot connect: {exc}")
        except httpx.HTTPError as exc:
            return Attempt(False, "transport", f"{type(exc).__name__}: {exc}")
        status = response.status_code
        if 200 <= status < 300:
            return Attempt(True)
        answer = f"HTTP {status}: {response.text[:200]!r}"
        if status < 400 or status in REFUSED_FOR_GOOD:
            return Attempt(False, "http_3xx" if status < 400 else "http_4xx", answer, retry=False)
        cause = "http_5xx" if status >= 500 else "http_429" if status == 429 else "http_4xx"
        return Attempt(False, cause, answer, True, _retry_after(response.headers.get("Retry-After")))

    async def _write_back(self, message: Outgoing) -> Attempt:
        """A registry write-back: the outcome the body names, through MLflow's REST API."""
        job = json.loads(message.envelope.body)
        problem = usable_url(job["trackingUri"])
        if problem is not None:
            return Attempt(False, "bad_url", f"registry trackingUri: {problem}", retry=False)
        credentials: dict[str, str | None] = {"token": None, "username": None, "password": None}
        if message.url_secret:
            secret = await labelled_secret(
                self.secrets, message.namespace, message.url_secret, REGISTRY_SECRET_FIELD, HELD_REGISTRY
            )
            if isinstance(secret, SecretFault):
                cause = "secret_not_allowed" if secret.cause == "not_allowed" else "no_url"
                return Attempt(False, cause, secret.words)
            credentials = {key: secret_value(secret, key) for key in credentials}
            if not any(credentials.values()):
                return Attempt(False, "no_url", f"Secret {message.url_secret} has no token or username (yet)")
        assert self.http is not None
        registry = MlflowRegistry(job["trackingUri"], self.http, **credentials)
        candidate = ModelVersionRef(job["candidate"]["model"], job["candidate"]["version"])
        production = ModelVersionRef(**job["production"]) if job["production"] else None
        outcome = Outcome(rollout=job["rollout"], link=job["link"], reason=job["reason"], time=job["time"])
        try:
            if job["outcome"] == "promoted":
                await registry.promoted(candidate, production, outcome, job["alias"])
            else:
                await registry.rolled_back(candidate, outcome)
        except RegistryError as exc:
            return Attempt(False, "registry", str(exc), retry=exc.retry)
        return Attempt(True)
