"""The local node without bringing it up: its components' configuration, the machine snapshot and its
comparison, the images' archive format and build context, and the one-line refusals."""

from __future__ import annotations

import json
import os
import tarfile
import tomllib
from pathlib import Path

import pytest

from shadowgate_dev.localenv import host, images, node
from shadowgate_dev.localenv.pki import KeyPair
from shadowgate_operator import cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_containerd_keeps_everything_of_its_own_under_the_node_directory(tmp_path: Path) -> None:
    config = tomllib.loads(node.containerd_config(tmp_path))
    assert config["version"] == 2
    for key in ("root", "state"):
        assert Path(config[key]).is_relative_to(tmp_path)
    assert Path(config["grpc"]["address"]).is_relative_to(tmp_path)
    assert Path(config["plugins"]["io.containerd.internal.v1.opt"]["path"]).is_relative_to(tmp_path)
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True  # root here may not lower oom_score_adj
    assert cri["sandbox_image"] == images.PAUSE_IMAGE
    assert Path(cri["cni"]["conf_dir"]).is_relative_to(tmp_path)
    runc = cri["containerd"]["runtimes"]["runc"]["options"]
    assert Path(runc["Root"]).is_relative_to(tmp_path)
    assert runc["SystemdCgroup"] is False


def test_the_pod_network_is_a_bridge_that_masquerades_nothing(tmp_path: Path) -> None:
    (plugin,) = node.cni_config(tmp_path)["plugins"]
    assert (plugin["type"], plugin["bridge"], plugin["isGateway"], plugin["ipMasq"]) == (
        "bridge",
        node.BRIDGE,
        True,
        False,
    )
    assert plugin["ipam"]["ranges"] == [[{"subnet": node.POD_CIDR, "gateway": node.NODE_IP}]]
    assert Path(plugin["ipam"]["dataDir"]).is_relative_to(tmp_path)  # not /var/lib/cni/networks


def test_kubelet_runs_on_cgroup_v1_with_cgroupfs_under_its_own_cgroup(tmp_path: Path) -> None:
    pair = KeyPair(tmp_path / "k.crt", tmp_path / "k.key")
    config = node.kubelet_config(tmp_path, tmp_path / "ca.crt", pair, port=10250, healthz_port=10248)
    assert config["failCgroupV1"] is False
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["cgroupRoot"] == f"/{node.CGROUP_PARENT}"
    assert config["failSwapOn"] is False
    assert config["clusterDNS"] == [node.NODE_IP]
    assert config["authentication"]["anonymous"] == {"enabled": False}
    assert Path(config["podLogsDir"]).is_relative_to(tmp_path)
    assert config["containerRuntimeEndpoint"] == f"unix://{tmp_path / 'containerd' / 'containerd.sock'}"


def test_kube_proxy_uses_nftables_and_leaves_conntrack_alone(tmp_path: Path) -> None:
    config = node.kube_proxy_config(tmp_path / "kubeconfig", 1, 2)
    assert config["mode"] == "nftables"
    assert "masqueradeAll" not in config.get("nftables", {})  # pods' addresses reach NetworkPolicies
    assert all(value in (0, "0s") for value in config["conntrack"].values())
    assert config["healthzBindAddress"] == "127.0.0.1:1"


def test_coredns_answers_on_the_bridge_with_no_upstream(tmp_path: Path) -> None:
    corefile = node.coredns_corefile(tmp_path / "kubeconfig", 9153)
    assert f"bind {node.NODE_IP}" in corefile
    assert "forward" not in corefile
    assert "ready 127.0.0.1:9153" in corefile


def test_a_snapshot_names_what_changed_and_nothing_else() -> None:
    before = host.HostState(
        sysctls={"net.ipv4.ip_forward": "0"},
        links=["eth0", "lo"],
        nft_tables=[],
        mounts=["/"],
        paths=["/run/netns"],
    )
    assert before.difference(host.HostState.from_json(before.to_json())) == []
    after = host.HostState(
        sysctls={"net.ipv4.ip_forward": "1"},
        links=["eth0", "lo", "shadowgate0"],
        nft_tables=["table ip kube-proxy"],
        mounts=["/", "/run/netns/cni-1", "/var/tmp/x/shm"],
        paths=["/run/netns", "/run/netns/cni-1"],
    )
    assert after.difference(after) == []
    assert before.difference(after) == [
        "sysctl net.ipv4.ip_forward is 1, was 0",
        "network link added: shadowgate0",
        "nft table added: table ip kube-proxy",
        "path added: /run/netns/cni-1",
        "mount added: /run/netns/cni-1",
        "mount added: /var/tmp/x/shm",
    ]


def test_kube_routers_chains_go_with_the_jumps_to_them_and_nothing_else() -> None:
    dump = [
        "*filter",
        ":INPUT ACCEPT",
        ":FORWARD DROP",
        ":KUBE-ROUTER-FORWARD - [0:0]",
        ":KUBE-POD-FW-ABC - [0:0]",
        ":OTHER - [0:0]",
        '-A INPUT -s 10.0.0.1/32 -m comment --comment "someone else\'s" -j ACCEPT',
        '-A FORWARD -m comment --comment "kube-router netpol - X" -j KUBE-ROUTER-FORWARD',
        "-A FORWARD -j OTHER",
        "-A KUBE-ROUTER-FORWARD -d 10.244.0.5/32 -j KUBE-POD-FW-ABC",
        "-A OTHER -j KUBE-POD-FW-ABC",
        "COMMIT",
    ]
    script = host.iptables_removal(dump, node.KUBE_ROUTER_CHAINS)
    assert script is not None
    assert script.splitlines() == [
        "*filter",
        '-D FORWARD -m comment --comment "kube-router netpol - X" -j KUBE-ROUTER-FORWARD',
        "-D OTHER -j KUBE-POD-FW-ABC",
        "-F KUBE-ROUTER-FORWARD",
        "-F KUBE-POD-FW-ABC",
        "-X KUBE-ROUTER-FORWARD",
        "-X KUBE-POD-FW-ABC",
        "COMMIT",
    ]
    assert host.iptables_removal(["*filter", ":INPUT ACCEPT", "-A INPUT -j ACCEPT", "COMMIT"], ("KUBE-",)) is None


def test_a_real_snapshot_of_this_machine_compares_equal_to_itself() -> None:
    first = host.HostState.capture()
    assert first.links
    assert "net.ipv4.ip_forward" in first.sysctls
    assert first.difference(host.HostState.capture()) == []


def test_mounts_elsewhere_are_other_work_on_the_machine_not_the_nodes(tmp_path: Path) -> None:
    """Only mounts below the watched paths, the cgroup file system and the roots named count."""
    watched = host.HostState.capture(mount_roots=(str(tmp_path),))
    assert all(
        point.startswith((*host.WATCHED_PATHS, str(host.CGROUP_ROOT), str(tmp_path))) for point in watched.mounts
    )


def test_without_root_the_node_refuses_in_one_line_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(host.HostProblem) as raised:
        host.preflight()
    message = str(raised.value)
    assert "\n" not in message
    assert "needs root" in message and "sudo make e2e" in message and "kind-e2e.sh" in message

    assert cli.main(["node", "preflight"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("error: node: a local node needs root")


def test_root_without_the_capabilities_containerd_needs_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Root in an unprivileged container (Docker's default set: no CAP_SYS_ADMIN, no CAP_NET_ADMIN)."""
    docker_default = "Name:\tpython\nCapPrm:\t00000000a80425fb\nCapEff:\t00000000a80425fb\n"
    assert host.missing_capabilities(docker_default) == ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]
    # This machine's root: everything but CAP_SYS_RESOURCE, which a node does without.
    assert host.missing_capabilities("CapEff:\t000001fffeffffff\n") == []
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(host, "missing_capabilities", lambda: ["CAP_SYS_ADMIN"])
    with pytest.raises(host.HostProblem) as raised:
        host.preflight(install=False)
    message = str(raised.value)
    assert "\n" not in message
    assert "lacks CAP_SYS_ADMIN" in message and "privileged container" in message and "kind-e2e.sh" in message


def test_missing_packages_are_named_with_the_command_that_installs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(host, "PACKAGES", {"containerd": "/nonexistent/containerd", "nftables": "/nonexistent/nft"})
    with pytest.raises(
        host.HostProblem, match=r"missing Debian packages containerd, nftables: `apt-get install containerd nftables`"
    ):
        host.preflight(install=False)


def test_a_docker_archive_holds_the_layers_their_digests_name(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as archive:
        (tmp_path / "hello").write_text("hi")
        archive.add(tmp_path / "hello", arcname="hello")
    output = tmp_path / "image.tar"
    images.write_docker_archive(output, "localhost/test:1", [layer], {"Entrypoint": ["/hello"]})
    with tarfile.open(output) as archive:
        (manifest,) = json.loads(archive.extractfile("manifest.json").read())  # type: ignore[union-attr]
        config = json.loads(archive.extractfile(manifest["Config"]).read())  # type: ignore[union-attr]
        assert manifest["RepoTags"] == ["localhost/test:1"]
        (layer_name,) = manifest["Layers"]
        assert config["rootfs"]["diff_ids"] == [f"sha256:{layer_name.split('/')[0]}"]
        assert config["rootfs"]["diff_ids"] == [f"sha256:{images._file_digest(layer)}"]
        assert (config["os"], config["architecture"], config["config"]) == (
            "linux",
            "amd64",
            {"Entrypoint": ["/hello"]},
        )


def test_the_image_hash_covers_what_the_dockerfile_may_copy_and_nothing_else() -> None:
    files = {str(path.relative_to(REPO_ROOT)) for path in images.build_context_files()}
    assert {"pyproject.toml", "README.md"} <= files
    assert any(name.startswith("operator/shadowgate_operator/") for name in files)
    assert any(name.startswith("router/shadowgate_router/") for name in files)
    assert any(name.startswith("migrations/") for name in files)
    assert not any(name.startswith(("tests/", "hack/", "manifests/")) or "__pycache__" in name for name in files)
    # The developer tooling is not copied into the image: a change to it does not rebuild the image.
    assert not any(name.startswith("operator/shadowgate_dev/") for name in files)


def test_the_node_overlay_only_swaps_the_database_image() -> None:
    import yaml

    overlay = yaml.safe_load((REPO_ROOT / "hack" / "e2e" / "node-timescaledb" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../../manifests/overlays/timescaledb"]
    (swap,) = overlay["images"]
    statefulset = (REPO_ROOT / "manifests" / "overlays" / "timescaledb" / "statefulset.yaml").read_text()
    assert f"image: {swap['name']}:" in statefulset
    assert f"{swap['newName']}:{swap['newTag']}" == images.TIMESCALEDB_IMAGE
