"""manifests/ on a real API server: every kustomization builds and is accepted (server-side dry run,
strict field validation, the restricted Pod Security Standard), and the example's sample programs work
against a real router and database."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from shadowgate_dev.localenv.process import free_port
from shadowgate_operator import builders
from shadowgate_operator.api import ShadowDeployment
from shadowgate_operator.migrate import migrate_dsn
from tests.conftest import Kubectl
from tests.support.rbac import REPO_ROOT, kustomize
from tests.support.router import Router, router_config, wait_until

pytestmark = pytest.mark.cluster

KUSTOMIZATIONS = ("crds", "operator", "base", "overlays/cluster-wide", "overlays/timescaledb", "overlays/example")
SAMPLE = REPO_ROOT / "manifests" / "overlays" / "example" / "sample"


def dry_run(kubectl: Kubectl, documents: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    return kubectl(
        "apply", "--dry-run=server", "--server-side", "--force-conflicts", "--field-manager=shadowgate-manifests-test",
        "-f", "-", input=yaml.safe_dump_all(documents),
    )  # fmt: skip


def create_namespaces(kubectl: Kubectl, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply the Namespaces for real (a dry run cannot put objects in a namespace it only pretended to
    create; their Pod Security labels then judge the workloads); return the other documents."""
    namespaces = [document for document in documents if document["kind"] == "Namespace"]
    if namespaces:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(namespaces))
    return [document for document in documents if document["kind"] != "Namespace"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_kustomization_builds_and_the_api_server_accepts_it(
    kubectl: Kubectl, shadow_crd: str, directory: str
) -> None:
    documents = kustomize(kubectl, directory)
    assert documents, directory
    others = create_namespaces(kubectl, documents)
    result = dry_run(kubectl, others)
    accepted = [line for line in result.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len(others), result.stdout
    assert "would violate PodSecurity" not in result.stderr, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_the_router_pods_the_operator_makes_pass_the_restricted_pod_security_standard(
    kubectl: Kubectl, shadow_crd: str
) -> None:
    example = kustomize(kubectl, "overlays/example")
    create_namespaces(kubectl, example)
    document = next(d for d in example if d["kind"] == "ShadowDeployment")
    document["metadata"]["uid"] = "1b2c3d4e-0000-4000-8000-000000000000"
    sd = ShadowDeployment.model_validate(document)
    children = builders.router_objects(sd, builders.OperatorSettings(router_image="shadowgate:0.1.0"))
    result = dry_run(kubectl, children)
    assert "deployment.apps/fraud-detector-router serverside-applied (server dry run)" in result.stdout
    assert result.stderr.strip() == "", result.stderr  # no "would violate PodSecurity" warning


class Program:
    """One of the example's sample programs, run as it is in the pod (python FILE, settings in the environment)."""

    def __init__(self, script: str, log: Path, *args: str, env: dict[str, str]):
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, str(SAMPLE / script), *args],
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def sample_models(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """fraud-v1 and fraud-v2 from the example overlay, on loopback."""
    urls, programs = [], []
    for version, noise in (("1.4.2", "0.25"), ("2.0.0", "0.05")):
        port = free_port()
        environment = {"MODEL_NAME": "fraud", "MODEL_VERSION": version, "NOISE": noise, "PORT": str(port)}
        programs.append(Program("model_server.py", tmp_path / f"model-{version}.log", env=environment))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url in urls:
            wait_until(lambda u=url: _ready(u), 20, f"the sample model at {url}")
        yield urls[0], urls[1]
    finally:
        for program in programs:
            program.stop()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.database
async def test_the_examples_sample_clients_and_models_feed_a_real_router(
    sample_models: tuple[str, str], tmp_path: Path, dsn: str
) -> None:
    """The sample clients score through a router and report outcomes; the candidate's log loss is lower,
    which is what the example's ShadowDeployment needs to promote it."""
    await migrate_dsn(dsn)  # the session's database, migrated whichever test comes first (idempotent)
    deployment = f"sample-{free_port()}"
    config = router_config(*sample_models, deployment=deployment, confidencePath=None, weight=100)
    router = Router.with_file(tmp_path, dsn, config, token="sample-token")
    router.start()
    traffic = Program(
        "traffic.py", tmp_path / "traffic.log", "--router", router.url, "--duration", "4", "--outcome-delay", "0.2",
        env={"OUTCOME_TOKEN": "sample-token", "RATE": "100"},
    )  # fmt: skip
    try:
        assert traffic.process.wait(30) == 0, traffic.log.read_text()
    finally:
        traffic.stop()
    summary = traffic.log.read_text().splitlines()[-1]
    scored, failed, reported = (int(part.split()[-1]) for part in summary.split(", "))
    assert scored > 50 and failed == 0 and reported > 0.8 * scored, summary
    wait_until(lambda: router.pending_rows() == 0, 10, "the router to flush its rows")
    router.stop()

    connection = await asyncpg.connect(dsn)
    try:
        row = await connection.fetchrow(
            """SELECT count(*) AS pairs,
                      avg(-(o.outcome * ln(p.production_prediction)
                            + (1 - o.outcome) * ln(1 - p.production_prediction))) AS production_loss,
                      avg(-(o.outcome * ln(p.candidate_prediction)
                            + (1 - o.outcome) * ln(1 - p.candidate_prediction))) AS candidate_loss
               FROM predictions p JOIN outcomes o USING (namespace, deployment, request_id)
               WHERE p.deployment = $1 AND p.candidate_prediction IS NOT NULL""",
            deployment,
        )
    finally:
        await connection.close()
    assert row["pairs"] >= 0.8 * scored
    assert row["candidate_loss"] < row["production_loss"], dict(row)
