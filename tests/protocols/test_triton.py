"""The router in front of two real Triton Inference Servers (nvidia-pytriton's build): tritonclient over HTTP
(binary tensors, gzip and deflate both ways) and gRPC (raw contents, gzip), requests with Triton's
always-compressed answers, model config over both protocols passed through to production."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import httpx
import numpy
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from tests.cluster.test_router_proxy import StartRouter, rows
from tests.protocols.conftest import real_config
from tests.support.model_servers import ServerProcess, server_pair

pytestmark = [pytest.mark.protocols, pytest.mark.database]

Pair = tuple[ServerProcess, ServerProcess]


@pytest.fixture(scope="module")
def tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with server_pair("triton", tmp_path_factory.mktemp("triton"), candidate_model="fraud_v2") as pair:
        yield pair


async def test_tritonclient_http_binary_and_compressed(
    tritons: Pair, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(real_config(tritons, deployment, mode="shadow", weight=100))

    def use_triton() -> list[float]:
        client = triton_http.InferenceServerClient(url=router.url.removeprefix("http://"))
        try:
            assert client.is_server_live() and client.is_model_ready("fraud")
            assert client.get_model_config("fraud")["max_batch_size"] == 64
            values = []
            for algorithm in ("gzip", "deflate", None):
                tensor = triton_http.InferInput("x", [1, 3], "FP64")
                tensor.set_data_from_numpy(numpy.array([[1, 2, 3]], dtype=numpy.float64))  # binary
                answer = client.infer(
                    "fraud",
                    [tensor],
                    outputs=[triton_http.InferRequestedOutput("score"), triton_http.InferRequestedOutput("confidence")],
                    request_id=f"triton-http-{algorithm}",
                    request_compression_algorithm=algorithm,
                    response_compression_algorithm=algorithm,
                )
                assert answer.get_response()["id"] == f"triton-http-{algorithm}"
                values.append(float(answer.as_numpy("score").ravel()[0]))
            return values
        finally:
            client.close()

    assert await asyncio.to_thread(use_triton) == [6.0, 6.0, 6.0]

    def use_requests() -> requests.Response:
        body = {"id": "triton-requests", "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [9]}]}
        return requests.post(f"{router.url}/v2/models/fraud/infer", json=body, timeout=30)

    answer = await asyncio.to_thread(use_requests)
    assert answer.status_code == 200 and answer.headers["Content-Encoding"] == "gzip", "Triton compresses for requests"
    assert answer.json()["outputs"][0]["data"] == [9.0]

    recorded = {row["request_id"]: row for row in await rows(db, deployment, 4)}
    for request_id, value in (
        ("triton-http-gzip", 6.0),
        ("triton-http-deflate", 6.0),
        ("triton-http-None", 6.0),
        ("triton-requests", 9.0),
    ):
        row = recorded[request_id]
        assert (row["production_prediction"], row["candidate_prediction"]) == (value, value + 100), request_id
        assert (row["production_confidence"], row["production_error"], row["candidate_error"]) == (0.75, None, None)


async def test_tritonclient_grpc_and_the_config_passed_through(
    tritons: Pair, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(real_config(tritons, deployment, mode="canary", weight=100, fallbackToProduction=True))

    def use_grpc() -> list[float]:
        client = triton_grpc.InferenceServerClient(url=router.grpc_address)
        try:
            assert client.is_server_ready() and client.is_model_ready("fraud")
            config = client.get_model_config("fraud").config  # from the promoted candidate, by its own name
            assert (config.name, config.max_batch_size) == ("fraud_v2", 64)
            values = []
            for index, compression in enumerate([None, "gzip"]):
                tensor = triton_grpc.InferInput("x", [1, 2], "FP64")
                tensor.set_data_from_numpy(numpy.array([[index, 1]], dtype=numpy.float64))
                answer = client.infer(
                    "fraud", [tensor], request_id=f"triton-grpc-{index}", compression_algorithm=compression
                )
                assert answer.get_response().model_name == "fraud_v2", "the candidate's own answer"
                values.append(float(answer.as_numpy("score").ravel()[0]))  # raw_output_contents
            return values
        finally:
            client.close()

    assert await asyncio.to_thread(use_grpc) == [101.0, 102.0]
    async with httpx.AsyncClient(timeout=30) as client:
        config = await client.get(f"{router.url}/v2/models/fraud/config")
    assert config.status_code == 200 and config.json()["name"] == "fraud_v2"
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 2)}
    for index in range(2):
        row = recorded[f"triton-grpc-{index}"]
        assert (row["served_by"], row["candidate_prediction"], row["candidate_status"]) == (
            "candidate",
            index + 101.0,
            200,
        )
