"""Child processes that never outlive us: a log file each, readiness polling, ordered teardown."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shadowgate_dev.localenv.errors import ComponentError

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on the port (servers set SO_REUSEADDR, so TIME_WAIT is fine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _child_setup(user: str | None, die_with_parent: bool) -> Callable[[], None]:
    """preexec_fn: drop to `user` (PostgreSQL refuses root), then die when the parent dies."""
    account = pwd.getpwnam(user) if user else None

    def setup() -> None:
        if account is not None:
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
        if die_with_parent:
            # Set after setuid: a credential change clears the parent-death signal.
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return setup


def run_as_owner_needed() -> str | None:
    """The unprivileged account to run PostgreSQL as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise ComponentError("postgres", "running as root and no unprivileged 'postgres' or 'nobody' account exists")


@dataclass
class ManagedProcess:
    """One long-running component with its own log file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    user: str | None = None
    die_with_parent: bool = True
    stop_signal: signal.Signals = signal.SIGTERM
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        binary = Path(self.argv[0])
        if not binary.exists():
            raise ComponentError(self.name, f"binary not found at {binary}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                # Own session: a Ctrl-C in the terminal reaches us, and we tear down in order.
                start_new_session=True,
                preexec_fn=_child_setup(self.user, self.die_with_parent),
            )
        except OSError as exc:
            raise ComponentError(self.name, f"could not start {binary}: {exc}", self.log_path) from exc
        finally:
            log.close()

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise ComponentError(self.name, "not started")
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, probe: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `probe` until it is true; fail early if the process exits, with its log tail."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen is not None and self.popen.poll() is not None:
                raise ComponentError(
                    self.name, f"exited with code {self.popen.returncode} before {what}", self.log_path
                )
            with contextlib.suppress(Exception):
                if probe():
                    return
            if time.monotonic() > deadline:
                raise ComponentError(self.name, f"not {what} after {timeout:.0f}s", self.log_path)
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask politely, then kill the whole process group; always reap."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(self.stop_signal)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        # Anything the component forked into its group (PostgreSQL backends) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
