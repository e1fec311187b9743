"""Session-scoped real infrastructure, started only when a test asks for it.

`control_plane`/`kubeconfig` start etcd, kube-apiserver and kube-controller-manager; `database`/`dsn`
start a throwaway PostgreSQL. Unit tests request neither and run without them. Set
SHADOWGATE_USE_DEV_ENV=1 to reuse a running `shadowgate dev up` instead (fast iteration).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shadowgate_dev.localenv import ControlPlane, Postgres
from shadowgate_dev.localenv.binaries import KUBERNETES
from shadowgate_dev.localenv.cli import read_state
from shadowgate_dev.localenv.postgres import database_description

REPO_ROOT = Path(__file__).resolve().parents[1]

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
STARTUP_TIMES: dict[str, float] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Subprocesses (`shadowgate operator`, the router, model servers) run this checkout's code, as the tests
    themselves do through pyproject's `pythonpath`, whichever venv's package is installed (a venv made in
    another checkout would otherwise start its own copy of the operator)."""
    roots = [str(path) for path in config.getini("pythonpath")]
    inherited = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(roots + ([inherited] if inherited else []))


def pytest_report_header() -> str:
    """What the throwaway database runs: CI's log must say "with timescaledb"."""
    return f"throwaway database: {database_description()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for component, seconds in STARTUP_TIMES.items():
        terminalreporter.write_line(f"{component} started in {seconds:.1f}s")


def _dev_state() -> dict[str, Any] | None:
    if os.environ.get("SHADOWGATE_USE_DEV_ENV") != "1":
        return None
    state = read_state()
    if state is None:
        pytest.exit("SHADOWGATE_USE_DEV_ENV=1 but no `shadowgate dev up` environment is running", returncode=2)
    return state


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane | None]:
    """The session's control plane (None when reusing a dev environment)."""
    if _dev_state() is not None:
        yield None
        return
    with ControlPlane() as plane:
        STARTUP_TIMES["control plane (etcd, kube-apiserver, kube-controller-manager)"] = plane.startup_seconds
        yield plane


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane | None) -> str:
    if control_plane is None:
        state = _dev_state()
        assert state is not None
        return str(state["kubeconfig"])
    return str(control_plane.kubeconfig)


@pytest.fixture(scope="session")
def database() -> Iterator[Postgres | None]:
    if _dev_state() is not None:
        yield None
        return
    started = time.monotonic()
    with Postgres() as postgres:
        STARTUP_TIMES[f"{postgres.server} (initdb and start)"] = time.monotonic() - started
        yield postgres


@pytest.fixture(scope="session")
def plain_database() -> Iterator[Postgres]:
    """A second throwaway cluster, plain PostgreSQL (no TimescaleDB anywhere): shadowgate supports both."""
    started = time.monotonic()
    with Postgres(timescaledb=False) as postgres:
        STARTUP_TIMES[f"{postgres.server}, plain (initdb and start)"] = time.monotonic() - started
        yield postgres


@pytest.fixture(scope="session")
def apache_database() -> Iterator[Postgres]:
    """A third cluster: TimescaleDB's Apache-only edition (hypertables, no compression, no policies)."""
    started = time.monotonic()
    with Postgres(settings={"timescaledb.license": "apache"}) as postgres:
        STARTUP_TIMES[f"{postgres.server}, Apache license (initdb and start)"] = time.monotonic() - started
        yield postgres


@pytest.fixture(scope="session")
def dsn(database: Postgres | None) -> str:
    if database is None:
        state = _dev_state()
        assert state is not None
        return str(state["dsn"])
    return database.dsn


@pytest.fixture(scope="session")
def kubectl(kubeconfig: str) -> Kubectl:
    """Run kubectl (the build matching the server) against the test cluster: kubectl("get", "ns", input=...)."""

    def run(
        *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(KUBERNETES.path("kubectl")), *args],
            env={**os.environ, "KUBECONFIG": kubeconfig},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    return run


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (without waiting for it to go)."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{stem}-{secrets.token_hex(3)}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)
