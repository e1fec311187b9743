"""One router process: wires the HTTP server, the proxy, the recorders and the config source together,
answers its own endpoints (/healthz, /readyz, /outcomes; /metrics on a port of its own) and shuts down in
order.

Shutdown order matters for "nothing lost": stop being ready and stop listening, let requests in flight
finish and wait for shadow copies (their rows are recorded only when they end), both within
`drain_seconds`; then both recorders put what they hold on disk at once and flush to the database in
parallel for up to `flush_seconds` (what it does not take stays in the spool, replayed by the next start).
The operator sets the pod's grace period from these two (`shutdown_seconds`), so the SIGKILL that ends a
grace period never cuts a flush short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol as TypingProtocol

from shadowgate_router import outcomes
from shadowgate_router.config import (
    DRAIN_SECONDS,
    FLUSH_SECONDS,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    RouterConfig,
    RouterConfigError,
)
from shadowgate_router.grpcproxy import GrpcProxy
from shadowgate_router.httpserver import HttpServer, Request, Response, error_response, json_response, new_request_id
from shadowgate_router.metrics import RouterMetrics
from shadowgate_router.proxy import Proxy, ProxySettings, valid_request_id
from shadowgate_router.recorder import OUTCOME_COLUMNS, OUTCOME_CONFLICT, PREDICTION_COLUMNS, Recorder

log = logging.getLogger(__name__)

_OWN_PATHS = frozenset({"/healthz", "/readyz", "/outcomes"})


class ConfigSource(TypingProtocol):
    async def run(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    dsn: str
    spool_dir: Path
    host: str = "0.0.0.0"
    port: int = HTTP_PORT
    grpc_host: str | None = "0.0.0.0"
    """Where gRPC (inference.GRPCInferenceService) is served; None: not at all."""
    grpc_port: int = GRPC_PORT
    metrics_host: str = "0.0.0.0"
    metrics_port: int = METRICS_PORT
    """Prometheus' /metrics, apart from the traffic port (0: any free port)."""
    outcome_token: str | None = None
    body_limit: int = 10 * 1024 * 1024
    proxy: ProxySettings = field(default_factory=ProxySettings)
    memory_rows: int = 20_000
    batch_rows: int = 2_000
    flush_interval: float = 0.2
    spool_max_bytes: int = 400 * 1024 * 1024
    """Per table; beyond it rows are dropped and counted (two tables fit the operator's 1 GiB emptyDir)."""
    drain_seconds: float = DRAIN_SECONDS
    """How long shutdown waits for requests and shadow copies in flight."""
    flush_seconds: float = FLUSH_SECONDS
    """How long it then tries to write what is left to the database (both tables at once)."""


class RouterApp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = RouterMetrics()
        self.config: RouterConfig | None = None
        self.closing = False
        self.predictions: Recorder | None = None
        self.outcomes: Recorder | None = None
        self.proxy: Proxy | None = None
        self.server: HttpServer | None = None
        self.grpc: GrpcProxy | None = None
        self.metrics_server: HttpServer | None = None
        self._source_task: asyncio.Task[None] | None = None

    # configuration
    def offer(self, data: Mapping[str, str] | None, origin: str) -> None:
        """Apply a ConfigMap's data if it is valid; otherwise log, count and keep the last good one."""
        try:
            config = RouterConfig.from_configmap_data(data)
        except RouterConfigError as exc:
            self.metrics.config_refused.inc()
            kept = f"keeping revision {self.config.revision}" if self.config else "not ready until a valid one arrives"
            log.error("refused the configuration from %s (%s):\n%s", origin, kept, exc)
            return
        if self.config is not None and config == self.config:
            return
        assert self.proxy is not None
        self.proxy.apply(config)
        if self.grpc is not None:
            self.grpc.apply(config)
        if self.config is not None:
            old = self.config
            self.metrics.config_info.remove(old.revision, old.mode.value, old.phase)
        self.config = config
        self.metrics.config_info.labels(config.revision, config.mode.value, config.phase).set(1)
        self.metrics.config_weight.set(config.weight)
        self.metrics.config_applied.inc()
        log.info(
            "applied configuration %s from %s: %s %d%% to %s (%s), phase %s",
            config.revision,
            origin,
            config.mode.value,
            config.weight,
            config.candidate.name,
            config.candidate.version,
            config.phase,
        )

    # lifecycle
    async def start(self, source: ConfigSource) -> None:
        settings = self.settings
        self.predictions, self.outcomes = (
            Recorder(
                table,
                columns,
                settings.dsn,
                settings.spool_dir,
                self.metrics,
                memory_rows=settings.memory_rows,
                batch_rows=settings.batch_rows,
                flush_interval=settings.flush_interval,
                spool_max_bytes=settings.spool_max_bytes,
                conflict=conflict,
            )
            for table, columns, conflict in (
                ("predictions", PREDICTION_COLUMNS, None),
                ("outcomes", OUTCOME_COLUMNS, OUTCOME_CONFLICT),
            )
        )
        self.predictions.start()
        self.outcomes.start()
        self.proxy = Proxy(self.predictions, self.metrics, settings.proxy)
        self.server = HttpServer(self.handle, body_limit=settings.body_limit)
        self.server.on_refusal = lambda status: self.metrics.refusals.labels("http", str(status)).inc()
        await self.server.start(settings.host, settings.port)
        if settings.grpc_host is not None:
            self.grpc = GrpcProxy(self.proxy, message_limit=settings.body_limit)
            await self.grpc.start(settings.grpc_host, settings.grpc_port)
        self.metrics_server = HttpServer(self.handle_metrics, body_limit=0)
        await self.metrics_server.start(settings.metrics_host, settings.metrics_port)
        self._source_task = asyncio.get_running_loop().create_task(source.run(), name="config-source")
        # Everything allocated so far lives as long as the process: keep the collector from re-scanning
        # it, which otherwise shows up as 20-30 ms pauses in the tail latency.
        gc.collect()
        gc.freeze()
        log.info(
            "router listening on %s:%d (metrics on %s:%d)",
            settings.host,
            self.server.port,
            settings.metrics_host,
            self.metrics_server.port,
        )
        if self.grpc is not None:
            log.info("router serving gRPC on %s:%d", settings.grpc_host, self.grpc.port)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def metrics_port(self) -> int:
        assert self.metrics_server is not None
        return self.metrics_server.port

    async def stop(self) -> None:
        """Within drain_seconds + flush_seconds whatever happens (the pod's grace period allows for both)."""
        self.closing = True
        loop = asyncio.get_running_loop()
        drained_by = loop.time() + self.settings.drain_seconds
        stopping = []
        if self.server is not None:
            stopping.append(self.server.shutdown(self.settings.drain_seconds))
        if self.grpc is not None:
            stopping.append(self.grpc.stop(self.settings.drain_seconds))
        await asyncio.gather(*stopping)
        if self.proxy is not None:
            await self.proxy.close(max(0.0, drained_by - loop.time()))  # waits for shadow copies, gRPC ones too
        if self.grpc is not None:
            await self.grpc.close()
        if self._source_task is not None:
            self._source_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._source_task
        recorders = [recorder for recorder in (self.predictions, self.outcomes) if recorder is not None]
        await asyncio.gather(*(recorder.close(self.settings.flush_seconds) for recorder in recorders))
        if self.metrics_server is not None:  # the last to go: the drain can be watched
            await self.metrics_server.shutdown(1.0)
        log.info("router stopped")

    async def serve_until_signalled(self, source: ConfigSource) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.start(source)
        source_task = self._source_task
        assert source_task is not None
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, source_task], return_when=asyncio.FIRST_COMPLETED)
        if source_task.done() and not source_task.cancelled() and source_task.exception() is not None:
            log.error("the configuration source failed", exc_info=source_task.exception())
        waiter.cancel()
        log.info("shutting down: draining requests and flushing recorded rows")
        await self.stop()

    # requests
    async def handle(self, request: Request) -> Response:
        client_id = request.header(b"x-request-id")
        if client_id is not None and not valid_request_id(client_id):
            self.metrics.refusals.labels("http", "400").inc()
            return error_response(400, "X-Request-Id must be 1 to 200 visible ASCII characters")
        path = request.path
        if path not in _OWN_PATHS:
            assert self.proxy is not None
            return await self.proxy.handle(request, client_id)
        request_id = client_id or new_request_id()
        if path == "/healthz":
            return json_response(200, {"status": "ok"}, [(b"X-Request-Id", request_id)])
        if path == "/readyz":
            return self._readiness(request_id)
        return self._outcomes(request, request_id)

    async def handle_metrics(self, request: Request) -> Response:
        """The metrics port: GET /metrics, nothing else."""
        if request.path != "/metrics":
            return error_response(404, "this port serves GET /metrics only")
        if request.method not in ("GET", "HEAD"):
            return error_response(405, "use GET on /metrics")
        body, content_type = self.metrics.render()
        return Response(200, body, [(b"Content-Type", content_type)])

    def _readiness(self, request_id: bytes) -> Response:
        if self.closing:
            return error_response(503, "shutting down", request_id)
        if self.config is None:
            return error_response(503, "no valid configuration yet", request_id)
        return json_response(
            200, {"status": "ready", "revision": self.config.revision}, [(b"X-Request-Id", request_id)]
        )

    def _outcomes(self, request: Request, request_id: bytes) -> Response:
        refusals = self.metrics.outcome_refusals
        if request.method != "POST":
            refusals.labels("405").inc()
            response = error_response(405, "use POST on /outcomes", request_id)
            response.headers.append((b"Allow", b"POST"))
            return response
        try:
            outcomes.check_token(self.settings.outcome_token, request.header(b"authorization"))
            if self.config is None:
                raise outcomes.OutcomeRefused(503, "the router has no configuration yet")
            accepted = outcomes.parse(request.body)
        except outcomes.OutcomeRefused as exc:
            refusals.labels(str(exc.status)).inc()
            response = error_response(exc.status, str(exc), request_id)
            if exc.status == 401:
                response.headers.append((b"WWW-Authenticate", b'Bearer realm="shadowgate outcomes"'))
            return response
        assert self.outcomes is not None
        for row in outcomes.to_rows(accepted, self.config.namespace, self.config.deployment):
            self.outcomes.put(row)
        self.metrics.outcomes.inc(len(accepted))
        return json_response(202, {"accepted": len(accepted)}, [(b"X-Request-Id", request_id)])
