"""The local control plane and PostgreSQL are real: kubectl, CRDs, garbage collection, namespaces, asyncpg."""

from __future__ import annotations

import dataclasses
import json
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from shadowgate_dev.localenv import ComponentError, ControlPlane, Postgres
from shadowgate_dev.localenv.binaries import KUBERNETES, Binaries, ensure_binaries
from shadowgate_dev.localenv.crds import install_crds
from shadowgate_dev.localenv.postgres import find_postgres_bin
from tests.conftest import Kubectl

pytestmark = pytest.mark.cluster


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)


def test_kubectl_works_with_the_written_kubeconfig(kubectl: Kubectl) -> None:
    whoami = json.loads(kubectl("auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == "admin"
    assert "system:masters" in whoami["status"]["userInfo"]["groups"]
    namespaces = kubectl("get", "namespaces", "-o", "name").stdout.split()
    assert "namespace/default" in namespaces


WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.localenv.shadowgate.io
spec:
  group: localenv.shadowgate.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size: {type: integer, minimum: 1}
"""


def test_a_crd_can_be_created_and_served(kubectl: Kubectl, kubeconfig: str, namespace: str, tmp_path: Path) -> None:
    (tmp_path / "widgets.yaml").write_text(WIDGET_CRD)
    assert install_crds(KUBERNETES.path("kubectl"), kubeconfig, [tmp_path]) == ["widgets.localenv.shadowgate.io"]
    # Established, in discovery and in the OpenAPI document: the very first explain works.
    assert "size" in kubectl("explain", "widgets.spec").stdout
    widget = "apiVersion: localenv.shadowgate.io/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n"
    kubectl("apply", "-n", namespace, "-f", "-", input=widget)
    served = json.loads(kubectl("get", "widget", "w1", "-n", namespace, "-o", "json").stdout)
    assert served["spec"] == {"size": 3}
    refused = kubectl("apply", "-n", namespace, "-f", "-", input=widget.replace("size: 3", "size: 0"), check=False)
    assert refused.returncode != 0
    assert "should be greater than or equal to 1" in refused.stderr


def test_dependents_are_garbage_collected_when_the_owner_goes(kubectl: Kubectl, namespace: str) -> None:
    kubectl("create", "configmap", "owner", "-n", namespace)
    uid = kubectl("get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(dependent))
    kubectl("delete", "configmap", "owner", "-n", namespace)

    def dependent_gone() -> bool:
        return kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode != 0

    wait_for(dependent_gone, 60, "the garbage collector to delete the dependent ConfigMap")


def test_a_namespace_can_be_deleted(kubectl: Kubectl) -> None:
    kubectl("create", "namespace", "t-deleted-namespace")
    kubectl("create", "configmap", "content", "-n", "t-deleted-namespace")
    kubectl("delete", "namespace", "t-deleted-namespace", "--timeout=60s")
    assert kubectl("get", "namespace", "t-deleted-namespace", check=False).returncode != 0


@pytest.mark.database
async def test_postgres_accepts_an_asyncpg_connection(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        version = await connection.fetchval("SHOW server_version_num")
        assert int(version) >= 150000
        assert await connection.fetchval("SELECT current_database()") == "shadowgate"
        await connection.execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (41)")
        assert await connection.fetchval("SELECT x + 1 FROM t") == 42
    finally:
        await connection.close()


@pytest.mark.database
async def test_the_cluster_preloads_timescaledb_from_a_private_tree(database: Postgres | None, dsn: str) -> None:
    if database is None or not database.timescale:
        pytest.skip(f"the throwaway database runs without TimescaleDB: {database and database.timescale_reason}")
    assert database.bin_dir is not None
    system = find_postgres_bin()
    assert system not in database.bin_dir.parents and database.bin_dir != system
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SHOW shared_preload_libraries") == "timescaledb"
        assert await connection.fetchval("SHOW timescaledb.telemetry_level") == "off"
        assert await connection.fetchval("SHOW timescaledb.license") == "timescale"
        version = await connection.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
        assert database.server.endswith(f"with timescaledb {version}")
    finally:
        await connection.close()


@pytest.mark.database
def test_the_machines_own_server_is_untouched(database: Postgres | None) -> None:
    """No TimescaleDB files in the system's server tree, its configuration sample as it was."""
    system = find_postgres_bin()
    lines = subprocess.run(
        [str(system / "pg_config"), "--pkglibdir", "--sharedir"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not list(Path(lines[0]).glob("timescaledb*"))
    assert not list(Path(lines[1], "extension").glob("timescaledb*"))
    assert "timescaledb" not in Path(lines[1], "postgresql.conf.sample").read_text()


@pytest.mark.database
async def test_a_plain_cluster_has_no_timescaledb(plain_database: Postgres) -> None:
    assert not plain_database.timescale and plain_database.bin_dir == find_postgres_bin()
    connection = await asyncpg.connect(plain_database.dsn)
    try:
        assert await connection.fetchval("SHOW shared_preload_libraries") == ""
        assert not await connection.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
    finally:
        await connection.close()


def _descendants(pids: list[int]) -> set[int]:
    """pids and every process whose parent chain leads to one of them (PostgreSQL backends, for example)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found = set(pids)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_teardown_leaves_no_process_and_no_port() -> None:
    plane = ControlPlane()
    database = Postgres()
    plane.start()
    try:
        database.start()
        postgres_pid = database.pid()
        assert postgres_pid is not None
        pids = _descendants([*plane.pids(), postgres_pid])
        ports = [plane.etcd_port, plane.apiserver_port, database.port]
        assert len(pids) >= 5  # etcd, kube-apiserver, kube-controller-manager, postmaster and its helpers
        assert all(port is not None and _listening(port) for port in ports)
        directories = [plane.directory, database.directory]
    finally:
        database.stop()
        database.cleanup()
        plane.stop()
    wait_for(lambda: not any(_alive(pid) for pid in pids), 10, "every process to exit")
    assert not any(_listening(port) for port in ports if port is not None)
    assert not any(directory is not None and directory.exists() for directory in directories)


def test_a_taken_port_fails_fast_and_names_the_component() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ComponentError) as raised:
            ControlPlane(apiserver_port=port).start()
        assert raised.value.component == "kube-apiserver"
        assert f"port 127.0.0.1:{port} is already in use" in str(raised.value)
        with pytest.raises(ComponentError, match=f"postgres: port 127.0.0.1:{port} is already in use"):
            Postgres(port=port).start()
        assert time.monotonic() - started < 5


def test_a_missing_binary_fails_fast_and_names_it(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ComponentError, match=rf"etcd: binary not found at {tmp_path}/etcd"):
        ControlPlane(binaries=Binaries.from_dir(tmp_path)).start()
    assert time.monotonic() - started < 5


def test_a_component_that_dies_fails_fast_with_its_log_tail(tmp_path: Path) -> None:
    broken = tmp_path / "kube-apiserver"
    broken.write_text("#!/bin/sh\necho 'E1125 run.go:72] error: unable to load server certificate' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    real = ensure_binaries()
    plane = ControlPlane(binaries=dataclasses.replace(real, kube_apiserver=broken), with_controller_manager=False)
    started = time.monotonic()
    with pytest.raises(ComponentError) as raised:
        plane.start()
    assert time.monotonic() - started < 15
    message = str(raised.value)
    assert message.startswith("kube-apiserver: exited with code 1 before ready on /readyz")
    assert "unable to load server certificate" in message  # the log tail says why
    # etcd, started before the failure, was stopped with it.
    assert not any(_alive(pid) for pid in plane.pids())
