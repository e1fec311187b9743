"""TimescaleDB built from its release source against the machine's PostgreSQL server, cached by version.

No package registry reachable from the test machines serves TimescaleDB, so `shadowgate dev build`
(`make binaries`, hence `make test` and `make demo`) builds it from a release tarball once per
TimescaleDB version and PostgreSQL server version, into a *private copy of the server tree*:

    $SHADOWGATE_CACHE/timescaledb/timescaledb-<version>-pg<server version>/
        lib/postgresql/15/bin/   the server's own binaries, copied
        lib/postgresql/15/lib/   its libraries, plus timescaledb*.so
        share/postgresql/15/     its share/, plus the extension's SQL, and a postgresql.conf.sample
                                 that preloads timescaledb (every cluster initdb'd from here does)
        build.json               what was built from what, and how long it took

PostgreSQL finds its lib/ and share/ relative to the bin/ it runs from (the layout mirrors the compiled-in
paths below their common prefix, /usr on Debian), so the throwaway cluster runs from this copy and the
system's PostgreSQL installation and configuration are never touched. Other tools (the e2e image build)
can take the tree as it is: `ServerTree.root` holds everything a server needs besides shared system
libraries.

The source is a directory holding `timescaledb-<version>.tar.gz` and a `SHA256SUMS` that lists it
(checked before anything is unpacked), named by $SHADOWGATE_TIMESCALEDB_SOURCE (`.ci/run` points it at
../shared/vendor). The version is TIMESCALEDB_VERSION unless $SHADOWGATE_TIMESCALEDB_VERSION says
otherwise. Building needs cmake, a C compiler, make and the server's headers at exactly the server's
version (Debian: postgresql-server-dev-NN pinned to the installed postgresql-NN, plus libssl-dev and
libkrb5-dev); as root on Debian the missing ones are installed with apt-get. Without a source or the
tools, `ensure_timescaledb` says why in one line and the throwaway cluster stays plain PostgreSQL; a source
whose checksum does not match, or a build that fails, is an error.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shadowgate_dev.localenv.binaries import cache_root
from shadowgate_dev.localenv.errors import ComponentError

TIMESCALEDB_VERSION = "2.22.1"
"""The release tests and the demo run on (the one in ../shared/vendor)."""

SOURCE_ENV = "SHADOWGATE_TIMESCALEDB_SOURCE"
VERSION_ENV = "SHADOWGATE_TIMESCALEDB_VERSION"

# What every cluster started from the private tree gets (appended to its postgresql.conf.sample):
# the library preloaded, no telemetry calls from test machines, and room for the background workers
# of several databases with the extension (each runs a scheduler and its jobs; the default
# max_worker_processes = 8 runs out with a handful: "failed to start a background worker").
PRELOAD_SETTINGS = {
    "shared_preload_libraries": "'timescaledb'",
    "timescaledb.telemetry_level": "off",
    "timescaledb.max_background_workers": "24",
    "max_worker_processes": "40",
}

_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DREGRESS_CHECKS=OFF",
    "-DTAP_CHECKS=OFF",
    "-DWARNINGS_AS_ERRORS=OFF",
    "-DENABLE_DEBUG_UTILS=OFF",
    "-DGENERATE_DOWNGRADE_SCRIPT=OFF",
)
_PROGRESS = re.compile(r"^\[\s*(\d+)%\]")


def timescaledb_version() -> str:
    return os.environ.get(VERSION_ENV) or TIMESCALEDB_VERSION


@dataclass(frozen=True)
class ServerTree:
    """A private copy of the PostgreSQL server tree with TimescaleDB installed and preloaded."""

    root: Path
    timescaledb_version: str
    postgres_version: str
    bin_relative: str
    """bin/ below `root` (lib/postgresql/15/bin on Debian)."""
    build_seconds: float

    @property
    def bin_dir(self) -> Path:
        return self.root / self.bin_relative

    def describe(self) -> str:
        return f"PostgreSQL {self.postgres_version} with timescaledb {self.timescaledb_version}"


@dataclass(frozen=True)
class Availability:
    """What the throwaway cluster will run on: a tree, or plain PostgreSQL and the reason in one line."""

    tree: ServerTree | None
    reason: str = ""


# --- the server the tree is made from ---------------------------------------------------------------


def server_version(bin_dir: Path) -> str:
    """The server's version as `postgres --version` prints it: "15.18" of "postgres (PostgreSQL) 15.18 (Debian)"."""
    result = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"\(PostgreSQL\) (\d+(?:\.\d+)?)", result.stdout)
    if result.returncode != 0 or not match:
        raise ComponentError("timescaledb", f"cannot tell the version of {bin_dir}/postgres: {result.stderr.strip()}")
    return match.group(1)


def _version_num(version: str) -> int:
    """PG_VERSION_NUM of a "15.18" version (majors from 10 on: major * 10000 + minor)."""
    major, _, minor = version.partition(".")
    return int(major) * 10000 + int(minor or 0)


def tree_dir(postgres_version: str, version: str | None = None) -> Path:
    return cache_root() / "timescaledb" / f"timescaledb-{version or timescaledb_version()}-pg{postgres_version}"


def cached_tree(bin_dir: Path, version: str | None = None) -> ServerTree | None:
    """The cached tree for this server and TimescaleDB version, or None when there is none (yet)."""
    manifest = tree_dir(server_version(bin_dir), version) / "build.json"
    try:
        built = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    tree = ServerTree(
        root=manifest.parent,
        timescaledb_version=built["timescaledb_version"],
        postgres_version=built["postgres_version"],
        bin_relative=built["bin_relative"],
        build_seconds=built["build_seconds"],
    )
    return tree if (tree.bin_dir / "postgres").is_file() else None


def availability(bin_dir: Path) -> Availability:
    """What a throwaway cluster started now runs on, without building anything."""
    tree = cached_tree(bin_dir)
    if tree is not None:
        return Availability(tree)
    where = tree_dir(server_version(bin_dir))
    return Availability(
        None,
        f"no timescaledb {timescaledb_version()} build at {where} "
        f"(`make binaries` builds one when ${SOURCE_ENV} names a directory with its release tarball)",
    )


# --- the build --------------------------------------------------------------------------------------


@contextmanager
def _build_lock() -> Iterator[None]:
    """One build per machine at a time; a second caller waits, then finds the tree built."""
    lock_path = cache_root() / "timescaledb" / ".build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def verified_source(directory: Path, version: str) -> Path:
    """The tarball of `version` in `directory`, after checking it against the directory's SHA256SUMS."""
    tarball = directory / f"timescaledb-{version}.tar.gz"
    sums = directory / "SHA256SUMS"
    if not tarball.is_file():
        raise ComponentError("timescaledb", f"{tarball} does not exist (${SOURCE_ENV}={directory})")
    try:
        listed = {
            name.lstrip("*"): digest
            for digest, name in (line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip())
        }
    except (OSError, ValueError) as exc:
        raise ComponentError("timescaledb", f"cannot read the checksums in {sums}: {exc}") from exc
    expected = listed.get(tarball.name)
    if expected is None:
        raise ComponentError("timescaledb", f"{sums} has no checksum for {tarball.name}")
    digest = hashlib.sha256()
    with tarball.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise ComponentError(
            "timescaledb", f"{tarball}: SHA-256 {digest.hexdigest()} is not {expected} ({sums}): not building it"
        )
    return tarball


def _pg_config(bin_dir: Path, *flags: str) -> list[str]:
    pg_config = bin_dir / "pg_config"
    result = subprocess.run([str(pg_config), *flags], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ComponentError("timescaledb", f"{pg_config} {' '.join(flags)} failed: {result.stderr.strip()}")
    return result.stdout.splitlines()


def _headers_version(include_server: Path) -> int | None:
    """PG_VERSION_NUM of the server headers installed, or None when there are none."""
    try:
        text = (include_server / "pg_config.h").read_text()
    except OSError:
        return None
    match = re.search(r"#define PG_VERSION_NUM (\d+)", text)
    return int(match.group(1)) if match else None


def _debian_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", package], capture_output=True, text=True, check=False
    )
    # "ii  15.18-0+deb12u1": the status abbreviation is three characters wide, then the version.
    words = result.stdout.split()
    return words[-1] if result.returncode == 0 and len(words) >= 2 and words[0] == "ii" else None


def missing_tools(bin_dir: Path, postgres_version: str) -> list[str]:
    """What the build lacks on this machine, in words (empty when it can build)."""
    missing = [f"`{tool}`" for tool in ("cmake", "make", "cc") if shutil.which(tool) is None]
    if not (bin_dir / "pg_config").is_file():
        missing.append(f"{bin_dir / 'pg_config'}")
        return missing
    include_server = Path(_pg_config(bin_dir, "--includedir-server")[0])
    headers = _headers_version(include_server)
    if headers != _version_num(postgres_version):
        found = "none" if headers is None else f"those of {headers // 10000}.{headers % 10000}"
        missing.append(f"the PostgreSQL {postgres_version} server headers in {include_server} (found {found})")
    return missing


def debian_packages(bin_dir: Path, postgres_version: str) -> list[str]:
    """The Debian packages the build needs and the machine lacks, the server headers pinned to the
    server's exact package version. Empty when nothing is missing (or this is not Debian)."""
    major = postgres_version.split(".")[0]
    server_package = _debian_version(f"postgresql-{major}")
    wanted = ["cmake", "gcc", "make", "libssl-dev", "libkrb5-dev"]
    packages = [package for package in wanted if _debian_version(package) is None]
    include_server = Path(_pg_config(bin_dir, "--includedir-server")[0]) if (bin_dir / "pg_config").is_file() else None
    headers = _headers_version(include_server) if include_server else None
    if server_package and headers != _version_num(postgres_version):
        packages.append(f"postgresql-server-dev-{major}={server_package}")
    return packages


def install_build_dependencies(packages: list[str]) -> None:
    """apt-get install the packages (as root), after refreshing the package lists."""
    print(f"installing {' '.join(packages)} from Debian's packages (to build TimescaleDB)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
    ):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise ComponentError("timescaledb", f"`{' '.join(argv)}` failed ({result.returncode}):\n{tail}")


def _nice() -> None:
    os.nice(10)  # the build shares the machine with whatever else runs: it yields first


def _run_build_step(argv: list[str], cwd: Path, label: str, started: float, log: Path) -> None:
    """Run one step, its output into `log`, with a progress line from make's "[ NN%]" now and then."""
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        process = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_nice
        )
        assert process.stdout is not None
        last_print = time.monotonic()
        for line in process.stdout:
            sink.write(line)
            now = time.monotonic()
            match = _PROGRESS.match(line)
            if match and now - last_print >= 30:
                last_print = now
                print(f"  building {label}: {match.group(1)}%, {now - started:.0f}s", file=sys.stderr)
        code = process.wait()
    if code != 0:
        raise ComponentError("timescaledb", f"`{' '.join(argv)}` failed with code {code}", log)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


@dataclass(frozen=True)
class _Layout:
    """Where the server's directories went in the private tree: compiled-in path -> path in the tree."""

    bin_relative: str
    lib: tuple[Path, Path]
    share: tuple[Path, Path]

    def place(self, installed: Path) -> Path | None:
        """Where a file `make install` meant for `installed` goes in the tree (None: not lib/ or share/)."""
        for compiled, target in (self.lib, self.share):
            if installed.is_relative_to(compiled):
                return target / installed.relative_to(compiled)
        return None


def _copy_server_tree(bin_dir: Path, root: Path) -> _Layout:
    """Copy the server's bin/, lib/ and share/ below `root`, laid out as below their common prefix."""
    bindir, pkglibdir, sharedir = (Path(line) for line in _pg_config(bin_dir, "--bindir", "--pkglibdir", "--sharedir"))
    prefix = Path(os.path.commonpath([bindir, pkglibdir, sharedir]))
    # bin/ from the server we were given ($SHADOWGATE_PG_BIN may name another place than pg_config's).
    for source, compiled in ((bin_dir, bindir), (pkglibdir, pkglibdir), (sharedir, sharedir)):
        shutil.copytree(source, root / compiled.relative_to(prefix), symlinks=True, dirs_exist_ok=True)
    return _Layout(
        bin_relative=str(bindir.relative_to(prefix)),
        lib=(pkglibdir, root / pkglibdir.relative_to(prefix)),
        share=(sharedir, root / sharedir.relative_to(prefix)),
    )


def _extract_safely(archive: tarfile.TarFile, destination: Path) -> None:
    """Unpack a source tarball, refusing members that would land outside `destination`.

    Python 3.11.4+ does this with extraction filters; Debian bookworm's python3 is 3.11.2, which has
    none (`extractall(filter=...)` is a TypeError there), so the same rule is applied by hand.
    """
    if hasattr(tarfile, "data_filter"):
        archive.extractall(destination, filter="data")
        return
    root = destination.resolve()
    for member in archive.getmembers():
        target = (root / member.name).resolve()
        link = (target.parent / member.linkname).resolve() if member.issym() else None
        linked = (root / member.linkname).resolve() if member.islnk() else None
        escapes = [p for p in (target, link, linked) if p is not None and not p.is_relative_to(root)]
        if escapes or member.isdev():
            raise ComponentError("timescaledb", f"refusing unsafe member {member.name!r} in the source tarball")
    archive.extractall(destination)  # every member was checked above


def build(bin_dir: Path, source_dir: Path, version: str | None = None) -> ServerTree:
    """Build TimescaleDB `version` from `source_dir` against the server in `bin_dir` into the cache,
    unless it is there already. Raises ComponentError when it cannot."""
    version = version or timescaledb_version()
    postgres_version = server_version(bin_dir)
    with _build_lock():
        cached = cached_tree(bin_dir, version)
        if cached is not None:
            return cached
        tarball = verified_source(source_dir, version)
        if os.geteuid() == 0:
            packages = debian_packages(bin_dir, postgres_version)
            if packages:
                install_build_dependencies(packages)
        missing = missing_tools(bin_dir, postgres_version)
        if missing:
            raise ComponentError("timescaledb", f"cannot build: missing {', '.join(missing)}")
        final = tree_dir(postgres_version, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        label = f"timescaledb {version} for PostgreSQL {postgres_version}"
        print(f"Building {label} from {tarball} (first run only; 3-8 min on 2 cores)...", file=sys.stderr)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as scratch:
            work = Path(scratch)
            log = work / "build.log"
            with tarfile.open(tarball) as archive:
                _extract_safely(archive, work / "src")
            (source,) = (work / "src").iterdir()
            pg_config = str(bin_dir / "pg_config")
            jobs = str(max(1, min(os.cpu_count() or 2, 4)))
            _run_build_step(
                ["cmake", "-S", str(source), "-B", str(work / "build"), f"-DPG_CONFIG={pg_config}", *_CMAKE_OPTIONS],
                work,
                label,
                started,
                log,
            )
            _run_build_step(["make", "-C", str(work / "build"), f"-j{jobs}"], work, label, started, log)
            staged = work / "staged"
            _run_build_step(
                ["make", "-C", str(work / "build"), "install", f"DESTDIR={staged}"], work, label, started, log
            )
            tree = work / "tree"
            layout = _copy_server_tree(bin_dir, tree)
            installed = 0
            for path in sorted(staged.rglob("*")):
                if not path.is_file():
                    continue
                target = layout.place(Path("/") / path.relative_to(staged))
                if target is None:
                    raise ComponentError("timescaledb", f"`make install` put {path} outside lib/ and share/", log)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
                installed += 1
            with (layout.share[1] / "postgresql.conf.sample").open("a") as conf:
                conf.write("\n# shadowgate: TimescaleDB preloaded in every cluster made from this private tree\n")
                conf.writelines(f"{name} = {value}\n" for name, value in PRELOAD_SETTINGS.items())
            seconds = time.monotonic() - started
            (tree / "build.json").write_text(
                json.dumps(
                    {
                        "timescaledb_version": version,
                        "postgres_version": postgres_version,
                        "bin_relative": layout.bin_relative,
                        "build_seconds": round(seconds, 1),
                        "source": str(tarball),
                        "files_installed": installed,
                        "cmake_options": list(_CMAKE_OPTIONS),
                    },
                    indent=2,
                )
            )
            shutil.copy2(log, tree / "build.log")
            # Moved into place only when complete: a half-built tree never looks cached.
            os.replace(tree, final)
        print(f"Built {label} in {seconds:.0f}s into {final}", file=sys.stderr)
        built = cached_tree(bin_dir, version)
        assert built is not None
        return built


def ensure_timescaledb(bin_dir: Path, source_dir: Path | None = None) -> Availability:
    """The cached tree, built first when a source is named (argument or $SHADOWGATE_TIMESCALEDB_SOURCE)
    and the tree is missing. Without a source or, as a user other than root, without the build tools:
    no tree, and the reason in one line. A bad checksum or a failed build raises ComponentError."""
    found = availability(bin_dir)
    if found.tree is not None:
        return found
    configured = source_dir or (Path(os.environ[SOURCE_ENV]) if os.environ.get(SOURCE_ENV) else None)
    if configured is None:
        return found
    postgres_version = server_version(bin_dir)
    if os.geteuid() != 0:
        missing = missing_tools(bin_dir, postgres_version)
        if missing:
            return Availability(None, f"cannot build timescaledb here: missing {', '.join(missing)}")
    return Availability(build(bin_dir, configured))


def linked_tree(tree: ServerTree, destination: Path) -> Path:
    """A view of the tree at `destination` (hard links, copies across file systems), for a server run as
    another user than the cache's owner (root's ~/.cache is closed to `postgres`). Returns its bin/."""
    shutil.rmtree(destination, ignore_errors=True)  # a view left by an earlier start from this directory
    shutil.copytree(tree.root, destination, symlinks=True, copy_function=_link_or_copy)
    return destination / tree.bin_relative
