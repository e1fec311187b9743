"""`shadowgate node`: a single-node cluster on this machine where pods really run (see node.py).

shadowgate node up          # detached; prints the KUBECONFIG and PATH to export
shadowgate node images --load
shadowgate node down        # teardown; exit 1 when something is not as it was before `up`
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shadowgate_dev.localenv import host, node
from shadowgate_dev.localenv.binaries import KUBERNETES, ensure_node_binaries
from shadowgate_dev.localenv.errors import ComponentError


def _fail(exc: ComponentError) -> int:
    # A HostProblem is one line that says why and what to do; other errors carry a log tail.
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return 1


def env_lines(state: dict[str, object]) -> str:
    return f"export KUBECONFIG={state['kubeconfig']}\nexport PATH={KUBERNETES.install_dir}:$PATH\n"


def preflight(_: argparse.Namespace) -> int:
    try:
        host.preflight()
    except ComponentError as exc:
        return _fail(exc)
    print("# this machine can run a local node (root, cgroups, containerd, runc, CNI plugins, nft, buildah)")
    return 0


def build(_: argparse.Namespace) -> int:
    try:
        binaries = ensure_node_binaries()
    except ComponentError as exc:
        return _fail(exc)
    for path in (
        binaries.kubelet,
        binaries.kube_proxy,
        binaries.kube_scheduler,
        binaries.coredns,
        binaries.kube_router,
    ):
        print(path)
    return 0


def up(args: argparse.Namespace) -> int:
    state = node.read_state()
    if state is not None:
        print("# a local node is already running", file=sys.stderr)
        print(env_lines(state), end="")
        return 0
    started = time.monotonic()
    cluster = node.Node(detached=not args.foreground)
    try:
        cluster.start()
    except ComponentError as exc:
        return _fail(exc)
    steps = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in cluster.timings.items())
    print(f"# node {node.NODE_NAME} Ready in {time.monotonic() - started:.1f}s ({steps})", file=sys.stderr)
    print(f"# logs in {cluster.logs}", file=sys.stderr)
    state = node.read_state()
    assert state is not None
    print(env_lines(state), end="", flush=True)
    if not args.foreground:
        print("# `eval $(shadowgate node env)` to use it; `shadowgate node down` to stop it", file=sys.stderr)
        return 0
    print("# running in the foreground; Ctrl-C stops everything", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    return 1 if cluster.stop() else 0


def down(args: argparse.Namespace) -> int:
    directory = node.node_dir()
    if args.keep_logs:
        node.logs_copy(directory, Path(args.keep_logs))
    started = time.monotonic()
    try:
        with host.machine_lock(timeout=120):
            problems = node.teardown(directory)
    except ComponentError as exc:
        return _fail(exc)
    if problems:
        print(
            f"error: the machine is not as it was before `node up` ({len(problems)} differences above)", file=sys.stderr
        )
        return 1
    print(
        f"# node stopped in {time.monotonic() - started:.1f}s; the machine is as it was before `node up`",
        file=sys.stderr,
    )
    return 0


def env(_: argparse.Namespace) -> int:
    state = node.read_state()
    if state is None:
        print("error: no local node is running; start one with `shadowgate node up`", file=sys.stderr)
        return 1
    print(env_lines(state), end="")
    return 0


def images(args: argparse.Namespace) -> int:
    from shadowgate_dev.localenv import images as image_builds

    try:
        host.preflight()
        built = image_builds.node_images()
        for image in built:
            how = "built" if image.built else "cached"
            print(f"# {image.reference}: {how} ({image.archive}, {image.seconds:.0f}s)", file=sys.stderr)
        if args.load:
            state = node.read_state()
            if state is None:
                print("error: no local node is running to load images into (`shadowgate node up`)", file=sys.stderr)
                return 1
            for image in built:
                started = time.monotonic()
                loaded = node.run_ctr(Path(state["containerd"]), "images", "import", str(image.archive))
                if loaded.returncode != 0:
                    raise ComponentError("containerd", f"importing {image.archive}: {loaded.stderr.strip()}")
                print(f"# {image.reference} loaded into the node in {time.monotonic() - started:.1f}s", file=sys.stderr)
    except ComponentError as exc:
        return _fail(exc)
    return 0


def volume(args: argparse.Namespace) -> int:
    """A hostPath PersistentVolume bound in advance to one claim (no storage provisioner here)."""
    state = node.read_state()
    if state is None:
        print("error: no local node is running (`shadowgate node up`)", file=sys.stderr)
        return 1
    namespace, _, claim = args.claim.partition("/")
    result = node.claim_volume(Path(str(state["kubeconfig"])), namespace, claim, args.size)
    if result.returncode != 0:
        print(f"error: {result.stderr.strip()}", file=sys.stderr)
        return 1
    print(result.stdout.strip())
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "node",
        help="a single-node cluster where pods run (containerd, kubelet, kube-proxy, CoreDNS, kube-router); root",
        description=(
            "Bring up etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, kubelet, "
            "kube-proxy (nftables), CoreDNS and kube-router's NetworkPolicy firewall on a bridge network, with images "
            "built without Docker. "
            "Needs root; one node per machine. `make e2e` runs the end-to-end story on it."
        ),
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    verbs.add_parser("preflight", help="say in one line whether this machine can run a node").set_defaults(
        func=preflight
    )
    verbs.add_parser(
        "build", help="build (or find in the cache) kubelet, kube-proxy, kube-scheduler, CoreDNS, kube-router"
    ).set_defaults(func=build)
    up_parser = verbs.add_parser("up", help="start the node and print the KUBECONFIG to export")
    up_parser.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops everything")
    up_parser.set_defaults(func=up)
    down_parser = verbs.add_parser("down", help="stop everything and put the machine back as it was")
    down_parser.add_argument("--keep-logs", metavar="DIR", help="copy the components' logs here first")
    down_parser.set_defaults(func=down)
    verbs.add_parser("env", help="print the export lines for the running node").set_defaults(func=env)
    images_parser = verbs.add_parser("images", help="build the shadowgate and TimescaleDB images (cached)")
    images_parser.add_argument("--load", action="store_true", help="and load them into the running node")
    images_parser.set_defaults(func=images)
    volume_parser = verbs.add_parser("volume", help="a hostPath PersistentVolume for one claim")
    volume_parser.add_argument("claim", metavar="NAMESPACE/CLAIM")
    volume_parser.add_argument("--size", default="20Gi")
    volume_parser.set_defaults(func=volume)
