"""A real MLflow tracking server for the registry write-back tests: `mlflow server` on loopback with a
SQLite backend in the test's directory.

MLflow's server is a large install (Flask, SQLAlchemy, alembic, pandas, ...) that the operator itself
never imports (it speaks MLflow's REST API), so it lives in a virtualenv of its own, built with uv and
cached in ~/.cache/shadowgate/model-servers/ like the protocol tests' model servers (the same `Family`
mechanism and file lock): built once, then reused by every run.

    python -m tests.support.mlflow_server install      # build the venv if missing (`make test` does it on demand)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

import httpx

from tests.support.model_servers import Family, _project_python, install
from tests.support.router import Process, free_port, wait_until

MLFLOW = Family("mlflow", ("mlflow==3.17.2",), _project_python())


class MlflowServer(Process):
    """`mlflow server` with its registry in SQLite under `work`; `url` once started."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            str(MLFLOW.bin / "mlflow"), "server",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
            "--default-artifact-root", str(work / "artifacts"),
        ]  # fmt: skip
        super().__init__(argv, work / "mlflow.log")

    def start(self, timeout: float = 540) -> None:
        # Importing MLflow and creating its schema takes 15 s on an idle machine and minutes on a busy one.
        super().start()

        def healthy() -> bool:
            self.assert_running()
            try:
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, "mlflow server to answer /health", interval=0.25)

    def stop(self, timeout: float = 5) -> int | None:
        """The server (SIGTERM, then SIGKILL: it may take half a minute to stop), then whatever it started
        in its session (uvicorn, its job runner's huey consumers)."""
        code = super().stop(timeout)
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        return code


def main() -> int:
    if sys.argv[1:] != ["install"]:
        print(__doc__, file=sys.stderr)
        return 2
    seconds = install(MLFLOW)
    print(f"mlflow venv: {MLFLOW.venv} ({'cached' if seconds == 0 else f'built in {seconds:.0f}s'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
