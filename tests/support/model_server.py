"""A tiny but real model server for router tests and benchmarks, on loopback.

It speaks the three protocols the router fronts (Open Inference Protocol v2, KServe v1, plain JSON;
v2 with model versions in the path and the binary tensor data extension, as tritonclient uses them; and,
with ``--grpc-port``, v2 over gRPC: inference.GRPCInferenceService's ModelInfer, ModelReady, ModelMetadata,
ServerLive/Ready and the ModelStreamInfer stream, answering with typed contents or raw output contents as
the request's inputs came),
answers with a prediction that is a known function of the input (``bias + sum(inputs)``), so a test can
tell which server answered, and can be made slow or failing on demand: at start (``--latency-ms``,
``--error-rate``) or while running (``POST /control``), which lets one test compare a healthy and a
sick candidate against the same production server. ``GET /stats`` says how many inference requests
it served and the last request ids it saw.

Run it as a process (``python -m tests.support.model_server --port 9001 --bias 1``) so that its CPU
time is not shared with the router's event loop under test, or in-process with `ModelServer`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web

from shadowgate_router.oip import inference_pb2


@dataclass
class Behaviour:
    """What the server does to each inference request; changeable at run time through /control."""

    latency_ms: float = 0.0
    error_rate: float = 0.0
    """Share of inference requests answered with a 500."""
    hang: bool = False
    """Never answer (until the client gives up): a model server that is stuck."""
    bias: float = 0.0
    confidence: float = 0.75
    compress: bool = False
    """gzip (or deflate) answers for clients that accept it, as Triton does."""

    def update(self, changes: dict[str, Any]) -> None:
        for key, attribute in (
            ("latencyMs", "latency_ms"),
            ("errorRate", "error_rate"),
            ("hang", "hang"),
            ("bias", "bias"),
            ("confidence", "confidence"),
            ("compress", "compress"),
        ):
            if key in changes:
                setattr(self, attribute, type(getattr(self, attribute))(changes[key]))


@dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    request_ids: deque[str] = field(default_factory=lambda: deque(maxlen=100_000))
    other: int = 0
    """Calls to the other v2 paths (model config, repository index)."""


def _numbers(value: Any) -> float:
    """Sum of every number in a JSON value: the 'model'."""
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return sum(_numbers(item) for item in value)
    if isinstance(value, dict):
        return sum(_numbers(item) for item in value.values())
    return 0.0


_FORMATS = {"FP32": "f", "FP64": "d", "INT32": "i", "INT64": "q"}


def _binary_inputs(header: dict[str, Any], raw: bytes) -> list[Any]:
    """The inputs' numbers: JSON ``data``, or little-endian values of ``binary_data_size`` bytes in order."""
    values: list[Any] = []
    offset = 0
    for tensor in header.get("inputs", []):
        size = tensor.get("parameters", {}).get("binary_data_size")
        if size is None:
            values.append(tensor.get("data"))
            continue
        code = _FORMATS[tensor["datatype"]]
        values.append(list(struct.unpack_from(f"<{size // struct.calcsize(code)}{code}", raw, offset)))
        offset += size
    return values


def _body_id(header_length: str | None, body: bytes) -> str | None:
    try:
        document = json.loads(body[: int(header_length)] if header_length else body)
    except (ValueError, RecursionError):
        return None
    value = document.get("id") if isinstance(document, dict) else None
    return value if isinstance(value, str) else None


def _wants_binary(header_length: str | None, body: bytes) -> bool:
    """Whether the client asked for binary outputs (``binary_data`` on an output, or binary_data_output)."""
    try:
        document = json.loads(body[: int(header_length)] if header_length else body)
    except (ValueError, RecursionError):
        return False
    if document.get("parameters", {}).get("binary_data_output"):
        return True
    return any(output.get("parameters", {}).get("binary_data") for output in document.get("outputs", []))


class ModelServer:
    """The aiohttp application; `serve()` runs it on 127.0.0.1:port until cancelled."""

    def __init__(self, model: str = "fraud", behaviour: Behaviour | None = None, seed: int = 7) -> None:
        self.model = model
        self.behaviour = behaviour or Behaviour()
        self.stats = Stats()
        self.random = random.Random(seed)
        self.unhung = asyncio.Event()
        self.app = web.Application()
        self.app.add_routes(
            [
                web.post("/v2/models/{name}/infer", self.infer_v2),
                web.post("/v2/models/{name}/versions/{version}/infer", self.infer_v2),
                web.get("/v2/models/{name}/ready", self.ready_v2),
                web.get("/v2/models/{name}/versions/{version}/ready", self.ready_v2),
                web.get("/v2/models/{name}", self.metadata_v2),
                web.get("/v2/models/{name}/versions/{version}", self.metadata_v2),
                web.get("/v2/models/{name}/config", self.config_v2),
                web.post("/v2/repository/index", self.repository_index),
                web.get("/v2/health/ready", self.health),
                web.get("/v2/health/live", self.health),
                web.post("/v1/models/{name}:predict", self.predict_v1),
                web.get("/v1/models/{name}", self.status_v1),
                web.post("/control", self.control),
                web.get("/stats", self.get_stats),
                web.post("/{path:.*}", self.predict_json),
            ]
        )

    async def _infer(self, request: web.Request) -> tuple[web.Response | None, float]:
        """Common part: count, delay, fail; returns (error response or None, prediction)."""
        name = request.match_info.get("name")
        if name is not None and name != self.model:
            return web.json_response({"error": f"model {name!r} not found"}, status=404), 0.0
        body = await request.read()
        header_length = request.headers.get("Inference-Header-Content-Length")
        try:
            if header_length is None:
                document: Any = json.loads(body)
            else:  # the binary tensor data extension: a JSON header, then the inputs' raw bytes
                document = json.loads(body[: int(header_length)])
                document = {"inputs": _binary_inputs(document, body[int(header_length) :])}
        except (ValueError, RecursionError, struct.error):  # too deep for json: a 400, as real servers give
            return web.json_response({"error": "malformed JSON"}, status=400), 0.0
        self.stats.requests += 1
        self.stats.request_ids.append(request.headers.get("X-Request-Id", ""))
        behaviour = self.behaviour
        if behaviour.hang:
            await self.unhung.wait()  # until /control turns hang off (or the client goes away)
        if behaviour.latency_ms > 0:
            await asyncio.sleep(behaviour.latency_ms / 1000)
        if behaviour.error_rate > 0 and self.random.random() < behaviour.error_rate:
            self.stats.errors += 1
            return web.json_response({"error": "injected failure"}, status=500), 0.0
        if isinstance(document, dict):  # a v2 body's id is not an input
            document = {key: value for key, value in document.items() if key != "id"}
        return None, behaviour.bias + _numbers(document)

    async def infer_v2(self, request: web.Request) -> web.Response:
        failed, prediction = await self._infer(request)
        if failed is not None:
            return failed
        header_length = request.headers.get("Inference-Header-Content-Length")
        body = await request.read()
        # Like Triton and MLServer: the answer's id is the request body's id (else, here, the header's).
        request_id = _body_id(header_length, body) or request.headers.get("X-Request-Id", "")
        if _wants_binary(header_length, body):
            header = json.dumps(
                {
                    "model_name": self.model,
                    "id": request_id,
                    "outputs": [
                        {"name": "score", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}},
                        {"name": "confidence", "shape": [1], "datatype": "FP64", "data": [self.behaviour.confidence]},
                    ],
                }
            ).encode()
            return self._maybe_compressed(
                request,
                web.Response(
                    body=header + struct.pack("<f", prediction),
                    content_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))},
                ),
            )
        answer = web.json_response(
            {
                "model_name": self.model,
                "id": request_id,
                "outputs": [
                    {"name": "score", "shape": [1], "datatype": "FP64", "data": [prediction]},
                    {"name": "confidence", "shape": [1], "datatype": "FP64", "data": [self.behaviour.confidence]},
                ],
            }
        )
        return self._maybe_compressed(request, answer)

    def _maybe_compressed(self, request: web.Request, response: web.Response) -> web.Response:
        """gzip if the client accepts it, else deflate if it accepts that (when compress is on)."""
        accepted = request.headers.get("Accept-Encoding", "")
        if self.behaviour.compress:
            for coding in (web.ContentCoding.gzip, web.ContentCoding.deflate):
                if coding.value in accepted:
                    response.enable_compression(coding)
                    break
        return response

    async def config_v2(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != self.model:
            return web.json_response({"error": "model not found"}, status=404)
        self.stats.other += 1
        return web.json_response({"name": self.model, "backend": "shadowgate-test", "max_batch_size": 8})

    async def repository_index(self, request: web.Request) -> web.Response:
        self.stats.other += 1
        ready = (await request.json()).get("ready", False) if await request.read() else False
        return web.json_response([{"name": self.model, "state": "READY", "asked_ready_only": ready}])

    async def predict_v1(self, request: web.Request) -> web.Response:
        failed, prediction = await self._infer(request)
        return failed or web.json_response({"predictions": [prediction]})

    async def predict_json(self, request: web.Request) -> web.Response:
        failed, prediction = await self._infer(request)
        if failed is not None:
            return failed
        confidence = self.behaviour.confidence
        return web.json_response({"result": {"score": prediction, "probabilities": [1 - confidence, confidence]}})

    async def ready_v2(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != self.model:
            return web.json_response({"error": "model not found"}, status=404)
        return web.json_response({"name": self.model, "ready": True})

    async def metadata_v2(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != self.model:
            return web.json_response({"error": "model not found"}, status=404)
        return web.json_response(
            {
                "name": self.model,
                "platform": "shadowgate-test",
                "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1]}],
                "outputs": [{"name": "score", "datatype": "FP64", "shape": [1]}],
            }
        )

    async def status_v1(self, request: web.Request) -> web.Response:
        return web.json_response({"model_version_status": [{"version": "1", "state": "AVAILABLE"}]})

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def control(self, request: web.Request) -> web.Response:
        self.behaviour.update(await request.json())
        if self.behaviour.hang:
            self.unhung.clear()
        else:
            self.unhung.set()
        return web.json_response({"ok": True})

    async def get_stats(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": self.stats.requests,
                "errors": self.stats.errors,
                "requestIds": list(self.stats.request_ids),
                "other": self.stats.other,
            }
        )

    # gRPC: the same model, behaviour and stats
    async def _grpc_infer(self, request: inference_pb2.ModelInferRequest, context: Any, unary: bool = True) -> bytes:
        if request.model_name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_name!r} not found")
        self.stats.requests += 1
        metadata = dict(context.invocation_metadata() or ())
        self.stats.request_ids.append(str(metadata.get("x-request-id", "")))
        behaviour = self.behaviour
        if behaviour.hang:
            await self.unhung.wait()
        if behaviour.latency_ms > 0:
            await asyncio.sleep(behaviour.latency_ms / 1000)
        if behaviour.error_rate > 0 and self.random.random() < behaviour.error_rate:
            self.stats.errors += 1
            await context.abort(grpc.StatusCode.INTERNAL, "injected failure")
        prediction = behaviour.bias + sum(_grpc_inputs(request))
        answer = inference_pb2.ModelInferResponse(model_name=self.model, model_version="1", id=request.id)
        score = answer.outputs.add(name="score", datatype="FP64", shape=[1])
        confidence = answer.outputs.add(name="confidence", datatype="FP64", shape=[1])
        if request.raw_input_contents:  # raw in, raw out (as Triton answers tritonclient)
            answer.raw_output_contents.extend([struct.pack("<d", prediction), struct.pack("<d", behaviour.confidence)])
        else:
            score.contents.fp64_contents.append(prediction)
            confidence.contents.fp64_contents.append(behaviour.confidence)
        if unary:
            await context.send_initial_metadata((("x-model-server", self.model),))
        return answer.SerializeToString()

    async def grpc_model_infer(self, data: bytes, context: Any) -> bytes:
        return await self._grpc_infer(inference_pb2.ModelInferRequest.FromString(data), context)

    async def grpc_stream_infer(self, requests: Any, context: Any) -> Any:
        async for data in requests:  # ModelStreamInferResponse { error_message = 1; infer_response = 2 }
            answer = await self._grpc_infer(inference_pb2.ModelInferRequest.FromString(data), context, unary=False)
            yield _field(2, answer)

    async def grpc_model_ready(self, data: bytes, context: Any) -> bytes:
        named = inference_pb2.ModelRequest.FromString(data)
        if named.name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {named.name!r} not found")
        self.stats.other += 1
        return b"\x08\x01"  # ModelReadyResponse { ready: true }

    async def grpc_model_metadata(self, data: bytes, context: Any) -> bytes:
        named = inference_pb2.ModelRequest.FromString(data)
        if named.name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {named.name!r} not found")
        self.stats.other += 1
        return _field(1, self.model.encode()) + _field(3, b"shadowgate-test")  # name, platform

    async def grpc_live(self, data: bytes, context: Any) -> bytes:
        return b"\x08\x01"  # ServerLiveResponse / ServerReadyResponse { live/ready: true }

    def grpc_handlers(self) -> Any:
        service = "inference.GRPCInferenceService"
        unary = {
            "ModelInfer": self.grpc_model_infer,
            "ModelReady": self.grpc_model_ready,
            "ModelMetadata": self.grpc_model_metadata,
            "ServerLive": self.grpc_live,
            "ServerReady": self.grpc_live,
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(call) for name, call in unary.items()}
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.grpc_stream_infer)
        return grpc.method_handlers_generic_handler(service, handlers)

    async def serve(self, port: int, ready: asyncio.Event | None = None, grpc_port: int | None = None) -> None:
        # Like most model servers, stop working on a request whose client has gone (a router's timeout),
        # and do not wait long for stuck requests when stopping.
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        server = None
        if grpc_port is not None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers([self.grpc_handlers()])
            server.add_insecure_port(f"127.0.0.1:{grpc_port}")
            await server.start()
        if ready is not None:
            ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            if server is not None:
                await server.stop(1.0)
            await runner.cleanup()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings, bytes, messages)."""
    length, varint = len(payload), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(varint) + payload


_RAW_FORMATS = {"FP32": "f", "FP64": "d", "INT32": "i", "INT64": "q"}


def _grpc_inputs(request: inference_pb2.ModelInferRequest) -> list[float]:
    """Every input element: typed contents, or raw_input_contents (little-endian) in order."""
    values: list[float] = []
    for index, tensor in enumerate(request.inputs):
        if index < len(request.raw_input_contents):
            raw = request.raw_input_contents[index]
            code = _RAW_FORMATS[tensor.datatype]
            values += struct.unpack(f"<{len(raw) // struct.calcsize(code)}{code}", raw)
        else:
            contents = tensor.contents
            values += [*contents.fp64_contents, *contents.fp32_contents, *contents.int64_contents]
            values += [*contents.int_contents]
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--bias", type=float, default=0.0, help="added to every prediction (tells servers apart)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--confidence", type=float, default=0.75)
    parser.add_argument("--grpc-port", type=int, default=None, help="also serve v2 over gRPC on this port")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    behaviour = Behaviour(
        latency_ms=args.latency_ms, error_rate=args.error_rate, bias=args.bias, confidence=args.confidence
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await ModelServer(args.model, behaviour).serve(args.port, grpc_port=args.grpc_port)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
