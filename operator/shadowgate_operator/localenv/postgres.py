"""A throwaway PostgreSQL cluster from the machine's own server binaries.

initdb into a temp dir, listen on a free loopback port with the socket in that dir, create the
`shadowgate` database and try `CREATE EXTENSION timescaledb` (reported in `timescale`, never
required). `stop()` then `start()` again keeps the data and the port: tests use it to take the
database away under load and bring it back.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shadowgate_operator.localenv.errors import ComponentError
from shadowgate_operator.localenv.process import ManagedProcess, free_port, port_is_free, run_as_owner_needed

DATABASE = "shadowgate"
SUPERUSER = "postgres"


def find_postgres_bin() -> Path:
    """The newest PostgreSQL server bin directory: $SHADOWGATE_PG_BIN, /usr/lib/postgresql/*/bin or PATH."""
    if configured := os.environ.get("SHADOWGATE_PG_BIN"):
        return Path(configured)
    candidates = sorted(
        (Path(path) for path in glob.glob("/usr/lib/postgresql/*/bin") if Path(path, "postgres").exists()),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1]
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise ComponentError(
        "postgres",
        "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and PATH); "
        "install the postgresql package or set SHADOWGATE_PG_BIN",
    )


@dataclass
class Postgres:
    bin_dir: Path | None = None
    directory: Path | None = None
    port: int | None = None
    detached: bool = False
    start_timeout: float = 30.0
    timescale: bool = False
    timescale_reason: str = ""
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
        bin_dir = self.bin_dir or find_postgres_bin()
        user = run_as_owner_needed()
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="shadowgate-pg-"))
            self._owns_directory = True
            if user:
                shutil.chown(self.directory, user)
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
        # Timescale is optional: the schema uses it when present and plain PostgreSQL otherwise.
        attempt = self._psql(bin_dir, DATABASE, "CREATE EXTENSION IF NOT EXISTS timescaledb")
        self.timescale = attempt.returncode == 0
        lines = attempt.stderr.strip().splitlines()
        self.timescale_reason = "" if self.timescale else (lines[0] if lines else "unknown error")
