"""One scenario told from start to end: what `shadowgate demo` runs and the end-to-end tests assert on.

On a cluster (a kubeconfig) and a database (a DSN) that are already up, and in one namespace:

1. migrate the database; start the two model servers (each trains its model at start) on free ports;
   with an MLflow server (registry.py), register the trading models as versions of `trade-signal` there
   and name them in the ShadowDeployment (else leave its registry out, saying why in one line);
2. create the Secrets the ShadowDeployment names (the DSN, an outcome token) and start the operator;
3. apply the scenario's ShadowDeployment; once the operator has created the router's ServiceAccount and
   ConfigMap, start the router as a local process that authenticates with that ServiceAccount's token
   and watches that ConfigMap, exactly as its pod would;
4. send trades through the router and post their outcomes as they close;
5. show a row per analysis until the operator promotes or rolls back, and a line per notification the
   demo's CloudEvents receiver (receiver.py, named in spec.notifications) gets; keep the traffic a few
   seconds more (what clients see afterwards) and wait for the last transition's notification; after a
   promotion or a rollback, read the alias and the versions' tags back from MLflow and show them; stop
   the traffic, let the router flush every row, stop it.

Everything started here is stopped before `tell` returns or raises, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import httpx

from shadowgate_common import kubeaccess
from shadowgate_dev.demo.progress import Counters, Progress
from shadowgate_dev.demo.receiver import Received, Receiver
from shadowgate_dev.demo.registry import (
    WRITE_BACK_WAIT,
    DemoRegistry,
    ReadBack,
    Registered,
    register,
    wait_written,
)
from shadowgate_dev.demo.scenarios import Pace, Scenario, manifest
from shadowgate_dev.demo.stack import (
    Environment,
    Stack,
    last_json_line,
    model_server_argv,
    operator_argv,
    pick_port,
    python_env,
    router_argv,
    service_account_kubeconfig,
    traffic_argv,
    wait_http,
)
from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.process import ManagedProcess
from shadowgate_operator.api import GROUP, PLURAL, VERSION
from shadowgate_operator.builders import ROUTER_SECRET_LABEL
from shadowgate_operator.migrate import migrate_dsn

FINISHED = ("Promoted", "RolledBack", "Failed")
DECIDED = ("Promote", "RollBack", "Fail")
POLL_SECONDS = 0.5
NOTIFICATION_WAIT = 30.0
"""Seconds the story waits, after the end, for the notification of the last transition (the operator's
worker posts it within a second or so of queueing it, retrying if it fails)."""
METRICS_ROWS = """
    SELECT time, step, weight, samples, production_value, candidate_value, improvement, overall_score, p_value,
           (metrics ->> 'pValueWorse')::float8 AS p_value_worse, decision, reason
    FROM deployment_metrics WHERE namespace = $1 AND deployment = $2 ORDER BY time"""


@dataclass
class StoryResult:
    scenario: Scenario
    environment: Environment
    name: str
    manifest: dict[str, Any]
    shadow: dict[str, Any]
    """The ShadowDeployment as the story ended."""
    applied_at: float
    """Wall-clock time (epoch seconds) the ShadowDeployment was applied."""
    decided_at: float
    """When the story saw the final phase."""
    traffic_log: Path
    traffic: dict[str, Any]
    """The traffic generator's summary (sent, answered, servedBy, outcomesPosted, ...)."""
    production_ids: list[str]
    """Request ids the production model server answered (its own count, not the router's)."""
    candidate_ids: list[str]
    """Request ids the candidate model server answered."""
    notifications: list[Received] = field(default_factory=list)
    """The CloudEvents the demo's receiver got, in order of arrival, each id once."""
    registry: ReadBack | None = None
    """The alias and tags MLflow held after the end (None: told without a registry)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per part of the story, in order."""

    @property
    def phase(self) -> str:
        return str(self.shadow.get("status", {}).get("phase"))


def prometheus_sum(exposition: str, name: str) -> float:
    """Sum of every sample of metric `name` in a Prometheus text exposition."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def secret(name: str, key: str, value: str) -> dict[str, Any]:
    """A Secret the ShadowDeployment names, labelled so that the operator hands it to the router."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {ROUTER_SECRET_LABEL: "true"}},
        "type": "Opaque",
        "data": {key: base64.b64encode(value.encode()).decode()},
    }


async def tell(
    environment: Environment,
    scenario: Scenario,
    pace: Pace | None = None,
    *,
    out: TextIO = sys.stdout,
    registry: DemoRegistry | None = None,
) -> StoryResult:
    """Run `scenario` to its end on `environment`; everything it starts is stopped when it returns.

    With `registry` (an MLflow server, begun by the caller and stopped by it) the models are registered
    in it, the ShadowDeployment names them, and the write-back is read back and shown after the end.
    """
    story = _Story(Stack(environment), Receiver().start(), environment, scenario, pace or Pace(), out, registry)
    try:
        return await story.tell()
    finally:
        story.stack.stop()
        story.receiver.stop()


@dataclass
class _Model:
    process: ManagedProcess
    url: str


@dataclass
class _Story:
    stack: Stack
    receiver: Receiver
    environment: Environment
    scenario: Scenario
    pace: Pace
    out: TextIO
    registry: DemoRegistry | None
    taken: set[int] = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)

    def say(self, message: str) -> None:
        print(f"==> {message}", file=self.out, flush=True)

    def port(self) -> int:
        return pick_port(self.taken)

    async def tell(self) -> StoryResult:
        started = time.monotonic()
        environment = self.environment
        environment.workdir.mkdir(parents=True, exist_ok=True)
        await self.migrate()
        production, candidate = await self.start_model_servers()
        registered = await self.register()
        document = manifest(self.scenario, production.url, candidate.url, self.pace, registered)
        token = self.create_secrets(document)
        self.stack.start(
            "operator", operator_argv(environment.namespace), env=python_env(KUBECONFIG=str(environment.kubeconfig))
        )
        self.say(f"operator started, watching namespace {environment.namespace}")
        shown = self.scenario.manifest.relative_to(self.scenario.manifest.parents[2])
        self.say(f"kubectl apply -n {environment.namespace} -f {shown}  (urls: the model servers above)")
        print(environment.apply(document).strip(), file=self.out, flush=True)
        applied_at = time.time()

        name = document["metadata"]["name"]
        access = kubeaccess.load(str(environment.kubeconfig))
        async with (
            httpx.AsyncClient(base_url=access.server, verify=access.verify, timeout=10.0) as api,
            httpx.AsyncClient(timeout=5.0) as http,
        ):
            kube = _Kube(api, access, environment.namespace, self.stack)
            router, router_url, metrics_url = await self.start_router(kube, http, name, token)
            traffic_log = environment.workdir / "trades.jsonl"
            traffic = self.stack.start(
                "traffic",
                traffic_argv(router_url, environment.workdir / "outcome-token", self.pace.rate, traffic_log, "T"),
            )
            self.say(
                f"trading: {self.pace.rate:.0f} trades/s through the router (X-Request-Id = trade id, sticky "
                "X-Account-Id); each outcome posted to /outcomes when the trade closes, 1-4 s later"
            )
            self.timings["model servers, operator, router"] = time.monotonic() - started

            rollout_started = time.monotonic()
            progress = _progress(self.out, document, applied_at)
            urls = (metrics_url, production.url, candidate.url)
            shadow = await self.watch(kube, http, progress, name, urls)
            decided_at = time.time()
            self.timings["rollout until the decision"] = time.monotonic() - rollout_started

            # What clients see once the decision is in force (and the last transition's notification),
            # then a clean stop: no trade without its outcome, no row left unwritten.
            winding_down = time.monotonic()
            await self.wait_notified(progress, shadow, self.pace.after_end)
            registry = await self.show_registry(progress, registered, document, shadow)
            self.stack.stop_one(traffic, timeout=30.0)
            await _wait_flushed(http, metrics_url)
            production_ids, candidate_ids = [
                (await http.get(f"{model.url}/stats", params={"ids": "1"})).json()["requestIds"]
                for model in (production, candidate)
            ]
            self.stack.stop_one(router, timeout=30.0)
            final = await kube.get(kube.shadow_path(name))
            self.timings["traffic after it, flush, stop"] = time.monotonic() - winding_down
        return StoryResult(
            scenario=self.scenario,
            environment=environment,
            name=name,
            manifest=document,
            shadow=final or shadow,
            applied_at=applied_at,
            decided_at=decided_at,
            traffic_log=traffic_log,
            traffic=last_json_line(traffic.log_path),
            production_ids=production_ids,
            candidate_ids=candidate_ids,
            notifications=self.receiver.events,
            registry=registry,
            timings=self.timings,
        )

    async def migrate(self) -> None:
        applied = await migrate_dsn(self.environment.dsn)
        self.say(f"database migrated ({len(applied)} migrations applied)" if applied else "database schema is current")

    async def start_model_servers(self) -> tuple[_Model, _Model]:
        """Production's and the candidate's servers, each ready (its model trained)."""
        pace, scenario = self.pace, self.scenario
        candidate_latency = pace.latency_ms if pace.candidate_latency_ms is None else pace.candidate_latency_ms
        models: list[_Model] = []
        for version, latency, error_rate in (
            (scenario.production_model, pace.latency_ms, 0.0),
            (scenario.candidate_model, candidate_latency, pace.candidate_error_rate),
        ):
            port = self.port()
            process = self.stack.start(f"model-{version}", model_server_argv(version, port, latency, error_rate))
            models.append(_Model(process, f"http://127.0.0.1:{port}"))
        async with httpx.AsyncClient() as http:
            await asyncio.gather(
                *(wait_http(http, f"{m.url}/v2/health/ready", m.process, "ready", within=120) for m in models)
            )
        for model in models:
            lines = model.process.log_path.read_text().splitlines()
            self.say(f"model server at {model.url}: {next((x for x in lines if x.startswith('trained')), '')}")
        return models[0], models[1]

    async def register(self) -> Registered | None:
        """The trading models as versions of one registered model in the demo's MLflow server, the alias on
        production's; None (said in one line) when there is no MLflow."""
        if self.registry is None:
            return None
        waited = time.monotonic()
        alias = self.scenario.load()["spec"]["registry"]["alias"]
        registered = None
        if await self.registry.ready():
            try:
                registered = await register(self.registry.url, self.scenario.production_model, alias)
            except (ComponentError, httpx.HTTPError) as exc:
                self.registry.unavailable = str(exc).splitlines()[0]
        if registered is None:
            self.say(f"no model registry, the story goes on without one: {self.registry.unavailable}")
            return None
        versions = ", ".join(f"{number} ({model})" for model, number in registered.versions.items())
        waits = f"waited {time.monotonic() - waited:.1f}s"
        if self.registry.install_seconds:
            waits += f"; its venv built once, in {self.registry.install_seconds:.0f}s"
        self.say(
            f"MLflow at {registered.url}: registered model {registered.model}, versions {versions}; alias "
            f"{alias} on version {registered.alias_version} (production); {waits}"
        )
        return registered

    async def show_registry(
        self, progress: Progress, registered: Registered | None, document: dict[str, Any], shadow: dict[str, Any]
    ) -> ReadBack | None:
        """After a promotion or a rollback: the alias and both versions' tags as MLflow holds them once the
        operator's write-back is in (at most WRITE_BACK_WAIT seconds more)."""
        phase = (shadow.get("status") or {}).get("phase")
        if registered is None or phase not in ("Promoted", "RolledBack"):
            return None
        spec = document["spec"]
        versions = (spec["production"]["registeredModel"]["version"], spec["candidate"]["registeredModel"]["version"])
        found, written = await wait_written(registered, *versions, phase)
        if not written:
            progress.say(f"==> MLflow: no write-back of {phase} after {WRITE_BACK_WAIT:.0f}s (see operator.log)")
        for line in found.lines((spec["production"]["name"], spec["candidate"]["name"])):
            progress.say(line)
        return found

    def create_secrets(self, document: dict[str, Any]) -> str:
        """The Secrets the ShadowDeployment names: the database's DSN, a new outcome token (returned,
        and written to outcome-token in the work directory for the clients) and the URL of each receiver
        in spec.notifications (the demo's own)."""
        spec = document["spec"]
        token = secrets.token_hex(16)
        token_file = self.environment.workdir / "outcome-token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        receivers = [target["urlSecretRef"] for target in spec.get("notifications", [])]
        self.environment.apply(
            secret(spec["database"]["secretRef"]["name"], "dsn", self.environment.dsn),
            secret(spec["outcomes"]["tokenSecretRef"]["name"], "token", token),
            *(secret(ref["name"], ref.get("key", "url"), self.receiver.url) for ref in receivers),
        )
        if receivers:
            self.say(f"notification receiver at {self.receiver.url} (CloudEvents; spec.notifications)")
        return token

    def show_notifications(self, progress: Progress) -> None:
        """A line per notification received since the last call (and per body it could not read)."""
        for event in self.receiver.take():
            progress.say(f"==> {event.line()}")
        while self.receiver.refused:
            progress.say(f"==> notification refused by the receiver: {self.receiver.refused.pop(0)}")

    async def wait_notified(self, progress: Progress, shadow: dict[str, Any], after_end: float) -> None:
        """`after_end` seconds, showing notifications as they come, then until the notification of the
        phase the rollout ended in has come (at most NOTIFICATION_WAIT seconds more)."""
        phase = (shadow.get("status") or {}).get("phase")
        expected = bool(shadow.get("spec", {}).get("notifications"))
        started = time.monotonic()
        while True:
            self.stack.check()
            self.show_notifications(progress)
            waited = time.monotonic() - started
            if waited >= after_end:
                if not expected or any(e.data.get("phase") == phase for e in self.receiver.events):
                    return
                if waited >= after_end + NOTIFICATION_WAIT:
                    self.say(f"no notification of {phase} after {NOTIFICATION_WAIT:.0f}s (see operator.log)")
                    return
            await asyncio.sleep(0.2)

    async def start_router(
        self, kube: _Kube, http: httpx.AsyncClient, name: str, token: str
    ) -> tuple[ManagedProcess, str, str]:
        """The router as its pod would run: once the operator has made its ServiceAccount and ConfigMap,
        with that ServiceAccount's token, watching that ConfigMap, with the Secrets' DSN and token.
        Returns it, its URL and its metrics URL."""
        router_name = f"{name}-router"
        for kind in ("serviceaccounts", "configmaps"):
            await kube.wait_exists(f"/api/v1/namespaces/{self.environment.namespace}/{kind}/{router_name}")
        credentials = service_account_kubeconfig(
            self.environment, router_name, self.environment.workdir / "router.kubeconfig"
        )
        port, metrics_port = self.port(), self.port()
        url = f"http://127.0.0.1:{port}"
        router = self.stack.start(
            "router",
            router_argv(self.environment, router_name, credentials, port, metrics_port),
            env=python_env(SHADOWGATE_OUTCOME_TOKEN=token),
        )
        await wait_http(http, f"{url}/readyz", router, "ready", within=30)
        self.say(
            f"router at {url}, as ServiceAccount {router_name}: watching ConfigMap {router_name}, "
            "recording to PostgreSQL"
        )
        return router, url, f"http://127.0.0.1:{metrics_port}"

    async def watch(
        self, kube: _Kube, http: httpx.AsyncClient, progress: Progress, name: str, urls: tuple[str, str, str]
    ) -> dict[str, Any]:
        """Show each analysis until the rollout has finished; returns the ShadowDeployment at the end."""
        deadline = time.monotonic() + self.pace.timeout
        finished_at: float | None = None
        shown = 0
        database = await asyncpg.connect(self.environment.dsn)
        try:
            while True:
                self.stack.check()
                shadow = await kube.get(kube.shadow_path(name))
                status = shadow.get("status") or {}
                counters = await _counters(http, *urls)
                rows = await database.fetch(METRICS_ROWS, self.environment.namespace, name)
                for row in rows[shown:]:
                    progress.analysis(dict(row), counters)
                shown = len(rows)
                self.show_notifications(progress)
                if status.get("phase") in FINISHED:
                    finished_at = finished_at or time.monotonic()
                    # The analysis writes its row just after the status: wait for it (not for a manual verb's).
                    if (rows and rows[-1]["decision"] in DECIDED) or time.monotonic() - finished_at > 5:
                        return shadow
                elif time.monotonic() > deadline:
                    raise ComponentError(
                        "demo",
                        f"{name} is still {status.get('phase')} after {self.pace.timeout:.0f}s: "
                        f"{status.get('message', '')}",
                    )
                progress.status(status, counters)
                await asyncio.sleep(POLL_SECONDS)
        finally:
            await database.close()


@dataclass
class _Kube:
    """The few reads the story makes from the API server, with the kubeconfig's credentials."""

    api: httpx.AsyncClient
    access: kubeaccess.KubeAccess
    namespace: str
    stack: Stack

    def shadow_path(self, name: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{name}"

    async def get(self, path: str) -> dict[str, Any]:
        """The object, or {} when it does not exist."""
        answer = await self.api.get(path, headers=self.access.headers())
        found: dict[str, Any] = answer.json() if answer.status_code == 200 else {}
        return found

    async def wait_exists(self, path: str, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not await self.get(path):
            self.stack.check()
            if time.monotonic() > deadline:
                raise ComponentError("operator", f"did not create {path} within {within:.0f}s")
            await asyncio.sleep(0.2)


def _progress(out: TextIO, document: dict[str, Any], applied_at: float) -> Progress:
    spec = document["spec"]
    return Progress(
        out,
        started=applied_at,
        steps=len(spec["traffic"]["steps"]),
        min_samples=int(spec["analysis"]["minSamples"]),
        names=(spec["production"]["name"], spec["candidate"]["name"]),
        mode=spec["traffic"]["mode"],
        metric=spec["analysis"]["metric"],
    )


async def _counters(http: httpx.AsyncClient, router_metrics: str, production: str, candidate: str) -> Counters:
    exposition = (await http.get(f"{router_metrics}/metrics")).text
    production_stats, candidate_stats = [(await http.get(f"{url}/stats")).json() for url in (production, candidate)]
    return Counters(
        responses=prometheus_sum(exposition, "shadowgate_router_responses_total"),
        outcomes=prometheus_sum(exposition, "shadowgate_router_outcomes_total"),
        production=int(production_stats["requests"]),
        candidate=int(candidate_stats["requests"]),
    )


async def _wait_flushed(http: httpx.AsyncClient, router_metrics: str, within: float = 15.0) -> None:
    """Until the router has no shadow copy in flight and no row in memory or in its spool: every request
    is in PostgreSQL."""
    deadline = time.monotonic() + within
    pending_metrics = (
        "shadowgate_router_inflight_mirrors",
        "shadowgate_router_record_queue_rows",
        "shadowgate_router_spool_rows",
    )
    while time.monotonic() < deadline:
        exposition = (await http.get(f"{router_metrics}/metrics")).text
        if all(prometheus_sum(exposition, metric) == 0 for metric in pending_metrics):
            return
        await asyncio.sleep(0.2)
