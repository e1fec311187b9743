"""The processes the demo runs beside the control plane and PostgreSQL, and how they are stopped.

Model servers, the operator, the router and the traffic generator each run as a child process with its
own log file, in its own session (a Ctrl-C in the terminal reaches only the demo, which then stops them
in order) and with a parent-death signal (if the demo itself is killed, they die with it).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from shadowgate_dev.demo.scenarios import EXAMPLES
from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.process import ManagedProcess, free_port


@dataclass(frozen=True)
class Environment:
    """Where the story runs: a cluster (through kubectl and a kubeconfig), a database, a namespace."""

    kubectl: Path
    kubeconfig: Path
    dsn: str
    namespace: str
    workdir: Path
    """Logs, the router's credentials and spool, the traffic log."""

    def kubectl_run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.kubectl), *args],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise ComponentError("kubectl", f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def apply(self, *documents: dict[str, Any]) -> str:
        return self.kubectl_run("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump_all(documents)).stdout


def python_env(**extra: str) -> dict[str, str]:
    """The environment of a Python child: examples/ importable, one OpenMP thread, unbuffered output."""
    path = os.pathsep.join(p for p in (str(EXAMPLES), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def pick_port(taken: set[int]) -> int:
    """A port nothing listens on, chosen by the kernel (so two demos at once do not pick the same one),
    and not one already handed out in `taken` (its server may not listen yet); remembered there."""
    port = free_port()
    while port in taken:
        port = free_port()
    taken.add(port)
    return port


@dataclass
class Stack:
    """Child processes, stopped in reverse order of start."""

    environment: Environment
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.environment.workdir / f"{name}.log", env=env or python_env())
        process.start()
        self.processes.append(process)
        return process

    def check(self) -> None:
        """Fail, with the log's tail, when a component has exited."""
        for process in self.processes:
            if process.popen is not None and process.popen.poll() is not None:
                raise ComponentError(process.name, f"exited with code {process.popen.returncode}", process.log_path)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout=15.0)
        self.processes.clear()

    def stop_one(self, process: ManagedProcess, timeout: float = 15.0) -> None:
        process.stop(timeout=timeout)
        if process in self.processes:
            self.processes.remove(process)


async def wait_http(
    client: httpx.AsyncClient, url: str, process: ManagedProcess, what: str, *, within: float
) -> httpx.Response:
    """Poll `url` until it answers 200; fail early when `process` exits."""
    deadline = time.monotonic() + within
    while True:
        if process.popen is not None and process.popen.poll() is not None:
            code = process.popen.returncode
            raise ComponentError(process.name, f"exited with code {code} before {what}", process.log_path)
        try:
            answer = await client.get(url, timeout=2.0)
            if answer.status_code == 200:
                return answer
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ComponentError(process.name, f"not {what} after {within:.0f}s", process.log_path)
        await asyncio.sleep(0.1)


def model_server_argv(model: str, port: int, latency_ms: float, error_rate: float) -> list[str]:
    return [
        sys.executable, "-m", "trading.server", "--model", model, "--port", str(port),
        "--latency-ms", str(latency_ms), "--error-rate", str(error_rate),
    ]  # fmt: skip


def operator_argv(namespace: str) -> list[str]:
    return [sys.executable, "-m", "shadowgate_operator.cli", "operator", "--namespace", namespace]


def router_argv(environment: Environment, configmap: str, kubeconfig: Path, port: int, metrics_port: int) -> list[str]:
    return [
        sys.executable, "-m", "shadowgate_operator.cli", "router",
        "--configmap", configmap, "--namespace", environment.namespace, "--kubeconfig", str(kubeconfig),
        "--listen", f"127.0.0.1:{port}", "--grpc-listen", "off", "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--dsn", environment.dsn,
        "--spool-dir", str(environment.workdir / "router-spool"), "--drain-seconds", "5",
    ]  # fmt: skip


DEMO_ACCOUNTS = 50_000
"""Accounts the demo's trades come from. The sticky header groups requests by account and the analysis
judges accounts, not requests (a variance clustered by key): at step 1 (5%) 5,000 accounts would put some
250 on the candidate, fewer than the test needs for log loss's skew, and the step could never pass."""


def traffic_argv(router_url: str, token_file: Path, rate: float, log: Path, prefix: str) -> list[str]:
    return [
        sys.executable, "-m", "trading.traffic", "--router", router_url, "--token-file", str(token_file),
        "--rate", str(rate), "--log", str(log), "--prefix", prefix, "--accounts", str(DEMO_ACCOUNTS),
    ]  # fmt: skip


def service_account_kubeconfig(environment: Environment, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as `service_account`, as the router's pod would with its token."""
    token = environment.kubectl_run(
        "create", "token", service_account, "-n", environment.namespace, "--duration=2h"
    ).stdout.strip()
    admin = yaml.safe_load(environment.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "router", "context": {"cluster": "local", "user": service_account}}],
        "current-context": "router",
    }
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config))
    return path


def last_json_line(path: Path) -> dict[str, Any]:
    """The last line of a log that is a JSON object (the traffic generator's summary)."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                found: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue
            return found
    return {}
