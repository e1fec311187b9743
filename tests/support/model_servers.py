"""The real model servers for tests/protocols (`make test-protocols`): MLServer, KServe's Python model server
and Triton Inference Server as nvidia-pytriton packages it, each serving the same toy model as
tests/support/model_server.py (prediction = bias + the sum of the inputs; tests/protocols/servers/).

Their dependencies conflict with each other and with the project's, so each family has its own virtualenv,
built with uv (seconds instead of pip's minutes) and cached in ~/.cache/shadowgate/model-servers/ under a
hash of what it holds; a file lock lets concurrent test runs share one build. Triton's Python backend
needs a Python whose threading it understands: its venv is built on Debian's /usr/bin/python3 (a pyenv
build failed there). Servers run as processes in their own session and are stopped with their children.

    python -m tests.support.model_servers install      # build the venvs that are missing (make test-protocols does)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.router import REPO_ROOT, Process, free_port, wait_until

CACHE = Path(os.environ.get("SHADOWGATE_CACHE", Path.home() / ".cache" / "shadowgate")) / "model-servers"
SERVERS = REPO_ROOT / "tests" / "protocols" / "servers"
DEBIAN_PYTHON = "/usr/bin/python3"


@dataclass(frozen=True)
class Family:
    name: str
    requirements: tuple[str, ...]
    python: str
    """The interpreter the venv is built on."""

    @property
    def venv(self) -> Path:
        key = json.dumps([self.name, self.requirements, _python_version(self.python)])
        return CACHE / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def ready(self) -> bool:
        return (self.venv / ".complete").exists()


def _python_version(python: str) -> str:
    result = subprocess.run(
        [python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout.strip()


def _project_python() -> str:
    """The interpreter under the project's venv (uv builds a venv from a base interpreter, not a venv)."""
    return getattr(sys, "_base_executable", sys.executable)


FAMILIES = {
    "mlserver": Family("mlserver", ("mlserver==1.7.1",), _project_python()),
    "kserve": Family("kserve", ("kserve==0.21.0",), _project_python()),
    "triton": Family("triton", ("nvidia-pytriton==0.7.0",), DEBIAN_PYTHON),
}


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise RuntimeError("uv is not installed: it is in the project's dev extra (make setup)")
    return found


def install(family: Family) -> float:
    """Build the family's venv unless it is cached; returns the seconds it took (0 when cached)."""
    if family.ready:
        return 0.0
    if not Path(family.python).exists():
        raise RuntimeError(f"{family.name} needs {family.python} (Debian's python3 package)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f"{family.venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if family.ready:  # another run built it while we waited
            return 0.0
        started = time.monotonic()
        shutil.rmtree(family.venv, ignore_errors=True)  # a build that died halfway
        env = {**os.environ, "UV_NATIVE_TLS": "1", "UV_PYTHON_DOWNLOADS": "never"}
        uv = _uv()
        subprocess.run(
            [uv, "venv", "--quiet", "--python", family.python, str(family.venv)], env=env, check=True, timeout=300
        )
        subprocess.run(
            [uv, "pip", "install", "--quiet", "--python", str(family.bin / "python"), *family.requirements],
            env=env,
            check=True,
            timeout=1800,
        )
        (family.venv / ".complete").write_text(json.dumps({"requirements": family.requirements}) + "\n")
        return time.monotonic() - started


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
