"""The router in front of two real MLServer 1.7 servers (production "fraud", candidate "fraud-v2": the
router puts each server's own model name in): REST with requests, httpx and tritonclient, gzip on and
off; gRPC with tritonclient; the repository API passed through; a canary split."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import numpy
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from shadowgate_router.hashing import salt_for, threshold, to_candidate
from tests.cluster.test_router_proxy import StartRouter, rows
from tests.protocols.conftest import real_config
from tests.support.model_servers import ServerProcess, server_pair

pytestmark = [pytest.mark.protocols, pytest.mark.database]

Pair = tuple[ServerProcess, ServerProcess]
INFER = "/v2/models/fraud/infer"


@pytest.fixture(scope="module")
def mlservers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with server_pair("mlserver", tmp_path_factory.mktemp("mlserver"), candidate_model="fraud-v2") as pair:
        yield pair


def v2(*numbers: float, **extra: Any) -> dict[str, Any]:
    return {**extra, "inputs": [{"name": "x", "shape": [1, len(numbers)], "datatype": "FP64", "data": list(numbers)}]}


async def test_rest_clients_with_and_without_compression(
    mlservers: Pair, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(real_config(mlservers, deployment, mode="shadow", weight=100))
    url = router.url + INFER

    def use_requests() -> list[requests.Response]:
        with requests.Session() as session:  # asks for gzip by default; MLServer gzips answers over 1 KB
            return [
                session.post(
                    url,
                    data=gzip.compress(json.dumps(v2(1, 2, 3, id="requests-gzip")).encode()),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                    timeout=30,
                ),
                session.post(url, json=v2(2, 2, id="requests-plain"), timeout=30),
            ]

    gzipped, plain = await asyncio.to_thread(use_requests)
    for answer, request_id, value in ((gzipped, "requests-gzip", 6.0), (plain, "requests-plain", 4.0)):
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Encoding"] == "gzip"
        assert answer.headers["X-Request-Id"] == request_id == answer.json()["id"]
        assert answer.json()["outputs"][0]["data"] == [value]
        assert answer.json()["model_name"] == "fraud"

    async with httpx.AsyncClient(timeout=30, headers={"Accept-Encoding": "identity"}) as client:
        identity = await client.post(url, json=v2(5), headers={"X-Request-Id": "httpx-identity"})
    assert identity.status_code == 200 and "Content-Encoding" not in identity.headers

    def use_tritonclient() -> list[float]:
        client = triton_http.InferenceServerClient(url=router.url.removeprefix("http://"))
        try:
            values = []
            for algorithm in ("gzip", None):
                tensor = triton_http.InferInput("x", [1, 2], "FP64")
                tensor.set_data_from_numpy(numpy.array([[3, 4]], dtype=numpy.float64), binary_data=False)
                answer = client.infer(
                    "fraud",
                    [tensor],
                    outputs=[triton_http.InferRequestedOutput("score", binary_data=False)],
                    request_id=f"tritonclient-{algorithm}",
                    request_compression_algorithm=algorithm,
                    response_compression_algorithm=algorithm,
                )
                values.append(float(answer.as_numpy("score").ravel()[0]))
            return values
        finally:
            client.close()

    assert await asyncio.to_thread(use_tritonclient) == [7.0, 7.0]
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 5)}
    for request_id, value in (
        ("requests-gzip", 6.0),
        ("requests-plain", 4.0),
        ("httpx-identity", 5.0),
        ("tritonclient-gzip", 7.0),
        ("tritonclient-None", 7.0),
    ):
        row = recorded[request_id]
        assert (row["production_prediction"], row["candidate_prediction"]) == (value, value + 100), request_id
        assert (row["production_confidence"], row["production_error"], row["candidate_error"]) == (0.75, None, None)


async def test_grpc_with_tritonclient(
    mlservers: Pair, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(real_config(mlservers, deployment, mode="shadow", weight=100))

    def use_grpc() -> list[tuple[float, str]]:
        client = triton_grpc.InferenceServerClient(url=router.grpc_address)
        try:
            assert client.is_server_live() and client.is_model_ready("fraud")
            assert client.get_model_metadata("fraud").name == "fraud"
            answers = []
            for index, compression in enumerate([None, "gzip"]):
                tensor = triton_grpc.InferInput("x", [1, 2], "FP64")
                tensor.set_data_from_numpy(numpy.array([[index, 1]], dtype=numpy.float64))
                answer = client.infer(
                    "fraud", [tensor], request_id=f"grpc-{index}", compression_algorithm=compression
                ).get_response()
                answers.append((_first(answer, "score"), answer.id))
            return answers
        finally:
            client.close()

    assert await asyncio.to_thread(use_grpc) == [(1.0, "grpc-0"), (2.0, "grpc-1")]
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 2)}
    for index in range(2):
        row = recorded[f"grpc-{index}"]
        assert (row["production_prediction"], row["candidate_prediction"]) == (index + 1, index + 101)
        assert (row["production_status"], row["candidate_status"]) == (200, 200)


def _first(answer: Any, name: str) -> float:
    """An output's first element, from raw_output_contents or typed contents (servers differ)."""
    for index, output in enumerate(answer.outputs):
        if output.name == name:
            if answer.raw_output_contents:
                return float(numpy.frombuffer(answer.raw_output_contents[index], dtype=numpy.float64)[0])
            return float(output.contents.fp64_contents[0])
    raise AssertionError(f"no output {name}")


async def test_the_repository_api_and_a_canary_split(
    mlservers: Pair, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(real_config(mlservers, deployment, mode="canary", weight=50))
    limit, salt = threshold(50), salt_for("models", deployment)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:
        index = await client.post("/v2/repository/index", json={})
        answers = [
            await client.post(INFER, json=v2(n), headers={"X-Account-Id": f"acct-{n}", "X-Request-Id": f"canary-{n}"})
            for n in range(20)
        ]
    assert index.status_code == 200 and index.headers["X-Shadowgate-Served-By"] == "production"
    assert [model["name"] for model in index.json()] == ["fraud"]
    for n, answer in enumerate(answers):
        expected = "candidate" if to_candidate(f"acct-{n}".encode(), salt, limit) else "production"
        assert answer.headers["X-Shadowgate-Served-By"] == expected
        body = answer.json()
        # The candidate's own answer: its model_name is the candidate server's (router/README.md, "Canary answers").
        assert body["model_name"] == ("fraud-v2" if expected == "candidate" else "fraud")
        assert body["outputs"][0]["data"] == [n + (100 if expected == "candidate" else 0)]
    recorded = await rows(db, deployment, 20)
    assert {row["served_by"] for row in recorded} == {"production", "candidate"}
