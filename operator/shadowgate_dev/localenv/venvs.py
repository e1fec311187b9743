"""Python programs the project runs but never imports, each in a virtualenv of its own, cached.

MLflow's tracking server (`make demo`, the registry tests) and the protocol tests' model servers
(MLServer, KServe, Triton) need dependencies that conflict with each other and with the project's. Each
`Family` gets its own venv, built with uv (seconds instead of pip's minutes) in
``$SHADOWGATE_CACHE/model-servers/`` under a hash of what it holds; a file lock lets concurrent runs share
one build, and a venv is used only once its build finished (`.complete`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shadowgate_dev.localenv.prerequisites import cache_root


def cache() -> Path:
    return cache_root() / "model-servers"


@dataclass(frozen=True)
class Family:
    name: str
    requirements: tuple[str, ...]
    python: str
    """The interpreter the venv is built on."""

    @property
    def venv(self) -> Path:
        key = json.dumps([self.name, self.requirements, _python_version(self.python)])
        return cache() / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

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


def project_python() -> str:
    """The interpreter under the project's venv (uv builds a venv from a base interpreter, not a venv)."""
    return getattr(sys, "_base_executable", sys.executable)


def uv() -> str:
    """The uv next to this Python (the project's dev extra), else on PATH."""
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found is None:
        raise RuntimeError("uv is not installed: it is in the project's dev extra (make setup)")
    return found


def install(family: Family) -> float:
    """Build the family's venv unless it is cached; returns the seconds it took (0 when cached).
    Raises RuntimeError (no uv, no base Python) or subprocess.CalledProcessError / TimeoutExpired."""
    if family.ready:
        return 0.0
    if not Path(family.python).exists():
        raise RuntimeError(f"{family.name} needs {family.python} (Debian's python3 package)")
    cache().mkdir(parents=True, exist_ok=True)
    with (cache() / f"{family.venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (family.venv / ".complete").exists():  # another run built it while we waited
            return 0.0
        started = time.monotonic()
        shutil.rmtree(family.venv, ignore_errors=True)  # a build that died halfway
        env = {**os.environ, "UV_NATIVE_TLS": "1", "UV_PYTHON_DOWNLOADS": "never"}
        command = uv()
        subprocess.run(
            [command, "venv", "--quiet", "--python", family.python, str(family.venv)],
            env=env, check=True, timeout=300, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            [command, "pip", "install", "--quiet", "--python", str(family.bin / "python"), *family.requirements],
            env=env, check=True, timeout=1800, capture_output=True,
        )  # fmt: skip
        (family.venv / ".complete").write_text(json.dumps({"requirements": family.requirements}) + "\n")
        return time.monotonic() - started
