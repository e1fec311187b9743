"""The floor for the router's gRPC path: a bare grpc.aio bytes proxy with no shadowgate logic.

One grpc.aio server, one generic handler: every call's bytes go to production (awaited, answered) and, with
--mirror, a copy goes to the candidate in the background. No metadata handling, no parsing, no recording.
bench/router/grpc_cpu.py runs it beside the router so that the CPU grpcio itself takes per proxied call can
be told from what the router adds. With --sync N the same proxy runs on grpcio's synchronous server (a pool of
N threads) and blocking client calls instead of grpc.aio, to compare the two set-ups on the same work.

    .venv/bin/python bench/router/bare_grpc_proxy.py --listen 127.0.0.1:9000 --production 127.0.0.1:9001 \
        --candidate 127.0.0.1:9002 --mirror
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
from collections.abc import Callable
from typing import Any

import grpc
import uvloop


def callables(to_production: Any, to_candidate: Any | None) -> Callable[[str, bool], Any]:
    """callable_for(method, mirror): the channel's unary-unary callable for a method, made once per method and
    side (grpc.aio and sync channels alike)."""
    calls: dict[tuple[str, bool], Any] = {}

    def callable_for(method: str, mirror: bool) -> Any:
        found = calls.get((method, mirror))
        if found is None:
            channel = to_candidate if mirror else to_production
            assert channel is not None
            found = calls[(method, mirror)] = channel.unary_unary(method)
        return found

    return callable_for


async def serve(listen: str, production: str, candidate: str | None, initial_metadata: bool) -> None:
    to_production = grpc.aio.insecure_channel(production)
    to_candidate = grpc.aio.insecure_channel(candidate) if candidate else None
    callable_for = callables(to_production, to_candidate)
    background: set[asyncio.Task[Any]] = set()

    async def mirror(method: str, data: bytes) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await callable_for(method, True)(data, timeout=10)

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            method = details.method

            async def forward(data: bytes, context: Any) -> bytes:
                if to_candidate is not None:
                    task = asyncio.get_running_loop().create_task(mirror(method, data))
                    background.add(task)
                    task.add_done_callback(background.discard)
                answer: bytes = await callable_for(method, False)(data, timeout=10)
                if initial_metadata:
                    await context.send_initial_metadata((("x-request-id", "bare"),))
                return answer

            return grpc.unary_unary_rpc_method_handler(forward)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([Handler()])
    server.add_insecure_port(listen)
    await server.start()
    gc.collect()
    gc.freeze()
    await server.wait_for_termination()


def serve_sync(listen: str, production: str, candidate: str | None, initial_metadata: bool, threads: int) -> None:
    """The same proxy on grpcio's synchronous server (a thread pool) and blocking client calls: the mirror
    is sent with the client's `future()` (grpcio's own channel thread completes it), production awaited in
    the handler's thread."""
    from concurrent import futures

    to_production = grpc.insecure_channel(production)
    to_candidate = grpc.insecure_channel(candidate) if candidate else None
    callable_for = callables(to_production, to_candidate)

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            method = details.method

            def forward(data: bytes, context: Any) -> bytes:
                if to_candidate is not None:
                    callable_for(method, True).future(data, timeout=10)
                answer: bytes = callable_for(method, False)(data, timeout=10)
                if initial_metadata:
                    context.send_initial_metadata((("x-request-id", "bare"),))
                return answer

            return grpc.unary_unary_rpc_method_handler(forward)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    server.add_generic_rpc_handlers([Handler()])
    server.add_insecure_port(listen)
    server.start()
    gc.collect()
    gc.freeze()
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--production", required=True)
    parser.add_argument("--candidate")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--initial-metadata", action="store_true", help="send initial metadata of its own, as the router does"
    )
    parser.add_argument("--sync", type=int, default=0, help="grpcio's sync server with this many threads")
    args = parser.parse_args()
    if args.sync:
        serve_sync(args.listen, args.production, args.candidate, args.initial_metadata, args.sync)
        return
    factory = uvloop.new_event_loop if args.loop == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.listen, args.production, args.candidate, args.initial_metadata))


if __name__ == "__main__":
    main()
