"""A single-node Kubernetes cluster on this machine, where pods really run (`shadowgate node up`).

Beside the pod-less control plane the tests use, a node adds kube-scheduler, containerd (Debian's,
with its own root, state, socket and configuration), kubelet, kube-proxy in nftables mode, CoreDNS
and kube-router's firewall (NetworkPolicies enforced), on a bridge pod network:

- the bridge `shadowgate0` (10.244.0.1/24) is made first: it is the node's IP (kubelet refuses
  loopback), the CNI bridge plugin's gateway, where the API server listens (pods reach it through the
  `kubernetes` Service, 10.96.0.1) and where CoreDNS answers for cluster.local. Nothing is forwarded
  out of the machine: no masquerade to the outside, no upstream DNS.
- containerd runs with `restrict_oom_score_adj` (root here may not lower oom_score_adj: every
  sandbox fails otherwise) and runc; kubelet with the cgroupfs driver under the cgroup `/shadowgate`,
  cgroup v1 allowed; kube-proxy and kubelet find no iptables on their PATH, so they write no iptables
  rules (kube-proxy keeps to its own nft tables).
- NetworkPolicies are enforced, always, as on a real cluster: kube-router's firewall alone
  (hack/kube-router: no routing, no service proxy) writes iptables rules (iptables-nft, the `ip filter`
  nft table) and ipsets; the bridge's traffic passes them through br_netfilter. Always on because the
  shipped policies (the operator's, each router's) must hold wherever `make e2e` runs the story: one
  that blocked DNS, the API server or the database would fail it. kube-router allows whatever comes
  from the node's own address (kubelet's probes); kube-proxy does not masquerade pod-to-Service
  traffic, so a policy's `from` sees the calling pod through a Service too.
- teardown (`shadowgate node down`, or `stop()`) deletes every pod through the API so kubelet and
  the CRI tear their sandboxes and networks down, stops every process by PID, removes containers'
  leftovers, the bridge, kube-proxy's nft tables, kube-router's iptables chains and ipsets (and the
  `ip filter` table when it made it), the cgroups, the mounts, the node's directory and
  the system paths the components wrote, restores the sysctls kubelet and CNI changed, then compares
  the machine with the snapshot taken before `up` and names whatever differs.

One node per machine: `up` and `down` hold a machine-wide lock, and `up` refuses while a node runs.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shadowgate_dev.localenv import host
from shadowgate_dev.localenv.binaries import KUBERNETES, NodeBinaries, cache_root, ensure_node_binaries
from shadowgate_dev.localenv.controlplane import ControlPlane
from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.pki import KeyPair
from shadowgate_dev.localenv.process import ManagedProcess, free_port

NODE_NAME = "shadowgate-node"
BRIDGE = "shadowgate0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
CNI_NETWORK = "shadowgate"
CGROUP_PARENT = "shadowgate"
KUBE_PROXY_TABLES = ("table ip kube-proxy", "table ip6 kube-proxy")
# kube-router's firewall: its chains in iptables' filter table and its ipsets, by name.
KUBE_ROUTER_CHAINS = ("KUBE-ROUTER-", "KUBE-POD-FW-", "KUBE-NWPLCY-")
KUBE_ROUTER_IPSETS = ("KUBE-SRC-", "KUBE-DST-", "inet6:KUBE-SRC-", "inet6:KUBE-DST-")
CONTAINERD_NAMESPACE = "k8s.io"
# containerd's root on a tmpfs of this size when at least TMPFS_MIN_AVAILABLE bytes of memory are free
# (the e2e images and their unpacked layers take about 1.5 GB).
TMPFS_SIZE = "6g"
TMPFS_MIN_AVAILABLE = 8 << 30  # the CRI's: images loaded here are what kubelet sees
# Binaries a component may find on PATH. kubelet and kube-proxy get no iptables (it lives in
# /usr/sbin), so neither writes iptables rules; kube-proxy gets nft, and kube-router iptables-nft and
# ipset (KUBE_ROUTER_TOOLS), through a directory of their own.
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


def node_dir() -> Path:
    """The node's directory (certificates, logs, containerd's root and state, volumes); machine-wide."""
    return Path(os.environ.get("SHADOWGATE_NODE_DIR", "/var/tmp/shadowgate-node"))


def state_path(directory: Path | None = None) -> Path:
    return (directory or node_dir()) / "state.json"


def read_state(directory: Path | None = None) -> dict[str, Any] | None:
    """The running node's state, or None when no process of a node is alive."""
    try:
        state: dict[str, Any] = json.loads(state_path(directory).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if any(_alive(entry["pid"]) for entry in state.get("processes", [])) else None


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        return bool(response.status == 200)


def _insecure_context() -> ssl.SSLContext:
    """For health endpoints of components that serve a self-signed certificate on loopback."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, client: KeyPair, user: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "shadowgate-node", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": _b64(client.cert_path), "client-key-data": _b64(client.key_path)},
            }
        ],
        "contexts": [{"name": "shadowgate-node", "context": {"cluster": "shadowgate-node", "user": user}}],
        "current-context": "shadowgate-node",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


@dataclass
class Node:
    """The node's components as processes of this program (tests) or detached (`shadowgate node up`).

    `start()` takes the machine lock, clears what a crashed node left, snapshots the machine and brings
    everything up; `stop()` tears down and returns what is not as it was ([] when nothing)."""

    directory: Path = field(default_factory=node_dir)
    detached: bool = False
    start_timeout: float = 180.0
    binaries: NodeBinaries | None = None
    control_plane: ControlPlane | None = field(default=None, init=False)
    processes: list[ManagedProcess] = field(default_factory=list, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    timings: dict[str, float] = field(default_factory=dict, init=False)

    # --- public surface -------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "control-plane" / "admin.kubeconfig"

    @property
    def containerd_socket(self) -> Path:
        return self.directory / "containerd" / "containerd.sock"

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    @property
    def volumes(self) -> Path:
        """Where hostPath PersistentVolumes for this node live (removed with the node)."""
        return self.directory / "volumes"

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        host.preflight()
        binaries = self.binaries or ensure_node_binaries()
        with host.machine_lock(timeout=60):
            running = read_state(self.directory)
            if running is not None:
                raise host.HostProblem(
                    f"a local node is already running on this machine (state in {self.directory}): "
                    "use it (`shadowgate node env`) or stop it first (`shadowgate node down`)"
                )
            teardown(self.directory, quiet=True)  # whatever a crashed node left behind
            try:
                self._start(binaries)
            except BaseException:
                teardown(self.directory)
                raise

    def stop(self) -> list[str]:
        with host.machine_lock(timeout=120):
            problems = teardown(self.directory)
        for process in self.processes:  # stopped by PID above: reap what is ours to reap
            if process.popen is not None and process.popen.poll() is None:
                process.popen.wait(5)
        return problems

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run containerd's `ctr` against this node's containerd, in the CRI's namespace."""
        return run_ctr(self.containerd_socket, *args, timeout=timeout)

    def load_image(self, archive: Path) -> None:
        """Import an image archive (docker-archive or OCI) so kubelet finds it without pulling."""
        result = self.ctr("images", "import", str(archive))
        if result.returncode != 0:
            raise ComponentError("containerd", f"importing {archive.name} failed: {result.stderr.strip()}")

    # --- start-up -------------------------------------------------------------------------------

    def _step(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.timings[name] = now - started
        return now

    def _start(self, binaries: NodeBinaries) -> None:
        started = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)  # pods' hostPath volumes live below it and run as non-root
        self.logs.mkdir(exist_ok=True)
        self.volumes.mkdir(exist_ok=True)
        (self.directory / "host-before.json").write_text(machine_state(self.directory).to_json())
        self._save_state()
        _check_network_free()
        self._make_bridge()
        self._make_cgroup_parent()
        step = self._step("bridge and cgroups", started)

        plane = self.control_plane = ControlPlane(
            directory=self.directory / "control-plane",
            detached=self.detached,
            address=NODE_IP,
            service_cidr=SERVICE_CIDR,
            node_name=NODE_NAME,
            start_timeout=self.start_timeout,
        )
        plane.start()
        self.processes.extend(plane.processes)
        self._save_state()
        step = self._step("etcd, kube-apiserver, kube-controller-manager", step)

        self._start_scheduler(binaries)
        self._start_containerd()
        step = self._step("kube-scheduler, containerd", step)
        from shadowgate_dev.localenv.images import pause_image  # images imports node's constants

        self.load_image(pause_image())
        step = self._step("pause image", step)
        self._start_kubelet(binaries)
        step = self._step("kubelet (node Ready)", step)
        self._start_kube_proxy(binaries)
        self._start_coredns(binaries)
        step = self._step("kube-proxy, CoreDNS", step)
        self._start_kube_router(binaries)
        self._step("kube-router (NetworkPolicies)", step)
        self.startup_seconds = time.monotonic() - started

    def _save_state(self) -> None:
        state = {
            "directory": str(self.directory),
            "kubeconfig": str(self.kubeconfig),
            "server": self.control_plane.server_url if self.control_plane else None,
            "containerd": str(self.containerd_socket),
            "node": NODE_NAME,
            "processes": [
                {"name": process.name, "pid": process.pid} for process in self.processes if process.popen is not None
            ],
        }
        state_path(self.directory).write_text(json.dumps(state, indent=2))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        process = ManagedProcess(
            name=name,
            argv=argv,
            log_path=self.logs / f"{name}.log",
            env=env,
            die_with_parent=not self.detached,
        )
        process.start()
        self.processes.append(process)
        self._save_state()
        return process

    @property
    def _plane(self) -> ControlPlane:
        if self.control_plane is None or self.control_plane.pki is None or self.control_plane.pki.node is None:
            raise ComponentError("node", "the control plane is not up")
        return self.control_plane

    def _admin_context(self) -> ssl.SSLContext:
        pki = self._plane.pki
        assert pki is not None
        context = ssl.create_default_context(cafile=str(pki.serving_ca))
        context.load_cert_chain(str(pki.admin.cert_path), str(pki.admin.key_path))
        return context

    def _make_bridge(self) -> None:
        for argv in (
            ["ip", "link", "add", BRIDGE, "type", "bridge"],
            ["ip", "address", "add", f"{NODE_IP}/{ipaddress.ip_network(POD_CIDR).prefixlen}", "dev", BRIDGE],
            ["ip", "link", "set", BRIDGE, "up"],
        ):
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise ComponentError("network", f"`{' '.join(argv)}` failed: {result.stderr.strip()}")

    def _make_cgroup_parent(self) -> None:
        """kubelet wants its cgroupRoot to exist in every hierarchy; cpuset needs its cpus and mems."""
        for hierarchy in host.cgroup_hierarchies():
            parent = hierarchy / CGROUP_PARENT
            parent.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                source = hierarchy / name
                if source.exists() and not (parent / name).read_text().strip():
                    (parent / name).write_text(source.read_text())

    def _start_scheduler(self, binaries: NodeBinaries) -> None:
        pki = self._plane.pki
        assert pki is not None and pki.node is not None
        kubeconfig = write_kubeconfig(
            self.directory / "kube-scheduler.kubeconfig",
            self._plane.server_url,
            pki.serving_ca,
            pki.node.kube_scheduler,
            "system:kube-scheduler",
        )
        port = free_port()
        scheduler = self._spawn(
            "kube-scheduler",
            [
                str(binaries.kube_scheduler),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                "--v=1",
            ],
        )
        scheduler.wait_ready(
            lambda: _http_ok(f"https://127.0.0.1:{port}/healthz", _insecure_context()), self.start_timeout, "healthy"
        )

    def _mount_image_store(self, store: Path) -> None:
        """containerd's root (images, unpacked layers, containers' writable layers) on a tmpfs when the
        machine has the memory: loading images and removing them at teardown cost seconds instead of
        a minute of disk writes and discards. SHADOWGATE_NODE_TMPFS=0 keeps it on disk."""
        if os.environ.get("SHADOWGATE_NODE_TMPFS", "1") == "0" or _available_memory() < TMPFS_MIN_AVAILABLE:
            return
        store.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "shadowgate-node", str(store)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ComponentError("containerd", f"mounting a tmpfs for its root failed: {result.stderr.strip()}")

    def _start_containerd(self) -> None:
        root = self.directory / "containerd"
        self._mount_image_store(root / "root")
        cni_conf = self.directory / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-shadowgate.conflist").write_text(json.dumps(cni_config(self.directory), indent=2))
        config = root / "config.toml"
        root.mkdir(parents=True, exist_ok=True)
        config.write_text(containerd_config(self.directory))
        containerd = self._spawn(
            "containerd",
            ["/usr/bin/containerd", f"--config={config}"],
            env={**_clean_env(), "PATH": f"/usr/sbin:{BASE_PATH}"},
        )
        containerd.wait_ready(
            lambda: self.ctr("version", timeout=10).returncode == 0, self.start_timeout, "serving its socket"
        )

    def _start_kubelet(self, binaries: NodeBinaries) -> None:
        pki = self._plane.pki
        assert pki is not None and pki.node is not None
        kubelet_dir = self.directory / "kubelet"
        kubelet_dir.mkdir(exist_ok=True)
        kubeconfig = write_kubeconfig(
            kubelet_dir / "kubelet.kubeconfig",
            self._plane.server_url,
            pki.serving_ca,
            pki.node.kubelet_client,
            f"system:node:{NODE_NAME}",
        )
        resolv = self.directory / "resolv.conf"
        resolv.write_text("# shadowgate node: pods resolve through CoreDNS only (no upstream)\n")
        config = kubelet_dir / "config.yaml"
        settings = kubelet_config(
            self.directory,
            pki.client_ca,
            pki.node.kubelet_serving,
            port=free_port(NODE_IP),  # the bridge has the address by now
            healthz_port=free_port(),
        )
        config.write_text(yaml.safe_dump(settings))
        kubelet = self._spawn(
            "kubelet",
            [
                str(binaries.kubelet),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={kubelet_dir / 'root'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
            env={**_clean_env(), "PATH": BASE_PATH},
        )
        context = self._admin_context()
        url = f"{self._plane.server_url}/api/v1/nodes/{NODE_NAME}"
        kubelet.wait_ready(lambda: _node_ready(url, context), self.start_timeout, "registered and Ready")

    def _start_kube_proxy(self, binaries: NodeBinaries) -> None:
        pki = self._plane.pki
        assert pki is not None and pki.node is not None
        proxy_dir = self.directory / "kube-proxy"
        (proxy_dir / "bin").mkdir(parents=True, exist_ok=True)
        nft = proxy_dir / "bin" / "nft"
        if not nft.exists():
            nft.symlink_to("/usr/sbin/nft")
        kubeconfig = write_kubeconfig(
            proxy_dir / "kube-proxy.kubeconfig",
            self._plane.server_url,
            pki.serving_ca,
            pki.node.kube_proxy,
            "system:kube-proxy",
        )
        healthz = free_port()
        config = proxy_dir / "config.yaml"
        config.write_text(yaml.safe_dump(kube_proxy_config(kubeconfig, healthz, free_port())))
        proxy = self._spawn(
            "kube-proxy",
            [str(binaries.kube_proxy), f"--config={config}", "--v=1"],
            env={**_clean_env(), "PATH": f"{proxy_dir / 'bin'}:{BASE_PATH}"},
        )
        proxy.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{healthz}/healthz"), self.start_timeout, "synced")

    def _start_kube_router(self, binaries: NodeBinaries) -> None:
        """kube-router's NetworkPolicy firewall alone, as admin (it lists pods, namespaces, policies and its
        node); ready once healthy and its chains are in place."""
        router_dir = self.directory / "kube-router"
        bin_dir = router_dir / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name, target in KUBE_ROUTER_TOOLS.items():
            if not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(target)
        health = free_port()
        router = self._spawn(
            "kube-router",
            [
                str(binaries.kube_router),
                f"--kubeconfig={self.kubeconfig}",  # hack/kube-router runs the firewall alone, whatever --run-* say
                "--enable-ipv4=true",
                "--enable-ipv6=false",
                f"--hostname-override={NODE_NAME}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--health-port={health}",
                "--metrics-port=0",
                "--v=1",
            ],
            env={**_clean_env(), "PATH": f"{bin_dir}:{BASE_PATH}"},
        )
        router.wait_ready(
            lambda: _http_ok(f"http://127.0.0.1:{health}/healthz") and _iptables_chain_exists("KUBE-NWPLCY-DEFAULT"),
            self.start_timeout,
            "healthy, its chains in place",
        )

    def _start_coredns(self, binaries: NodeBinaries) -> None:
        ready = free_port()
        corefile = self.directory / "Corefile"
        corefile.write_text(coredns_corefile(self.kubeconfig, ready))
        coredns = self._spawn("coredns", [str(binaries.coredns), "-conf", str(corefile)])
        coredns.wait_ready(lambda: _http_ok(f"http://127.0.0.1:{ready}/ready"), self.start_timeout, "ready")


# --- configuration ------------------------------------------------------------------------------------

# What kube-router finds on its PATH: iptables-nft under the names it runs (its rules land in the nft
# table `ip filter`, beside kube-proxy's own tables, whatever the machine's iptables alternative is).
KUBE_ROUTER_TOOLS = {
    "iptables": "/usr/sbin/iptables-nft",
    "iptables-save": "/usr/sbin/iptables-nft-save",
    "iptables-restore": "/usr/sbin/iptables-nft-restore",
    "ipset": "/usr/sbin/ipset",
}


def _iptables_chain_exists(chain: str) -> bool:
    result = subprocess.run(
        [KUBE_ROUTER_TOOLS["iptables"], "-t", "filter", "-S", chain], capture_output=True, text=True, check=False
    )
    return result.returncode == 0


def cni_config(directory: Path) -> dict[str, Any]:
    """The pod network: a bridge with host-local addresses, the node as gateway, no masquerade."""
    return {
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(directory / "cni" / "ipam"),
                },
            }
        ],
    }


def containerd_config(directory: Path) -> str:
    """containerd 1.6 with everything of its own under `directory` (config version 2)."""
    root = directory / "containerd"
    from shadowgate_dev.localenv.images import PAUSE_IMAGE

    return f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{root / "containerd.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here may not lower oom_score_adj: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Network namespaces under the node's state directory, not /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{root / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{directory / "cni" / "net.d"}"
    max_conf_num = 1
"""


def kubelet_config(
    directory: Path, client_ca: Path, serving: KeyPair, *, port: int, healthz_port: int
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(serving.cert_path),
        "tlsPrivateKeyFile": str(serving.key_path),
        # Only clients with a certificate from the control plane's client CA (the API server).
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(client_ca)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "containerRuntimeEndpoint": f"unix://{directory / 'containerd' / 'containerd.sock'}",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_PARENT}",
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(directory / "resolv.conf"),
        "podLogsDir": str(directory / "pod-logs"),
        "makeIPTablesUtilChains": False,
        "serializeImagePulls": False,
        "registerNode": True,
        # Images are loaded, never pulled: never collect them; evict only when the disk is really full.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
        "shutdownGracePeriod": "0s",
        # Root here may not lower its oom_score_adj (kubelet asks for -999 by default).
        "oomScoreAdj": 0,
        "rotateCertificates": False,
    }


def kube_proxy_config(kubeconfig: Path, healthz_port: int, metrics_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_CIDR,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # No masqueradeAll: pod to Service to a pod on the same bridge keeps the client pod's address (the
        # bridge's traffic passes netfilter through br_netfilter, whose conntrack undoes the DNAT on the
        # replies), so NetworkPolicies see who is calling, as on a real cluster. Traffic from outside
        # clusterCIDR is still masqueraded.
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # Leave the machine's conntrack settings alone (0: do not set).
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
            "udpTimeout": "0s",
            "udpStreamTimeout": "0s",
        },
        "oomScoreAdj": 0,
    }


def coredns_corefile(kubeconfig: Path, ready_port: int) -> str:
    return f""".:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} shadowgate-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
}}
"""


def _available_memory() -> int:
    """MemAvailable in bytes (0 when unknown)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_state(directory: Path) -> host.HostState:
    """The snapshot a node is compared with: the machine, with the mounts below the node's directory and
    the cache (image builds) counted as well."""
    return host.HostState.capture(mount_roots=(str(directory), str(cache_root())))


def _clean_env() -> dict[str, str]:
    """The environment for node components: ours, without proxies (nothing here goes off the machine)."""
    return {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
    }


def _check_network_free() -> None:
    """The pod and Service ranges must not be in use on this machine (other than by a node's bridge)."""
    result = subprocess.run(["ip", "-o", "route", "show"], capture_output=True, text=True, check=False)
    ours = [ipaddress.ip_network(POD_CIDR), ipaddress.ip_network(SERVICE_CIDR)]
    for line in result.stdout.splitlines():
        destination = line.split()[0]
        if destination == "default" or f" dev {BRIDGE} " in f"{line} ":
            continue
        with contextlib.suppress(ValueError):
            network = ipaddress.ip_network(destination, strict=False)
            if any(network.overlaps(range_) for range_ in ours):
                raise host.HostProblem(
                    f"the node's address ranges ({POD_CIDR}, {SERVICE_CIDR}) are already routed on this machine "
                    f"({line.strip()}): a local node cannot run beside that network"
                )


def _node_ready(url: str, context: ssl.SSLContext) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        node = json.loads(response.read())
    conditions = node.get("status", {}).get("conditions", [])
    return any(item["type"] == "Ready" and item["status"] == "True" for item in conditions)


def run_ctr(socket: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ctr", f"--address={socket}", f"--namespace={CONTAINERD_NAMESPACE}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- teardown -----------------------------------------------------------------------------------------


def kubectl(
    kubeconfig: Path, *args: str, input_text: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The control plane's own kubectl against the node, as admin."""
    return subprocess.run(
        [str(KUBERNETES.path("kubectl")), f"--kubeconfig={kubeconfig}", *args],
        input=input_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process (and its group), wait, then SIGKILL: the way ManagedProcess.stop does."""
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _drain(kubeconfig: Path, processes: dict[str, int], timeout: float = 90.0) -> None:
    """Delete every pod through the API so kubelet stops them and the CRI tears their networks down.
    The controllers go first so nothing makes new pods meanwhile."""
    for name in ("kube-controller-manager", "kube-scheduler"):
        if name in processes:
            _stop_pid(processes[name])
    if not all(_alive(processes.get(name, -1)) for name in ("kube-apiserver", "kubelet", "containerd")):
        return
    kubectl(kubeconfig, "delete", "pods", "--all", "--all-namespaces", "--grace-period=1", "--wait=false")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = kubectl(kubeconfig, "get", "pods", "--all-namespaces", "-o", "name", timeout=20)
        if listed.returncode != 0 or not listed.stdout.strip():
            return
        time.sleep(0.5)


def claim_volume(kubeconfig: Path, namespace: str, claim: str, size: str) -> subprocess.CompletedProcess[str]:
    """A hostPath PersistentVolume in the node's directory, bound in advance to one claim (no storage
    provisioner here)."""
    path = node_dir() / "volumes" / f"{namespace}-{claim}"
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)  # hostPath volumes ignore fsGroup: any pod user may write
    manifest = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{claim}", "labels": {"shadowgate.io/local-node": "true"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": namespace, "name": claim},
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    }
    return kubectl(kubeconfig, "apply", "-f", "-", input_text=json.dumps(manifest))


def _our_processes(directory: Path) -> list[int]:
    """Processes whose command line names the node's directory (containerd's shims, for example)."""
    marker = str(directory)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace") and _alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


def teardown(directory: Path, quiet: bool = False) -> list[str]:
    """Stop a node (running, half-started or crashed) and put the machine back; what differs after."""
    try:
        state: dict[str, Any] = json.loads(state_path(directory).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        state = {}
    try:
        before = host.HostState.from_json((directory / "host-before.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        before = None
    if not state and before is None:
        return []  # not a node's directory (or nothing left of one): touch nothing
    processes = {entry["name"]: entry["pid"] for entry in state.get("processes", [])}
    kubeconfig = Path(state.get("kubeconfig", directory / "control-plane" / "admin.kubeconfig"))
    if processes and kubeconfig.exists():
        _drain(kubeconfig, processes)
    # Node components, then containerd's shims and the containers still in the node's cgroups, then
    # containerd and the control plane (reverse start order).
    order = ["kube-router", "coredns", "kube-proxy", "kubelet"]
    for name in order:
        if name in processes:
            _stop_pid(processes[name])
    for pid in _our_processes(directory):
        if pid not in processes.values():
            _stop_pid(pid, timeout=5)
    for hierarchy in host.cgroup_hierarchies():
        host.kill_cgroup_tree(hierarchy / CGROUP_PARENT)
    for entry in reversed(state.get("processes", [])):
        _stop_pid(entry["pid"])
    for pid in _our_processes(directory):
        _stop_pid(pid, timeout=5)
    if before is not None:
        host.restore(
            before,
            bridge=BRIDGE,
            nft_tables=KUBE_PROXY_TABLES,
            iptables_chains=KUBE_ROUTER_CHAINS,
            ipsets=KUBE_ROUTER_IPSETS,
        )
    else:
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
        host.remove_iptables_chains(KUBE_ROUTER_CHAINS, drop_table=False)
        host.destroy_ipsets(KUBE_ROUTER_IPSETS)
    host.remove_tree(directory)
    if before is None:
        return []
    problems = before.difference(machine_state(directory))
    problems += [f"process left: {pid}" for pid in _our_processes(directory)]
    if directory.exists():
        problems.append(f"directory left: {directory}")
    if problems and not quiet:
        for problem in problems:
            print(f"node teardown: not as it was: {problem}", flush=True)
    return problems


def logs_copy(directory: Path, destination: Path) -> None:
    """Keep the components' logs (they go with the node's directory)."""
    source = directory / "logs"
    if source.is_dir():
        shutil.copytree(source, destination, dirs_exist_ok=True)
