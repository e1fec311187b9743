"""What bench/router/run.py and bench/router/grpc_cpu.py start alike, on loopback.

A throwaway PostgreSQL (migrated), two model servers (tests/support/model_server.py, production and candidate,
each with a gRPC port), `shadowgate router` in shadow mode in front of them (mirroring and recording every
request, HTTP and gRPC), and the bare grpc.aio proxy (bare_grpc_proxy.py) in front of the same two servers:
one place for the processes, their ports and the router's configuration, so that both benches measure the same
set-up.

The model servers and the bare proxy run grpcio as the router does (`GRPC_EXPERIMENTS`: its classic pollers,
shadowgate_router.cli, unless the environment sets it): every gRPC figure, the direct baseline included, is on
the same grpcio set-up, and the stand-in servers, which serve every routed call twice, take about 15% less of
the 2 cores than with grpcio's default EventEngine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from shadowgate_router.cli import GRPC_EXPERIMENTS

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not come up on port {port}")


def wait_http(url: str, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} did not come up at {url}")


class Processes(ExitStack):
    """Child processes, stopped (SIGTERM, then SIGKILL) when the stack closes; each one's output in
    `logs`/<name>.log."""

    def __init__(self, logs: Path) -> None:
        super().__init__()
        self.logs = logs

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        self.callback(log.close)
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})}
        )
        self.callback(self._stop, process)
        return process

    @staticmethod
    def _stop(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@dataclass
class ModelServers:
    """Production (bias 0) and candidate (bias 100), HTTP and gRPC."""

    production: subprocess.Popen[bytes]
    candidate: subprocess.Popen[bytes]
    ports: dict[str, int]
    """production, candidate (HTTP) and production-grpc, candidate-grpc."""

    def grpc_address(self, side: str) -> str:
        return f"127.0.0.1:{self.ports[f'{side}-grpc']}"

    def url(self, side: str) -> str:
        return f"http://127.0.0.1:{self.ports[side]}"


def start_model_servers(processes: Processes, latency_ms: float = 0.0) -> ModelServers:
    ports = {name: free_port() for name in ("production", "candidate", "production-grpc", "candidate-grpc")}
    started = {}
    for name, bias in (("production", 0), ("candidate", 100)):
        started[name] = processes.start(
            name,
            [sys.executable, "-m", "tests.support.model_server", "--port", str(ports[name]), "--bias", str(bias),
             "--latency-ms", str(latency_ms), "--grpc-port", str(ports[f"{name}-grpc"])],
            env={"GRPC_EXPERIMENTS": os.environ.get("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)},
        )  # fmt: skip
    for name in started:
        wait_http(f"http://127.0.0.1:{ports[name]}/v2/health/ready", f"the {name} model server", timeout=180)
    return ModelServers(started["production"], started["candidate"], ports)


def router_config(deployment: str, servers: ModelServers, weight: int = 100) -> dict[str, Any]:
    """Shadow mode, `weight`% mirrored, v2 (HTTP and gRPC), the model servers' score and confidence read."""
    return {
        "deployment": deployment, "namespace": "bench", "mode": "shadow", "weight": weight, "phase": "Progressing",
        "protocol": "v2", "predictionPath": "outputs[0].data[0]", "confidencePath": "outputs[1].data[0]",
        "production": {"name": "v1", "version": "1", "url": servers.url("production"), "modelName": "fraud",
                       "grpcAddress": servers.grpc_address("production")},
        "candidate": {"name": "v2", "version": "2", "url": servers.url("candidate"), "modelName": "fraud",
                      "grpcAddress": servers.grpc_address("candidate")},
        "fallbackToProduction": True, "timeoutSeconds": 10, "mirrorTimeoutSeconds": 10,
    }  # fmt: skip


@dataclass
class Router:
    process: subprocess.Popen[bytes]
    http: int
    grpc: int
    metrics: int

    @property
    def pid(self) -> int:
        return self.process.pid


def start_router(
    processes: Processes,
    work: Path,
    dsn: str,
    config: dict[str, Any],
    name: str = "router",
    env: dict[str, str] | None = None,
) -> Router:
    """`shadowgate router` with `config` (a file it watches), recording into `dsn`; ready when it returns."""
    config_file = work / f"{name}.json"
    config_file.write_text(json.dumps(config))
    http, grpc_port, metrics = free_port(), free_port(), free_port()
    process = processes.start(
        name,
        [sys.executable, "-m", "shadowgate_operator.cli", "router", "--config-file", str(config_file),
         "--listen", f"127.0.0.1:{http}", "--grpc-listen", f"127.0.0.1:{grpc_port}",
         "--metrics-listen", f"127.0.0.1:{metrics}",
         "--dsn", dsn, "--spool-dir", str(work / f"{name}-spool"), "--log-level", "WARNING"],
        env={"SHADOWGATE_OUTCOME_TOKEN": "bench", **(env or {})},
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{http}/readyz", f"the {name}", timeout=180)
    return Router(process, http, grpc_port, metrics)


def start_bare_proxy(
    processes: Processes,
    servers: ModelServers,
    options: list[str],
    name: str = "bare-grpc-proxy",
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """bare_grpc_proxy.py in front of production; `--mirror` in `options` mirrors to the candidate, the rest
    are bare_grpc_proxy.py's. grpcio set up as the router's unless `env` sets GRPC_EXPERIMENTS."""
    port = free_port()
    argv = [sys.executable, str(HERE / "bare_grpc_proxy.py"), "--listen", f"127.0.0.1:{port}",
            "--production", servers.grpc_address("production")]  # fmt: skip
    if "--mirror" in options:
        argv += ["--candidate", servers.grpc_address("candidate")]
    argv += [option for option in options if option != "--mirror"]
    process = processes.start(name, argv, env={"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS, **(env or {})})
    wait_port(port, f"the {name}")
    return process, port
