"""The hot path: one inference request in, the right model server's answer out, one row recorded.

shadow: production answers every request; for the candidate's share the same bytes go to the candidate
at the same moment, in the background, under its own timeout and a concurrency limit (over the limit
the copy is dropped and counted, never queued). Whatever the candidate does is recorded, never shown.
canary: the candidate's share is answered by the candidate; when it fails (no answer, or a 5xx) and
fallback is on, production answers instead and the row says so.
In both modes calls to the candidate go through its circuit breaker (breaker.py; one for HTTP, one for gRPC):
while it is open the call is not made and the row records the candidate as failed (`circuit_open`);
production is never behind one.

Nothing here waits for the database: the row is put on the recorder's queue after the answer has been
handed to the socket (`Response.after`), and for a mirrored request only once the copy has finished.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from shadowgate_router import codings
from shadowgate_router.breaker import CIRCUIT_OPEN, Breaker, BreakerSettings, State
from shadowgate_router.config import RouterConfig, TrafficMode, parse_json_path
from shadowgate_router.hashing import salt_for, threshold, to_candidate
from shadowgate_router.httpserver import Request, Response, error_response, new_request_id
from shadowgate_router.metrics import RouterMetrics
from shadowgate_router.protocols import (
    CONTENT_ENCODING,
    INFERENCE_HEADER,
    BadPathSegment,
    Extractor,
    Kind,
    Match,
    UnknownPath,
    WrongMethod,
    answer_format,
    body_request_id,
    decode_json,
    json_header_length,
    match,
    served_names,
    walk_json,
)
from shadowgate_router.recentids import RecentIds
from shadowgate_router.recorder import Recorder, now_us
from shadowgate_router.spool import Row
from shadowgate_router.upstream import (
    BAD_RESPONSE,
    CLOSED,
    CONNECT,
    TIMEOUT,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
"""Recorded as the candidate's error for a shadow copy cut short by shutdown."""
NO_PREDICTION = "no_prediction"
"""Recorded as the side's error when it answered 2xx but the configured path held no number."""
BREAKER_FAILURES = frozenset({CONNECT, TIMEOUT, CLOSED, BAD_RESPONSE})
"""Candidate call failures that count towards opening its breaker: no usable HTTP answer (see breaker.py)."""

# Not forwarded in either direction: they describe one hop, or the router sets them itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
        b"x-request-id",
    }
)
_REQUEST_ID = b"X-Request-Id"
_SERVED_BY = b"X-Shadowgate-Served-By"
_ACCEPT_ENCODING = b"accept-encoding"
INLINE_DECODE_BYTES = 64 * 1024
"""Compressed request bodies larger than this are inflated in a worker thread, off the event loop."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    max_connections: int = 512
    """Per model server."""
    connect_timeout: float = 2.0
    idle_timeout: float = 30.0
    mirror_concurrency: int = 512
    record_features: bool = False
    decoded_limit: int = 10 * 1024 * 1024
    """Largest body, once gzip/deflate is undone, that the router reads (a request over it gets 413)."""
    response_limit: int = 10 * 1024 * 1024
    """Largest answer body taken from a model server (bigger: the call fails as bad_response)."""
    response_memory: int = 64 * 1024 * 1024
    """Per model server: answer bytes being received at once, beyond which calls fail the same way."""
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    """The candidate's circuit breaker (breaker.py); off with failures=0."""


@dataclass(slots=True)
class Answer:
    """What one model server did with one request."""

    status: int | None
    error: str | None
    detail: str
    latency_ms: float | None
    """None for a call that was not made (skipped by the breaker, or cut short): it took no time to measure."""
    response: UpstreamResponse | None

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.status is not None and self.status >= 500)


@dataclass(frozen=True, slots=True)
class Route:
    """A configuration compiled for the hot path."""

    config: RouterConfig
    revision: str
    """config.revision, computed once (it hashes the whole configuration)."""
    limit: int
    salt: bytes
    names: frozenset[str]
    extractor: Extractor
    sticky: bytes | None
    segment_header: bytes | None
    segment_path: tuple[str | int, ...] | None
    production: UpstreamPool
    candidate: UpstreamPool
    mirror_drop: frozenset[bytes]
    """Lower-cased names of the request headers left out of shadow copies."""
    breaker: Breaker | None
    """The candidate's circuit breaker (HTTP); None when off, and when the candidate answers everything
    (promoted)."""
    grpc_breaker: Breaker | None
    """The same for its gRPC address (a breaker of its own: another port, maybe another server)."""


def _mirrored(task: asyncio.Task[Answer]) -> Answer:
    """A finished copy's answer; one cut short (the process stopping) is recorded as such."""
    if task.cancelled():
        return Answer(None, CANCELLED, "the router stopped before the candidate answered", None, None)
    return task.result()


def _skipped(breaker: Breaker) -> Answer:
    """What the candidate is recorded as having done with a call its open breaker skipped: failed."""
    return Answer(None, CIRCUIT_OPEN, f"the candidate's circuit breaker is open ({breaker.reason})", None, None)


async def _answered_now(answer: Answer) -> Answer:
    return answer


def valid_request_id(value: bytes) -> bool:
    """1 to 200 visible ASCII characters: safe in a header, a log line and a text column."""
    return 0 < len(value) <= 200 and all(0x21 <= byte <= 0x7E for byte in value)


def segment_text(value: object) -> str | None:
    """A request's segment (spec.analysis.segmentBy) as the text column holds it: a header's value (bytes), or
    the string or number found at the configured path of the request; None for anything else or empty."""
    if isinstance(value, bytes | str) and value:
        return key_text(value.encode() if isinstance(value, str) else value)[:128]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)[:128]
    return None


def _segment(route: Route, request: Request, document: object) -> str | None:
    """The HTTP request's segment: the segmentBy header's value, or the value at segmentBy's path of the JSON
    body; None when not configured or absent."""
    if route.segment_header is not None:
        return segment_text(request.header(route.segment_header))
    if route.segment_path is not None:
        return segment_text(walk_json(document, route.segment_path))
    return None


def key_text(key: bytes) -> str:
    """A sticky key as the text column holds it: UTF-8 (invalid bytes replaced), no NUL, at most 200 characters."""
    return key[:800].decode("utf-8", "replace").replace("\x00", "\ufffd")[:200]


def _is_json_type(content_type: bytes | None) -> bool:
    if content_type is None:
        return True  # many clients send none; the body is still checked
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class Proxy:
    def __init__(self, recorder: Recorder, metrics: RouterMetrics, settings: ProxySettings | None = None) -> None:
        self.recorder = recorder
        self.metrics = metrics
        self.settings = settings or ProxySettings()
        self.route: Route | None = None
        self._pools: dict[str, UpstreamPool] = {}
        self._mirrors: set[asyncio.Task[Any]] = set()
        self._recent = RecentIds()
        self._closing: set[asyncio.Task[None]] = set()
        self._calls: dict[tuple[str, str, str], Any] = {}
        self._latencies: dict[tuple[str, str], Any] = {}
        self._responses: dict[int, Any] = {}
        self._refusals: dict[int, Any] = {}
        self._request_latency = {side: metrics.request_latency.labels(side) for side in ("production", "candidate")}
        self._breakers: dict[str, tuple[tuple[str, str, str], Breaker]] = {}
        """Per protocol (http, grpc), the candidate's breaker and whom it guards (address, model name, version):
        kept across configurations that change only the split, replaced with the candidate."""
        metrics.inflight.set_function(lambda: len(self._mirrors))
        for protocol in ("http", "grpc"):
            metrics.breaker_state.labels(protocol).set_function(functools.partial(self._breaker_state, protocol))

    # configuration
    def apply(self, config: RouterConfig) -> None:
        """Swap in a new configuration; requests already in flight finish under the one they started with."""
        pools = {upstream.base_url: self._pool(upstream.base_url) for upstream in (config.production, config.candidate)}
        self.route = Route(
            config=config,
            revision=config.revision,
            limit=threshold(config.weight),
            salt=salt_for(config.namespace, config.deployment),
            names=served_names(config),
            extractor=Extractor(config.prediction_path, config.confidence_path),
            sticky=config.sticky_header.lower().encode() if config.sticky_header else None,
            segment_header=config.segment_header.lower().encode() if config.segment_header else None,
            segment_path=parse_json_path(config.segment_path) if config.segment_path else None,
            production=pools[config.production.base_url],
            candidate=pools[config.candidate.base_url],
            mirror_drop=frozenset(name.lower().encode() for name in config.mirror_drop_headers),
            breaker=self._candidate_breaker(config, "http", config.candidate.base_url),
            grpc_breaker=self._candidate_breaker(config, "grpc", config.candidate.grpc_address),
        )
        for url in [url for url in self._pools if url not in pools]:
            retired = self._pools.pop(url)
            # Let calls that started under the old configuration finish before closing its connections.
            grace = max(config.timeout_seconds, config.mirror_timeout_seconds) + 1
            asyncio.get_running_loop().call_later(grace, self._close_later, retired)

    def _candidate_breaker(self, config: RouterConfig, protocol: str, address: str | None) -> Breaker | None:
        settings = self.settings.breaker
        if not settings.enabled or config.candidate_answers_all or address is None:
            return None  # promoted, the candidate is the service: nothing to fall back on, nothing to protect
        guarded = (address, config.candidate.model_name, config.candidate.version)
        held = self._breakers.get(protocol)
        if held is None or held[0] != guarded:
            breaker = Breaker(settings, on_change=functools.partial(self._breaker_changed, protocol))
            held = self._breakers[protocol] = (guarded, breaker)
        return held[1]

    def _breaker_changed(self, protocol: str, breaker: Breaker) -> None:
        if breaker.state is State.OPEN:
            self.metrics.breaker_opened.labels(protocol).inc()
            log.warning(
                "the candidate's circuit breaker opened (%s): %s; no calls to it for %gs, each recorded as %s",
                protocol,
                breaker.reason,
                breaker.cool_off,
                CIRCUIT_OPEN,
            )
        elif breaker.state is State.CLOSED:
            log.info("the candidate's circuit breaker closed (%s): it answered again", protocol)

    def _breaker_state(self, protocol: str) -> float:
        route = self.route
        if route is None:
            return 0.0
        breaker = route.breaker if protocol == "http" else route.grpc_breaker
        return float(breaker.state) if breaker is not None else 0.0

    def _close_later(self, pool: UpstreamPool) -> None:
        task = asyncio.get_running_loop().create_task(pool.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _pool(self, url: str) -> UpstreamPool:
        pool = self._pools.get(url)
        if pool is None:
            settings = self.settings
            pool = self._pools[url] = UpstreamPool(
                url,
                max_connections=settings.max_connections,
                connect_timeout=settings.connect_timeout,
                idle_timeout=settings.idle_timeout,
                response_limit=settings.response_limit,
                memory_limit=settings.response_memory,
            )
        return pool

    async def close(self, grace: float) -> None:
        """Wait (up to `grace` seconds) for shadow copies in flight, so their rows are recorded; close the pools."""
        if self._mirrors:
            await asyncio.wait(list(self._mirrors), timeout=grace)
        for pool in self._pools.values():
            await pool.close()

    # requests
    async def handle(self, request: Request, client_id: bytes | None) -> Response:
        """Answer one model API request. `client_id` is the client's (valid) X-Request-Id header, if any."""
        route = self.route
        if route is None:
            return error_response(503, "the router has no configuration yet", client_id)
        try:
            found = match(route.config.protocol, request.method, request.path)
        except UnknownPath as exc:
            return self.refuse(404, f"no such path: {request.path}. {exc}", client_id)
        except BadPathSegment as exc:
            return self.refuse(400, str(exc), client_id)
        except WrongMethod as exc:
            response = self.refuse(405, f"{request.method} is not allowed on {request.path}: {exc}", client_id)
            response.headers.append((b"Allow", exc.allow.encode()))
            return response
        if found.model is not None and found.model not in route.names:
            served = route.config.production.model_name
            return self.refuse(404, f"model {found.model!r} is not served here; call it {served!r}", client_id)
        if found.kind is Kind.PASSTHROUGH:
            return await self._passthrough(route, request, found, client_id or new_request_id())
        return await self._infer(route, request, found, client_id)

    def refuse(self, status: int, message: str, request_id: bytes | None) -> Response:
        """The router's own 4xx for a request it will not pass on, counted in refusals_total{protocol="http"}."""
        counter = self._refusals.get(status)
        if counter is None:
            counter = self._refusals[status] = self.metrics.refusals.labels("http", str(status))
        counter.inc()
        return error_response(status, message, request_id)

    async def _passthrough(self, route: Route, request: Request, found: Match, request_id: bytes) -> Response:
        config = route.config
        promoted = config.candidate_answers_all
        side, pool, upstream = (
            ("candidate", route.candidate, config.candidate)
            if promoted
            else ("production", route.production, config.production)
        )
        template = found.candidate_template if promoted else found.template
        target = self._target(template, upstream.model_name, request.query)
        answer = await self._call(
            pool,
            side,
            "answer",
            request.method.encode(),
            target,
            self._forward_headers(request, request_id, reading=False),
            request.body,
            config.timeout_seconds,
        )
        return self._respond(answer, side, request_id)

    async def _read_body(self, request: Request) -> bytes:
        """The request body with its Content-Encoding undone (bounded); the body itself when it has none."""
        coding = request.header(CONTENT_ENCODING)
        if coding is None or not codings.codings(coding):
            return request.body
        limit = self.settings.decoded_limit
        if len(request.body) <= INLINE_DECODE_BYTES:
            return codings.decode(request.body, coding, limit)
        return await asyncio.to_thread(codings.decode, request.body, coding, limit)

    async def _infer(self, route: Route, request: Request, found: Match, client_id: bytes | None) -> Response:
        try:
            body = await self._read_body(request)
        except codings.CodingError as exc:
            return self.refuse(exc.status, str(exc), client_id)
        document = body
        binary_header = request.header(INFERENCE_HEADER)
        if binary_header is not None:  # binary tensor data extension: a JSON header, then raw tensors
            try:
                document = body[: json_header_length(binary_header, len(body))]
            except ValueError as exc:
                return self.refuse(400, str(exc), client_id)
        elif not _is_json_type(request.header(b"content-type")):
            return self.refuse(
                415,
                "send the request body as JSON (Content-Type: application/json), or as a JSON header and "
                "binary tensors with Inference-Header-Content-Length",
                client_id,
            )
        if not document:
            return self.refuse(400, "the request body is empty; send a JSON document", client_id)
        try:
            parsed = decode_json(document)
        except (ValueError, UnicodeDecodeError) as exc:
            return self.refuse(400, f"malformed JSON in the request body: {exc}", client_id)
        request_id = client_id
        if request_id is None:
            request_id = body_request_id(route.config.protocol, parsed)
            if request_id is None:
                request_id = new_request_id()
            elif not valid_request_id(request_id):
                return self.refuse(
                    400,
                    "the body's id is used as the request id and must be 1 to 200 visible ASCII characters; "
                    "change it, or send your own X-Request-Id header",
                    None,
                )
        received = now_us()
        started = time.perf_counter()
        config = route.config
        key = (request.header(route.sticky) if route.sticky else None) or request_id
        candidate_share = to_candidate(key, route.salt, route.limit)
        recorded_key = (key_text(key) if route.sticky else None, _segment(route, request, parsed))
        headers = self._forward_headers(request, request_id)
        features = None
        if self.settings.record_features:
            # The JSON part (binary tensors left out). JSONB cannot hold U+0000: stored as U+FFFD rather than
            # have the row refused.
            features = document.decode().replace("\\u0000", "\\ufffd")
        production_target = self._target(found.template, config.production.model_name, request.query)
        candidate_target = self._target(found.candidate_template, config.candidate.model_name, request.query)

        if config.mode is TrafficMode.SHADOW:
            mirror: asyncio.Task[Answer] | Answer | None = None
            if candidate_share:
                mirrored = headers
                if route.mirror_drop:  # the client's credentials are for production, not for a model under test
                    mirrored = [(name, value) for name, value in headers if name not in route.mirror_drop]
                mirror = self._mirror(route, candidate_target, mirrored, request.body)
            production = await self._infer_call(route, "production", "answer", production_target, headers, request.body)
            response = self._respond(production, "production", request_id, started)

            def record_shadow(done: asyncio.Task[Answer] | None = None) -> None:
                if isinstance(mirror, asyncio.Task) and not mirror.done():
                    mirror.add_done_callback(record_shadow)
                    return
                candidate = _mirrored(mirror) if isinstance(mirror, asyncio.Task) else mirror
                self._record(
                    route, received, request_id, "production", production, candidate, False, features, recorded_key
                )

            response.after = record_shadow
            return response

        if not candidate_share:
            production = await self._infer_call(route, "production", "answer", production_target, headers, request.body)
            return self._answered(
                route, received, request_id, started, "production", production, None, False, features, recorded_key
            )
        candidate = await self._infer_call(route, "candidate", "answer", candidate_target, headers, request.body)
        if candidate.failed and config.fallback_to_production:
            self.metrics.fallbacks.inc()
            production = await self._infer_call(
                route, "production", "fallback", production_target, headers, request.body
            )
            return self._answered(
                route, received, request_id, started, "production", production, candidate, True, features, recorded_key
            )
        return self._answered(
            route, received, request_id, started, "candidate", None, candidate, False, features, recorded_key
        )

    def _answered(
        self,
        route: Route,
        received: int,
        request_id: bytes,
        started: float,
        served_by: str,
        production: Answer | None,
        candidate: Answer | None,
        fallback: bool,
        features: str | None,
        key: tuple[str | None, str | None],
    ) -> Response:
        answer = production if served_by == "production" else candidate
        assert answer is not None
        response = self._respond(answer, served_by, request_id, started)
        response.after = lambda: self._record(
            route, received, request_id, served_by, production, candidate, fallback, features, key
        )
        return response

    def _mirror(
        self, route: Route, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> asyncio.Task[Answer] | Answer | None:
        """The shadow copy in flight; the candidate's failure when its breaker skips the copy; None when the
        copy is dropped (too many in flight: the row then has no candidate side)."""
        breaker = route.breaker
        ticket = 0
        if breaker is not None:
            admitted = breaker.admit()
            if admitted is None:
                return self._skip(breaker, "mirror")
            ticket = admitted
        if self.mirrors_full():
            if breaker is not None:
                breaker.release(ticket)
            return None
        task = asyncio.get_running_loop().create_task(
            self._call(
                route.candidate,
                "candidate",
                "mirror",
                b"POST",
                target,
                headers,
                body,
                route.config.mirror_timeout_seconds,
                breaker,
                ticket,
            )
        )
        self.track_mirror(task)
        return task

    def _skip(self, breaker: Breaker, role: str) -> Answer:
        self.count_skip(role)
        return _skipped(breaker)

    def count_skip(self, role: str) -> None:
        """A candidate call the open breaker skipped, in requests_total as circuit_open (HTTP and gRPC alike; no
        latency: it took none)."""
        key = ("candidate", role, CIRCUIT_OPEN)
        counter = self._calls.get(key)
        if counter is None:
            counter = self._calls[key] = self.metrics.requests.labels(*key)
        counter.inc()

    def mirrors_full(self) -> bool:
        """Whether --mirror-concurrency copies (HTTP and gRPC together) are in flight; counts the drop if so."""
        if len(self._mirrors) >= self.settings.mirror_concurrency:
            self.metrics.mirror_dropped.inc()
            return True
        return False

    def track_mirror(self, task: asyncio.Task[Any]) -> None:
        """A shadow copy in flight: counted against the limit, and waited for at shutdown."""
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    @staticmethod
    def _target(template: str, model: str, query: bytes) -> bytes:
        path = template.format(model=model).encode()
        return path + b"?" + query if query else path

    @staticmethod
    def _forward_headers(request: Request, request_id: bytes, reading: bool = True) -> list[tuple[bytes, bytes]]:
        """The client's headers for a model server, less hop-by-hop ones, with the request id. When the
        router reads the answer (`reading`), Accept-Encoding keeps only the codings it can decode."""
        named_hops: set[bytes] = set()
        connection = request.header(b"connection")
        if connection:
            named_hops = {token.strip().lower() for token in connection.split(b",")}
        headers = []
        for name, value in request.headers:
            if name in _HOP_BY_HOP or name in named_hops:
                continue
            if name == _ACCEPT_ENCODING and reading:
                readable = codings.accepted(value)
                if readable is None:
                    continue
                value = readable
            headers.append((name, value))
        headers.append((_REQUEST_ID, request_id))
        return headers

    def _infer_call(
        self, route: Route, side: str, role: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Coroutine[Any, Any, Answer]:
        """A call that answers an inference request (or falls back for one): POST, the answer's time limit; the
        candidate's through its breaker."""
        limit = route.config.timeout_seconds
        if side == "production":
            return self._call(route.production, side, role, b"POST", target, headers, body, limit)
        breaker = route.breaker
        ticket = 0
        if breaker is not None:
            admitted = breaker.admit()
            if admitted is None:
                return _answered_now(self._skip(breaker, role))
            ticket = admitted
        return self._call(route.candidate, side, role, b"POST", target, headers, body, limit, breaker, ticket)

    async def _call(
        self,
        pool: UpstreamPool,
        side: str,
        role: str,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        time_limit: float,
        breaker: Breaker | None = None,
        ticket: int = 0,
    ) -> Answer:
        """One call to a model server; its outcome goes to `breaker` (the candidate's) under `ticket`."""
        started = time.perf_counter()
        try:
            response = await pool.request(method, target, headers, body, time_limit)
        except UpstreamError as exc:
            latency_ms = (time.perf_counter() - started) * 1000
            answer = Answer(None, exc.kind, exc.detail, latency_ms, None)
            label = exc.kind
        except BaseException:
            if breaker is not None:
                breaker.release(ticket)  # cut short (cancelled): no verdict on the candidate
            raise
        else:
            latency_ms = (time.perf_counter() - started) * 1000
            answer = Answer(response.status, None, "", latency_ms, response)
            label = str(response.status)
        if breaker is not None:
            breaker.record(ticket, answer.error in BREAKER_FAILURES)
        self.count_call(side, role, label, latency_ms)
        return answer

    def count_call(self, side: str, role: str, label: str, latency_ms: float) -> None:
        """A model server call in requests_total and upstream_latency_seconds (HTTP and gRPC alike)."""
        counter = self._calls.get((side, role, label))
        if counter is None:
            counter = self._calls[(side, role, label)] = self.metrics.requests.labels(side, role, label)
        counter.inc()
        histogram = self._latencies.get((side, role))
        if histogram is None:
            histogram = self._latencies[(side, role)] = self.metrics.upstream_latency.labels(side, role)
        histogram.observe(latency_ms / 1000)

    def _respond(self, answer: Answer, side: str, request_id: bytes, started: float | None = None) -> Response:
        upstream = answer.response
        if upstream is None:
            status = 504 if answer.error == TIMEOUT else 503 if answer.error == CIRCUIT_OPEN else 502
            response = error_response(status, f"the {side} model server failed: {answer.detail}", request_id)
            response.headers.append((_SERVED_BY, side.encode()))
        else:
            headers = [(name, value) for name, value in upstream.headers if name not in _HOP_BY_HOP]
            headers.append((_REQUEST_ID, request_id))
            headers.append((_SERVED_BY, side.encode()))
            response = Response(upstream.status, upstream.body, headers)
        counter = self._responses.get(response.status)
        if counter is None:
            counter = self._responses[response.status] = self.metrics.responses.labels(str(response.status))
        counter.inc()
        if started is not None:
            self._request_latency[side].observe(time.perf_counter() - started)
        return response

    # recording
    def _record(
        self,
        route: Route,
        received: int,
        request_id: bytes,
        served_by: str,
        production: Answer | None,
        candidate: Answer | None,
        fallback: bool,
        features: str | None,
        key: tuple[str | None, str | None],
    ) -> None:
        if self._recent.seen(request_id):
            self.metrics.duplicate_ids.inc()
        config = route.config
        self.put_row(
            route,
            received,
            request_id,
            served_by,
            self._side(route.extractor, config.production.version, production),
            self._side(route.extractor, config.candidate.version, candidate),
            fallback,
            features,
            key,
        )

    def put_row(
        self,
        route: Route,
        received: int,
        request_id: bytes,
        served_by: str,
        production: Row,
        candidate: Row,
        fallback: bool,
        features: str | None,
        key: tuple[str | None, str | None],
    ) -> None:
        """Queue one predictions row (HTTP and gRPC alike); each side is (version, prediction, confidence,
        latency_ms, status, error), all None for a side that was not called; `key`: the sticky key the side was
        chosen by (None without stickyHeader) and the request's segment (None without segmentBy or when the
        request has none)."""
        config = route.config
        row: Row = (
            received,
            config.namespace,
            config.deployment,
            request_id.decode(),
            served_by,
            config.mode.value,
            config.weight,
            route.revision,
            *production,
            *candidate,
            fallback,
            features,
            *key,
        )
        self.recorder.put(row)

    def _side(self, extract: Extractor, version: str, answer: Answer | None) -> Row:
        """(version, prediction, confidence, latency_ms, status, error); all None when the side was not called."""
        if answer is None:
            return (None, None, None, None, None, None)
        prediction = confidence = None
        error = answer.error
        if answer.response is not None and 200 <= answer.status < 300:  # type: ignore[operator]
            response = answer.response
            json_length, coding = answer_format(response.headers)
            body = response.body
            try:
                if coding is not None:
                    try:
                        body = codings.decode(body, coding, self.settings.decoded_limit)
                    except codings.CodingError:
                        body = b""  # recorded as no_prediction: the answer went to the client untouched
                prediction, confidence = extract(body, json_length)
            except Exception:  # whatever a model server answers, the row is recorded
                log.exception("could not read the prediction from a %d-byte answer", len(response.body))
                prediction = confidence = None
            if prediction is None:
                error = NO_PREDICTION
        latency = None if answer.latency_ms is None else round(answer.latency_ms, 3)
        return (version, prediction, confidence, latency, answer.status, error)
