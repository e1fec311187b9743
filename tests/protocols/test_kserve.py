"""The router in front of two real KServe Python model servers (`kserve` 0.21): v1 and v2 over REST with
requests and httpx, v2 over gRPC with tritonclient (KServe answers gRPC with typed contents, not raw)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator

import asyncpg
import httpx
import numpy
import pytest
import requests
import tritonclient.grpc as triton_grpc

from tests.cluster.test_router_proxy import StartRouter, rows
from tests.protocols.conftest import real_config
from tests.support.model_servers import ServerProcess, server_pair

pytestmark = [pytest.mark.protocols, pytest.mark.database]

Pair = tuple[ServerProcess, ServerProcess]


@pytest.fixture(scope="module")
def kservers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with server_pair("kserve", tmp_path_factory.mktemp("kserve"), candidate_model="fraud-v2") as pair:
        yield pair


async def test_v1_rest_with_the_body_s_id(
    kservers: Pair, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    config = real_config(
        kservers, deployment, protocol="v1", predictionPath="predictions[0]", confidencePath=None, weight=100
    )
    router = start_router(config)
    url = f"{router.url}/v1/models/fraud:predict"

    def use_requests() -> list[requests.Response]:
        with requests.Session() as session:
            return [
                session.post(url, json={"id": "kserve-v1-body", "instances": [[1, 2]]}, timeout=30),
                session.post(
                    url,
                    data=gzip.compress(json.dumps({"instances": [[4]]}).encode()),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip", "X-Request-Id": "v1-gz"},
                    timeout=30,
                ),
            ]

    by_body, gzipped = await asyncio.to_thread(use_requests)
    assert (by_body.status_code, by_body.json(), by_body.headers["X-Request-Id"]) == (
        200,
        {"predictions": [3.0]},
        "kserve-v1-body",
    )
    assert gzipped.status_code == 400, "KServe itself does not read gzip request bodies: its answer is passed on"
    async with httpx.AsyncClient(timeout=30) as client:
        metadata = await client.get(f"{router.url}/v1/models/fraud")
    assert metadata.status_code == 200 and metadata.headers["X-Shadowgate-Served-By"] == "production"
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 2)}
    row = recorded["kserve-v1-body"]
    assert (row["production_prediction"], row["candidate_prediction"]) == (3.0, 103.0)
    assert recorded["v1-gz"]["production_status"] == 400


async def test_v2_rest_and_grpc(
    kservers: Pair, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(real_config(kservers, deployment, mode="shadow", weight=100))
    body = {"id": "kserve-v2-rest", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1, 5]}]}
    async with httpx.AsyncClient(timeout=30) as client:
        rest = await client.post(f"{router.url}/v2/models/fraud/infer", json=body)
        model = await client.get(f"{router.url}/v2/models/fraud")
    assert rest.status_code == 200 and rest.json()["outputs"][0]["data"] == [6.0]
    assert rest.headers["X-Request-Id"] == "kserve-v2-rest" == rest.json()["id"]
    assert model.json()["name"] == "fraud"

    def use_grpc() -> tuple[float, str, bool]:
        client = triton_grpc.InferenceServerClient(url=router.grpc_address)
        try:
            ready = client.is_model_ready("fraud")
            tensor = triton_grpc.InferInput("x", [1, 2], "FP64")
            tensor.set_data_from_numpy(numpy.array([[2, 5]], dtype=numpy.float64))
            answer = client.infer("fraud", [tensor], request_id="kserve-v2-grpc").get_response()
            return float(answer.outputs[0].contents.fp64_contents[0]), answer.id, ready
        finally:
            client.close()

    assert await asyncio.to_thread(use_grpc) == (7.0, "kserve-v2-grpc", True)
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 2)}
    for request_id, value in (("kserve-v2-rest", 6.0), ("kserve-v2-grpc", 7.0)):
        row = recorded[request_id]
        assert (row["production_prediction"], row["candidate_prediction"]) == (value, value + 100), request_id
        assert row["production_confidence"] == 0.75
