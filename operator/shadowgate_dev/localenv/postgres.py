"""A throwaway PostgreSQL cluster from the machine's own server binaries, with TimescaleDB where it was built.

initdb into a temp dir, listen on a free loopback port with the socket in that dir, create the
`shadowgate` database and `CREATE EXTENSION timescaledb` in it. The server runs from the private tree
of localenv/timescaledb.py (the machine's server with TimescaleDB built in and preloaded) when that is in
the cache, and from the machine's own server otherwise, or when asked with `timescaledb=False` (a plain
PostgreSQL, which shadowgate supports as well). `timescale` says whether the extension was created,
`timescale_reason` why not, `server` what ran. `stop()` then `start()` again keeps the data and the port:
tests use it to take the database away under load and bring it back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.prerequisites import postgres_bin_candidates, postgres_install_plan
from shadowgate_dev.localenv.process import ManagedProcess, free_port, port_is_free, run_as_owner_needed
from shadowgate_dev.localenv.timescaledb import availability, linked_tree, server_version

DATABASE = "shadowgate"
TIMESCALEDB_ENV = "SHADOWGATE_TIMESCALEDB"
SUPERUSER = "postgres"


def find_postgres_bin() -> Path:
    """The newest PostgreSQL server bin directory: $SHADOWGATE_PG_BIN, /usr/lib/postgresql/*/bin or PATH.

    Finds, never installs: `make binaries` (`shadowgate dev build`) installs Debian's package as root
    (prerequisites.ensure_postgres_server); without one, the error says in one line what to install."""
    if configured := os.environ.get("SHADOWGATE_PG_BIN"):
        return Path(configured)
    candidates = postgres_bin_candidates()
    if candidates:
        return candidates[-1]
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    plan = postgres_install_plan(root=False, apt_get=shutil.which("apt-get"))
    raise ComponentError("postgres", plan if isinstance(plan, str) else "no PostgreSQL server binaries found")


def database_description() -> str:
    """What `Postgres()` runs on this machine now, in one line (for logs: CI shows "with timescaledb")."""
    try:
        system = find_postgres_bin()
        found = availability(system)
    except ComponentError as exc:
        return f"none: {exc}"
    if os.environ.get(TIMESCALEDB_ENV, "1") == "0":
        return f"PostgreSQL {server_version(system)}, plain (${TIMESCALEDB_ENV}=0)"
    if found.tree is not None:
        return f"{found.tree.describe()} (from {found.tree.root})"
    return f"PostgreSQL {server_version(system)}, plain, no timescaledb: {found.reason}"


@dataclass
class Postgres:
    bin_dir: Path | None = None
    directory: Path | None = None
    port: int | None = None
    detached: bool = False
    start_timeout: float = 30.0
    timescaledb: bool = field(default_factory=lambda: os.environ.get(TIMESCALEDB_ENV, "1") != "0")
    """Run from the cached TimescaleDB tree when there is one (False: plain PostgreSQL; the default is
    False when $SHADOWGATE_TIMESCALEDB=0, to run a whole suite or the demo on plain PostgreSQL)."""
    settings: dict[str, str] = field(default_factory=dict)
    """Server settings on the command line (`-c name=value`), e.g. timescaledb.license."""
    timescale: bool = False
    timescale_reason: str = ""
    server: str = ""
    """What runs, in words: "PostgreSQL 15.18 with timescaledb 2.22.1" or "PostgreSQL 15.18"."""
    initdb_seconds: float = 0.0
    process: ManagedProcess | None = field(default=None, init=False)
    _owns_directory: bool = False
    _initialized: bool = False

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def log_path(self) -> Path:
        return self._dir / "postgres.log"

    @property
    def _dir(self) -> Path:
        if self.directory is None:
            raise ComponentError("postgres", "not started")
        return self.directory

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
        self.cleanup()

    def start(self) -> None:
        """Start the server (initialising it on first start); waits until it accepts connections."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Fast shutdown; the data directory stays for a later start()."""
        if self.process is not None:
            self.process.stop(timeout=15)

    def cleanup(self) -> None:
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.running() else None

    def _start(self) -> None:
        user = run_as_owner_needed()
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="shadowgate-pg-"))
            self._owns_directory = True
            if user:
                shutil.chown(self.directory, user)
        bin_dir = self._server(user)
        self.port = self.port or free_port()
        if not port_is_free(self.port):
            raise ComponentError("postgres", f"port 127.0.0.1:{self.port} is already in use")
        data = self._dir / "data"
        if not self._initialized and not data.exists():
            self._initdb(bin_dir, data, user)
        self._initialized = True
        self.process = ManagedProcess(
            name="postgres",
            argv=[
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self._dir),
                "-c",
                "listen_addresses=127.0.0.1",
                # Throwaway data: durability buys nothing here and costs a lot of I/O.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                *(argument for name, value in self.settings.items() for argument in ("-c", f"{name}={value}")),
            ],
            log_path=self.log_path,
            user=user,
            die_with_parent=not self.detached,
            stop_signal=signal.SIGINT,  # "fast" shutdown: roll back open transactions, exit promptly
        )
        self.process.start()
        pg_isready = bin_dir / "pg_isready"
        self.process.wait_ready(
            lambda: (
                subprocess.run(
                    [str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER],
                    check=False,
                ).returncode
                == 0
            ),
            self.start_timeout,
            "accepting connections",
        )
        self._create_database(bin_dir)

    def _server(self, user: str | None) -> Path:
        """The bin/ to run: the one given, else the TimescaleDB tree (seen through links in our directory
        when the server runs as another user, who cannot enter the cache's owner's home), else the
        machine's."""
        if self.bin_dir is not None:
            self.server = self.server or f"PostgreSQL {server_version(self.bin_dir)}"
            return self.bin_dir
        system = find_postgres_bin()
        found = availability(system) if self.timescaledb else None
        if found is None or found.tree is None:
            self.timescale_reason = found.reason if found is not None else "plain PostgreSQL asked for"
            self.server = f"PostgreSQL {server_version(system)}"
            self.bin_dir = system
            return system
        self.server = found.tree.describe()
        self.bin_dir = linked_tree(found.tree, self._dir / "server") if user else found.tree.bin_dir
        return self.bin_dir

    def _initdb(self, bin_dir: Path, data: Path, user: str | None) -> None:
        started = time.monotonic()
        result = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            user=user,
            check=False,
        )
        if result.returncode != 0:
            raise ComponentError("postgres", f"initdb failed ({result.returncode}): {result.stderr.strip()}")
        self.initdb_seconds = time.monotonic() - started

    def _psql(self, bin_dir: Path, database: str, sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(bin_dir / "psql"),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    def _create_database(self, bin_dir: Path) -> None:
        found = self._psql(bin_dir, "postgres", f"SELECT count(*) FROM pg_database WHERE datname = '{DATABASE}'")
        if found.returncode != 0:
            raise ComponentError("postgres", f"cannot query the server: {found.stderr.strip()}", self.log_path)
        if found.stdout.strip() == "0":
            created = self._psql(bin_dir, "postgres", f"CREATE DATABASE {DATABASE}")
            if created.returncode != 0:
                raise ComponentError("postgres", f"CREATE DATABASE failed: {created.stderr.strip()}", self.log_path)
        if not self.timescaledb:
            return
        # Timescale is optional: the schema uses it when present and plain PostgreSQL otherwise.
        attempt = self._psql(bin_dir, DATABASE, "CREATE EXTENSION IF NOT EXISTS timescaledb")
        self.timescale = attempt.returncode == 0
        lines = attempt.stderr.strip().splitlines()
        if self.timescale:
            self.timescale_reason = ""
        elif not self.timescale_reason:
            self.timescale_reason = lines[0] if lines else "unknown error"
