"""hack/kind-e2e.sh where it cannot run: without Docker it says so and exits 0, touching nothing. The
e2e scripts are valid bash, and kind and `make e2e` share one scenario script."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "kind-e2e.sh"


def fake_tools(directory: Path, docker_info_fails: bool) -> Path:
    """docker (whose `info` fails like a CLI without an engine) and kind/kubectl that only record being called."""
    calls = directory / "calls"
    for tool in ("kind", "kubectl"):
        (directory / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 0\n')
    info = 'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1'
    if not docker_info_fails:
        info = "exit 0"
    (directory / "docker").write_text(f'#!/bin/sh\necho "docker $*" >> {calls}\nif [ "$1" = info ]; then {info}; fi\n')
    for tool in ("kind", "kubectl", "docker"):
        (directory / tool).chmod(0o755)
    return calls


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script", ["kind-e2e.sh", "node-e2e.sh", "e2e-scenario.sh"])
def test_the_scripts_are_valid_bash(script: str) -> None:
    path = SCRIPT.parent / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):  # where it is installed; not needed for the tests
        checked = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


def test_kind_and_the_local_node_run_one_scenario_script() -> None:
    """The story is told once: both paths set up a cluster and images, then run hack/e2e-scenario.sh."""
    for script in ("kind-e2e.sh", "node-e2e.sh"):
        lines = (SCRIPT.parent / script).read_text().splitlines()
        assert any(line.split("#")[0].strip().endswith("hack/e2e-scenario.sh") for line in lines), script


def test_without_a_docker_engine_it_says_so_and_exits_cleanly(tmp_path: Path) -> None:
    calls = fake_tools(tmp_path, docker_info_fails=True)
    result = run({**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert "kind-e2e: skipped: the Docker engine is not reachable (Cannot connect to the Docker daemon" in result.stdout
    assert calls.read_text().splitlines() == ["docker info --format {{.ServerVersion}}"]  # no kind, no build


@pytest.mark.parametrize("docker", ["/nonexistent/docker", "no-such-docker-command"])
def test_without_docker_at_all_it_says_so_and_exits_cleanly(tmp_path: Path, docker: str) -> None:
    calls = fake_tools(tmp_path, docker_info_fails=False)
    result = run({**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "DOCKER": docker})
    assert result.returncode == 0, result.stderr
    assert f"kind-e2e: skipped: no docker command ({docker}) on PATH" in result.stdout
    assert not calls.exists()
