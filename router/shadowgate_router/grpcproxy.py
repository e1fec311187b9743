"""gRPC beside HTTP/1.1: the Open Inference Protocol's ``inference.GRPCInferenceService`` (KServe, Triton,
MLServer), on grpcio's asyncio server and client, in the router's one event loop.

``ModelInfer`` follows the HTTP rules exactly (proxy.py): the same configuration, split by the same sticky key
(the configured header, read from the call's metadata, else the request id), mirrored in shadow mode under
the same concurrency limit and timeouts, answered by the candidate for its canary share with the same
fallback, and recorded in the same row, with the same sticky key and a segment (segmentBy's header read from
the metadata, or its path read in the request shaped as its REST body). The request id is the
``x-request-id`` metadata, else ``ModelInferRequest.id``, else a new one; it is sent to both servers as
``x-request-id`` metadata and returned in the answer's initial metadata with ``x-shadowgate-served-by``. The
prediction is read from the answer's outputs (typed ``contents`` or ``raw_output_contents``) through the
configured path, as if it were the REST answer (``outputs[0].data[0]``). A gRPC status is recorded as its
HTTP equivalent (OK 200, INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503, ...), so error rates mean the
same for both; a call the router cut off at its timeout is ``timeout``, a server it could not reach
``connect``.

Every other RPC goes to the answering model server (production; the candidate once promoted) and is not
mirrored or recorded: the named-model ones (ModelReady, ModelMetadata, Triton's ModelConfig and
ModelStatistics) with that server's model name put in, the rest byte for byte, including streams
(Triton's ModelStreamInfer) and services the router does not know of.

Messages are read with shadowgate's own copy of the protocol's messages (oip/inference.proto), not with
tritonclient's or KServe's generated modules: the router image carries neither, and only ModelInfer's
messages are parsed at all. gRPC message compression (``grpc-encoding``) is per hop: the router accepts
what the client sends and calls the model servers uncompressed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError

from shadowgate_router.breaker import CIRCUIT_OPEN, Breaker
from shadowgate_router.config import DEFAULT_MIRROR_DROP_HEADERS, Protocol, RouterConfig, TrafficMode, Upstream
from shadowgate_router.hashing import to_candidate
from shadowgate_router.httpserver import new_request_id
from shadowgate_router.oip import inference_pb2
from shadowgate_router.protocols import Extractor, grpc_request_document, walk_json
from shadowgate_router.proxy import (
    BREAKER_FAILURES,
    CANCELLED,
    NO_PREDICTION,
    Proxy,
    Route,
    key_text,
    segment_text,
    valid_request_id,
)
from shadowgate_router.recorder import now_us
from shadowgate_router.spool import Row
from shadowgate_router.upstream import CONNECT, TIMEOUT

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
_NAMED_MODEL = frozenset(
    f"/{SERVICE}/{name}" for name in ("ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics")
)
"""Requests whose first two fields are a model's name and version (oip.ModelRequest)."""
_UNARY = _NAMED_MODEL | frozenset(
    f"/{SERVICE}/{name}"
    for name in (
        "ServerLive",
        "ServerReady",
        "ServerMetadata",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryStatus",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
        "TraceSetting",
        "LogSettings",
    )
)
"""The service's other one-message-each-way RPCs (KServe's, and Triton's extensions). Anything else is
passed on as a stream, which is also how a unary call looks on the wire."""

REQUEST_ID = "x-request-id"
SERVED_BY = "x-shadowgate-served-by"
_NOT_FORWARDED = frozenset({"user-agent", "te", "content-type", "host", "connection", REQUEST_ID})
"""Metadata that describes one hop (grpc-* and :pseudo headers are dropped too)."""

HTTP_EQUIVALENT = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
"""gRPC status -> the HTTP status recorded (google.rpc's mapping): the analysis counts >= 500 as errors."""

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),  # the model server's answer, whatever its size (as over HTTP)
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 0),  # a failed inference call is reported, not repeated behind the caller's back
]

Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(slots=True)
class GrpcAnswer:
    """What one model server did with one gRPC call."""

    code: grpc.StatusCode | None
    """None when there was no answer: see `error`."""
    error: str | None
    details: str
    latency_ms: float | None
    """None for a call that was not made (skipped by the candidate's breaker, or cut short)."""
    body: bytes | None
    initial: Metadata = ()
    trailing: Metadata = ()

    @property
    def status(self) -> int | None:
        return HTTP_EQUIVALENT.get(self.code) if self.code is not None else None

    @property
    def failed(self) -> bool:
        status = self.status
        return self.error is not None or (status is not None and status >= 500)


@dataclass(frozen=True, slots=True)
class _Upstreams:
    """The gRPC channels of one configuration (None: that server has no gRPC address)."""

    production: grpc.aio.Channel | None
    candidate: grpc.aio.Channel | None


class GrpcProxy:
    """The gRPC server and its clients; routes with the HTTP proxy's configuration and records through it."""

    def __init__(self, proxy: Proxy, *, message_limit: int) -> None:
        self.proxy = proxy
        self.metrics = proxy.metrics
        self.message_limit = message_limit
        self.server: grpc.aio.Server | None = None
        self._port = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[tuple[int, str, bool], Any] = {}
        self._upstreams = _Upstreams(None, None)
        self._responses: dict[grpc.StatusCode, Any] = {}
        self._latency = {side: self.metrics.request_latency.labels(side) for side in ("production", "candidate")}
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._mirror_drop = frozenset(name.lower() for name in DEFAULT_MIRROR_DROP_HEADERS)
        """Metadata left out of shadow copies (traffic.mirrorDropHeaders, lower-cased as gRPC keys are): the
        client's credentials are for production, not for a model under test."""

    # configuration
    def apply(self, config: RouterConfig) -> None:
        """Channels for the configuration's gRPC addresses; ones no longer named are closed after a grace."""
        wanted = {upstream.grpc_address for upstream in (config.production, config.candidate)} - {None}
        for address in wanted:
            assert address is not None
            if address not in self._channels:
                self._channels[address] = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._upstreams = _Upstreams(self._channel(config.production), self._channel(config.candidate))
        self._mirror_drop = frozenset(name.lower() for name in config.mirror_drop_headers)
        grace = max(config.timeout_seconds, config.mirror_timeout_seconds) + 1
        for address in [address for address in self._channels if address not in wanted]:
            retired = self._channels.pop(address)
            self._calls = {key: call for key, call in self._calls.items() if key[0] != id(retired)}
            asyncio.get_running_loop().call_later(grace, self._close_later, retired)

    def _channel(self, upstream: Upstream) -> grpc.aio.Channel | None:
        return self._channels.get(upstream.grpc_address) if upstream.grpc_address else None

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _multicallable(self, channel: grpc.aio.Channel, method: str, stream: bool = False) -> Any:
        key = (id(channel), method, stream)
        found = self._calls.get(key)
        if found is None:
            make = channel.stream_stream if stream else channel.unary_unary
            found = self._calls[key] = make(method)  # bytes in, bytes out: no (de)serializers
        return found

    # lifecycle
    async def start(self, host: str, port: int) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.message_limit),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.server.add_generic_rpc_handlers([_Handlers(self)])
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._port = self.server.add_insecure_port(address)
        await self.server.start()

    @property
    def port(self) -> int:
        return self._port

    async def stop(self, grace: float) -> None:
        """Refuse new calls and let those in flight finish (up to `grace` seconds). The channels stay open
        for the shadow copies still running: `close()` once the proxy has waited for them."""
        if self.server is not None:
            await self.server.stop(grace)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def handler(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        found = self._handlers.get(method)
        if found is None:
            if method == MODEL_INFER:
                found = grpc.unary_unary_rpc_method_handler(self.model_infer)
            elif method in _UNARY:
                found = grpc.unary_unary_rpc_method_handler(functools.partial(self.passthrough, method))
            else:
                found = grpc.stream_stream_rpc_method_handler(functools.partial(self.passthrough_stream, method))
            self._handlers[method] = found
        return found

    # ModelInfer
    async def model_infer(self, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        proxy = self.proxy
        route = proxy.route
        if route is None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "the router has no configuration yet", None)
        config = route.config
        if config.protocol is not Protocol.V2:
            await self.refuse(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                f"this deployment speaks protocol {config.protocol.value}; gRPC serves protocol v2 only",
                None,
            )
        try:
            request = inference_pb2.ModelInferRequest.FromString(data)
        except DecodeError as exc:
            await self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"not a ModelInferRequest: {exc}", None)
        client_id: bytes | None = None
        sticky: bytes | None = None
        sticky_key = route.sticky.decode() if route.sticky else None
        segment: object = None
        segment_key = route.segment_header.decode() if route.segment_header else None
        forward: list[tuple[str, str | bytes]] = []
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID:
                client_id = value.encode() if isinstance(value, str) else value
            elif key == sticky_key:
                sticky = value.encode() if isinstance(value, str) else value
            if key == segment_key:
                segment = value
            if key not in _NOT_FORWARDED and not key.startswith((":", "grpc-")):
                forward.append((key, value))
        if client_id is not None and not valid_request_id(client_id):
            await self.refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "x-request-id must be 1 to 200 visible ASCII characters",
                None,
            )
        request_id = client_id
        if request_id is None:
            if request.id:
                request_id = request.id.encode(errors="replace")
                if not valid_request_id(request_id):
                    await self.refuse(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "the request's id is used as the request id and must be 1 to 200 visible ASCII characters;"
                        " change it, or send your own x-request-id metadata",
                        None,
                    )
            else:
                request_id = new_request_id()
        if request.model_name not in route.names:
            served = config.production.model_name
            await self.refuse(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model_name!r} is not served here; call it {served!r}",
                request_id,
            )
        received = now_us()
        started = time.perf_counter()
        forward.append((REQUEST_ID, request_id.decode()))
        candidate_share = to_candidate(sticky or request_id, route.salt, route.limit)
        if route.segment_path is not None:
            segment = walk_json(grpc_request_document(request), route.segment_path)
        recorded_key = (key_text(sticky or request_id) if route.sticky else None, segment_text(segment))
        timeout = config.timeout_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        features = _features(request) if proxy.settings.record_features else None
        upstreams = self._upstreams

        called = request.model_name  # as the client sent it (`data`)
        unversioned = not request.model_version
        production_data = data
        if called != config.production.model_name:
            request.model_name = config.production.model_name
            production_data = request.SerializeToString()

        def candidate_data() -> bytes:
            if called == config.candidate.model_name and unversioned:
                return data  # the call as the client sent it
            request.model_name = config.candidate.model_name
            request.model_version = ""  # a version in the call is production's; the candidate's default
            return request.SerializeToString()

        breaker = route.grpc_breaker
        if config.mode is TrafficMode.SHADOW:
            mirror: asyncio.Task[GrpcAnswer] | GrpcAnswer | None = None
            ticket = 0 if breaker is None or not candidate_share else breaker.admit()
            if ticket is None:
                assert breaker is not None
                mirror = self._skip(breaker, "mirror")
            elif candidate_share and proxy.mirrors_full():
                if breaker is not None:
                    breaker.release(ticket)
            elif candidate_share:
                drop = self._mirror_drop
                mirrored = [(key, value) for key, value in forward if key not in drop] if drop else forward
                mirror = asyncio.get_running_loop().create_task(
                    self._call(
                        upstreams.candidate,
                        "candidate",
                        "mirror",
                        candidate_data(),
                        mirrored,
                        config.mirror_timeout_seconds,
                        keep_metadata=False,
                        breaker=breaker,
                        ticket=ticket,
                    )
                )
                proxy.track_mirror(mirror)
            answered = await self._call(upstreams.production, "production", "answer", production_data, forward, timeout)

            def record_shadow(done: asyncio.Task[GrpcAnswer] | None = None) -> None:
                if isinstance(mirror, asyncio.Task) and not mirror.done():
                    mirror.add_done_callback(record_shadow)
                    return
                candidate = _mirrored(mirror) if isinstance(mirror, asyncio.Task) else mirror
                self._record(
                    route, received, request_id, "production", answered, candidate, False, features, recorded_key
                )

            return await self._answer(context, answered, "production", request_id, started, record_shadow)

        production: GrpcAnswer | None = None
        candidate: GrpcAnswer | None = None
        served_by = "production"
        fallback = False
        if candidate_share:
            admitted = 0 if breaker is None else breaker.admit()
            if admitted is None:
                assert breaker is not None
                candidate = self._skip(breaker, "answer")
            else:
                candidate = await self._call(
                    upstreams.candidate,
                    "candidate",
                    "answer",
                    candidate_data(),
                    forward,
                    timeout,
                    breaker=breaker,
                    ticket=admitted,
                )
            served_by = "candidate"
            if candidate.failed and config.fallback_to_production:
                self.metrics.fallbacks.inc()
                served_by, fallback = "production", True
                production = await self._call(
                    upstreams.production, "production", "fallback", production_data, forward, timeout
                )
        else:
            production = await self._call(
                upstreams.production, "production", "answer", production_data, forward, timeout
            )
        answer = production if served_by == "production" else candidate
        assert answer is not None
        return await self._answer(
            context,
            answer,
            served_by,
            request_id,
            started,
            lambda: self._record(
                route, received, request_id, served_by, production, candidate, fallback, features, recorded_key
            ),
        )

    async def _call(
        self,
        channel: grpc.aio.Channel | None,
        side: str,
        role: str,
        data: bytes,
        metadata: Metadata,
        time_limit: float,
        method: str = MODEL_INFER,
        keep_metadata: bool = True,
        breaker: Breaker | None = None,
        ticket: int = 0,
    ) -> GrpcAnswer:
        """One call to a model server. `keep_metadata`: also take its initial and trailing metadata (for the
        client; a shadow copy's are never used). Its outcome goes to `breaker` (the candidate's) under `ticket`."""
        started = time.perf_counter()
        if channel is None:
            answer = GrpcAnswer(
                None, CONNECT, f"the {side} model server has no gRPC address (spec.{side}.grpcPort)", 0.0, None
            )
        else:
            call = self._multicallable(channel, method)(data, metadata=metadata, timeout=time_limit)
            try:
                body = await call
            except grpc.aio.AioRpcError as exc:
                answer = _failure(exc, time_limit, (time.perf_counter() - started) * 1000)
            except BaseException:
                if breaker is not None:
                    breaker.release(ticket)  # cut short (cancelled): no verdict on the candidate
                raise
            else:
                latency_ms = (time.perf_counter() - started) * 1000
                if keep_metadata:
                    answer = GrpcAnswer(
                        grpc.StatusCode.OK,
                        None,
                        "",
                        latency_ms,
                        body,
                        _pairs(await call.initial_metadata()),
                        _pairs(await call.trailing_metadata()),
                    )
                else:
                    answer = GrpcAnswer(grpc.StatusCode.OK, None, "", latency_ms, body)
        if breaker is not None:
            breaker.record(ticket, answer.error in BREAKER_FAILURES)
        label = answer.error or str(answer.status)
        self.proxy.count_call(side, role, label, answer.latency_ms or 0.0)
        return answer

    def _skip(self, breaker: Breaker, role: str) -> GrpcAnswer:
        """What the candidate is recorded as having done with a call its open breaker skipped: failed."""
        self.proxy.count_skip(role)
        return GrpcAnswer(None, CIRCUIT_OPEN, f"the candidate's circuit breaker is open ({breaker.reason})", None, None)

    async def _answer(
        self,
        context: grpc.aio.ServicerContext[bytes, bytes],
        answer: GrpcAnswer,
        side: str,
        request_id: bytes,
        started: float | None,
        after: Callable[[], None] | None = None,
    ) -> bytes:
        """Hand the model server's answer (or the router's 502/504-like failure) to the client."""
        identity = ((REQUEST_ID, request_id.decode()), (SERVED_BY, side))
        if started is not None:
            self._latency[side].observe(time.perf_counter() - started)
        if after is not None:
            asyncio.get_running_loop().call_soon(after)  # once the answer is on its way
        await context.send_initial_metadata((*_passable(answer.initial), *identity))
        code = answer.code if answer.code is not None else _code_for(answer.error)
        self._count_response(code)
        if code is grpc.StatusCode.OK and answer.body is not None:
            context.set_trailing_metadata(_passable(answer.trailing))
            return answer.body
        details = answer.details if answer.error is None else f"the {side} model server failed: {answer.details}"
        await context.abort(code, details, tuple(_passable(answer.trailing)))
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    def _count_response(self, code: grpc.StatusCode) -> None:
        counter = self._responses.get(code)
        if counter is None:
            counter = self._responses[code] = self.metrics.grpc_responses.labels(code.name)
        counter.inc()

    async def refuse(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        message: str,
        request_id: bytes | None,
    ) -> NoReturn:
        """The router's own refusal, counted in refusals_total{protocol="grpc", status=<code name>}."""
        self.metrics.refusals.labels("grpc", code.name).inc()
        await self._fail(context, code, message, request_id)

    async def _fail(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        code: grpc.StatusCode,
        message: str,
        request_id: bytes | None,
    ) -> NoReturn:
        self._count_response(code)
        request_id = request_id or new_request_id()
        await context.abort(code, message, ((REQUEST_ID, request_id.decode()),))
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    def _record(
        self,
        route: Route,
        received: int,
        request_id: bytes,
        served_by: str,
        production: GrpcAnswer | None,
        candidate: GrpcAnswer | None,
        fallback: bool,
        features: str | None,
        key: tuple[str | None, str | None],
    ) -> None:
        config = route.config
        self.proxy.put_row(
            route,
            received,
            request_id,
            served_by,
            _side(route.extractor, config.production.version, production),
            _side(route.extractor, config.candidate.version, candidate),
            fallback,
            features,
            key,
        )

    # every other RPC
    def _answering(self, route: Route) -> tuple[str, grpc.aio.Channel | None, Upstream, bool]:
        config = route.config
        if config.candidate_answers_all:
            return "candidate", self._upstreams.candidate, config.candidate, True
        return "production", self._upstreams.production, config.production, False

    async def passthrough(self, method: str, data: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """One message each way, to the answering server; a named model gets that server's name."""
        route = self.proxy.route
        if route is None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "the router has no configuration yet", None)
        side, channel, upstream, promoted = self._answering(route)
        client_id, forward = _forwardable(context)
        request_id = client_id if client_id is not None and valid_request_id(client_id) else new_request_id()
        forward.append((REQUEST_ID, request_id.decode()))
        if method in _NAMED_MODEL:
            try:
                named = inference_pb2.ModelRequest.FromString(data)
            except DecodeError as exc:
                await self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"unreadable request: {exc}", request_id)
            if named.name:  # empty: every model (Triton's statistics)
                if named.name not in route.names:
                    served = route.config.production.model_name
                    await self.refuse(
                        context,
                        grpc.StatusCode.NOT_FOUND,
                        f"model {named.name!r} is not served here; call it {served!r}",
                        request_id,
                    )
                if named.name != upstream.model_name or (promoted and named.version):
                    named.name = upstream.model_name
                    if promoted:
                        named.version = ""
                    data = named.SerializeToString()  # unknown fields (Triton's extras) are kept
        timeout = route.config.timeout_seconds
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        answer = await self._call(channel, side, "answer", data, forward, timeout, method)
        return await self._answer(context, answer, side, request_id, None)

    async def passthrough_stream(
        self, method: str, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        """A stream (or an RPC the router does not know) to the answering server, message for message."""
        route = self.proxy.route
        if route is None:
            await self._fail(context, grpc.StatusCode.UNAVAILABLE, "the router has no configuration yet", None)
        side, channel, _, _ = self._answering(route)
        client_id, forward = _forwardable(context)
        request_id = client_id if client_id is not None and valid_request_id(client_id) else new_request_id()
        forward.append((REQUEST_ID, request_id.decode()))
        if channel is None:
            await self._fail(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"the {side} model server has no gRPC address (spec.{side}.grpcPort)",
                request_id,
            )
        call = self._multicallable(channel, method, stream=True)(
            requests, metadata=forward, timeout=context.time_remaining()
        )
        try:
            initial = await call.initial_metadata()
            await context.send_initial_metadata(
                (*_passable(_pairs(initial)), (REQUEST_ID, request_id.decode()), (SERVED_BY, side))
            )
            async for message in call:
                yield message
            context.set_trailing_metadata(_passable(_pairs(await call.trailing_metadata())))
            self._count_response(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            self._count_response(exc.code())
            await context.abort(exc.code(), exc.details() or "", tuple(_passable(_pairs(exc.trailing_metadata()))))


class _Handlers(grpc.GenericRpcHandler):
    def __init__(self, proxy: GrpcProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return self.proxy.handler(handler_call_details.method)


def _forwardable(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[bytes | None, list[tuple[str, str | bytes]]]:
    client_id: bytes | None = None
    forward: list[tuple[str, str | bytes]] = []
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID:
            client_id = value.encode() if isinstance(value, str) else value
        elif key not in _NOT_FORWARDED and not key.startswith((":", "grpc-")):
            forward.append((key, value))
    return client_id, forward


def _passable(metadata: Metadata) -> list[tuple[str, str | bytes]]:
    """A model server's metadata for the client, less what the router sets or gRPC itself manages."""
    return [
        (key, value)
        for key, value in metadata
        if key not in _NOT_FORWARDED and key != SERVED_BY and not key.startswith((":", "grpc-"))
    ]


def _failure(exc: grpc.aio.AioRpcError, timeout: float, latency_ms: float) -> GrpcAnswer:
    code = exc.code()
    details = exc.details() or ""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and "Deadline Exceeded" in details:
        return GrpcAnswer(None, TIMEOUT, f"no answer within {timeout:g}s", latency_ms, None)
    if code is grpc.StatusCode.UNAVAILABLE and "failed to connect" in (exc.debug_error_string() or "").lower():
        return GrpcAnswer(None, CONNECT, f"cannot connect: {details}", latency_ms, None)
    return GrpcAnswer(
        code, None, details, latency_ms, None, _pairs(exc.initial_metadata()), _pairs(exc.trailing_metadata())
    )


def _pairs(metadata: Any) -> list[tuple[str, str | bytes]]:
    """grpc.aio.Metadata (or None) as (key, value) pairs."""
    return [(key, value) for key, value in metadata] if metadata else []


def _code_for(error: str | None) -> grpc.StatusCode:
    return grpc.StatusCode.DEADLINE_EXCEEDED if error == TIMEOUT else grpc.StatusCode.UNAVAILABLE


def _mirrored(task: asyncio.Task[GrpcAnswer]) -> GrpcAnswer:
    if task.cancelled():
        return GrpcAnswer(None, CANCELLED, "the router stopped before the candidate answered", None, None)
    return task.result()


def _side(extract: Extractor, version: str, answer: GrpcAnswer | None) -> Row:
    """(version, prediction, confidence, latency_ms, status, error) as proxy.put_row takes it."""
    if answer is None:
        return (None, None, None, None, None, None)
    prediction = confidence = None
    error = answer.error
    if answer.code is grpc.StatusCode.OK and answer.body is not None:
        with contextlib.suppress(DecodeError):  # not a ModelInferResponse: recorded as no_prediction
            prediction, confidence = extract.read_grpc(inference_pb2.ModelInferResponse.FromString(answer.body))
        if prediction is None:
            error = NO_PREDICTION
    latency = None if answer.latency_ms is None else round(answer.latency_ms, 3)
    return (version, prediction, confidence, latency, answer.status, error)


def _features(request: inference_pb2.ModelInferRequest) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(request, indent=None)
