"""The real model servers for tests/protocols (`make test-protocols`): MLServer, KServe's Python model server
and Triton Inference Server as nvidia-pytriton packages it, each serving the same toy model as
tests/support/model_server.py (prediction = bias + the sum of the inputs; tests/protocols/servers/).

Their dependencies conflict with each other and with the project's, so each family has its own virtualenv,
built with uv and cached in ~/.cache/shadowgate/model-servers/ (shadowgate_dev.localenv.venvs, which
the demo's MLflow server shares). Triton's Python backend needs a Python whose threading it understands:
its venv is built on Debian's /usr/bin/python3 (a pyenv build failed there). Servers run as processes in
their own session and are stopped with their children.

    python -m tests.support.model_servers install      # build the venvs that are missing (make test-protocols does)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from shadowgate_dev.localenv.venvs import Family, install, project_python
from tests.support.router import REPO_ROOT, Process, free_port, wait_until

SERVERS = REPO_ROOT / "tests" / "protocols" / "servers"
DEBIAN_PYTHON = "/usr/bin/python3"


FAMILIES = {
    "mlserver": Family("mlserver", ("mlserver==1.7.1",), project_python()),
    "kserve": Family("kserve", ("kserve==0.21.0",), project_python()),
    "triton": Family("triton", ("nvidia-pytriton==0.7.0",), DEBIAN_PYTHON),
}


def install_all(names: list[str] | None = None) -> dict[str, float]:
    """Build the named (or all) families' venvs side by side; returns each one's seconds."""
    chosen = [FAMILIES[name] for name in names or FAMILIES]
    with ThreadPoolExecutor(len(chosen)) as pool:
        return dict(zip((family.name for family in chosen), pool.map(install, chosen), strict=True))


class ServerProcess(Process):
    """A model server in its own session: stopping it stops its children too (tritonserver, workers)."""

    def __init__(self, argv: list[str], log_path: Path, http_port: int, grpc_port: int, model: str, **env: str):
        super().__init__(argv, log_path, env=env)
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        self.model = model

    def start(self, timeout: float = 180) -> None:  # Triton's first start unpacks itself: allow for a busy machine
        super().start()

        def model_ready() -> bool:
            self.assert_running()
            return httpx.get(f"{self.url}/v2/models/{self.model}/ready", timeout=5).status_code == 200

        wait_until(model_ready, timeout, f"{self.argv[:3]} to serve {self.model}", interval=0.25)

    def stop(self, timeout: float = 30) -> int | None:
        code = super().stop(timeout)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever it left behind in its session
        return code


def mlserver(work: Path, *, bias: float, model: str = "fraud") -> ServerProcess:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    folder = work / f"mlserver-{http_port}"
    folder.mkdir(parents=True)
    shutil.copy(SERVERS / "mlserver_model.py", folder)
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
        "parallel_workers": 0,
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": model,
        "implementation": "mlserver_model.SumModel",
        "parameters": {"version": "1", "extra": {"bias": bias}},
    }
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    argv = [str(FAMILIES["mlserver"].bin / "mlserver"), "start", str(folder)]
    return ServerProcess(argv, work / f"mlserver-{http_port}.log", http_port, grpc_port, model)


def kserve(work: Path, *, bias: float, model: str = "fraud") -> ServerProcess:
    http_port, grpc_port = free_port(), free_port()
    argv = [
        str(FAMILIES["kserve"].bin / "python"),
        str(SERVERS / "kserve_server.py"),
        "--name",
        model,
        "--bias",
        str(bias),
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
    ]
    return ServerProcess(argv, work / f"kserve-{http_port}.log", http_port, grpc_port, model)


def triton(work: Path, *, bias: float, model: str = "fraud") -> ServerProcess:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    argv = [
        str(FAMILIES["triton"].bin / "python"),
        str(SERVERS / "triton_server.py"),
        "--name",
        model,
        "--bias",
        str(bias),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--workspace",
        str(work / f"triton-{http_port}"),
    ]
    return ServerProcess(argv, work / f"triton-{http_port}.log", http_port, grpc_port, model)


STARTERS = {"mlserver": mlserver, "kserve": kserve, "triton": triton}


@contextlib.contextmanager
def server_pair(
    family: str, work: Path, *, production_model: str = "fraud", candidate_model: str = "fraud"
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Production (bias 0) and candidate (bias 100) of one family, started side by side; both stopped."""
    install(FAMILIES[family])
    production = STARTERS[family](work, bias=0, model=production_model)
    candidate = STARTERS[family](work, bias=100, model=candidate_model)
    try:
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(server.start) for server in (production, candidate)]:
                started.result()
        yield production, candidate
    finally:
        for server in (production, candidate):
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["install", "where"])
    parser.add_argument("families", nargs="*", choices=[*FAMILIES, []], help="default: all")
    args = parser.parse_args(argv)
    if args.command == "where":
        for name in args.families or FAMILIES:
            print(f"{name}: {FAMILIES[name].venv} ({'ready' if FAMILIES[name].ready else 'not built'})")
        return 0
    started = time.monotonic()
    seconds: dict[str, Any] = install_all(args.families or None)
    for name, took in seconds.items():
        print(f"{name}: {'cached' if not took else f'built in {took:.0f}s'} ({FAMILIES[name].venv})")
    print(f"model server venvs ready in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
