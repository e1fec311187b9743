"""Registry write-back against a real MLflow tracking server (`mlflow server`, SQLite backend, on loopback):
the MLflow client of the operator, and the real operator writing a promotion and a rollback back."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shadowgate_dev.localenv.mlflow import MLFLOW, MlflowServer
from shadowgate_dev.localenv.process import free_port
from shadowgate_dev.localenv.venvs import install
from shadowgate_operator.migrate import migrate_dsn
from shadowgate_operator.registry import ModelVersionRef, Outcome
from shadowgate_operator.registry.mlflow import MlflowRegistry, RegistryError
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import eventually, example, wait_phase

OUTCOME = Outcome(
    rollout="models/fraud-detector",
    link="/apis/shadowgate.io/v1alpha1/namespaces/models/shadowdeployments/fraud-detector",
    reason="candidate promoted: mae 0.415 vs 0.5 (17% better), score 0.81 >= 0.7, p = 0.002",
    time="2026-12-01T00:40:00Z",
)


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Our own `mlflow server`, or the one at $SHADOWGATE_MLFLOW_URL (a server already running: MLflow takes
    from 15 s on an idle machine to minutes on a busy one to import and start)."""
    work = Path(tmp_path_factory.mktemp("mlflow"))
    server = MlflowServer(work)
    running = os.environ.get("SHADOWGATE_MLFLOW_URL")
    if running:
        server.url = running.rstrip("/")
        yield server
        return
    install(MLFLOW)  # cached after the first run
    try:
        server.start().wait_ready(540)
        yield server
    finally:
        server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def call(http: httpx.AsyncClient, server: MlflowServer, method: str, path: str, **body: Any) -> dict[str, Any]:
    """MLflow's REST API as a person (or the MLflow client) would call it, to set up and to check."""
    url = f"{server.url}/api/2.0/mlflow/{path}"
    response = await (http.get(url, params=body) if method == "GET" else http.post(url, json=body))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def registered(http: httpx.AsyncClient, server: MlflowServer, versions: int = 2) -> str:
    """A new registered model with `versions` versions, `champion` on version 1 (production serves it)."""
    name = f"fraud-{secrets.token_hex(3)}"
    await call(http, server, "POST", "registered-models/create", name=name)
    for number in range(1, versions + 1):
        await call(http, server, "POST", "model-versions/create", name=name, source=f"s3://models/{name}/{number}")
    await call(http, server, "POST", "registered-models/alias", name=name, alias="champion", version="1")
    return name


async def version(http: httpx.AsyncClient, server: MlflowServer, name: str, number: str) -> dict[str, Any]:
    found: dict[str, Any] = (await call(http, server, "GET", "model-versions/get", name=name, version=number))[
        "model_version"
    ]
    return found


def tags(model_version: dict[str, Any]) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in model_version.get("tags", [])}


async def champion(http: httpx.AsyncClient, server: MlflowServer, name: str, alias: str = "champion") -> str:
    answer = await call(http, server, "GET", "registered-models/alias", name=name, alias=alias)
    return str(answer["model_version"]["version"])


async def test_promotion_moves_the_alias_to_the_candidate_and_tags_both_versions(
    mlflow: MlflowServer, http: httpx.AsyncClient
) -> None:
    name = await registered(http, mlflow)
    registry = MlflowRegistry(mlflow.url, http)
    for _ in range(2):  # a write-back retried (after a failure, a restart) changes nothing more
        await registry.promoted(ModelVersionRef(name, "2"), ModelVersionRef(name, "1"), OUTCOME, "champion")
        assert await champion(http, mlflow, name) == "2"
        candidate, production = await version(http, mlflow, name, "2"), await version(http, mlflow, name, "1")
        assert tags(candidate) == {
            "shadowgate.outcome": "promoted",
            "shadowgate.rollout": OUTCOME.rollout,
            "shadowgate.link": OUTCOME.link,
            "shadowgate.time": OUTCOME.time,
            "shadowgate.reason": OUTCOME.reason,
            "shadowgate.replaces": "1",
        }
        assert tags(production)["shadowgate.outcome"] == "replaced"
        assert tags(production)["shadowgate.replaced_by"] == "2"
        assert "champion" in candidate.get("aliases", []) and "champion" not in production.get("aliases", [])


async def test_rollback_tags_the_candidate_with_the_reason_and_leaves_the_alias_where_it_was(
    mlflow: MlflowServer, http: httpx.AsyncClient
) -> None:
    name = await registered(http, mlflow)
    rolled_back = Outcome(OUTCOME.rollout, OUTCOME.link, "candidate error rate 0.12 > maxErrorRate 0.05", OUTCOME.time)
    await MlflowRegistry(mlflow.url, http).rolled_back(ModelVersionRef(name, "2"), rolled_back)
    assert await champion(http, mlflow, name) == "1"
    candidate = tags(await version(http, mlflow, name, "2"))
    assert candidate["shadowgate.outcome"] == "rolled_back"
    assert candidate["shadowgate.reason"] == "candidate error rate 0.12 > maxErrorRate 0.05"
    assert "shadowgate.outcome" not in tags(await version(http, mlflow, name, "1"))


async def test_a_model_the_registry_does_not_know_is_refused_for_good_and_a_server_away_is_worth_a_retry(
    mlflow: MlflowServer, http: httpx.AsyncClient
) -> None:
    with pytest.raises(RegistryError) as unknown:
        await MlflowRegistry(mlflow.url, http).rolled_back(ModelVersionRef("no-such-model", "1"), OUTCOME)
    assert not unknown.value.retry and "HTTP 404" in str(unknown.value)
    with pytest.raises(RegistryError) as away:
        await MlflowRegistry(f"http://127.0.0.1:{free_port()}", http).rolled_back(ModelVersionRef("m", "1"), OUTCOME)
    assert away.value.retry and "not reached" in str(away.value)


def registry_state(server: MlflowServer, name: str) -> tuple[str, dict[str, dict[str, str]]]:
    """Where `champion` points, and each version's tags, as MLflow says now."""

    async def read() -> tuple[str, dict[str, dict[str, str]]]:
        async with httpx.AsyncClient(timeout=30) as http:
            versions = {number: tags(await version(http, server, name, number)) for number in ("1", "2", "3")}
            return await champion(http, server, name), versions

    return asyncio.run(read())


@pytest.mark.cluster
@pytest.mark.database
@pytest.mark.timeout(900)
def test_the_operator_writes_a_promotion_and_a_rollback_back_to_mlflow(
    kubectl: Kubectl,
    namespace: str,
    dsn: str,
    start_operator: StartOperator,
    apply_shadow: ApplyShadow,
    mlflow: MlflowServer,
) -> None:
    asyncio.run(migrate_dsn(dsn))

    async def model() -> str:
        async with httpx.AsyncClient(timeout=30) as http:
            return await registered(http, mlflow, versions=3)

    name, rollout = asyncio.run(model()), "registered"
    manifest = example(rollout, registry={"mlflow": {"trackingUri": mlflow.url}})
    manifest["spec"]["production"]["registeredModel"] = {"name": name, "version": "1"}
    manifest["spec"]["candidate"]["registeredModel"] = {"name": name, "version": "2"}
    start_operator("--namespace", namespace)
    apply_shadow(namespace, manifest)
    wait_phase(kubectl, namespace, rollout, "Progressing", timeout=60)

    def annotate(value: str) -> None:
        kubectl(
            "annotate", "--overwrite", "shadowdeployment", rollout, "-n", namespace, f"shadowgate.io/action={value}"
        )

    annotate("promote")
    promoted = wait_phase(kubectl, namespace, rollout, "Promoted", timeout=60)
    state = eventually(lambda: (found := registry_state(mlflow, name))[0] == "2" and found, 120, "champion on 2")
    link = f"/apis/shadowgate.io/v1alpha1/namespaces/{namespace}/shadowdeployments/{rollout}"
    candidate, production = state[1]["2"], state[1]["1"]
    assert (candidate["shadowgate.outcome"], candidate["shadowgate.replaces"]) == ("promoted", "1")
    assert (candidate["shadowgate.rollout"], candidate["shadowgate.link"]) == (f"{namespace}/{rollout}", link)
    assert candidate["shadowgate.reason"] == promoted["status"]["lastTransition"]["events"][0]["message"]
    assert (production["shadowgate.outcome"], production["shadowgate.replaced_by"]) == ("replaced", "2")

    # The next candidate, version 3, rolled back: tagged with the reason, the alias stays on 2.
    kubectl(
        "patch", "shadowdeployment", rollout, "-n", namespace, "--type=merge", "-p",
        '{"spec": {"production": {"version": "2.0.0", "registeredModel": {"version": "2"}},'
        ' "candidate": {"version": "3.0.0", "registeredModel": {"version": "3"}}}}',
    )  # fmt: skip
    annotate("retry:1")
    wait_phase(kubectl, namespace, rollout, "Progressing", timeout=60)
    annotate("abort:2")
    rolled_back = wait_phase(kubectl, namespace, rollout, "RolledBack", timeout=60)
    state = eventually(
        # The reason is the last tag written.
        lambda: "shadowgate.reason" in (found := registry_state(mlflow, name))[1]["3"] and found,
        120,
        "3 tagged",
    )
    reason = next(e for e in rolled_back["status"]["lastTransition"]["events"] if e["reason"] == "RolledBack")
    assert state[0] == "2"
    assert (state[1]["3"]["shadowgate.outcome"], state[1]["3"]["shadowgate.reason"]) == (
        "rolled_back",
        reason["message"],
    )
    assert state[1]["2"]["shadowgate.outcome"] == "promoted"
