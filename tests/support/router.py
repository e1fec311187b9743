"""Run the real `shadowgate router` and real model servers as processes on loopback, and talk to them.

Processes rather than tasks in the test's event loop: the router's latency is what several tests measure,
and it must not share a loop (or a GIL) with the load generator or the model servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx

from shadowgate_dev.localenv import Postgres
from shadowgate_operator.migrate import migrate_dsn
from shadowgate_router.config import CONFIG_KEY, RouterConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(probe: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Process:
    """A child process whose output goes to a log file, stopped with SIGTERM (SIGKILL if it hangs)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
            )

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def assert_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.argv[:4]} exited with {self.process.returncode}:\n{self.log()[-4000:]}")


class ModelServer(Process):
    """tests/support/model_server.py in its own process."""

    def __init__(self, log_dir: Path, *, bias: float = 0.0, latency_ms: float = 0.0, error_rate: float = 0.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        super().__init__(
            [
                sys.executable,
                "-m",
                "tests.support.model_server",
                "--port",
                str(self.port),
                "--grpc-port",
                str(self.grpc_port),
                "--bias",
                str(bias),
                "--latency-ms",
                str(latency_ms),
                "--error-rate",
                str(error_rate),
            ],
            log_dir / f"model-{self.port}.log",
        )
        self.defaults = {
            "bias": bias,
            "latencyMs": latency_ms,
            "errorRate": error_rate,
            "hang": False,
            "compress": False,
        }

    def start(self) -> None:
        super().start()
        wait_until(lambda: httpx.get(f"{self.url}/v2/health/ready").status_code == 200, 20, "the model server")

    def control(self, **changes: Any) -> None:
        httpx.post(f"{self.url}/control", json=changes).raise_for_status()

    def reset(self) -> None:
        self.control(**self.defaults)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.url}/stats").json()
        return result


class HostileModelServer(Process):
    """tests/support/hostile.py in its own process: a model server answering what no good one would."""

    def __init__(self, log_dir: Path, mode: str, size: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "tests.support.hostile", "--port", str(self.port), "--mode", mode]
        super().__init__([*argv, "--size", str(size)], log_dir / f"hostile-{self.port}.log")

    def start(self) -> None:
        super().start()

        def listening() -> bool:
            self.assert_running()
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(listening, 20, "the hostile model server")


@contextmanager
def model_pair(log_dir: Path) -> Iterator[tuple[ModelServer, ModelServer]]:
    """Production (prediction = sum of the request's numbers) and candidate (the same + 100), running."""
    production, candidate = ModelServer(log_dir, bias=0), ModelServer(log_dir, bias=100)
    production.start()
    candidate.start()
    try:
        yield production, candidate
    finally:
        production.stop()
        candidate.stop()


@asynccontextmanager
async def migrated_postgres() -> AsyncIterator[Postgres]:
    """A PostgreSQL of one's own, migrated: for tests that stop and start the database."""
    postgres = Postgres()
    await asyncio.to_thread(postgres.start)
    try:
        await migrate_dsn(postgres.dsn)
        yield postgres
    finally:
        await asyncio.to_thread(postgres.stop)
        postgres.cleanup()


def router_config(
    production: str, candidate: str, *, grpc: tuple[str, str] | None = None, **changes: Any
) -> dict[str, Any]:
    """A RouterConfig document (what the operator writes to the ConfigMap) for two local model servers;
    `grpc`: their gRPC addresses (HOST:PORT), production's and the candidate's."""
    document: dict[str, Any] = {
        "deployment": "fraud-detector",
        "namespace": "models",
        "mode": "shadow",
        "weight": 100,
        "phase": "Progressing",
        "protocol": "v2",
        "predictionPath": "outputs[0].data[0]",
        "confidencePath": "outputs[1].data[0]",
        "production": {"name": "fraud-v1", "version": "1.0", "url": production, "modelName": "fraud"},
        "candidate": {"name": "fraud-v2", "version": "2.0", "url": candidate, "modelName": "fraud"},
        "stickyHeader": "X-Account-Id",
        "fallbackToProduction": True,
        "timeoutSeconds": 5,
        "mirrorTimeoutSeconds": 5,
    }
    if grpc is not None:
        document["production"]["grpcAddress"], document["candidate"]["grpcAddress"] = grpc
    document.update(changes)
    RouterConfig.model_validate(document)  # fail here, not in the router, when a test writes nonsense
    return document


class Router(Process):
    """`shadowgate router` with a config file (or a ConfigMap), a DSN and a spool directory."""

    def __init__(
        self,
        work: Path,
        dsn: str,
        *args: str,
        token: str = "outcome-token",
        env: dict[str, str] | None = None,
        spool_dir: Path | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.config_path = work / f"router-{self.port}.json"
        self.spool_dir = spool_dir or work / f"spool-{self.port}"
        self.token = token
        super().__init__(
            [
                sys.executable,
                "-m",
                "shadowgate_operator.cli",
                "router",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--grpc-listen",
                self.grpc_address,
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--dsn",
                dsn,
                "--spool-dir",
                str(self.spool_dir),
                "--drain-seconds",
                "10",
                *args,
            ],
            work / f"router-{self.port}.log",
            env={"SHADOWGATE_OUTCOME_TOKEN": token, **(env or {})},
        )

    @classmethod
    def with_file(cls, work: Path, dsn: str, config: dict[str, Any], *args: str, **kwargs: Any) -> Router:
        router = cls(work, dsn, "--config-file", "", *args, **kwargs)
        router.argv[router.argv.index("--config-file") + 1] = str(router.config_path)
        router.write_config(config)
        return router

    def write_config(self, config: dict[str, Any]) -> None:
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(config))
        os.replace(temporary, self.config_path)

    def start(self, *, ready: bool = True) -> Router:
        super().start()
        wait_until(lambda: self._get("/healthz").status_code == 200, 60, "the router to listen")
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 10) -> None:
        wait_until(lambda: self._get("/readyz").status_code == 200, timeout, "the router to be ready")

    def _get(self, path: str, base: str | None = None) -> httpx.Response:
        self.assert_running()
        return httpx.get((base or self.url) + path, timeout=5)

    def readiness(self) -> httpx.Response:
        return self._get("/readyz")

    def metrics(self) -> dict[str, float]:
        """The Prometheus exposition as {'name{labels}': value}."""
        values: dict[str, float] = {}
        for line in self._get("/metrics", self.metrics_url).text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for key, value in self.metrics().items():
            found = re.fullmatch(r"([^{]+)(?:\{(.*)\})?", key)
            assert found is not None
            if found.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
            if all(have.get(label) == wanted for label, wanted in labels.items()):
                total += value
        return total

    def pending_rows(self) -> float:
        return sum(
            self.metric(name, table=table)
            for name in ("shadowgate_router_record_queue_rows", "shadowgate_router_spool_rows")
            for table in ("predictions", "outcomes")
        )


def configmap_data(config: dict[str, Any]) -> dict[str, str]:
    return {CONFIG_KEY: json.dumps(config, indent=2)}
