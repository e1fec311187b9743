"""etcd + kube-apiserver + kube-controller-manager as local processes on free loopback ports.

With `node_name` set, the same control plane serves a real node (node.py): the API server listens on
the node's bridge address (pods reach it through the `kubernetes` Service), authorizes kubelets with
the Node authorizer, mounts ServiceAccount tokens, and the controller manager runs every controller.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import ssl
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shadowgate_dev.localenv.binaries import Binaries, ensure_binaries
from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.pki import ControlPlanePki, NodePki, make_control_plane_pki
from shadowgate_dev.localenv.process import ManagedProcess, free_port, port_is_free

# Only what a namespace-scoped operator test needs: ownerReference GC, namespace deletion and the
# `default` ServiceAccount in each namespace (which also tells us the controller manager is up).
CONTROLLERS = ("garbage-collector-controller", "namespace-controller", "serviceaccount-controller")


@dataclass
class ControlPlane:
    """A real API server for tests and the demo. Use as a context manager or call start()/stop().

    `directory` holds certificates, the kubeconfig, etcd's data and every component's log; it is
    a fresh temp dir unless given. `detached` components survive this Python process (for
    `shadowgate dev up`); otherwise they are killed with it.
    """

    binaries: Binaries | None = None
    directory: Path | None = None
    etcd_port: int | None = None
    apiserver_port: int | None = None
    with_controller_manager: bool = True
    detached: bool = False
    start_timeout: float = 90.0
    # Where the API server listens (and what the `kubernetes` Service points at), the Service range,
    # and, for a control plane with a node, the node's name (see the module docstring).
    address: str = "127.0.0.1"
    service_cidr: str = "10.0.0.0/24"
    node_name: str | None = None
    pki: ControlPlanePki | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    startup_seconds: float = 0.0
    _owns_directory: bool = False

    # --- public surface -------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self._dir / "admin.kubeconfig"

    @property
    def server_url(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def kubernetes_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first address of the Service range."""
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    @property
    def logs(self) -> Path:
        return self._dir / "logs"

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop components in reverse order and remove the directory if we made it."""
        for process in reversed(self.processes):
            process.stop()
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.popen is not None]

    # --- start-up -------------------------------------------------------------------------------

    @property
    def _dir(self) -> Path:
        if self.directory is None:
            raise ComponentError("control plane", "not started")
        return self.directory

    def _start(self) -> None:
        started = time.monotonic()
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="shadowgate-cp-"))
            self._owns_directory = True
        binaries = self.binaries or ensure_binaries()
        self.etcd_port = self.etcd_port or free_port()
        self.apiserver_port = self.apiserver_port or free_port(self.address)
        for component, port, host in (
            ("etcd", self.etcd_port, "127.0.0.1"),
            ("kube-apiserver", self.apiserver_port, self.address),
        ):
            if not port_is_free(port, host):
                raise ComponentError(component, f"port {host}:{port} is already in use")
        server_ips = tuple(dict.fromkeys(("127.0.0.1", self.address, self.kubernetes_service_ip)))
        node = (self.node_name, self.address) if self.node_name else None
        pki = self.pki = make_control_plane_pki(self._dir / "pki", server_ips=server_ips, node=node)
        self._start_etcd(binaries)
        self._start_apiserver(binaries, pki)
        self._write_kubeconfig(pki)
        if self.with_controller_manager:
            self._start_controller_manager(binaries, pki)
        self.startup_seconds = time.monotonic() - started

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(
            name=name, argv=argv, log_path=self.logs / f"{name}.log", die_with_parent=not self.detached
        )
        process.start()
        self.processes.append(process)
        return process

    def _start_etcd(self, binaries: Binaries) -> None:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{free_port()}"
        etcd = self._spawn(
            "etcd",
            [
                str(binaries.etcd),
                "--name=default",
                f"--data-dir={self._dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        etcd.wait_ready(lambda: _http_ok(f"{client}/health"), self.start_timeout, "healthy")

    def _apiserver_node_flags(self, node: NodePki | None) -> list[str]:
        if node is None:
            # No token controller runs, so pods could never get a ServiceAccount token mounted.
            return ["--disable-admission-plugins=ServiceAccount", "--authorization-mode=RBAC"]
        return [
            # Kubelets may touch only their own Node and the objects of pods bound to it.
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            # logs, exec and port-forward: the API server calls the kubelet by the node's InternalIP
            # (not its name, which no DNS here resolves), as a client the kubelet trusts.
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={node.apiserver_kubelet_client.cert_path}",
            f"--kubelet-client-key={node.apiserver_kubelet_client.key_path}",
        ]

    def _start_apiserver(self, binaries: Binaries, pki: ControlPlanePki) -> None:
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(binaries.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                f"--cert-dir={self._dir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving.cert_path}",
                f"--tls-private-key-file={pki.serving.key_path}",
                f"--secure-port={self.apiserver_port}",
                f"--bind-address={self.address}",
                # What the `kubernetes` Service's endpoints point at: pods reach the API server there.
                f"--advertise-address={self.address}",
                f"--service-cluster-ip-range={self.service_cidr}",
                "--allow-privileged=true",
                *self._apiserver_node_flags(pki.node),
                f"--client-ca-file={pki.client_ca}",
                f"--service-account-issuer=https://{self.address}:{self.apiserver_port}/",
                f"--service-account-key-file={pki.service_account_public_key}",
                f"--service-account-signing-key-file={pki.service_account_private_key}",
                # Fewer moving parts on a 2-core machine.
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        context = self._admin_ssl_context(pki)
        apiserver.wait_ready(
            lambda: _http_ok(f"{self.server_url}/readyz", context), self.start_timeout, "ready on /readyz"
        )

    def _start_controller_manager(self, binaries: Binaries, pki: ControlPlanePki) -> None:
        kubeconfig = str(self.kubeconfig)
        manager = self._spawn(
            "kube-controller-manager",
            [
                str(binaries.kube_controller_manager),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                # With a node: every default controller (Deployments, ReplicaSets, StatefulSets, endpoints,
                # volume binding, node lifecycle, ...); without, the few a pod-less API server needs.
                f"--controllers={'*' if self.node_name else ','.join(CONTROLLERS)}",
                f"--secure-port={free_port()}",
                "--bind-address=127.0.0.1",
                f"--service-account-private-key-file={pki.service_account_private_key}",
                f"--root-ca-file={pki.serving_ca}",
                "--use-service-account-credentials=false",
                "--v=1",
            ],
        )
        context = self._admin_ssl_context(pki)
        url = f"{self.server_url}/api/v1/namespaces/default/serviceaccounts/default"
        manager.wait_ready(lambda: _http_ok(url, context), self.start_timeout, "running its controllers")

    def _admin_ssl_context(self, pki: ControlPlanePki) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(pki.serving_ca))
        context.load_cert_chain(str(pki.admin.cert_path), str(pki.admin.key_path))
        return context

    def _write_kubeconfig(self, pki: ControlPlanePki) -> None:
        # Embedded *-data fields: kopf, kubectl and the kubernetes client all read them.
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "shadowgate-local",
                    "cluster": {"server": self.server_url, "certificate-authority-data": b64(pki.serving_ca)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(pki.admin.cert_path),
                        "client-key-data": b64(pki.admin.key_path),
                    },
                }
            ],
            "contexts": [{"name": "shadowgate-local", "context": {"cluster": "shadowgate-local", "user": "admin"}}],
            "current-context": "shadowgate-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def describe(self) -> dict[str, Any]:
        return {
            "kubeconfig": str(self.kubeconfig),
            "server": self.server_url,
            "logs": str(self.logs),
            "pids": self.pids(),
        }

    def __str__(self) -> str:
        return json.dumps(self.describe())


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        return bool(response.status == 200)
