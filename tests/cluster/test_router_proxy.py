"""The router as a process between real model servers and the real PostgreSQL: what clients get back and
what lands in the database, for shadow, canary, the three protocols, failures and bad input."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy
import pytest
import tritonclient.http as triton

from shadowgate_operator.migrate import migrate
from shadowgate_router.hashing import salt_for, threshold, to_candidate
from tests.support.load import Result, infer_body, run_load
from tests.support.router import ModelServer, Router, free_port, model_pair, router_config, wait_until

pytestmark = pytest.mark.database


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelServer, ModelServer]]:
    """Production (prediction = sum of the request's numbers) and candidate (the same + 100)."""
    with model_pair(tmp_path_factory.mktemp("models")) as pair:
        yield pair


@pytest.fixture(autouse=True)
def healthy_servers(servers: tuple[ModelServer, ModelServer]) -> Iterator[None]:
    yield
    for server in servers:
        server.reset()


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    await migrate(connection)
    yield connection
    await connection.close()


@pytest.fixture
def deployment() -> str:
    return f"router-{secrets.token_hex(4)}"


StartRouter = Callable[..., Router]


@pytest.fixture
def start_router(tmp_path: Path, dsn: str, request: pytest.FixtureRequest) -> Iterator[StartRouter]:
    started: list[Router] = []

    def start(config: dict[str, Any], *args: str, ready: bool = True) -> Router:
        router = Router.with_file(tmp_path, dsn, config, *args)
        started.append(router)
        return router.start(ready=ready)

    yield start
    for router in started:
        router.stop()
    if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
        for router in started:
            print(f"--- {router.log_path} ---\n{router.log()[-5000:]}")


def config_for(servers: tuple[ModelServer, ModelServer], deployment: str, **changes: Any) -> dict[str, Any]:
    grpc = (servers[0].grpc_address, servers[1].grpc_address)
    return router_config(servers[0].url, servers[1].url, grpc=grpc, deployment=deployment, **changes)


def prediction(result: Result) -> float:
    value: float = json.loads(result.body)["outputs"][0]["data"][0]
    return value


async def rows(db: asyncpg.Connection, deployment: str, expected: int, table: str = "predictions") -> list[Any]:
    """Wait until `expected` rows of the deployment are in `table` (the router writes every 0.2 s)."""
    deadline = time.monotonic() + 15
    while True:
        found = await db.fetch(f"SELECT * FROM {table} WHERE deployment = $1 ORDER BY time", deployment)
        if len(found) >= expected or time.monotonic() > deadline:
            assert len(found) == expected, f"{len(found)} {table} rows for {deployment}, expected {expected}"
            return found
        await asyncio.sleep(0.1)


def account(index: int) -> dict[str, str]:
    return {"X-Account-Id": f"acct-{index:06d}"}


async def test_shadow_answers_from_production_and_records_both_sides(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(config_for(servers, deployment, mode="shadow", weight=50))

    def headers(index: int) -> dict[str, str]:
        return {**account(index), **({"X-Request-Id": f"trade-{index}"} if index % 2 == 0 else {})}

    results = await run_load(f"{router.url}/v2/models/fraud/infer", 400, rate=200, headers=headers)

    assert [result.status for result in results] == [200] * 400
    assert {result.served_by for result in results} == {"production"}
    assert [prediction(result) for result in results] == [index + 1 for index in range(400)]
    assert all(result.request_id == f"trade-{result.index}" for result in results[::2]), "a client's id is kept"
    assert all(len(result.request_id) == 32 for result in results[1::2]), "others get one"

    recorded = {row["request_id"]: row for row in await rows(db, deployment, 400)}
    limit, salt = threshold(50), salt_for("models", deployment)
    mirrored = 0
    for result in results:
        row = recorded[result.request_id]
        assert (row["served_by"], row["mode"], row["weight"], row["fallback"]) == ("production", "shadow", 50, False)
        assert (row["production_version"], row["production_status"], row["production_error"]) == ("1.0", 200, None)
        assert row["production_prediction"] == result.index + 1
        assert row["production_confidence"] == 0.75 and row["production_latency_ms"] > 0
        assert row["sticky_key"] == f"acct-{result.index:06d}", "the key the side was chosen by"
        if to_candidate(f"acct-{result.index:06d}".encode(), salt, limit):
            mirrored += 1
            assert (row["candidate_version"], row["candidate_status"], row["candidate_error"]) == ("2.0", 200, None)
            assert row["candidate_prediction"] == result.index + 101
        else:
            assert row["candidate_version"] is None and row["candidate_status"] is None
    assert 150 < mirrored < 250
    assert servers[1].stats()["requests"] >= mirrored


async def test_canary_split_follows_the_hash_on_every_request(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """3,000 real requests: each goes exactly where the hashing function says; the share is near 20%."""
    router = start_router(config_for(servers, deployment, mode="canary", weight=20))
    results = await run_load(f"{router.url}/v2/models/fraud/infer", 3000, rate=1000, headers=account)
    limit, salt = threshold(20), salt_for("models", deployment)
    for result in results:
        expected = "candidate" if to_candidate(f"acct-{result.index:06d}".encode(), salt, limit) else "production"
        assert (result.status, result.served_by) == (200, expected)
        assert prediction(result) == result.index + 1 + (100 if expected == "candidate" else 0)
    share = 100 * sum(result.served_by == "candidate" for result in results) / len(results)
    assert share == pytest.approx(20, abs=2.5)
    recorded = await rows(db, deployment, 3000)
    assert sum(row["served_by"] == "candidate" for row in recorded) == sum(
        result.served_by == "candidate" for result in results
    )

    router.write_config(config_for(servers, deployment, mode="canary", weight=20, stickyHeader=None))
    wait_until(lambda: router.readiness().json()["revision"] != recorded[0]["config_revision"], 5, "the new config")
    await run_load(f"{router.url}/v2/models/fraud/infer", 10, rate=100, headers=account)
    unkeyed = (await rows(db, deployment, 3010))[3000:]
    assert {row["sticky_key"] for row in unkeyed} == {None}, "no stickyHeader: each request is its own key"


async def test_the_segment_is_recorded_from_a_header_or_the_body(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """spec.analysis.segmentBy: the header's value, or the string or number at a path of the JSON body."""
    router = start_router(config_for(servers, deployment, segmentHeader="X-Instrument"))

    def instrument(index: int) -> dict[str, str]:
        return {"X-Instrument": "EURUSD"} if index == 0 else {}

    await run_load(f"{router.url}/v2/models/fraud/infer", 2, rate=100, headers=instrument)
    assert {row["segment"] for row in await rows(db, deployment, 2)} == {"EURUSD", None}, "absent: NULL"

    revision = router.readiness().json()["revision"]
    router.write_config(config_for(servers, deployment, segmentPath="inputs[0].data[0]"))
    wait_until(lambda: router.readiness().json()["revision"] != revision, 5, "the new config")
    await run_load(f"{router.url}/v2/models/fraud/infer", 1, rate=100, body=lambda index: infer_body(7))
    assert (await rows(db, deployment, 3))[2]["segment"] == "7"


async def test_canary_falls_back_to_production_when_the_candidate_fails(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    servers[1].control(errorRate=1.0)
    config = config_for(servers, deployment, mode="canary", weight=100, fallbackToProduction=True)
    router = start_router(config)
    results = await run_load(f"{router.url}/v2/models/fraud/infer", 50, rate=100)
    assert {(result.status, result.served_by) for result in results} == {(200, "production")}
    assert [prediction(result) for result in results] == [index + 1 for index in range(50)]
    recorded = await rows(db, deployment, 50)
    assert {(row["served_by"], row["fallback"], row["candidate_status"]) for row in recorded} == {
        ("production", True, 500)
    }
    assert router.metric("shadowgate_router_fallbacks_total") == 50

    old = router.readiness().json()["revision"]
    router.write_config({**config, "fallbackToProduction": False})
    wait_until(lambda: router.readiness().json()["revision"] != old, 5, "the new configuration")
    results = await run_load(f"{router.url}/v2/models/fraud/infer", 20, rate=100)
    assert {(result.status, result.served_by) for result in results} == {(500, "candidate")}
    assert json.loads(results[0].body) == {"error": "injected failure"}, "the candidate's own answer, untouched"


async def test_a_model_server_down_or_slow_gets_502_or_504_with_a_reason(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    router = start_router(router_config(dead, servers[1].url, deployment=deployment, weight=0))
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"{router.url}/v2/models/fraud/infer", json={"inputs": []})
    assert answer.status_code == 502
    assert "the production model server failed: cannot connect to" in answer.json()["error"]
    assert answer.json()["requestId"] == answer.headers["X-Request-Id"]

    servers[0].control(latencyMs=3000)
    old = router.readiness().json()["revision"]
    router.write_config(config_for(servers, deployment, weight=0, timeoutSeconds=0.3))
    wait_until(lambda: router.readiness().json()["revision"] != old, 5, "the new configuration")
    async with httpx.AsyncClient(timeout=10) as client:
        started = time.monotonic()
        answer = await client.post(f"{router.url}/v2/models/fraud/infer", json={"inputs": []})
        elapsed = time.monotonic() - started
    assert answer.status_code == 504
    assert "no answer from" in answer.json()["error"] and "within 0.3s" in answer.json()["error"]
    assert elapsed < 1.5
    recorded = await rows(db, deployment, 2)
    assert [(row["production_status"], row["production_error"]) for row in recorded] == [
        (None, "connect"),
        (None, "timeout"),
    ]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "says"),
    [
        ("POST", "/v2/models/fraud/infer", {"Content-Type": "application/json"}, b"{nope", 400, "malformed JSON"),
        ("POST", "/v2/models/fraud/infer", {"Content-Type": "application/json"}, b"", 400, "body is empty"),
        ("POST", "/v2/models/fraud/infer", {"Content-Type": "text/plain"}, b"{}", 415, "Content-Type"),
        ("POST", "/v2/models/fraud/infer", {}, b"[" + b"1," * 600_000 + b"1]", 413, "the limit is 1048576"),
        ("POST", "/v2/models/other/infer", {}, b"{}", 404, "model 'other' is not served here; call it 'fraud'"),
        ("POST", "/predict", {}, b"{}", 404, "POST /v2/models/{name}[/versions/{version}]/infer"),
        ("GET", "/v2/models/fraud/infer", {}, b"", 405, "use POST"),
        ("PUT", "/v2/health/live", {}, b"", 405, "use GET"),
        ("POST", "/v2/models/fraud/infer", {"X-Request-Id": "has space"}, b"{}", 400, "X-Request-Id must be"),
        ("POST", "/v2/models/fraud/infer", {"Content-Encoding": "br"}, b"{}", 415, "'br' is not supported"),
        ("POST", "/v2/models/fraud/infer", {"Content-Encoding": "gzip"}, b"{}", 400, "gzip body is corrupt"),
        ("POST", "/v2/models/fraud/infer", {}, b'{"id": "a b", "inputs": []}', 400, "the body's id is used"),
    ],
)
async def test_bad_input_gets_a_4xx_saying_why(
    servers: tuple[ModelServer, ModelServer],
    start_router: StartRouter,
    deployment: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    says: str,
) -> None:
    router = start_router(config_for(servers, deployment), "--body-limit", str(1024 * 1024))
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.request(method, router.url + path, headers=headers, content=body)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert says in answer.json()["error"]
    assert answer.headers["X-Request-Id"]
    if status == 405:
        assert answer.headers["Allow"] == says.removeprefix("use ")
    assert router.metric("shadowgate_router_refusals_total", protocol="http", status=str(status)) == 1
    assert router.metric("shadowgate_router_requests_total") == 0, "no model server was called"


async def test_outcomes_need_the_token_and_land_even_before_their_prediction(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(config_for(servers, deployment))
    url = f"{router.url}/outcomes"
    outcome = {"request_id": "trade-1", "outcome": 1.0}
    async with httpx.AsyncClient(timeout=10) as client:
        missing = await client.post(url, json=outcome)
        wrong = await client.post(url, json=outcome, headers={"Authorization": "Bearer not-it"})
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert "Authorization: Bearer" in missing.json()["error"] and missing.headers["WWW-Authenticate"]
        auth = {"Authorization": f"Bearer {router.token}"}
        # The outcome first, then the prediction it belongs to.
        accepted = await client.post(url, json=outcome, headers=auth)
        batch = [{"request_id": f"trade-{n}", "outcome": n % 2, "time": "2026-01-02T03:04:05.5Z"} for n in (2, 3)]
        accepted_batch = await client.post(url, json={"outcomes": batch}, headers=auth)
        bad = await client.post(url, json={"request_id": "x", "outcome": "high"}, headers=auth)
        predicted = await client.post(
            f"{router.url}/v2/models/fraud/infer", json={"inputs": []}, headers={"X-Request-Id": "trade-1"}
        )
    assert (accepted.status_code, accepted.json()) == (202, {"accepted": 1})
    assert (accepted_batch.status_code, accepted_batch.json()) == (202, {"accepted": 2})
    assert bad.status_code == 400 and "outcome: Input should be a valid number" in bad.json()["error"]
    assert predicted.headers["X-Request-Id"] == "trade-1"
    recorded = await rows(db, deployment, 3, table="outcomes")
    assert {row["request_id"]: row["outcome"] for row in recorded} == {"trade-1": 1.0, "trade-2": 0.0, "trade-3": 1.0}
    assert {row["time"].isoformat() for row in recorded if row["request_id"] != "trade-1"} == {
        "2026-01-02T03:04:05.500000+00:00"
    }
    await rows(db, deployment, 1)
    joined = await db.fetchval(
        "SELECT count(*) FROM predictions p JOIN outcomes o USING (namespace, deployment, request_id) "
        "WHERE p.deployment = $1",
        deployment,
    )
    assert joined == 1, "the early outcome meets its prediction"
    assert router.metric("shadowgate_router_outcome_refusals_total", status="401") == 2


@pytest.mark.parametrize(
    ("protocol", "path", "paths", "body"),
    [
        ("v1", "/v1/models/fraud:predict", {"predictionPath": "predictions[0]"}, {"instances": [[2, 3]]}),
        (
            "json",
            "/api/score",
            {"predictionPath": "result.score", "confidencePath": "result.probabilities[1]"},
            {"features": {"a": 2, "b": 3}},
        ),
    ],
)
async def test_v1_and_plain_json_are_forwarded_untouched_and_read(
    servers: tuple[ModelServer, ModelServer],
    start_router: StartRouter,
    db: asyncpg.Connection,
    deployment: str,
    protocol: str,
    path: str,
    paths: dict[str, str],
    body: dict[str, Any],
) -> None:
    config = config_for(servers, deployment, protocol=protocol, **{"confidencePath": None, **paths})
    router = start_router(config, "--record-features")
    raw = json.dumps(body, indent=3).encode()  # odd spacing: proves the bytes are not re-encoded
    async with httpx.AsyncClient(timeout=10) as client:
        via_router = await client.post(router.url + path, content=raw, headers={"Content-Type": "application/json"})
        direct = await client.post(servers[0].url + path, content=raw, headers={"Content-Type": "application/json"})
    assert via_router.status_code == 200
    assert via_router.content == direct.content
    [row] = await rows(db, deployment, 1)
    assert (row["production_prediction"], row["candidate_prediction"]) == (5.0, 105.0)
    expected_confidence = 0.75 if protocol == "json" else None
    assert row["production_confidence"] == expected_confidence
    assert json.loads(row["features"]) == body, "--record-features keeps the request"


async def test_readiness_and_metadata_pass_through(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, deployment: str
) -> None:
    router = start_router(config_for(servers, deployment))
    async with httpx.AsyncClient(timeout=10) as client:
        ready = await client.get(f"{router.url}/v2/models/fraud/ready")
        metadata = await client.get(f"{router.url}/v2/models/fraud")
        health = await client.get(f"{router.url}/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"name": "fraud", "ready": True})
    assert metadata.json()["platform"] == "shadowgate-test"
    assert health.status_code == 200 and health.headers["X-Shadowgate-Served-By"] == "production"


async def test_not_ready_without_a_configuration_and_a_bad_one_keeps_the_last_good(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, deployment: str
) -> None:
    good = config_for(servers, deployment, weight=10)
    router = start_router({**good, "weight": 101}, ready=False)
    assert router.readiness().status_code == 503
    assert router.readiness().json()["error"] == "no valid configuration yet"
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.post(f"{router.url}/v2/models/fraud/infer", json={})
    assert refused.status_code == 503
    router.write_config(good)
    router.wait_ready(5)
    revision = router.readiness().json()["revision"]
    router.write_config({**good, "mode": "blue"})
    wait_until(lambda: router.metric("shadowgate_router_config_refused_total") == 2, 5, "the refusal")
    assert router.readiness().json()["revision"] == revision
    assert router.metric("shadowgate_router_config_info", revision=revision) == 1
    assert "config.json: mode: Input should be 'shadow' or 'canary'" in router.log()


async def test_metrics_count_traffic_by_side_and_status(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    servers[1].control(errorRate=1.0)
    router = start_router(config_for(servers, deployment, weight=100))
    await run_load(f"{router.url}/v2/models/fraud/infer", 30, rate=100)
    await rows(db, deployment, 30)
    wait_until(lambda: router.metric("shadowgate_router_rows_written_total", table="predictions") == 30, 5, "rows")
    assert router.metric("shadowgate_router_requests_total", side="production", role="answer", status="200") == 30
    assert router.metric("shadowgate_router_requests_total", side="candidate", role="mirror", status="500") == 30
    assert router.metric("shadowgate_router_responses_total", status="200") == 30
    assert router.metric("shadowgate_router_upstream_latency_seconds_count", side="candidate") == 30
    assert router.metric("shadowgate_router_config_weight_percent") == 100
    assert router.metric("shadowgate_router_record_queue_rows", table="predictions") == 0
    assert router.metric("shadowgate_router_database_errors_total") == 0
    assert router.metric("shadowgate_router_mirror_dropped_total") == 0


async def test_sigterm_finishes_shadow_copies_and_flushes_before_exiting(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    servers[1].control(latencyMs=500)
    router = start_router(config_for(servers, deployment, weight=100, mirrorTimeoutSeconds=5))
    results = await run_load(f"{router.url}/v2/models/fraud/infer", 100, rate=500)
    assert {result.status for result in results} == {200}
    assert router.process is not None
    router.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(router.process.wait, 20) == 0
    recorded = await rows(db, deployment, 100)
    assert all(row["candidate_status"] == 200 for row in recorded), "every mirror finished and was recorded"
    assert "shutting down" in router.log()


async def test_shadow_copies_beyond_the_concurrency_limit_are_dropped_and_counted(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    servers[1].control(latencyMs=300)
    router = start_router(config_for(servers, deployment, weight=100), "--mirror-concurrency", "2")
    results = await run_load(f"{router.url}/v2/models/fraud/infer", 40, rate=200)
    assert {(result.status, result.served_by) for result in results} == {(200, "production")}
    recorded = await rows(db, deployment, 40)
    mirrored = sum(row["candidate_status"] == 200 for row in recorded)
    dropped = router.metric("shadowgate_router_mirror_dropped_total")
    assert 2 <= mirrored < 40 and mirrored + dropped == 40
    assert all(row["candidate_version"] is None for row in recorded if row["candidate_status"] is None)


async def test_a_triton_client_with_binary_tensors_and_a_model_version(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """NVIDIA's tritonclient, as users call Triton: inputs and outputs as binary tensor data (its default)
    and production's model version in the path. The bytes pass untouched both ways; the recorded
    predictions are decoded from the binary answers; the candidate is called without the version."""
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100))

    def use_triton() -> list[float]:
        # One thread from start to end: the client runs on gevent, whose hub belongs to one thread.
        client = triton.InferenceServerClient(url=router.url.removeprefix("http://"))
        try:
            assert client.is_server_live()
            assert client.is_model_ready("fraud", "1")
            assert client.get_model_metadata("fraud", "1")["name"] == "fraud"
            answers = []
            for index in range(5):
                tensor = triton.InferInput("x", [1, 3], "FP32")
                tensor.set_data_from_numpy(numpy.array([[index, 1.5, 2.5]], dtype=numpy.float32))  # binary
                wanted = [triton.InferRequestedOutput("score")]  # binary by default
                answer = client.infer(
                    "fraud", [tensor], model_version="1", outputs=wanted, headers={"X-Request-Id": f"triton-{index}"}
                )
                assert answer.get_output("score")["parameters"]["binary_data_size"] == 4
                answers.append(float(answer.as_numpy("score")[0]))
            return answers
        finally:
            client.close()

    answers = await asyncio.to_thread(use_triton)
    assert answers == [index + 4.0 for index in range(5)]
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 5)}
    for index in range(5):
        row = recorded[f"triton-{index}"]
        assert row["production_prediction"] == index + 4.0 and row["production_status"] == 200
        assert row["candidate_prediction"] == index + 104.0 and row["candidate_status"] == 200
        assert row["production_confidence"] == 0.75  # a JSON output beside the binary one


async def test_a_wrong_binary_header_length_gets_a_400_saying_why(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, deployment: str
) -> None:
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100))
    body = b'{"inputs": []}'
    octet_stream = {"Content-Type": "application/octet-stream"}
    async with httpx.AsyncClient() as http:
        answer = await http.post(
            f"{router.url}/v2/models/fraud/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(len(body) + 10), **octet_stream},
        )
        octets = await http.post(f"{router.url}/v2/models/fraud/infer", content=body, headers=octet_stream)
    assert answer.status_code == 400 and "does not fit a body of 14 bytes" in answer.text
    assert octets.status_code == 415 and "Inference-Header-Content-Length" in octets.text
