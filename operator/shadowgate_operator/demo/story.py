"""One scenario told from start to end: what `shadowgate demo` runs and the end-to-end tests assert on.

On a cluster (a kubeconfig) and a database (a DSN) that are already up, and in one namespace:

1. migrate the database; start the two model servers (each trains its model at start);
2. create the Secrets the ShadowDeployment names (the DSN, an outcome token) and start the operator;
3. apply the scenario's ShadowDeployment; once the operator has created the router's ServiceAccount and
   ConfigMap, start the router as a local process that authenticates with that ServiceAccount's token
   and watches that ConfigMap, exactly as its pod would;
4. send trades through the router and post their outcomes as they close;
5. show a row per analysis until the operator promotes or rolls back; keep the traffic a few seconds
   more (what clients see afterwards); stop the traffic, let the router flush every row, stop it.

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

from shadowgate_operator.api import GROUP, PLURAL, VERSION
from shadowgate_operator.demo.progress import Counters, Progress
from shadowgate_operator.demo.scenarios import Pace, Scenario, manifest
from shadowgate_operator.demo.stack import (
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
from shadowgate_operator.localenv.errors import ComponentError
from shadowgate_operator.localenv.process import free_port
from shadowgate_operator.migrate import migrate
from shadowgate_router import kubeapi

FINISHED = ("Promoted", "RolledBack", "Failed")
DECIDED = ("Promote", "RollBack", "Fail")
POLL_SECONDS = 0.5
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
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "data": {key: base64.b64encode(value.encode()).decode()},
    }


async def tell(
    environment: Environment,
    scenario: Scenario,
    pace: Pace | None = None,
    *,
    out: TextIO = sys.stdout,
    fixed_ports: bool = False,
) -> StoryResult:
    """Run `scenario` to its end on `environment`; everything it starts is stopped when it returns."""
    stack = Stack(environment)
    try:
        return await _tell(stack, environment, scenario, pace or Pace(), out, fixed_ports)
    finally:
        stack.stop()


async def _tell(
    stack: Stack, environment: Environment, scenario: Scenario, pace: Pace, out: TextIO, fixed_ports: bool
) -> StoryResult:
    def say(message: str) -> None:
        print(f"==> {message}", file=out, flush=True)

    started = time.monotonic()
    environment.workdir.mkdir(parents=True, exist_ok=True)
    connection = await asyncpg.connect(environment.dsn)
    try:
        applied = await migrate(connection)
    finally:
        await connection.close()
    say(f"database migrated ({len(applied)} migrations applied)" if applied else "database schema is current")

    taken: set[int] = set()
    production_port, candidate_port = (
        (pick_port(port, taken) for port in scenario.default_ports) if fixed_ports else (free_port(), free_port())
    )
    production_url, candidate_url = f"http://127.0.0.1:{production_port}", f"http://127.0.0.1:{candidate_port}"
    production = stack.start(
        f"model-{scenario.production_model}",
        model_server_argv(scenario.production_model, production_port, pace.latency_ms, 0.0),
    )
    candidate_latency = pace.latency_ms if pace.candidate_latency_ms is None else pace.candidate_latency_ms
    candidate = stack.start(
        f"model-{scenario.candidate_model}",
        model_server_argv(scenario.candidate_model, candidate_port, candidate_latency, pace.candidate_error_rate),
    )
    async with httpx.AsyncClient() as http:
        await asyncio.gather(
            wait_http(http, f"{production_url}/v2/health/ready", production, "ready", within=120),
            wait_http(http, f"{candidate_url}/v2/health/ready", candidate, "ready", within=120),
        )
    for process, url in ((production, production_url), (candidate, candidate_url)):
        trained = next((line for line in process.log_path.read_text().splitlines() if line.startswith("trained")), "")
        say(f"model server at {url}: {trained}")

    document = manifest(scenario, production_url, candidate_url, pace)
    spec = document["spec"]
    name = document["metadata"]["name"]
    token = secrets.token_hex(16)
    token_file = environment.workdir / "outcome-token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    environment.apply(
        secret(spec["database"]["secretRef"]["name"], "dsn", environment.dsn),
        secret(spec["outcomes"]["tokenSecretRef"]["name"], "token", token),
    )
    stack.start(
        "operator", operator_argv(environment.namespace), env=python_env(KUBECONFIG=str(environment.kubeconfig))
    )
    say(f"operator started, watching namespace {environment.namespace}")
    shown = scenario.manifest.relative_to(scenario.manifest.parents[2])
    say(f"kubectl apply -n {environment.namespace} -f {shown}  (urls: the model servers above)")
    print(environment.apply(document).strip(), file=out, flush=True)
    applied_at = time.time()

    access = kubeapi.load(str(environment.kubeconfig))
    async with (
        httpx.AsyncClient(base_url=access.server, verify=access.ssl_context, timeout=10.0) as api,
        httpx.AsyncClient(timeout=5.0) as http,
    ):
        router_name = f"{name}-router"
        for kind in ("serviceaccounts", "configmaps"):
            await _wait_exists(api, access, f"/api/v1/namespaces/{environment.namespace}/{kind}/{router_name}", stack)
        credentials = service_account_kubeconfig(environment, router_name, environment.workdir / "router.kubeconfig")
        router_port = pick_port(8500, taken) if fixed_ports else free_port()
        router_url = f"http://127.0.0.1:{router_port}"
        router = stack.start(
            "router",
            router_argv(environment, router_name, credentials, router_port),
            env=python_env(SHADOWGATE_OUTCOME_TOKEN=token),
        )
        await wait_http(http, f"{router_url}/readyz", router, "ready", within=30)
        say(
            f"router at {router_url}, as ServiceAccount {router_name}: watching ConfigMap {router_name}, "
            "recording to PostgreSQL"
        )
        traffic_log = environment.workdir / "trades.jsonl"
        traffic = stack.start("traffic", traffic_argv(router_url, token_file, pace.rate, traffic_log, "T"))
        say(
            f"trading: {pace.rate:.0f} trades/s through the router (X-Request-Id = trade id, sticky "
            "X-Account-Id); each outcome posted to /outcomes when the trade closes, 1-4 s later"
        )
        timings = {"model servers, operator, router": time.monotonic() - started}

        progress = Progress(
            out,
            started=applied_at,
            steps=len(spec["traffic"]["steps"]),
            min_samples=int(spec["analysis"]["minSamples"]),
            names=(spec["production"]["name"], spec["candidate"]["name"]),
            mode=spec["traffic"]["mode"],
            metric=spec["analysis"]["metric"],
        )
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{environment.namespace}/{PLURAL}/{name}"
        rollout_started = time.monotonic()
        database = await asyncpg.connect(environment.dsn)
        try:
            shadow = await _watch(
                stack, api, access, http, database, progress, environment, name, path, pace,
                (router_url, production_url, candidate_url),
            )  # fmt: skip
        finally:
            await database.close()
        decided_at = time.time()
        timings["rollout until the decision"] = time.monotonic() - rollout_started

        # What clients see once the decision is in force, then a clean stop: no trade without its
        # outcome, no row left unwritten.
        winding_down = time.monotonic()
        await asyncio.sleep(pace.after_end)
        stack.stop_one(traffic, timeout=30.0)
        summary = last_json_line(traffic.log_path)
        await _wait_flushed(http, router_url)
        production_ids, candidate_ids = [
            (await http.get(f"{url}/stats", params={"ids": "1"})).json()["requestIds"]
            for url in (production_url, candidate_url)
        ]
        stack.stop_one(router, timeout=30.0)
        final = (await api.get(path, headers=access.headers())).json()
        timings["traffic after it, flush, stop"] = time.monotonic() - winding_down
    return StoryResult(
        scenario=scenario,
        environment=environment,
        name=name,
        manifest=document,
        shadow=final or shadow,
        applied_at=applied_at,
        decided_at=decided_at,
        traffic_log=traffic_log,
        traffic=summary,
        production_ids=production_ids,
        candidate_ids=candidate_ids,
        timings=timings,
    )


async def _wait_exists(api: httpx.AsyncClient, access: kubeapi.KubeAccess, path: str, stack: Stack) -> None:
    deadline = time.monotonic() + 60
    while (await api.get(path, headers=access.headers())).status_code != 200:
        stack.check()
        if time.monotonic() > deadline:
            raise ComponentError("operator", f"did not create {path} within 60s")
        await asyncio.sleep(0.2)


async def _counters(http: httpx.AsyncClient, router: str, production: str, candidate: str) -> Counters:
    exposition = (await http.get(f"{router}/metrics")).text
    production_stats, candidate_stats = [(await http.get(f"{url}/stats")).json() for url in (production, candidate)]
    return Counters(
        responses=prometheus_sum(exposition, "shadowgate_router_responses_total"),
        outcomes=prometheus_sum(exposition, "shadowgate_router_outcomes_total"),
        production=int(production_stats["requests"]),
        candidate=int(candidate_stats["requests"]),
    )


async def _watch(
    stack: Stack,
    api: httpx.AsyncClient,
    access: kubeapi.KubeAccess,
    http: httpx.AsyncClient,
    database: asyncpg.Connection,
    progress: Progress,
    environment: Environment,
    name: str,
    path: str,
    pace: Pace,
    urls: tuple[str, str, str],
) -> dict[str, Any]:
    """Show each analysis until the rollout has finished; returns the ShadowDeployment at the end."""
    deadline = time.monotonic() + pace.timeout
    finished_at: float | None = None
    shown = 0
    while True:
        stack.check()
        shadow: dict[str, Any] = (await api.get(path, headers=access.headers())).json()
        status = shadow.get("status") or {}
        counters = await _counters(http, *urls)
        rows = await database.fetch(METRICS_ROWS, environment.namespace, name)
        for row in rows[shown:]:
            progress.analysis(dict(row), counters)
        shown = len(rows)
        if status.get("phase") in FINISHED:
            finished_at = finished_at or time.monotonic()
            # The analysis writes its row just after the status: wait for it (not for a manual verb's).
            if (rows and rows[-1]["decision"] in DECIDED) or time.monotonic() - finished_at > 5:
                return shadow
        elif time.monotonic() > deadline:
            raise ComponentError(
                "demo",
                f"{name} is still {status.get('phase')} after {pace.timeout:.0f}s: {status.get('message', '')}",
            )
        progress.status(status, counters)
        await asyncio.sleep(POLL_SECONDS)


async def _wait_flushed(http: httpx.AsyncClient, router: str, within: float = 15.0) -> None:
    """Until the router has no shadow copy in flight and no row in memory or in its spool: every request
    is in PostgreSQL."""
    deadline = time.monotonic() + within
    pending_metrics = (
        "shadowgate_router_inflight_mirrors",
        "shadowgate_router_record_queue_rows",
        "shadowgate_router_spool_rows",
    )
    while time.monotonic() < deadline:
        exposition = (await http.get(f"{router}/metrics")).text
        if all(prometheus_sum(exposition, metric) == 0 for metric in pending_metrics):
            return
        await asyncio.sleep(0.2)
