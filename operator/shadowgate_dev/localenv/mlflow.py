"""A local MLflow tracking server: `mlflow server` on loopback with its registry in SQLite.

Used by `make demo` (the registry write-back, shown) and the registry tests. MLflow's server is a large
install (Flask, SQLAlchemy, alembic, pandas, ...) that the operator itself never imports (it speaks
MLflow's REST API), so it lives in a venv of its own (`venvs.Family`), built with uv once and cached.

    python -m shadowgate_dev.localenv.mlflow install      # build the venv if missing
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from shadowgate_dev.localenv.process import ManagedProcess, free_port
from shadowgate_dev.localenv.venvs import Family, install, project_python

MLFLOW = Family("mlflow", ("mlflow==3.17.2",), project_python())


class MlflowServer:
    """`mlflow server` with its registry in SQLite under `work`, reachable at `url` once `wait_ready`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            str(MLFLOW.bin / "mlflow"), "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
            "--default-artifact-root", str(work / "artifacts"),
        ]  # fmt: skip
        # Its own session (uvicorn in it): stopped as a group. No job runner: the registry needs none, and
        # its consumers would import MLflow once more each (a minute of CPU on a busy machine). Bytecode
        # written: the first start compiles the modules it imports into the venv (uv installs none), the
        # next ones read them, even where the caller's environment says PYTHONDONTWRITEBYTECODE.
        env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.process = ManagedProcess("mlflow", argv, work / "mlflow.log", env=env)

    def start(self) -> MlflowServer:
        """Start it (the venv must be installed); returns at once: `wait_ready` for it to answer."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.process.start()
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float) -> None:
        """Until /health answers (importing MLflow and creating its schema takes 15 s on an idle machine and
        minutes on a busy one); ComponentError, with the log's tail, if it exits or takes longer."""
        self.process.wait_ready(self.healthy, timeout, "answering /health")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its whole group (it may take half a minute to stop by itself)."""
        self.process.stop(timeout=5.0)


def main() -> int:
    if sys.argv[1:] != ["install"]:
        print(__doc__, file=sys.stderr)
        return 2
    seconds = install(MLFLOW)
    print(f"mlflow venv: {MLFLOW.venv} ({'cached' if seconds == 0 else f'built in {seconds:.0f}s'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
