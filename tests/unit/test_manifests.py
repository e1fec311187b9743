"""What can be checked of the image and the manifests without building or applying them.

There is no Docker engine on the test machines: the Dockerfile is checked for what must hold (the user
the pods run as, every path it copies exists and gets past .dockerignore, no compiler in the final
stage, the migrations shipped where SHADOWGATE_MIGRATIONS says). tests/cluster/test_manifests.py builds
every kustomization and has the API server accept it.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowgate_operator import builders
from shadowgate_operator.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "manifests"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            found.append((instruction.upper(), " ".join(arguments.split())))
    return found


def stages() -> list[list[tuple[str, str]]]:
    split: list[list[tuple[str, str]]] = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "FROM":
            split.append([])
        if split:
            split[-1].append((instruction, arguments))
    return split


def dockerignore_allows(path: str) -> bool:
    """The last matching .dockerignore pattern decides (a leading ! re-includes), as Docker does."""
    allowed = True
    for pattern in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            allowed = negated
    return allowed


def test_the_final_image_runs_as_the_user_the_pods_ask_for() -> None:
    final = stages()[-1]
    users = [arguments for instruction, arguments in final if instruction == "USER"]
    assert users == [f"{builders.RUN_AS_USER}:{builders.RUN_AS_USER}"]
    operator = yaml.safe_load((MANIFESTS / "operator" / "deployment.yaml").read_text())
    pod = operator["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["runAsNonRoot"]) == (
        builders.RUN_AS_USER,
        builders.RUN_AS_USER,
        True,
    )


def test_every_path_the_dockerfile_copies_exists_and_is_sent_to_the_build() -> None:
    copied = []
    for instruction, arguments in dockerfile_instructions():
        if instruction == "COPY" and "--from=" not in arguments:
            *sources, _destination = shlex.split(arguments)
            copied += sources
    assert {"pyproject.toml", "operator/shadowgate_operator/", "router/", "common/", "migrations/"} <= set(copied)
    for source in copied:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path"
        assert dockerignore_allows(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
    # What the build must not see: the developer tooling is neither copied nor sent.
    assert not any(source.rstrip("/") in ("operator", "operator/shadowgate_dev") for source in copied), copied
    for kept_out in (
        ".venv",
        ".git",
        "tests",
        "shadowgate.egg-info",
        "operator/shadowgate_operator/__pycache__",
        "operator/shadowgate_dev",
        "operator/shadowgate_dev/demo/__init__.py",
    ):
        assert not dockerignore_allows(kept_out), kept_out


def test_the_final_stage_has_no_compiler_and_ships_the_migrations() -> None:
    build, final = stages()
    assert any("build-essential" in arguments for instruction, arguments in build if instruction == "RUN")
    assert not any(
        word in arguments for instruction, arguments in final if instruction == "RUN" for word in ("apt-get", "gcc")
    )
    assert ("ENTRYPOINT", '["shadowgate"]') in final
    environment = " ".join(arguments for instruction, arguments in final if instruction == "ENV")
    migrations = re.search(r"SHADOWGATE_MIGRATIONS=(\S+)", environment)
    assert migrations is not None
    assert ("COPY", f"migrations/ {migrations.group(1)}/") in final
    assert "PATH=/opt/shadowgate/bin:" in environment  # `shadowgate` as the router pods' command finds it
    assert any(arguments.startswith("--from=build /opt/shadowgate ") for instruction, arguments in final)


def test_the_operator_deployment_args_are_accepted_by_the_command() -> None:
    operator = yaml.safe_load((MANIFESTS / "operator" / "deployment.yaml").read_text())
    container = operator["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    # Namespaced by default: the namespace it runs in, from WATCH_NAMESPACE (no --all-namespaces).
    assert (args.command, args.all_namespaces, args.namespace, args.peering) == ("operator", False, [], "shadowgate")
    assert args.liveness == "http://0.0.0.0:8080/healthz" and args.metrics == "0.0.0.0:9090"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    watch = next(variable for variable in container["env"] if variable["name"] == "WATCH_NAMESPACE")
    assert watch["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    peering = yaml.safe_load((MANIFESTS / "operator" / "peering.yaml").read_text())
    assert (peering["kind"], peering["metadata"]["name"]) == ("KopfPeering", args.peering)
    rbac = list(yaml.safe_load_all((MANIFESTS / "operator" / "rbac.yaml").read_text()))
    assert {document["kind"] for document in rbac} == {"ServiceAccount", "Role", "RoleBinding"}  # nothing cluster-wide
    role = next(document for document in rbac if document["kind"] == "Role")
    named = [rule["resourceNames"] for rule in role["rules"] if "resourceNames" in rule]
    assert named == [[args.peering]]
    environment = {variable["name"]: variable.get("value") for variable in container["env"]}
    assert environment["SHADOWGATE_CLUSTER_ROLE"] == role["metadata"]["name"]
    assert environment["SHADOWGATE_ALLOWED_ROUTER_IMAGES"] == ""  # only the operator's own image for routers


def test_the_cluster_wide_role_is_the_namespaced_role_plus_what_kopf_scans() -> None:
    namespaced = next(
        document
        for document in yaml.safe_load_all((MANIFESTS / "operator" / "rbac.yaml").read_text())
        if document["kind"] == "Role"
    )
    cluster = next(
        document
        for document in yaml.safe_load_all((MANIFESTS / "overlays" / "cluster-wide" / "rbac.yaml").read_text())
        if document["kind"] == "ClusterRole"
    )

    def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {
            (group, "clusterkopfpeerings" if resource == "kopfpeerings" else resource, verb)
            for rule in rules
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }

    extra = grants(cluster["rules"]) - grants(namespaced["rules"])
    assert extra == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }
    assert grants(namespaced["rules"]) <= grants(cluster["rules"])


@pytest.mark.parametrize("name", ["shadowgate.io_shadowdeployments.yaml", "kopf.dev_peerings.yaml"])
def test_the_kustomize_crds_are_copies_of_crds(name: str) -> None:
    copy = MANIFESTS / "crds" / name
    assert copy.read_text() == (REPO_ROOT / "crds" / name).read_text(), f"{copy} is stale: run `make crds`"


def containers(path: Path) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every workload in a manifest file."""
    found = []
    for document in yaml.safe_load_all(path.read_text()):
        if document and document.get("kind") in ("Deployment", "StatefulSet"):
            pod = document["spec"]["template"]["spec"]
            for container in pod["containers"]:
                found.append((f"{path.name}: {document['metadata']['name']}", pod, container))
    return found


def test_every_container_is_unprivileged_with_a_read_only_root() -> None:
    found = [entry for path in sorted(MANIFESTS.rglob("*.yaml")) for entry in containers(path)]
    assert len(found) == 5  # the operator, TimescaleDB, two sample models, the sample clients
    for where, pod, container in found:
        security = container["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"] == {"drop": ["ALL"]}, where
        assert "memory" in container["resources"]["limits"], where


# What `pip install shadowgate` leaves out (the [dev] extra): the image has none of it.
DEV_ONLY = ("cryptography", "pytest", "pytest_asyncio", "pytest_timeout", "ruff", "mypy")


def without_dev_extra(*argv: str) -> subprocess.CompletedProcess[str]:
    """`shadowgate ARGV` in a Python where the dev-only packages cannot be imported."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in DEV_ONLY)
    program = f"import sys; {blocked}; from shadowgate_operator.cli import main; sys.exit(main({list(argv)!r}))"
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["operator", "router", "migrate"])
def test_the_image_commands_work_without_the_dev_extra(command: str) -> None:
    run = without_dev_extra(command, "--help")
    assert run.returncode == 0, run.stderr
    assert f"usage: shadowgate {command}" in run.stdout


def test_commands_that_need_the_dev_extra_say_so_instead_of_failing() -> None:
    listing = without_dev_extra("--help")
    assert listing.returncode == 0, listing.stderr
    assert "Not available in this installation:" in listing.stdout
    assert "needs cryptography (pip install 'shadowgate[dev]')" in listing.stdout


# Put first on sys.meta_path in the child: shadowgate_dev cannot be found, as in the image's virtualenv
# (the import system raises what it raises for any missing top-level module).
HIDE_DEV_PACKAGE = """
import sys

class HideDevPackage:
    def find_spec(self, name, path=None, target=None):
        if name == "shadowgate_dev":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideDevPackage())
"""


def in_the_image(*argv: str) -> subprocess.CompletedProcess[str]:
    """`shadowgate ARGV` as the image runs it: no dev extra and no shadowgate_dev package (the Dockerfile
    copies operator/shadowgate_operator only). The child first checks that shadowgate_dev is not there."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in DEV_ONLY)
    program = (
        f"{HIDE_DEV_PACKAGE}\n{blocked}\n"
        "import importlib\n"
        "try:\n    importlib.import_module('shadowgate_dev.demo')\n"
        "except ModuleNotFoundError as exc:\n    assert exc.name == 'shadowgate_dev', exc\n"
        "else:\n    sys.exit('shadowgate_dev imported')\n"
        f"from shadowgate_operator.cli import main\nsys.exit(main({list(argv)!r}))"
    )
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["demo"], "make demo"),
        (["demo", "--scenario", "rollback"], "make demo"),
        (["dev", "up", "--foreground"], "make dev-up"),
        (["node", "up"], "make e2e"),
        (["node", "--help"], "make e2e"),
    ],
)
def test_developer_commands_in_the_image_exit_2_with_one_line_saying_where_they_run(
    argv: list[str], target: str
) -> None:
    run = in_the_image(*argv)
    assert (run.returncode, run.stdout) == (2, ""), run.stderr
    assert run.stderr == (
        f"shadowgate {argv[0]}: developer tooling, not in this image: run it from a source checkout, `{target}`\n"
    )


def test_the_image_lists_the_developer_commands_and_still_runs_its_own() -> None:
    listing = in_the_image("--help")
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^\s+demo\s+developer tooling, not in this image$", listing.stdout, re.MULTILINE), listing.stdout
    assert "Not available in this installation" not in listing.stdout  # nothing else is missing
    for command in ("operator", "router", "migrate", "replay", "crd"):
        run = in_the_image(command, "--help")
        assert run.returncode == 0, run.stderr
        assert f"usage: shadowgate {command}" in run.stdout
    # Arguments the image's own commands do not know are still refused, as before.
    run = in_the_image("crd", "--no-such-option")
    assert run.returncode == 2
    assert "unrecognized arguments: --no-such-option" in run.stderr
