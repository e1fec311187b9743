"""gRPC through the router process to real gRPC model servers (grpcio, the support model server's gRPC side):
ModelInfer split, mirrored, recorded and failed over like HTTP; ids; every other RPC passed on; refusals.
Against Triton, MLServer and KServe themselves: tests/protocols/ (`make test-protocols`)."""

from __future__ import annotations

import asyncio
import signal
import struct
import time
from typing import Any

import asyncpg
import grpc
import numpy
import pytest
import tritonclient.grpc as triton

from shadowgate_router.hashing import salt_for, threshold, to_candidate
from shadowgate_router.oip import inference_pb2
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
from tests.support.router import ModelServer, free_port, wait_until

# The router fixtures of test_router_proxy.py, imported: pytest finds them here, ruff sees redefinitions.
# ruff: noqa: F811

pytestmark = pytest.mark.database

SERVICE = "/inference.GRPCInferenceService/"


def infer_request(value: float, *, model: str = "fraud", request_id: str = "", raw: bool = False) -> bytes:
    """A ModelInferRequest with one FP64 input (typed contents, or raw_input_contents as tritonclient sends)."""
    request = inference_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensor = request.inputs.add(name="x", datatype="FP64", shape=[1])
    if raw:
        request.raw_input_contents.append(struct.pack("<d", value))
    else:
        tensor.contents.fp64_contents.append(value)
    return request.SerializeToString()


async def call(
    address: str, method: str, data: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> tuple[grpc.StatusCode, bytes | None, dict[str, Any], str]:
    """One unary call: (code, answer bytes, initial metadata, details)."""
    async with grpc.aio.insecure_channel(address) as channel:
        rpc = channel.unary_unary(SERVICE + method)(data, metadata=metadata, timeout=10)
        try:
            answer = await rpc
        except grpc.aio.AioRpcError as exc:
            initial = dict(exc.initial_metadata() or ())
            return exc.code(), None, {**initial, **dict(exc.trailing_metadata() or ())}, exc.details() or ""
        return grpc.StatusCode.OK, answer, dict(await rpc.initial_metadata() or ()), ""


def score(answer: bytes) -> float:
    response = inference_pb2.ModelInferResponse.FromString(answer)
    if response.raw_output_contents:
        return float(struct.unpack("<d", response.raw_output_contents[0])[0])
    return float(response.outputs[0].contents.fp64_contents[0])


async def test_a_triton_grpc_client_in_shadow_mode(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """tritonclient.grpc as users call Triton: raw input contents, the id in the request (request_id=) or in
    metadata (headers=), gzip message compression; both sides' predictions recorded from raw outputs."""
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100))

    def use_triton() -> list[tuple[float, str]]:
        client = triton.InferenceServerClient(url=router.grpc_address)
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("fraud")
            assert client.get_model_metadata("fraud").platform == "shadowgate-test"
            answers = []
            for index in range(4):
                tensor = triton.InferInput("x", [1, 2], "FP64")
                tensor.set_data_from_numpy(numpy.array([[index, 0.5]], dtype=numpy.float64))
                answer = client.infer(
                    "fraud",
                    [tensor],
                    request_id=f"grpc-body-{index}",
                    headers={"x-request-id": "grpc-header-3"} if index == 3 else None,
                    compression_algorithm="gzip" if index % 2 else None,
                )
                answers.append((float(answer.as_numpy("score")[0]), answer.get_response().id))
            return answers
        finally:
            client.close()

    answers = await asyncio.to_thread(use_triton)
    assert answers == [(index + 0.5, f"grpc-body-{index}") for index in range(4)]
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 4)}
    assert set(recorded) == {"grpc-body-0", "grpc-body-1", "grpc-body-2", "grpc-header-3"}, "metadata id first"
    for index, request_id in enumerate(["grpc-body-0", "grpc-body-1", "grpc-body-2", "grpc-header-3"]):
        row = recorded[request_id]
        assert (row["served_by"], row["production_status"], row["candidate_status"]) == ("production", 200, 200)
        assert (row["production_prediction"], row["candidate_prediction"]) == (index + 0.5, index + 100.5)
        assert row["production_confidence"] == 0.75
    assert "grpc-header-3" in servers[1].stats()["requestIds"], "the candidate got the id as metadata"


async def test_canary_split_follows_the_sticky_key_like_http(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(config_for(servers, deployment, mode="canary", weight=30))
    limit, salt = threshold(30), salt_for("models", deployment)
    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        infer = channel.unary_unary(SERVICE + "ModelInfer")

        async def one(index: int) -> tuple[int, float, str, str]:
            metadata = (("x-account-id", f"acct-{index:06d}"),)
            rpc = infer(infer_request(index), metadata=metadata, timeout=10)
            answer = await rpc
            initial = dict(await rpc.initial_metadata())
            return index, score(answer), initial["x-shadowgate-served-by"], initial["x-request-id"]

        results = await asyncio.gather(*(one(index) for index in range(300)))
    for index, value, served_by, _ in results:
        expected = "candidate" if to_candidate(f"acct-{index:06d}".encode(), salt, limit) else "production"
        assert served_by == expected
        assert value == index + (100 if expected == "candidate" else 0)
    share = sum(served_by == "candidate" for _, _, served_by, _ in results) / len(results)
    assert 0.2 < share < 0.4
    recorded = {row["request_id"]: row for row in await rows(db, deployment, 300)}
    for index, value, served_by, request_id in results:
        row = recorded[request_id]
        assert row["sticky_key"] == f"acct-{index:06d}", "the key the side was chosen by, as HTTP records it"
        assert row["served_by"] == served_by and row["mode"] == "canary"
        side = "candidate" if served_by == "candidate" else "production"
        assert row[f"{side}_prediction"] == value and row[f"{side}_status"] == 200


async def test_the_segment_is_recorded_from_metadata_or_the_request(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """segmentBy.header read from the call's metadata; segmentBy.path read in the request as its REST body."""
    router = start_router(config_for(servers, deployment, segmentHeader="X-Instrument"))
    code, *_ = await call(router.grpc_address, "ModelInfer", infer_request(1), (("x-instrument", "EURUSD"),))
    assert code is grpc.StatusCode.OK
    assert (await rows(db, deployment, 1))[0]["segment"] == "EURUSD"

    revision = router.readiness().json()["revision"]
    router.write_config(config_for(servers, deployment, segmentPath="inputs[0].data[0]"))
    wait_until(lambda: router.readiness().json()["revision"] != revision, 5, "the new config")
    for raw in (False, True):
        code, *_ = await call(router.grpc_address, "ModelInfer", infer_request(7.5, raw=raw))
        assert code is grpc.StatusCode.OK
    assert [row["segment"] for row in (await rows(db, deployment, 3))[1:]] == ["7.5", "7.5"], "contents or raw"


async def test_the_candidate_failing_falls_back_to_production(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    servers[1].control(errorRate=1.0)
    router = start_router(config_for(servers, deployment, mode="canary", weight=100, fallbackToProduction=True))
    code, answer, initial, _ = await call(router.grpc_address, "ModelInfer", infer_request(2, request_id="fb-1"))
    assert code is grpc.StatusCode.OK and answer is not None and score(answer) == 2
    assert initial["x-shadowgate-served-by"] == "production" and initial["x-request-id"] == "fb-1"
    [row] = await rows(db, deployment, 1)
    assert (row["served_by"], row["fallback"], row["candidate_status"], row["production_prediction"]) == (
        "production",
        True,
        500,
        2.0,
    )
    assert router.metric("shadowgate_router_fallbacks_total") == 1


async def test_a_model_server_down_or_slow_is_unavailable_or_past_its_deadline(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    config = config_for(servers, deployment, weight=0, timeoutSeconds=0.3)
    config["production"]["grpcAddress"] = f"127.0.0.1:{free_port()}"
    router = start_router(config)
    code, _, initial, details = await call(router.grpc_address, "ModelInfer", infer_request(1))
    assert code is grpc.StatusCode.UNAVAILABLE
    assert details.startswith("the production model server failed: cannot connect")
    assert len(initial["x-request-id"]) == 32

    servers[0].control(latencyMs=3000)
    old = router.readiness().json()["revision"]
    router.write_config(config_for(servers, deployment, weight=0, timeoutSeconds=0.3))
    wait_until(lambda: router.readiness().json()["revision"] != old, 5, "the new configuration")
    started = time.monotonic()
    code, _, _, details = await call(router.grpc_address, "ModelInfer", infer_request(1))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "no answer within 0.3s" in details
    assert time.monotonic() - started < 2
    recorded = await rows(db, deployment, 2)
    assert [(row["production_status"], row["production_error"]) for row in recorded] == [
        (None, "connect"),
        (None, "timeout"),
    ]


async def test_a_candidate_that_cannot_be_reached_is_left_alone_by_its_own_breaker(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """Issue 12: gRPC copies to a candidate whose gRPC port refuses connections. After 10 failures in a row
    the gRPC breaker opens (HTTP's, another port, stays closed): the copies it skips are recorded as the
    candidate failing (circuit_open, no latency), production answers every call."""
    config = config_for(servers, deployment, mode="shadow", weight=100)
    config["candidate"]["grpcAddress"] = f"127.0.0.1:{free_port()}"
    router = start_router(config, "--breaker-cool-off", "60")
    for value in range(25):
        code, answer, _, _ = await call(router.grpc_address, "ModelInfer", infer_request(value))
        assert code is grpc.StatusCode.OK and answer is not None and score(answer) == value
    recorded = await rows(db, deployment, 25)
    errors = [row["candidate_error"] for row in recorded]
    assert errors[:10] == ["connect"] * 10 and set(errors) == {"connect", "circuit_open"}, errors
    assert errors.count("circuit_open") >= 10
    for row in recorded:
        assert (row["candidate_latency_ms"] is None) == (row["candidate_error"] == "circuit_open")
    skipped = router.metric("shadowgate_router_requests_total", side="candidate", role="mirror", status="circuit_open")
    assert skipped == errors.count("circuit_open")
    assert router.metric("shadowgate_router_candidate_breaker_state", protocol="grpc") == 2
    assert router.metric("shadowgate_router_candidate_breaker_state", protocol="http") == 0
    assert "the candidate's circuit breaker opened (grpc): 10 calls in a row failed" in router.log()


async def test_bad_calls_are_refused_and_counted(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, deployment: str
) -> None:
    router = start_router(config_for(servers, deployment))
    cases = [
        (infer_request(1, model="other"), (), grpc.StatusCode.NOT_FOUND, "model 'other' is not served here"),
        (b"\xff\xff\xff", (), grpc.StatusCode.INVALID_ARGUMENT, "not a ModelInferRequest"),
        (infer_request(1), (("x-request-id", "a b"),), grpc.StatusCode.INVALID_ARGUMENT, "x-request-id must be"),
        (infer_request(1, request_id="a b"), (), grpc.StatusCode.INVALID_ARGUMENT, "the request's id is used"),
    ]
    for data, metadata, expected, says in cases:
        code, _, trailing, details = await call(router.grpc_address, "ModelInfer", data, metadata)
        assert (code, says in details) == (expected, True), details
        assert trailing["x-request-id"]
    assert router.metric("shadowgate_router_refusals_total", protocol="grpc", status="INVALID_ARGUMENT") == 3
    assert router.metric("shadowgate_router_refusals_total", protocol="grpc", status="NOT_FOUND") == 1
    assert router.metric("shadowgate_router_requests_total") == 0, "no model server was called"


async def test_other_rpcs_and_streams_go_to_production_only(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """ModelReady and ModelMetadata by the deployment's name (rewritten to the server's), a ModelStreamInfer
    stream: answered by production; the candidate is not called; nothing is recorded."""
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100))
    before = [server.stats() for server in servers]
    ready = inference_pb2.ModelRequest(name=deployment).SerializeToString()
    code, answer, initial, _ = await call(router.grpc_address, "ModelReady", ready)
    assert (code, answer, initial["x-shadowgate-served-by"]) == (grpc.StatusCode.OK, b"\x08\x01", "production")
    code, _, _, details = await call(
        router.grpc_address, "ModelMetadata", inference_pb2.ModelRequest(name="other").SerializeToString()
    )
    assert code is grpc.StatusCode.NOT_FOUND and "not served here" in details

    async with grpc.aio.insecure_channel(router.grpc_address) as channel:
        stream = channel.stream_stream(SERVICE + "ModelStreamInfer")(
            iter([infer_request(1), infer_request(2)]), timeout=10
        )
        answers = [message async for message in stream]
    assert len(answers) == 2 and answers[0][:1] == b"\x12"  # ModelStreamInferResponse.infer_response
    assert [score(message[2:]) for message in answers] == [1.0, 2.0]

    after = [server.stats() for server in servers]
    assert after[0]["requests"] - before[0]["requests"] == 2 and after[0]["other"] - before[0]["other"] == 1
    assert (after[1]["requests"], after[1]["other"]) == (before[1]["requests"], before[1]["other"])
    code, _, _, _ = await call(router.grpc_address, "ModelInfer", infer_request(1, request_id="the-only-row"))
    assert code is grpc.StatusCode.OK
    assert [row["request_id"] for row in await rows(db, deployment, 1)] == ["the-only-row"]


async def test_grpc_serves_protocol_v2_only(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, deployment: str
) -> None:
    config = config_for(servers, deployment, protocol="v1", predictionPath="predictions[0]", confidencePath=None)
    router = start_router(config)
    code, _, _, details = await call(router.grpc_address, "ModelInfer", infer_request(1))
    assert code is grpc.StatusCode.UNIMPLEMENTED and "protocol v1" in details


async def test_sigterm_lets_grpc_shadow_copies_finish_and_records_them(
    servers: tuple[ModelServer, ModelServer], start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    servers[1].control(latencyMs=500)
    router = start_router(config_for(servers, deployment, mode="shadow", weight=100, mirrorTimeoutSeconds=5))
    answers = await asyncio.gather(
        *(
            call(router.grpc_address, "ModelInfer", infer_request(index, request_id=f"term-{index}"))
            for index in range(20)
        )
    )
    assert {code for code, _, _, _ in answers} == {grpc.StatusCode.OK}
    assert router.process is not None
    router.process.send_signal(signal.SIGTERM)  # while the candidate's copies are still on their way
    assert await asyncio.to_thread(router.process.wait, 30) == 0
    recorded = await rows(db, deployment, 20)
    assert all(row["candidate_status"] == 200 for row in recorded), "every copy finished and was recorded"


class MetadataRecorder:
    """A gRPC model server of the test's own that answers ModelInfer and keeps each call's metadata."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.server = grpc.aio.server()
        self.address = ""

    async def infer(self, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.seen.append(dict(context.invocation_metadata() or ()))
        answer = inference_pb2.ModelInferResponse(model_name="fraud")
        answer.outputs.add(name="score", datatype="FP64", shape=[1]).contents.fp64_contents.append(1.0)
        return answer.SerializeToString()

    async def __aenter__(self) -> MetadataRecorder:
        handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(self.infer)}
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE[1:-1], handlers)])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.server.stop(None)


@pytest.mark.parametrize(
    ("drop", "candidate_gets"),
    [(None, {"x-account-id"}), ([], {"authorization", "cookie", "x-account-id"})],  # default; opted in to all
)
async def test_client_credentials_are_not_mirrored_over_grpc_unless_asked(
    servers: tuple[ModelServer, ModelServer],
    start_router: StartRouter,
    deployment: str,
    drop: list[str] | None,
    candidate_gets: set[str],
) -> None:
    sent = (("authorization", "Bearer client-secret"), ("cookie", "session=1"), ("x-account-id", "a"))
    async with MetadataRecorder() as production, MetadataRecorder() as candidate:
        config = config_for(servers, deployment, mode="shadow", weight=100)
        if drop is not None:
            config["mirrorDropHeaders"] = drop
        config["production"]["grpcAddress"], config["candidate"]["grpcAddress"] = production.address, candidate.address
        router = start_router(config)
        code, _, _, _ = await call(router.grpc_address, "ModelInfer", infer_request(1), sent)
        assert code is grpc.StatusCode.OK
        deadline = time.monotonic() + 10
        while not candidate.seen:
            assert time.monotonic() < deadline, "the shadow copy never arrived"
            await asyncio.sleep(0.05)
    keys = {key for key, _ in sent}
    assert set(production.seen[0]) & keys == keys, "production gets the call as sent"
    assert set(candidate.seen[0]) & keys == candidate_gets
