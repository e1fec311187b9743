"""What real HTTP clients do beyond plain JSON, through the router process to real model server processes:
request ids in the body, gzip/deflate both ways (httpx, requests, tritonclient), a zip bomb, and the
rest of the v2 surface passed on to production. (The same against MLServer, KServe and Triton themselves:
tests/protocols/, `make test-protocols`.)"""

# The router fixtures of test_router_proxy.py, imported: pytest finds them here, ruff sees redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import time
import zlib
from typing import Any

import asyncpg
import httpx
import numpy
import pytest
import requests
import tritonclient.http as triton

from tests.cluster.test_router_proxy import (  # noqa: F401 - fixtures
    StartRouter,
    config_for,
    db,
    deployment,
    healthy_servers,
    rows,
    servers,
    start_router,
)
from tests.support.load import run_load
from tests.support.router import ModelServer

pytestmark = pytest.mark.database

INFER = "/v2/models/fraud/infer"


def v2_body(*numbers: float, **extra: Any) -> dict[str, Any]:
    """The test model servers predict the sum of every number in the body: sum(numbers) + len(numbers)."""
    return {**extra, "inputs": [{"name": "x", "shape": [len(numbers)], "datatype": "FP64", "data": list(numbers)}]}


@pytest.mark.parametrize("protocol", ["v2", "v1"])
async def test_the_request_id_is_the_header_s_then_the_body_s_then_a_new_one(
    servers: tuple[ModelServer, ModelServer],
    start_router: StartRouter,
    db: asyncpg.Connection,
    deployment: str,
    protocol: str,
) -> None:
    if protocol == "v2":
        path, extra = INFER, {}
        body = v2_body
    else:
        path, extra = "/v1/models/fraud:predict", {"predictionPath": "predictions[0]", "confidencePath": None}

        def body(*numbers: float, **more: Any) -> dict[str, Any]:
            return {**more, "instances": [list(numbers)]}

    router = start_router(config_for(servers, deployment, protocol=protocol, mode="shadow", weight=100, **extra))
    auth = {"Authorization": f"Bearer {router.token}"}
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as client:
        both = await client.post(path, json=body(1, id=f"{protocol}-body-1"), headers={"X-Request-Id": "header-1"})
        body_only = await client.post(path, json=body(2, id=f"{protocol}-body-2"))
        neither = await client.post(path, json=body(3))
        outcome = await client.post("/outcomes", json={"request_id": f"{protocol}-body-2", "outcome": 1}, headers=auth)
    assert (both.status_code, body_only.status_code, neither.status_code, outcome.status_code) == (200, 200, 200, 202)
    assert both.headers["X-Request-Id"] == "header-1", "the header comes first"
    assert body_only.headers["X-Request-Id"] == f"{protocol}-body-2", "then the body's id"
    generated = neither.headers["X-Request-Id"]
    assert len(generated) == 32, "else a new one"

    recorded = {row["request_id"]: row for row in await rows(db, deployment, 3)}
    assert set(recorded) == {"header-1", f"{protocol}-body-2", generated}
    assert recorded[f"{protocol}-body-2"]["production_prediction"] == (3.0 if protocol == "v2" else 2.0)
    for server in servers:  # both model servers were told the id the row has
        assert {"header-1", f"{protocol}-body-2", generated} <= set(server.stats()["requestIds"])
    await rows(db, deployment, 1, table="outcomes")
    joined = await db.fetchval(
        "SELECT count(*) FROM predictions JOIN outcomes USING (namespace, deployment, request_id) "
        "WHERE deployment = $1",
        deployment,
    )
    assert joined == 1, "an outcome posted under the body's id meets its prediction"


def gzip_json(document: Any) -> bytes:
    return gzip.compress(json.dumps(document).encode())


async def test_compressed_requests_and_answers_are_recorded_and_passed_on_untouched(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """httpx and requests ask for gzip answers by default; the model servers compress them (as Triton does);
    the clients compress requests with gzip or deflate. Predictions of both sides are read and recorded,
    and the client gets the model server's bytes and Content-Encoding."""
    for server in servers:
        server.control(compress=True)
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100))
    url = router.url + INFER
    json_type = {"Content-Type": "application/json"}

    async with httpx.AsyncClient(timeout=10) as client:
        plain = await client.post(url, json=v2_body(1), headers={"X-Request-Id": "httpx-plain"})
        gzipped = await client.post(
            url,
            content=gzip_json(v2_body(2)),
            headers={"Content-Encoding": "gzip", "X-Request-Id": "httpx-gzip", **json_type},
        )
        deflated = await client.post(
            url,
            content=zlib.compress(json.dumps(v2_body(3)).encode()),
            headers={"Content-Encoding": "deflate", "X-Request-Id": "httpx-deflate", **json_type},
        )
        # The raw bytes as they came over the wire: the model server's own gzip stream.
        async with client.stream("POST", url, json=v2_body(4), headers={"X-Request-Id": "httpx-raw"}) as raw:
            wire = b"".join([chunk async for chunk in raw.aiter_raw()])
    for answer, expected in ((plain, 2.0), (gzipped, 3.0), (deflated, 4.0)):
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Encoding"] == "gzip", "httpx accepts gzip; the answer stays compressed"
        assert answer.json()["outputs"][0]["data"] == [expected]
    assert raw.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(wire))["outputs"][0]["data"] == [5.0]

    def use_requests() -> requests.Response:
        return requests.post(
            url,
            data=gzip_json(v2_body(5)),
            headers={"Content-Encoding": "gzip", "X-Request-Id": "requests-gzip", **json_type},
            timeout=10,
        )

    answer = await asyncio.to_thread(use_requests)
    assert answer.status_code == 200 and answer.headers["Content-Encoding"] == "gzip"
    assert answer.json()["outputs"][0]["data"] == [6.0]

    recorded = {row["request_id"]: row for row in await rows(db, deployment, 5)}
    for request_id, expected in (
        ("httpx-plain", 2.0),
        ("httpx-gzip", 3.0),
        ("httpx-deflate", 4.0),
        ("httpx-raw", 5.0),
        ("requests-gzip", 6.0),
    ):
        row = recorded[request_id]
        assert (row["production_prediction"], row["candidate_prediction"]) == (expected, expected + 100), request_id
        assert row["production_error"] is None and row["candidate_error"] is None


async def test_a_triton_client_compressing_both_ways(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """tritonclient's request_compression_algorithm / response_compression_algorithm, with the binary
    tensor data extension and the request id only in the body (tritonclient's `request_id=`)."""
    for server in servers:
        server.control(compress=True)
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100))

    def use_triton() -> list[tuple[float, str]]:
        client = triton.InferenceServerClient(url=router.url.removeprefix("http://"))
        try:
            answers = []
            for index, algorithm in enumerate(["gzip", "deflate", None]):
                tensor = triton.InferInput("x", [1, 2], "FP32")
                tensor.set_data_from_numpy(numpy.array([[index, 0.5]], dtype=numpy.float32))
                answer = client.infer(
                    "fraud",
                    [tensor],
                    outputs=[triton.InferRequestedOutput("score")],
                    request_id=f"triton-{algorithm}",
                    request_compression_algorithm=algorithm,
                    response_compression_algorithm=algorithm,
                )
                answers.append((float(answer.as_numpy("score")[0]), answer.get_response()["id"]))
            return answers
        finally:
            client.close()

    answers = await asyncio.to_thread(use_triton)
    assert answers == [(0.5, "triton-gzip"), (1.5, "triton-deflate"), (2.5, "triton-None")]
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 3)}
    for index, algorithm in enumerate(["gzip", "deflate", None]):
        row = recorded[f"triton-{algorithm}"]
        assert (row["production_prediction"], row["candidate_prediction"]) == (index + 0.5, index + 100.5)


def gzip_bomb(mebibytes: int) -> bytes:
    """A gzip member of `mebibytes` MiB of zeros, built from one compressed MiB repeated (each copy ends with a
    full flush, so it refers to nothing before it): seconds cheaper than compressing a GiB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    trailer = struct.pack("<II", crc, (mebibytes << 20) & 0xFFFFFFFF)
    final_empty_block = b"\x03\x00"
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + block * mebibytes + final_empty_block + trailer


async def test_a_zip_bomb_gets_413_and_nobody_else_waits(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, deployment: str
) -> None:
    """A bomb (1 MB of gzip that inflates to 1 GiB) is inflated up to the decoded limit and refused with 413.
    The limit is set high here (256 MiB) so that inflating takes long enough to watch: it happens in a
    worker thread, and requests that arrive meanwhile are answered at once, not after the bomb."""
    bomb = gzip_bomb(1024)
    assert len(bomb) < 1_100_000 and gzip.decompress(gzip_bomb(3)) == bytes(3 << 20)
    limit = 256 << 20
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100), "--decoded-limit", str(limit))
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}

    async def send_bomb() -> tuple[httpx.Response, float, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.sleep(0.5)  # let the steady load get going first
            sent = time.perf_counter()
            answer = await client.post(router.url + INFER, content=bomb, headers=headers)
            return answer, sent, time.perf_counter()

    before = servers[0].stats()["requests"]
    started = time.perf_counter()
    load, (refused, sent, answered) = await asyncio.gather(run_load(router.url + INFER, 1000, rate=100), send_bomb())
    assert refused.status_code == 413
    assert f"decodes to over the limit of {limit} bytes" in refused.json()["error"]
    assert {result.status for result in load} == {200}
    assert servers[0].stats()["requests"] - before == 1000, "the bomb never reached production"
    assert router.metric("shadowgate_router_refusals_total", protocol="http", status="413") == 1

    busy = answered - sent
    assert busy > 0.2, f"inflating 256 MiB took only {busy:.3f}s: too quick to tell anything"
    during = [
        result
        for result in load
        if sent + busy / 4 <= started + result.scheduled <= answered - busy / 4  # the middle half of the bomb
    ]
    done_before = [result for result in during if started + result.scheduled + result.latency < answered]
    assert len(done_before) >= 0.9 * len(during), (
        f"only {len(done_before)} of the {len(during)} requests that came while the bomb was inflated "
        f"({busy:.2f}s) were answered before it: they waited for it"
    )


async def test_the_rest_of_the_v2_surface_goes_to_production_only(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """Model config, the repository index (a POST with a body): production answers, the candidate is not
    called, nothing is recorded; the model's name in the path is production's."""
    others = [server.stats()["other"] for server in servers]
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100))
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as client:
        model_config = await client.get("/v2/models/fraud-v1-alias/config")  # not a name the router serves
        by_deployment_name = await client.get(f"/v2/models/{deployment}/config")
        index = await client.post("/v2/repository/index", json={"ready": True})
        inferred = await client.post(INFER, json=v2_body(1), headers={"X-Request-Id": "the-only-row"})
    assert model_config.status_code == 404
    assert by_deployment_name.status_code == 200, by_deployment_name.text
    assert by_deployment_name.json()["max_batch_size"] == 8
    assert by_deployment_name.headers["X-Shadowgate-Served-By"] == "production"
    assert index.status_code == 200 and index.json()[0]["asked_ready_only"] is True, "the body went along"
    assert inferred.status_code == 200
    assert [server.stats()["other"] - count for server, count in zip(servers, others, strict=True)] == [2, 0]
    assert [row["request_id"] for row in await rows(db, deployment, 1)] == ["the-only-row"]
