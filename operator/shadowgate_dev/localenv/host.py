"""What the local node needs from the machine, what it changes there, and how it puts it back.

- `preflight()` says in one line why a node cannot run here (not root, root without the capabilities
  containerd needs as in an unprivileged container, not Linux, no cgroups) and installs the Debian
  packages the node and the image builds use when they are missing.
- `machine_lock()`: one node per machine, however many checkouts and cache directories there are.
- `HostState` is a snapshot of everything a node touches outside its own directory: the sysctls that
  kubelet and the CNI bridge plugin change, network links, addresses and routes, nft tables and
  iptables rules, ipsets, mounts, network namespaces, cgroups and the few system directories containerd,
  CNI and kubelet write to whatever they are told. `difference()` names what is not as it was;
  `restore()` (node.py's teardown) puts back what a node changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shadowgate_dev.localenv.errors import ComponentError

# Debian packages and a file each installs: containerd and its runc shim, runc, the CNI plugins
# (bridge, host-local, loopback), nft for kube-proxy, iptables-nft and ipset for kube-router's
# NetworkPolicy firewall, and buildah and mmdebstrap for the images.
PACKAGES: dict[str, str] = {
    "containerd": "/usr/bin/containerd",
    "runc": "/usr/sbin/runc",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "nftables": "/usr/sbin/nft",
    "iptables": "/usr/sbin/iptables-nft",
    "ipset": "/usr/sbin/ipset",
    "buildah": "/usr/bin/buildah",
    "mmdebstrap": "/usr/bin/mmdebstrap",
}

# What kubelet (vm.*, kernel.*), the bridge plugin (ip_forward) and kube-proxy (conntrack, route_localnet;
# the node's kube-proxy is told to leave conntrack alone) may change; the node restores them on teardown.
RESTORED_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    "net.ipv6.conf.all.forwarding",
    "net.ipv6.conf.default.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.netfilter.nf_conntrack_tcp_be_liberal",
    "net.netfilter.nf_conntrack_udp_timeout",
    "net.netfilter.nf_conntrack_udp_timeout_stream",
)

# System directories a node's components write to whatever their configuration says: containerd's
# shim sockets (/run/containerd/s is fixed in containerd 1.6), the CRI's network namespaces, libcni's
# result cache, kubelet's /var/log/containers links. The rest are the components' defaults, which the
# node moves into its own directory; watched to prove it.
WATCHED_PATHS = (
    "/run/containerd",
    "/run/netns",
    "/var/lib/cni",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/etc/cni",
    "/opt/cni",
    "/opt/containerd",
    "/etc/kubernetes",
    "/var/lib/containers",
    "/run/containers",
)

CGROUP_ROOT = Path("/sys/fs/cgroup")
LOCK_PATH = Path("/run/lock/shadowgate-node.lock")
_MNT_DETACH = 2


class HostProblem(ComponentError):
    """The machine cannot run a node; the message is one line: why, and what to do."""

    def __init__(self, reason: str):
        super().__init__("node", reason)


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy: the v1 controllers (and name=systemd, unified) or the v2 root."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    if not CGROUP_ROOT.is_dir():
        return []
    return sorted(path for path in CGROUP_ROOT.iterdir() if path.is_dir() and not path.is_symlink())


def cgroup_v1() -> bool:
    return not (CGROUP_ROOT / "cgroup.controllers").exists()


# Capabilities without which containerd and the pod network cannot work (linux/capability.h): mounts
# and namespaces for every sandbox, the bridge, veths, addresses and nft tables.
REQUIRED_CAPABILITIES = {21: "CAP_SYS_ADMIN", 12: "CAP_NET_ADMIN"}


def missing_capabilities(status: str | None = None) -> list[str]:
    """The REQUIRED_CAPABILITIES this process lacks, from CapEff in /proc/self/status (or `status`)."""
    text = status if status is not None else Path("/proc/self/status").read_text()
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return [name for bit, name in REQUIRED_CAPABILITIES.items() if not effective >> bit & 1]
    return []  # no CapEff line: nothing to tell; the components say what fails


def missing_packages() -> list[str]:
    return [package for package, probe in PACKAGES.items() if not Path(probe).exists()]


def preflight(install: bool = True) -> None:
    """Raise HostProblem (one line) unless a node can run here; install missing packages as root."""
    if os.uname().sysname != "Linux":
        raise HostProblem("a local node needs Linux (containerd, cgroups, network namespaces); use hack/kind-e2e.sh")
    if os.geteuid() != 0:
        raise HostProblem(
            "a local node needs root (containerd, kubelet and the pod network create mounts, cgroups and "
            "network interfaces): run it as root, e.g. `sudo make e2e`, or use hack/kind-e2e.sh with Docker"
        )
    lacking = missing_capabilities()
    if lacking:
        raise HostProblem(
            f"root here lacks {' and '.join(lacking)} (an unprivileged container?): containerd cannot mount or "
            "make network namespaces; run on a VM or in a privileged container, or use hack/kind-e2e.sh with Docker"
        )
    if not cgroup_hierarchies():
        raise HostProblem(f"no cgroup file system at {CGROUP_ROOT}: containerd cannot run containers here")
    missing = missing_packages()
    if missing and install:
        install_packages(missing)
        missing = missing_packages()
    if missing:
        raise HostProblem(
            f"missing Debian packages {', '.join(missing)}: `apt-get install {' '.join(missing)}` (as root)"
        )


def install_packages(packages: list[str]) -> None:
    """apt-get install, without starting the services Debian would start (containerd.service)."""
    if shutil.which("apt-get") is None:
        raise HostProblem(
            f"missing {', '.join(packages)} and no apt-get to install them: install them with this system's "
            "package manager"
        )
    print(f"installing {' '.join(packages)} from Debian's packages", flush=True)
    policy = Path("/usr/sbin/policy-rc.d")
    # policy-rc.d exit 101: "do not start services" for the length of the install (deb-systemd-invoke
    # and invoke-rc.d both ask it); only ours is removed afterwards.
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\n# shadowgate node set-up: no services started while installing\nexit 101\n")
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for argv in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        ):
            result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise HostProblem(f"`{' '.join(argv)}` failed ({result.returncode}): {tail}")
    finally:
        if ours:
            policy.unlink(missing_ok=True)


@contextlib.contextmanager
def machine_lock(timeout: float = 0.0) -> Iterator[None]:
    """Hold the machine's node lock (one node up or down at a time); HostProblem when another holds it."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_PATH.open("a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise HostProblem(
                        f"another local node is being started or stopped on this machine ({holder}); "
                        "wait for it, or `shadowgate node down`"
                    ) from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the snapshot -------------------------------------------------------------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    _sysctl_path(name).write_text(value)


def _lines(argv: list[str]) -> list[str]:
    if shutil.which(argv[0]) is None:
        return []
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(fields[4].replace("\\040", " "))
    return points


def _tree(root: Path, limit: int = 2000) -> list[str]:
    """Every path under root (not following links, not crossing into mounts), up to `limit`."""
    if not root.exists():
        return []
    found = [str(root)]
    try:
        device = root.stat().st_dev
    except OSError:
        return found
    for directory, subdirectories, files in os.walk(root):
        keep = []
        for name in subdirectories:
            path = Path(directory, name)
            try:
                if path.is_symlink() or path.stat().st_dev != device:
                    files.append(name)
                    continue
            except OSError:
                continue
            keep.append(name)
        subdirectories[:] = keep
        found.extend(str(Path(directory, name)) for name in [*keep, *files])
        if len(found) >= limit:
            break
    return sorted(found)


def _iptables_rules() -> list[str]:
    rules = []
    for command in ("iptables-save", "ip6tables-save"):
        for line in _lines([command]):
            if not line.startswith("#"):
                # Chain counters change with traffic; the chains and rules are what matter.
                rules.append(line.split(" [", 1)[0] if line.startswith(":") else line)
    return rules


def _cgroups() -> list[str]:
    found = []
    for hierarchy in cgroup_hierarchies():
        for name in ("shadowgate", "kubepods", "kubepods.slice"):
            if (hierarchy / name).is_dir():
                found.append(str(hierarchy / name))
    return found


@dataclass
class HostState:
    """What a node may change outside its own directory. JSON-serialisable (the node keeps the one
    taken before it started, to restore from and to compare with after teardown)."""

    sysctls: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    nft_tables: list[str] = field(default_factory=list)
    iptables: list[str] = field(default_factory=list)
    ipsets: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @classmethod
    def capture(cls, mount_roots: tuple[str, ...] = ()) -> HostState:
        """The machine now. Mounts are those at or below the watched paths, the cgroup file system and
        `mount_roots` (a node's directory, the cache): what a node or an image build could leave; other
        work on the machine mounts what it likes elsewhere."""
        roots = tuple(root.rstrip("/") for root in (*WATCHED_PATHS, str(CGROUP_ROOT), *mount_roots))
        sysctls = {name: value for name in RESTORED_SYSCTLS if (value := read_sysctl(name)) is not None}
        return cls(
            sysctls=sysctls,
            links=sorted(os.listdir("/sys/class/net")),
            addresses=sorted(_lines(["ip", "-o", "address", "show"])),
            routes=sorted(_lines(["ip", "-o", "route", "show", "table", "all"])),
            nft_tables=sorted(_lines(["nft", "list", "tables"])),
            iptables=sorted(_iptables_rules()),
            ipsets=sorted(_lines(["ipset", "list", "-n"])),
            mounts=sorted(
                point
                for point in mount_points()
                if any(point == root or point.startswith(f"{root}/") for root in roots)
            ),
            cgroups=_cgroups(),
            paths=sorted(path for root in WATCHED_PATHS for path in _tree(Path(root))),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> HostState:
        return cls(**json.loads(text))

    def difference(self, after: HostState) -> list[str]:
        """What `after` has that this snapshot had not, or lacks, in words; [] when it is as it was."""
        problems = []
        for name, value in self.sysctls.items():
            now = after.sysctls.get(name)
            if now is not None and now != value:
                problems.append(f"sysctl {name} is {now}, was {value}")
        for label, before_items, after_items in (
            ("network link", self.links, after.links),
            ("address", self.addresses, after.addresses),
            ("route", self.routes, after.routes),
            ("nft table", self.nft_tables, after.nft_tables),
            ("iptables rule", self.iptables, after.iptables),
            ("ipset", self.ipsets, after.ipsets),
            ("cgroup", self.cgroups, after.cgroups),
            ("path", self.paths, after.paths),
            ("mount", self.mounts, after.mounts),
        ):
            added = sorted(set(after_items) - set(before_items))
            removed = sorted(set(before_items) - set(after_items))
            problems += [f"{label} added: {item}" for item in added]
            problems += [f"{label} gone: {item}" for item in removed]
        return problems


# --- putting things back ------------------------------------------------------------------------------


def unmount_under(directory: Path) -> None:
    """Detach every mount at or below `directory`, deepest first."""
    libc = ctypes.CDLL(None, use_errno=True)
    prefix = str(directory).rstrip("/") + "/"
    for point in sorted(
        (p for p in mount_points() if p == str(directory) or p.startswith(prefix)), key=len, reverse=True
    ):
        libc.umount2(point.encode(), _MNT_DETACH)


def remove_tree(directory: Path) -> None:
    """rm -rf that first detaches mounts below it and never descends into a mount point it finds."""
    if not directory.exists() and not directory.is_symlink():
        return
    unmount_under(directory)
    if directory.is_symlink() or directory.is_file():
        directory.unlink(missing_ok=True)
        return
    device = directory.stat().st_dev
    for entry in list(directory.iterdir()):
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        if entry.is_dir() and not entry.is_symlink():
            if info.st_dev != device:  # a mount that would not detach: leave it, say so later
                continue
            remove_tree(entry)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


def kill_cgroup_tree(top: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in the cgroup `top` and below, then remove the cgroups, deepest first."""
    if not top.is_dir():
        return
    deadline = time.monotonic() + timeout
    while True:
        alive = False
        for directory, _, _ in os.walk(top):
            with contextlib.suppress(OSError):
                for pid in Path(directory, "cgroup.procs").read_text().split():
                    alive = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for directory, _, _ in sorted(os.walk(top), key=lambda entry: len(entry[0]), reverse=True):
        for _ in range(50):  # a cgroup whose last process just died may stay busy for a moment
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


IPTABLES_FILTER_TABLE = "table ip filter"
"""Where iptables-nft keeps the filter table's rules."""


def iptables_removal(dump: list[str], prefixes: tuple[str, ...]) -> str | None:
    """The iptables-restore input (with --noflush) that deletes the filter table's chains named with
    `prefixes` and, first, the rules of other chains that jump to them; None when there are none.
    `dump` is `iptables-save -t filter`'s lines."""
    ours = [line[1:].split()[0] for line in dump if line.startswith(":") and line[1:].startswith(prefixes)]
    if not ours:
        return None
    script = ["*filter"]
    for line in dump:
        fields = line.split()
        jumps = fields[fields.index("-j") + 1] if "-j" in fields[:-1] else None
        if line.startswith("-A ") and fields[1] not in ours and jumps in ours:
            script.append("-D" + line[2:])
    script += [f"-F {chain}" for chain in ours] + [f"-X {chain}" for chain in ours] + ["COMMIT", ""]
    return "\n".join(script)


def remove_iptables_chains(prefixes: tuple[str, ...], *, drop_table: bool) -> None:
    """Delete the filter table's chains named with `prefixes` (iptables-nft) and the jumps to them; then
    the `ip filter` table itself when `drop_table` and no rule is left in it (it was made for them)."""
    if shutil.which("iptables-nft-save") is None:
        return
    script = iptables_removal(_lines(["iptables-nft-save", "-t", "filter"]), prefixes)
    if script is not None:
        subprocess.run(["iptables-nft-restore", "--noflush"], input=script, capture_output=True, text=True, check=False)
    rules_left = any(line.startswith("-A ") for line in _lines(["iptables-nft-save", "-t", "filter"]))
    if drop_table and not rules_left and IPTABLES_FILTER_TABLE in _lines(["nft", "list", "tables"]):
        subprocess.run(["nft", "delete", "table", "ip", "filter"], capture_output=True, check=False)


def destroy_ipsets(prefixes: tuple[str, ...]) -> None:
    for name in _lines(["ipset", "list", "-n"]):
        if name.startswith(prefixes):
            subprocess.run(["ipset", "destroy", name], capture_output=True, check=False)


def restore(
    before: HostState,
    *,
    bridge: str,
    nft_tables: tuple[str, ...],
    iptables_chains: tuple[str, ...] = (),
    ipsets: tuple[str, ...] = (),
) -> None:
    """Put back what a node changes: its bridge and any veth left on it, kube-proxy's nft tables,
    kube-router's iptables chains and ipsets (and the `ip filter` table if it was not there before),
    network namespaces and system paths that appeared, the sysctls it changed. Idempotent."""
    now = HostState.capture()
    for link in sorted(set(now.links) - set(before.links)):
        master = Path("/sys/class/net", link, "master")
        if link == bridge or (master.exists() and master.resolve().name == bridge):
            subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
    if iptables_chains:
        remove_iptables_chains(iptables_chains, drop_table=IPTABLES_FILTER_TABLE not in before.nft_tables)
    if ipsets:
        destroy_ipsets(ipsets)
    for table in nft_tables:
        if table in now.nft_tables and table not in before.nft_tables:
            subprocess.run(["nft", "delete", "table", *table.split()[1:]], capture_output=True, check=False)
    for path in sorted(set(now.paths) - set(before.paths), key=len):
        target = Path(path)
        if target.exists() or target.is_symlink():
            remove_tree(target)
    for name, value in before.sysctls.items():
        if read_sysctl(name) not in (None, value):
            with contextlib.suppress(OSError):
                write_sysctl(name, value)
