"""The router's HTTP/1.1 server: asyncio protocols and httptools' C parser, nothing else.

A general framework would add a request object per middleware layer, routing tables and cookies; the
router needs one parse, one handler call and one write per request, and its added latency is the
product (bench/router). This module owns the connection-level rules: keep-alive and pipelining in
order, ``Expect: 100-continue``, limits on URL, headers and body (refused with 414/431/413 before the
body is read), slow or idle clients (408 / close), and graceful shutdown (stop listening, finish what is
in flight, close). What a request means is the handler's business.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import httptools

log = logging.getLogger(__name__)

MAX_URL_BYTES = 8192
MAX_HEADERS = 100
MAX_HEADER_BYTES = 65536
FEED_BYTES = 16384
"""Input is handed to the parser in pieces of at most this size (see `HttpConnection.data_received`)."""
MAX_HEAD_BYTES = MAX_URL_BYTES + MAX_HEADER_BYTES + 2 * FEED_BYTES
"""Bytes of one request's head (request line and headers) fed to the parser before it is refused with 431.

httptools builds a header value by concatenating the pieces it is given, so a value spread over many
reads costs time quadratic in its size (a 128 MB header took 12 s of CPU) before `on_header` can see
it: the bytes are counted before parsing instead. The count may include up to one piece of the previous
request's tail, hence the slack over the limits on URL and headers, which are checked exactly as well."""
MAX_PIPELINED = 16
"""Requests parsed ahead of the one being answered before the connection stops parsing and reading."""
LINGER_SECONDS = 2.0
"""After refusing a request, how long the rest of what the client sends is read and dropped."""
LINGER_BYTES = 1024 * 1024
"""...and how much of it at most: past this, nothing more is read (the client's sends stall) until the close.
Enough for the rest of a body a little over the limit, sent by a client that reads its answer once it has
sent everything; an attacker reconnecting in a loop to send endless headers costs the router this much per
connection instead of whatever loopback carries in LINGER_SECONDS (a 128 MB header, whole)."""


@dataclass(slots=True)
class Request:
    method: str
    path: str
    """The request target's path, percent-encoding kept."""
    query: bytes
    """The raw query string without '?', empty when there is none."""
    headers: list[tuple[bytes, bytes]]
    """Header names lower-cased, values as sent, in order."""
    body: bytes
    keep_alive: bool

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header; `name` must be lower case."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def target(self) -> bytes:
        return self.path.encode() + (b"?" + self.query if self.query else b"")


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Without Content-Length and Connection, which the server sets."""
    after: Callable[[], None] | None = None
    """Run once the response is handed to the socket: work the client must not wait for (recording)."""


def json_response(status: int, document: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    return Response(status, body, [(b"Content-Type", b"application/json"), *headers])


def error_response(status: int, message: str, request_id: bytes | None = None) -> Response:
    """The router's 4xx/5xx body: {"error": why, "requestId": ...}, and the X-Request-Id header."""
    request_id = request_id or new_request_id()
    return json_response(status, {"error": message, "requestId": request_id.decode()}, [(b"X-Request-Id", request_id)])


def new_request_id() -> bytes:
    """128 random bits in hex, like a uuid4 without its version bits (and at a third of the cost)."""
    return os.urandom(16).hex().encode()


Handler = Callable[[Request], Awaitable[Response]]

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
    return line


class _Reject(Exception):
    """Raised inside parser callbacks: answer `status` with `message` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, answers them strictly in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._queue: collections.deque[Request | Response] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._rejected = False
        self._dropped = 0
        """Bytes read and dropped since the refusal (bounded by LINGER_BYTES)."""
        self._in_head = False
        self._head_bytes = 0
        self._unparsed: memoryview | None = None
        """Input held back while too many requests wait for their answers (reading is paused meanwhile)."""
        self._writable: asyncio.Event | None = None
        """Set while the transport takes more output; None until it first asks us to stop writing."""
        self._eof = False
        self.reading_since: float | None = None
        self.last_activity = time.monotonic()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A request in flight still finishes (its prediction is recorded); its answer goes nowhere. Requests
        # pipelined behind it are dropped: nobody is left to read their answers.
        self._queue.clear()
        self._unparsed = None
        if self._writable is not None:
            self._writable.set()
        self.server.connections.discard(self)
        self.server.settled.set()
        self.transport = None

    def eof_received(self) -> bool:
        """The client half-closed: it sends nothing more but may still read. Answer what it asked, then close."""
        self._eof = True
        if self._rejected:
            return True  # lingering after a refusal: the close is already planned
        if self.reading_since is not None:
            self.reject(400, "the client closed its side of the connection in the middle of a request")
            return True
        return not self.idle  # False, nothing to answer: asyncio closes the transport

    def pause_writing(self) -> None:
        """The transport's buffer is over its high-water mark: answer nothing more until it drains."""
        if self._writable is None:
            self._writable = asyncio.Event()
        self._writable.clear()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES and not self._paused and self.transport is not None:
                self._paused = True  # for good: the close is planned (LINGER_SECONDS after the refusal is sent)
                self.transport.pause_reading()
            return
        self.last_activity = time.monotonic()
        if self._unparsed is not None:  # only if data arrives after pause_reading: keep the order
            self._unparsed = memoryview(bytes(self._unparsed) + data)
            return
        self._feed(memoryview(data))

    def _feed(self, data: memoryview) -> None:
        """Parse `data` piece by piece: a request head is refused past MAX_HEAD_BYTES before the parser sees
        more of it, and parsing stops (the rest kept, reading paused) once MAX_PIPELINED requests wait."""
        offset, size = 0, len(data)
        while offset < size:
            step = FEED_BYTES
            if self._in_head:
                step = min(step, MAX_HEAD_BYTES - self._head_bytes)
                if step <= 0:
                    self.reject(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
                    return
            piece = data[offset : offset + step]
            offset += len(piece)
            if not self._parse(piece):
                return
            if self._in_head:
                self._head_bytes += len(piece)
            if len(self._queue) > MAX_PIPELINED and offset < size:
                self._unparsed = data[offset:]
                self._pause_reading()
                return

    def _parse(self, piece: memoryview) -> bool:
        """Feed one piece; False when the connection takes no more input."""
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            # The request asking for an upgrade is complete (and queued): answer it as if Upgrade were not
            # there (RFC 9110 7.8 lets a server ignore it) and close, since what follows its head is another
            # protocol. No second answer: the client asked one question.
            last = self._queue[-1] if self._queue else None
            if isinstance(last, Request):
                last.keep_alive = False
                self._rejected = True  # read and drop whatever else comes
                return False
            self.reject(400, "protocol upgrades are not supported")
            return False
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Reject):
                self.reject(exc.__context__.status, exc.__context__.message)
            else:
                log.error("HTTP parser callback failed", exc_info=exc.__context__)
                self.reject(500, "internal error while reading the request")
            return False
        except httptools.HttpParserError as exc:
            self.reject(400, f"malformed HTTP request: {exc}")
            return False
        return not self._rejected

    def _pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        """The queue has room again: parse what was held back, then read again if all of it went in."""
        unparsed, self._unparsed = self._unparsed, None
        if unparsed is not None and not self._rejected:
            self._feed(unparsed)
        if self._unparsed is None and self._paused and not self._rejected:
            self._paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = []
        self._url_size = 0
        self._headers = []
        self._header_size = 0
        self._body = []
        self._body_size = 0
        self._in_head = True
        self._head_bytes = 0
        self.reading_since = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url_size += len(url)
        if self._url_size > MAX_URL_BYTES:
            raise _Reject(414, f"the request URL is longer than {MAX_URL_BYTES} bytes")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        if len(self._headers) >= MAX_HEADERS or self._header_size > MAX_HEADER_BYTES:
            raise _Reject(431, f"request headers exceed {MAX_HEADERS} fields or {MAX_HEADER_BYTES} bytes")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        limit = self.server.body_limit
        expects_body = False
        for name, value in self._headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _Reject(400, "Content-Length is not a number") from None
                if length > limit:
                    raise _Reject(413, f"the request body is {length} bytes; the limit is {limit}")
                expects_body = length > 0
            elif name == b"transfer-encoding":
                expects_body = True
        if expects_body and self.transport is not None:
            for name, value in self._headers:
                if name == b"expect" and value.lower() == b"100-continue":
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_chunk_header(self) -> None:
        # After the last chunk's size come trailer fields, built by httptools like headers: counted alike.
        self._in_head = True
        self._head_bytes = 0

    def on_chunk_complete(self) -> None:
        self._in_head = False

    def on_body(self, body: bytes) -> None:
        self._in_head = False
        self._body_size += len(body)
        if self._body_size > self.server.body_limit:
            raise _Reject(413, f"the request body is over the limit of {self.server.body_limit} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.reading_since = None
        path, _, query = b"".join(self._url).partition(b"?")
        request = Request(
            method=self._parser.get_method().decode("ascii", "replace"),
            path=path.decode("latin-1"),
            query=query,
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self._parser.should_keep_alive(),
        )
        self._enqueue(request)

    # answering
    def _enqueue(self, item: Request | Response) -> None:
        self._queue.append(item)
        if len(self._queue) > MAX_PIPELINED:
            self._pause_reading()
        if self._task is None:
            self._task = self.server.loop.create_task(self._answer())

    def reject(self, status: int, message: str) -> None:
        """Answer with an error after whatever is already queued, then close.

        What the client still sends (the rest of a body too large to take) is read and dropped until the
        close: closing a socket with unread data makes the kernel reset the connection, and the client
        would see "connection reset" instead of the 4xx that says why.
        """
        self._rejected = True
        self.reading_since = None
        if self.server.on_refusal is not None:
            self.server.on_refusal(status)
        self._enqueue(error_response(status, message))

    async def _answer(self) -> None:
        """Answer queued requests in order. Fair to the other connections: it yields to the loop between
        pipelined answers (a handler that needs no I/O would otherwise answer thousands in one go), and it
        waits while the client is not reading its answers (write backpressure; given up on after the
        request timeout), during which nothing more is parsed or read from it."""
        try:
            while self._queue:
                if self._writable is not None and not self._writable.is_set():
                    try:
                        async with asyncio.timeout(self.server.request_timeout):
                            await self._writable.wait()
                    except TimeoutError:
                        if self.transport is not None:
                            self.transport.abort()
                        return
                    if self.transport is None:
                        return
                item = self._queue.popleft()
                if isinstance(item, Response):
                    self._write(item, keep_alive=False)
                    self._linger()
                    return
                if self._paused and not self._rejected and len(self._queue) <= MAX_PIPELINED // 2:
                    self._resume_reading()
                try:
                    response = await self.server.handler(item)
                except Exception:
                    log.exception("handler failed on %s %s", item.method, item.path)
                    response = error_response(500, "internal error in the router")
                keep_alive = item.keep_alive and not self.server.closing
                self._write(response, keep_alive, head=item.method == "HEAD")
                if response.after is not None:
                    try:
                        response.after()
                    except Exception:
                        log.exception("post-response work failed on %s %s", item.method, item.path)
                if not keep_alive:
                    break
                if self._queue:
                    await asyncio.sleep(0)  # let other connections in between pipelined answers
            else:
                if not self.server.closing and not self._eof:
                    return
            self.close()
        finally:
            self._task = None
            self.last_activity = time.monotonic()
            self.server.settled.set()

    def _write(self, response: Response, keep_alive: bool, head: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        parts = [_status_line(response.status)]
        for name, value in response.headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"Content-Length: %d\r\n" % len(response.body))
        if not keep_alive:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if not head:  # an answer to HEAD has the headers of the body it does not carry
            parts.append(response.body)
        self.transport.write(b"".join(parts))

    def _linger(self) -> None:
        """Half-close after a refusal, keep dropping input for a moment, then close for good."""
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        self.server.loop.call_later(LINGER_SECONDS, self.close)

    @property
    def idle(self) -> bool:
        return self._task is None and not self._queue and self.reading_since is None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class HttpServer:
    """Listens on one address and hands each request to `handler`."""

    def __init__(
        self,
        handler: Handler,
        *,
        body_limit: int = 10 * 1024 * 1024,
        keepalive_timeout: float = 75.0,
        request_timeout: float = 30.0,
    ) -> None:
        self.handler = handler
        self.body_limit = body_limit
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.connections: set[HttpConnection] = set()
        self.settled = asyncio.Event()
        """Set whenever a connection finishes its requests or closes (shutdown waits on it)."""
        self.closing = False
        self.on_refusal: Callable[[int], None] | None = None
        """Called with the status of every request refused while reading it (400, 408, 413, 414, 431)."""
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()

    async def start(self, host: str, port: int) -> None:
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), host, port, backlog=2048, reuse_address=True
        )
        self._sweeper = self.loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _sweep(self) -> None:
        """Close idle keep-alive connections and answer 408 to clients that stall mid-request."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.reading_since is not None:
                    if now - connection.reading_since > self.request_timeout:
                        connection.reject(408, f"the request was not complete within {self.request_timeout:g}s")
                elif connection.idle and now - connection.last_activity > self.keepalive_timeout:
                    connection.close()

    async def shutdown(self, grace: float) -> None:
        """Stop listening, let requests in flight finish (up to `grace` seconds), then close every connection."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if connection.idle:
                connection.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while any(not connection.idle for connection in self.connections):
                    self.settled.clear()
                    await self.settled.wait()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort() if not connection.idle else connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
