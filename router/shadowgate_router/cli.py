"""`shadowgate router`: run the data plane in front of a production and a candidate model server.

In a pod everything comes from the environment the operator sets (POD_NAMESPACE,
SHADOWGATE_ROUTER_CONFIGMAP, SHADOWGATE_DSN, SHADOWGATE_OUTCOME_TOKEN, SHADOWGATE_SPOOL_DIR); on a
laptop, point it at a kubeconfig, or at a local JSON file with --config-file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from shadowgate_router.breaker import BreakerSettings
from shadowgate_router.config import (
    CONFIG_KEY,
    DRAIN_SECONDS,
    ENV_CONFIGMAP,
    ENV_DSN,
    ENV_NAMESPACE,
    ENV_OUTCOME_TOKEN,
    ENV_SPOOL_DIR,
    FLUSH_SECONDS,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
)

log = logging.getLogger("shadowgate_router")
BREAKER = BreakerSettings()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "router",
        help="run the router: split or mirror traffic to the candidate and record every prediction",
        description=(
            "Serve the model API in front of the production and candidate model servers: answer from "
            "production (shadow) or from the candidate for its share (canary), mirror the share in the "
            "background, and record one row per request and every POSTed outcome in PostgreSQL. "
            "Serves /healthz, /readyz (ready once a valid configuration is loaded) and POST /outcomes, and "
            "/metrics on a port of its own."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_argument_group("configuration (the ConfigMap the operator writes, or a local file)")
    source.add_argument(
        "--configmap",
        default=os.environ.get(ENV_CONFIGMAP),
        help=f"ConfigMap to watch, <shadowdeployment>-router [${ENV_CONFIGMAP}]",
    )
    source.add_argument(
        "--namespace", default=os.environ.get(ENV_NAMESPACE), help=f"namespace of the ConfigMap [${ENV_NAMESPACE}]"
    )
    source.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig to reach the API server [$KUBECONFIG; in a pod, its service account]",
    )
    source.add_argument("--context", default=None, help="kubeconfig context [its current-context]")
    source.add_argument(
        "--config-file",
        type=Path,
        default=None,
        help=f"development: read the configuration (the ConfigMap's {CONFIG_KEY} document) from "
        "this file instead of a ConfigMap; re-read when it changes",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument("--listen", default=f"0.0.0.0:{HTTP_PORT}", help="HOST:PORT to listen on (HTTP/1.1)")
    serving.add_argument(
        "--grpc-listen",
        default=f"0.0.0.0:{GRPC_PORT}",
        help="HOST:PORT to serve gRPC on (inference.GRPCInferenceService, protocol v2); 'off' to not serve it",
    )
    serving.add_argument(
        "--metrics-listen",
        default=f"0.0.0.0:{METRICS_PORT}",
        help="HOST:PORT for Prometheus' /metrics (kept off the traffic port)",
    )
    serving.add_argument(
        "--body-limit", type=int, default=10 * 1024 * 1024, help="largest request body accepted, in bytes (bigger: 413)"
    )
    serving.add_argument(
        "--decoded-limit",
        type=int,
        default=10 * 1024 * 1024,
        help="largest gzip/deflate body, once decoded, that the router reads: a bigger request gets 413, "
        "a bigger answer is passed on but its prediction is not recorded",
    )
    serving.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections per model server; callers beyond it wait within their timeout",
    )
    serving.add_argument("--connect-timeout", type=float, default=2.0, help="seconds to connect to a model server")
    serving.add_argument(
        "--mirror-concurrency",
        type=int,
        default=512,
        help="shadow copies in flight at once; beyond it copies are dropped and counted",
    )
    serving.add_argument(
        "--response-limit",
        type=int,
        default=10 * 1024 * 1024,
        help="largest answer body taken from a model server, in bytes (bigger: the call fails as bad_response)",
    )
    serving.add_argument(
        "--response-memory-mb",
        type=int,
        default=64,
        help="per model server, MiB of answers being received at once; beyond it calls fail as bad_response "
        "(a misbehaving candidate cannot take the router's memory, nor production's share of it)",
    )
    serving.add_argument(
        "--breaker-failures",
        type=int,
        default=BREAKER.failures,
        help="candidate calls failing in a row with no usable answer (connect, timeout, closed, bad_response) "
        "that open its circuit breaker: no calls to it for --breaker-cool-off seconds, each skipped one recorded "
        "as a candidate failure (circuit_open); 0 turns the breaker off. Production is never behind it",
    )
    serving.add_argument(
        "--breaker-cool-off",
        type=float,
        default=BREAKER.cool_off,
        help="seconds the candidate's open breaker makes no calls before letting a few through; doubled each "
        f"time they fail too, up to {BREAKER.max_cool_off:g}",
    )
    serving.add_argument(
        "--record-features", action="store_true", help="store each request body in predictions.features (JSONB)"
    )
    serving.add_argument(
        "--drain-seconds",
        type=float,
        default=DRAIN_SECONDS,
        help="on SIGTERM, how long to wait for requests in flight and shadow copies",
    )
    serving.add_argument(
        "--flush-seconds",
        type=float,
        default=FLUSH_SECONDS,
        help="then how long to try to write what is left to the database (both tables at once); "
        "the rest stays in the spool for the next start",
    )
    recording = parser.add_argument_group("recording")
    recording.add_argument(
        "--dsn",
        default=os.environ.get(ENV_DSN),
        help=f"PostgreSQL/TimescaleDB URL, e.g. postgresql://user@host/db [${ENV_DSN}]",
    )
    recording.add_argument(
        "--outcome-token-file",
        type=Path,
        default=None,
        help=f"file holding the bearer token for POST /outcomes [${ENV_OUTCOME_TOKEN}]",
    )
    recording.add_argument(
        "--spool-dir",
        type=Path,
        default=os.environ.get(ENV_SPOOL_DIR),
        help=f"the write-ahead spool: every row is on disk here within a flush interval until the database "
        f"has it [${ENV_SPOOL_DIR}; "
        "default: a shadowgate-spool directory in the system temp dir]",
    )
    recording.add_argument(
        "--memory-rows",
        type=int,
        default=20_000,
        help="rows per table kept in memory, besides on disk, while they wait for the database "
        "(older ones are read back from the spool)",
    )
    recording.add_argument(
        "--spool-limit-mb",
        type=int,
        default=400,
        help="disk the spool may use per table (predictions, outcomes); beyond it rows are dropped and counted",
    )
    recording.add_argument("--batch-rows", type=int, default=2_000, help="rows per COPY batch")
    recording.add_argument(
        "--flush-interval", type=float, default=0.2, help="seconds between writes when batches are not full"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"shadowgate router: error: {message}", file=sys.stderr)
    return 2


GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"
"""grpcio's I/O for the router unless $GRPC_EXPERIMENTS says otherwise: its classic pollers, not the EventEngine.
With the EventEngine (grpcio's default since 1.6x) every gRPC message is read and written on an EventEngine
thread and handed to the completion queue's poller thread, then to the event loop; with the classic pollers
the poller thread does the socket I/O itself. bench/router/grpc_cpu.py measured about 15% less CPU per
mirrored ModelInfer (2,020 -> 1,747 us on the 2-core bench machine), the same on a bare grpc.aio proxy.
grpcio reads it once, when it is first imported: so it is set before anything imports grpc."""


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    from shadowgate_common.kubeaccess import KubeAccessError
    from shadowgate_common.kubeaccess import load as load_kube_access
    from shadowgate_router.app import RouterApp, Settings
    from shadowgate_router.configwatch import ConfigFile, ConfigMapWatch
    from shadowgate_router.proxy import ProxySettings

    if not args.dsn:
        return _fail(f"no database: pass --dsn or set {ENV_DSN}")
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        return _fail(f"--listen {args.listen!r} is not HOST:PORT")
    grpc_host: str | None = None
    grpc_port = "0"
    if args.grpc_listen != "off":
        grpc_host, _, grpc_port = args.grpc_listen.rpartition(":")
        if not grpc_port.isdigit():
            return _fail(f"--grpc-listen {args.grpc_listen!r} is not HOST:PORT or 'off'")
        grpc_host = grpc_host.strip("[]") or "0.0.0.0"
    metrics_host, _, metrics_port = args.metrics_listen.rpartition(":")
    if not metrics_port.isdigit():
        return _fail(f"--metrics-listen {args.metrics_listen!r} is not HOST:PORT")
    token = os.environ.get(ENV_OUTCOME_TOKEN) or None
    if args.outcome_token_file is not None:
        try:
            token = args.outcome_token_file.read_text().strip() or None
        except OSError as exc:
            return _fail(f"cannot read {args.outcome_token_file}: {exc.strerror}")
    if token is None:
        log.warning("no outcome token (%s): POST /outcomes will be refused", ENV_OUTCOME_TOKEN)
    settings = Settings(
        dsn=args.dsn,
        spool_dir=args.spool_dir or Path(tempfile.gettempdir()) / "shadowgate-spool",
        host=host.strip("[]") or "0.0.0.0",
        port=int(port),
        grpc_host=grpc_host,
        grpc_port=int(grpc_port),
        metrics_host=metrics_host.strip("[]") or "0.0.0.0",
        metrics_port=int(metrics_port),
        outcome_token=token,
        body_limit=args.body_limit,
        proxy=ProxySettings(
            max_connections=args.max_connections,
            connect_timeout=args.connect_timeout,
            mirror_concurrency=args.mirror_concurrency,
            record_features=args.record_features,
            decoded_limit=args.decoded_limit,
            response_limit=args.response_limit,
            response_memory=args.response_memory_mb * 1024 * 1024,
            breaker=BreakerSettings(
                failures=args.breaker_failures,
                cool_off=args.breaker_cool_off,
                max_cool_off=max(args.breaker_cool_off, BREAKER.max_cool_off),
            ),
        ),
        memory_rows=args.memory_rows,
        batch_rows=args.batch_rows,
        flush_interval=args.flush_interval,
        spool_max_bytes=args.spool_limit_mb * 1024 * 1024,
        drain_seconds=args.drain_seconds,
        flush_seconds=args.flush_seconds,
    )
    app = RouterApp(settings)
    source: ConfigFile | ConfigMapWatch
    if args.config_file is not None:
        source = ConfigFile(args.config_file, app.offer)
    else:
        if not args.configmap or not args.namespace:
            return _fail(
                f"name the ConfigMap (--configmap/${ENV_CONFIGMAP} and --namespace/${ENV_NAMESPACE}), "
                "or give --config-file"
            )
        try:
            access = load_kube_access(args.kubeconfig, args.context)
        except KubeAccessError as exc:
            return _fail(str(exc))
        source = ConfigMapWatch(
            access, args.namespace, args.configmap, app.offer, on_error=lambda _: app.metrics.config_errors.inc()
        )
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(app.serve_until_signalled(source))
    return 0


def _loop_factory() -> Any:
    """uvloop when installed: its event loop and transports roughly halve the router's per-request cost."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms working
        return None
    return uvloop.new_event_loop
