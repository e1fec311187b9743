"""A hostile model server for router tests and bench/hostile: real sockets on loopback, raw HTTP/1.1 written
by hand, so it can answer what no well-behaved server library would send.

Modes (``--mode``, or `HostileServer(mode=...)` in-process):

- ``nested``: a 200 whose JSON body is nested ``--size`` levels deep (``[[[[...]]]]``);
- ``huge-header``: a 200 whose one header value is ``--size`` bytes, sent in 64 KiB pieces;
- ``huge-body``: a 200 with a JSON body of ``--size`` bytes (``Content-Length`` set; a valid V2 answer);
- ``many-headers``: a 200 with ``--size`` small headers.

Everything else it reads is ignored; it answers each request on a keep-alive connection until the client
goes. Run it as a process (``python -m tests.support.hostile --port 9001 --mode nested``) so that the bytes it
pushes cost the router under test, not the test's own event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

MODES = ("nested", "huge-header", "huge-body", "many-headers")
PIECE = 65_536


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)


async def _answer(writer: asyncio.StreamWriter, mode: str, size: int) -> None:
    if mode == "nested":
        body = b"[" * size + b"]" * size
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
    elif mode == "huge-header":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Huge: ")
        piece = b"a" * PIECE
        for _ in range(size // PIECE):
            writer.write(piece)
            await writer.drain()
        writer.write(b"\r\nContent-Length: 2\r\n\r\n{}")
    elif mode == "huge-body":
        head = b'{"outputs":[{"name":"score","datatype":"FP64","shape":[1],"data":[1.0]}],"padding":"'
        tail = b'"}'
        padding = max(0, size - len(head) - len(tail))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (len(head) + padding + len(tail))
        )
        writer.write(head)
        piece = b"a" * PIECE
        for _ in range(padding // PIECE):
            writer.write(piece)
            await writer.drain()
        writer.write(b"a" * (padding % PIECE) + tail)
    elif mode == "many-headers":
        headers = b"".join(b"X-H%d: v\r\n" % n for n in range(size))
        writer.write(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\n{}")
    else:
        raise ValueError(f"unknown mode {mode!r}")
    await writer.drain()


class HostileServer:
    """The server in the current event loop: `async with HostileServer(mode, size) as server: server.url`."""

    def __init__(self, mode: str, size: int, port: int = 0) -> None:
        self.mode = mode
        self.size = size
        self.port = port
        self.requests = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await _read_request(reader)
                self.requests += 1
                await _answer(writer, self.mode, self.size)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> HostileServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--size", type=int, required=True, help="nesting levels, header bytes, body bytes or headers")
    args = parser.parse_args(argv)

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
        async with HostileServer(args.mode, args.size, args.port):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
