"""etcd, kube-apiserver and kube-controller-manager, built from their Go modules and cached by version.

The versions are whatever hack/etcd/go.mod and hack/kube/go.mod require; the binaries land in
``$SHADOWGATE_CACHE/bin/<module>-<version>/`` (default ``~/.cache/shadowgate``), outside the repo, so
a cold build (10-20 minutes on 2 cores) happens once per machine and version.

The local node (`shadowgate node`, see node.py) adds kubelet, kube-proxy and kube-scheduler from the
same hack/kube module (built only when a node is asked for; the Go build cache shares every package
they have in common with the control plane) and CoreDNS from hack/coredns.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shadowgate_operator.localenv.errors import ComponentError

REPO_ROOT = Path(__file__).resolve().parents[3]
HACK_DIR = REPO_ROOT / "hack"


def cache_root() -> Path:
    return Path(os.environ.get("SHADOWGATE_CACHE", Path.home() / ".cache" / "shadowgate"))


@dataclass(frozen=True)
class GoBuild:
    """One wrapper module under hack/ and the commands it builds."""

    name: str
    module_dir: Path
    main_module: str
    packages: dict[str, str]  # binary name -> Go package path
    ldflags_template: str = ""

    @property
    def version(self) -> str:
        go_mod = (self.module_dir / "go.mod").read_text()
        match = re.search(rf"^\s*(?:require\s+)?{re.escape(self.main_module)}\s+(v\S+)", go_mod, re.MULTILINE)
        if not match:
            raise ComponentError("build", f"{self.module_dir}/go.mod does not require {self.main_module}")
        return match.group(1)

    @property
    def install_dir(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}"

    def path(self, binary: str) -> Path:
        return self.install_dir / binary

    def is_cached(self) -> bool:
        return all(self.path(name).is_file() for name in self.packages)

    def commands_by_package_name(self) -> bool:
        """Whether each binary is named like its package, so one `go build -o DIR/` can build them all."""
        return len(self.packages) > 1 and all(
            package.rsplit("/", 1)[-1] == name for name, package in self.packages.items()
        )


ETCD = GoBuild(
    name="etcd",
    module_dir=HACK_DIR / "etcd",
    main_module="go.etcd.io/etcd/server/v3",
    packages={"etcd": "go.etcd.io/etcd/server/v3"},
)

KUBERNETES = GoBuild(
    name="kubernetes",
    module_dir=HACK_DIR / "kube",
    main_module="k8s.io/kubernetes",
    packages={
        "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
        "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        # A kubectl of the same release: tests and the demo never depend on the machine's version skew.
        "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    },
    # What /version reports; kubectl reads it for its version-skew warning.
    ldflags_template=(
        "-s -w -X k8s.io/component-base/version.gitVersion={version}"
        " -X k8s.io/component-base/version.gitMajor={major}"
        " -X k8s.io/component-base/version.gitMinor={minor}"
        " -X k8s.io/component-base/version.gitTreeState=clean"
    ),
)


# The local node's binaries: built from the same module and version as KUBERNETES, on demand only
# (`make test` never needs them), into their own cache directory.
KUBERNETES_NODE = GoBuild(
    name="kubernetes-node",
    module_dir=HACK_DIR / "kube",
    main_module="k8s.io/kubernetes",
    packages={
        "kubelet": "k8s.io/kubernetes/cmd/kubelet",
        "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
        "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    },
    ldflags_template=KUBERNETES.ldflags_template,
)

COREDNS = GoBuild(
    name="coredns",
    module_dir=HACK_DIR / "coredns",
    main_module="github.com/coredns/coredns",
    packages={"coredns": "shadowgate.io/hack/coredns"},  # hack/coredns/main.go: CoreDNS with the node's plugins
    ldflags_template="-s -w",
)


@contextmanager
def _build_lock() -> Iterator[None]:
    """Two test runs on one machine must not build the same binaries at once."""
    lock_path = cache_root() / "bin" / ".build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _report_progress(process: subprocess.Popen[str], label: str, total: int, started: float) -> list[str]:
    """Read `go build -v` output (one line per package compiled) and print a progress line now and then."""
    lines: list[str] = []
    last_print = 0.0
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line.rstrip())
        now = time.monotonic()
        if now - last_print >= 5:
            last_print = now
            done = sum(1 for entry in lines if entry and not entry.startswith(("#", "go:")))
            share = f" (~{min(100, 100 * done // max(total, 1))}% of {total})" if total else ""
            print(f"  building {label}: {done} packages compiled{share}, {now - started:.0f}s", file=sys.stderr)
    return lines


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise ComponentError("build", "the `go` command is not on PATH; Go 1.26+ builds the local control plane")
    return go


def build(target: GoBuild) -> None:
    """Build `target`'s binaries into the cache unless they are there already."""
    with _build_lock():
        if target.is_cached():
            return
        go = _go()
        version = target.version
        label = f"{', '.join(target.packages)} {version}"
        print(f"Building {label} from the Go module proxy (first run only; 10-20 min on 2 cores)...", file=sys.stderr)
        started = time.monotonic()
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
        packages = list(target.packages.values())
        listing = subprocess.run(
            [go, "list", "-deps", *packages], cwd=target.module_dir, env=env, capture_output=True, text=True
        )
        total = len(listing.stdout.split()) if listing.returncode == 0 else 0
        major, minor = version.lstrip("v").split(".")[:2]
        ldflags = target.ldflags_template.format(version=version, major=major, minor=minor)
        target.install_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.install_dir.parent) as staging:
            staged = Path(staging)
            # Several commands named like their packages: one `go build` for all of them, so packages are
            # loaded once and the links run in parallel; otherwise one build per binary.
            if target.commands_by_package_name():
                invocations = [(", ".join(target.packages), f"{staged}/", list(target.packages.values()))]
            else:
                invocations = [(name, str(staged / name), [package]) for name, package in target.packages.items()]
            for label_part, output_path, packages_part in invocations:
                argv = [go, "build", "-trimpath", "-v", "-o", output_path]
                if ldflags:
                    argv += ["-ldflags", ldflags]
                process = subprocess.Popen(
                    [*argv, *packages_part], cwd=target.module_dir, env=env, stderr=subprocess.PIPE, text=True
                )
                output = _report_progress(process, label_part, total, started)
                code = process.wait()
                if code != 0:
                    tail = "\n".join(output[-30:])
                    raise ComponentError(
                        "build", f"`go build` of {label_part} {version} failed with code {code}:\n{tail}"
                    )
            target.install_dir.mkdir(parents=True, exist_ok=True)
            # Move into place only when every binary built: a half-built cache never looks complete.
            for name in target.packages:
                os.replace(staged / name, target.path(name))
        print(f"Built {label} in {time.monotonic() - started:.0f}s into {target.install_dir}", file=sys.stderr)


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kubectl: Path

    @classmethod
    def from_dir(cls, directory: Path) -> Binaries:
        """Binaries taken from one directory (tests use this to point at a missing binary)."""
        return cls(*(directory / name for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")))


@dataclass(frozen=True)
class NodeBinaries:
    """What the local node runs beside the control plane (containerd and runc come from Debian)."""

    kubelet: Path
    kube_proxy: Path
    kube_scheduler: Path
    coredns: Path


def ensure_node_binaries() -> NodeBinaries:
    """The node's cached binaries, building whatever is missing first (the control plane's too)."""
    ensure_binaries()
    for target in (KUBERNETES_NODE, COREDNS):
        build(target)
    return NodeBinaries(
        kubelet=KUBERNETES_NODE.path("kubelet"),
        kube_proxy=KUBERNETES_NODE.path("kube-proxy"),
        kube_scheduler=KUBERNETES_NODE.path("kube-scheduler"),
        coredns=COREDNS.path("coredns"),
    )


def ensure_binaries() -> Binaries:
    """The cached binaries, building whatever is missing first."""
    for target in (ETCD, KUBERNETES):
        build(target)
    return Binaries(
        etcd=ETCD.path("etcd"),
        kube_apiserver=KUBERNETES.path("kube-apiserver"),
        kube_controller_manager=KUBERNETES.path("kube-controller-manager"),
        kubectl=KUBERNETES.path("kubectl"),
    )
