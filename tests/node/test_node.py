"""A real node: pods run on it, Services and DNS work, and teardown leaves the machine as it was.

Each test snapshots the machine first (every readable sysctl, links, addresses, routes, nft tables,
iptables rules, ipsets, mounts, cgroups, the system paths containerd, CNI and kubelet write) and compares
after `stop()`/`teardown()`: nothing added, nothing changed. One also kills the node the hard way
(SIGKILL to every component, pods still running) and checks the next teardown clears it all.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowgate_dev.localenv import host
from shadowgate_dev.localenv.images import PAUSE_IMAGE
from shadowgate_dev.localenv.node import (
    KUBE_ROUTER_CHAINS,
    NODE_IP,
    Node,
    kubectl,
    machine_state,
    node_dir,
    read_state,
    teardown,
)

pytestmark = pytest.mark.node

# Counters and other values the kernel changes by itself; interface-specific keys of links that
# exist only while a node runs are compared only when the link exists on both sides.
VOLATILE_SYSCTLS = (
    "kernel.random.",
    "kernel.ns_last_pid",
    "kernel.pty.nr",
    "fs.dentry-state",
    "fs.file-nr",
    "fs.inode-nr",
    "fs.inode-state",
    "fs.quota.",
    "net.netfilter.nf_conntrack_count",
    "kernel.sched_",
    "vm.stat_refresh",
)


def all_sysctls() -> dict[str, str]:
    values = {}
    root = Path("/proc/sys")
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            key = ".".join(path.relative_to(root).parts)
            if key.startswith(VOLATILE_SYSCTLS):
                continue
            try:
                values[key] = path.read_text().strip()
            except OSError:
                continue
    return values


def sysctl_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [
        f"{key}: {before[key]} -> {after[key]}" for key in sorted(set(before) & set(after)) if before[key] != after[key]
    ]


def dns_a(name: str, server: str = NODE_IP) -> list[str]:
    """The A records `server` gives for `name` (a minimal DNS query over UDP)."""
    query_id = random.randrange(1 << 16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(packet, (server, 53))
        answer = sock.recv(4096)
    _, flags, _, count = struct.unpack(">HHHH", answer[:8])
    assert flags & 0xF == 0, f"DNS error code {flags & 0xF} for {name}"
    offset = 12 + len(question) + 4
    found = []
    for _ in range(count):
        offset += 2 if answer[offset] & 0xC0 == 0xC0 else len(answer[offset:].split(b"\0", 1)[0]) + 1
        kind, _, _, length = struct.unpack(">HHIH", answer[offset : offset + 10])
        offset += 10
        if kind == 1:
            found.append(socket.inet_ntoa(answer[offset : offset + length]))
        offset += length
    return found


def kube_routers(line: str) -> bool:
    """Whether an iptables-save line is kube-router's: its chains, the jumps to them, the filter table's
    header and built-in chains it made."""
    return (
        line in ("*filter", "COMMIT")
        or line.startswith((":INPUT ", ":FORWARD ", ":OUTPUT "))
        or any(prefix in line for prefix in KUBE_ROUTER_CHAINS)
    )


def node_processes(directory: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(directory) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def machine() -> Iterator[tuple[host.HostState, dict[str, str]]]:
    host.preflight()
    assert read_state() is None, "a local node is already running on this machine"
    yield machine_state(node_dir()), all_sysctls()


POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "sleeper", "namespace": "default", "labels": {"app": "sleeper"}},
    "spec": {
        "containers": [{"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
        "terminationGracePeriodSeconds": 1,
    },
}


def run_a_pod(node: Node) -> dict[str, object]:
    result = kubectl(node.kubeconfig, "apply", "-f", "-", input_text=json.dumps(POD))
    assert result.returncode == 0, result.stderr
    waited = kubectl(node.kubeconfig, "wait", "--for=condition=Ready", "pod/sleeper", "--timeout=120s", timeout=150)
    assert waited.returncode == 0, waited.stderr + kubectl(node.kubeconfig, "describe", "pod", "sleeper").stdout
    pod: dict[str, object] = json.loads(kubectl(node.kubeconfig, "get", "pod", "sleeper", "-o", "json").stdout)
    return pod


def test_pods_run_services_and_dns_work_and_teardown_leaves_the_machine_as_it_was(
    machine: tuple[host.HostState, dict[str, str]],
) -> None:
    before, sysctls_before = machine
    node = Node()
    started = time.monotonic()
    node.start()
    try:
        print(f"node Ready in {time.monotonic() - started:.1f}s: {node.timings}")
        # One node per machine: a second one is refused at once, naming the running one.
        with pytest.raises(host.HostProblem, match="a local node is already running on this machine"):
            Node().start()

        pod = run_a_pod(node)
        status = pod["status"]
        assert isinstance(status, dict)
        assert status["podIP"].startswith("10.244.0."), status
        # The bridge plugin attached the pod: a veth on the node's bridge.
        assert any(Path("/sys/class/net", link, "master").exists() for link in os.listdir("/sys/class/net"))

        # CoreDNS answers for Services; kube-proxy's nftables send the `kubernetes` Service to the API server.
        assert dns_a("kubernetes.default.svc.cluster.local") == ["10.96.0.1"]
        pki = node.control_plane.pki if node.control_plane else None
        assert pki is not None
        context = ssl.create_default_context(cafile=str(pki.serving_ca))
        context.load_cert_chain(str(pki.admin.cert_path), str(pki.admin.key_path))
        with urllib.request.urlopen("https://10.96.0.1/readyz", context=context, timeout=10) as response:
            assert response.status == 200
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        assert "table ip kube-proxy" in tables
        # kubelet and kube-proxy found no iptables: every iptables rule added is kube-router's (NetworkPolicies).
        added = set(machine_state(node.directory).iptables) - set(before.iptables)
        assert any(line.startswith("-A FORWARD") and "KUBE-ROUTER-FORWARD" in line for line in added), added
        assert [line for line in added if not kube_routers(line)] == []
    finally:
        problems = node.stop()  # with the pod still running

    assert problems == []
    assert before.difference(machine_state(node.directory)) == []
    assert sysctl_changes(sysctls_before, all_sysctls()) == []
    assert node_processes(node.directory) == []
    assert not node.directory.exists()


def test_a_node_killed_outright_is_cleared_by_the_next_teardown(machine: tuple[host.HostState, dict[str, str]]) -> None:
    before, sysctls_before = machine
    node = Node()
    node.start()
    try:
        run_a_pod(node)
        # A crash: every component killed at once, containers and their shims left running.
        for process in reversed(node.processes):
            if process.popen is not None and process.popen.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.popen.wait(10)
        assert node_processes(node.directory), "containerd's shims outlive containerd"
    finally:
        problems = teardown(node.directory)
    assert problems == []
    assert before.difference(machine_state(node.directory)) == []
    assert sysctl_changes(sysctls_before, all_sysctls()) == []
    assert node_processes(node.directory) == []
