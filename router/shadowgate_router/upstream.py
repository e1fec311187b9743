"""The router's HTTP/1.1 client to one model server: a pool of long-lived keep-alive connections.

Why not httpx or aiohttp: on a 2-core machine the forwarding path is the router's whole cost, and a
client built on asyncio protocols with httptools' C parser does only what a proxy needs (write one
request, parse one response, reuse the connection). See bench/router/README.md for the measurements
behind this choice. Every call has an overall deadline (acquiring a connection, connecting, writing and
reading the answer), the pool has a hard connection limit, and failures come back as `UpstreamError`
with a short `kind` that is recorded in the database and exported as a metric label.

A model server is a peer like any client: the head of its answer (status line and headers) is counted as it
arrives and refused past `MAX_HEAD_BYTES` or `MAX_HEADERS` fields, its body past the pool's `response_limit`
(at once, unread, when its Content-Length announces more), and all answers being received from one server at
once past its `memory_limit`, so a server sending endless headers or 50 MB bodies costs the call (a
``bad_response``), not the router's memory. The limit on all answers at once is per server: a misbehaving
candidate cannot use production's."""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar, cast
from urllib.parse import urlsplit

import httptools

T = TypeVar("T")

MAX_HEADERS = 100
MAX_HEADER_BYTES = 65_536
FEED_BYTES = 16_384
MAX_HEAD_BYTES = MAX_HEADER_BYTES + 2 * FEED_BYTES
"""Bytes of an answer's head fed to the parser before the answer is refused (see httpserver.MAX_HEAD_BYTES)."""

# Error kinds, recorded in predictions.{production,candidate}_error.
TIMEOUT = "timeout"
CONNECT = "connect"
CLOSED = "closed"
BAD_RESPONSE = "bad_response"


class UpstreamError(Exception):
    """A model server call that produced no HTTP answer; `kind` is one of the constants above."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    """Header names lower-cased (as HTTP/2 and most proxies send them), values as sent."""
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    __slots__ = (
        "_announced",
        "_body",
        "_body_size",
        "_content_length",
        "_head_size",
        "_header_size",
        "_headers",
        "_headers_done",
        "_no_body",
        "_parser",
        "_pool",
        "_refused",
        "_status",
        "_waiter",
        "closed",
        "idle_since",
        "received",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        """Bytes of the answer's body so far, counted against the pool's memory limit until handed over."""
        self._head_size = 0
        self._header_size = 0
        self._refused = False
        self._content_length = False
        self._announced = -1
        """The answer's Content-Length, -1 without one: past the pool's response_limit it is refused unread."""
        self._headers_done = False
        self._no_body = False
        """The request was HEAD: its answer ends with its head, whatever Content-Length says (RFC 9110 9.3.2)."""
        self._status = 0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.received = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self._refused:
            return
        view = memoryview(data)
        offset, size = 0, len(view)
        while offset < size:
            step = len(view)
            if not self._headers_done:  # in a head: in small pieces, counted before the parser builds them
                step = min(FEED_BYTES, MAX_HEAD_BYTES - self._head_size)
                if step <= 0:
                    self._refuse(f"an answer whose head is over {MAX_HEAD_BYTES} bytes")
                    return
            piece = view[offset : offset + step]
            offset += len(piece)
            if not self._parse(piece):
                return
            if not self._headers_done:
                self._head_size += len(piece)

    def _parse(self, piece: memoryview) -> bool:
        """Feed one piece; False once the answer is refused or unparseable (the connection is then closed)."""
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserError as exc:
            if not self._refused:
                self._fail(UpstreamError(BAD_RESPONSE, f"unparseable HTTP answer: {exc}"))
                self.close()
            return False
        return not self._refused

    def _refuse(self, detail: str) -> None:
        """Fail the call with a bad_response saying what the server sent, and drop the connection."""
        self._refused = True
        self._fail(UpstreamError(BAD_RESPONSE, f"{self._pool.base_url} sent {detail}"))
        self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._release_memory()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._headers_done and not self._content_length and self._status:
                # An answer without Content-Length or chunking ends when the server closes.
                self._complete()
            else:
                reason = str(exc) if exc else "the server closed the connection"
                self._fail(UpstreamError(CLOSED, f"{reason} before answering"))
        self._pool._forget(self)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._release_memory()
        self._headers = []
        self._body = []
        self._head_size = 0
        self._header_size = 0
        self._content_length = False
        self._announced = -1
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_size += len(name) + len(value) + 4
        if len(self._headers) >= MAX_HEADERS or self._header_size > MAX_HEADER_BYTES:
            self._refuse(f"an answer with over {MAX_HEADERS} header fields or {MAX_HEADER_BYTES} bytes of them")
            return
        lowered = name.lower()
        if lowered == b"content-length":
            self._content_length = True
            stripped = value.strip()
            if stripped.isdigit() and len(stripped) <= 19:
                self._announced = int(stripped)
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            self._content_length = True
        self._headers.append((lowered, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        bodiless = self._no_body or self._status < 200 or self._status in (204, 304)
        if not bodiless and self._announced > self._pool.response_limit:
            # Announced too big: refused before a byte of it is read (the connection is reset, not drained).
            limit = self._pool.response_limit
            self._refuse(f"an answer of {self._announced} bytes (Content-Length), over the limit of {limit} bytes")
            return
        if self._no_body and self._status >= 200:
            # httptools cannot be told to skip the body: answer now, and drop the connection, whose parser
            # would wait for the body Content-Length announces.
            self._complete()
            self._refused = True
            self.close()

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        size = len(body)
        pool = self._pool
        if self._body_size + size > pool.response_limit:
            self._refuse(f"an answer over the limit of {pool.response_limit} bytes")
            return
        if pool.receiving + size > pool.memory_limit:
            self._refuse(
                f"answers over the limit of {pool.memory_limit} bytes being received at once from one model server"
            )
            return
        self._body_size += size
        pool.receiving += size
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._complete()
        if not self._parser.should_keep_alive():
            self.close()

    # own
    def _release_memory(self) -> None:
        self._pool.receiving -= self._body_size
        self._body_size = 0

    def _complete(self) -> None:
        waiter = self._waiter
        self._waiter = None
        body = b"".join(self._body)
        self._body = []
        self._release_memory()
        if waiter is not None and not waiter.done():
            waiter.set_result(UpstreamResponse(self._status, self._headers, body))

    def _fail(self, error: UpstreamError) -> None:
        waiter = self._waiter
        self._waiter = None
        self._body = []
        self._release_memory()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def expire(self, detail: str) -> None:
        """The call's deadline passed: fail it as a timeout (the caller then closes the connection)."""
        self._fail(UpstreamError(TIMEOUT, detail))

    def send(self, data: bytes, no_body: bool = False) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self._no_body = no_body
        waiter: asyncio.Future[UpstreamResponse] = self._pool._loop.create_future()
        self._waiter = waiter
        self.received = False
        self._head_size = 0
        self._headers_done = False
        self.transport.write(data)
        return waiter

    @property
    def busy(self) -> bool:
        return self._waiter is not None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, unread bytes discarded (the peer sees a reset): for an answer refused mid-way, whose
        rest is not worth reading."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Long-lived connections to one model server (scheme, host and port of `base_url`).

    At most `max_connections` are open; callers beyond that wait for one to come free (within their
    deadline). A request on a reused connection that the server closed before answering is retried once
    on a fresh connection: model servers drop idle keep-alive connections on their own schedule, and
    an inference call is safe to repeat when nothing of it was answered.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 256,
        connect_timeout: float = 2.0,
        idle_timeout: float = 30.0,
        response_limit: int = 10 * 1024 * 1024,
        memory_limit: int = 64 * 1024 * 1024,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        self.base_url = base_url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path_prefix = parts.path.rstrip("/").encode()
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        default_port = (parts.scheme == "https" and self.port == 443) or (parts.scheme == "http" and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if default_port else f"{host}:{self.port}").encode()
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.response_limit = response_limit
        """Largest answer body taken from this server; a bigger one fails the call (bad_response)."""
        self.memory_limit = memory_limit
        """Most bytes of answer bodies being received from this server at once; beyond, calls fail the same way."""
        self.receiving = 0
        self._loop = asyncio.get_running_loop()
        self._idle: collections.deque[_Connection] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._open = 0
        self._closed = False

    async def request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, time_limit: float
    ) -> UpstreamResponse:
        """Send one request (target is the path and query, appended to the base URL's path).

        `headers` must not contain Host, Content-Length or hop-by-hop headers; raises UpstreamError.
        """
        data = self._encode(method, target, headers, body)
        deadline = self._loop.time() + time_limit
        idle = self._take_idle()
        if idle is not None:
            connection, reused = idle, True
        else:
            connection, reused = await self._within(deadline, time_limit, self._acquire())
        try:
            return await self._exchange(connection, data, deadline, time_limit, method == b"HEAD")
        except UpstreamError as error:
            if not (reused and error.kind == CLOSED and not connection.received):
                raise
        # The server dropped an idle connection as we used it: once more on a new one.
        connection = await self._within(deadline, time_limit, self._connect_new())
        return await self._exchange(connection, data, deadline, time_limit, method == b"HEAD")

    async def _within(self, deadline: float, time_limit: float, step: Awaitable[T]) -> T:
        """Waiting for a connection (the slow path) under the call's deadline."""
        try:
            async with asyncio.timeout_at(deadline):
                return await step
        except TimeoutError:
            raise UpstreamError(TIMEOUT, f"no answer from {self.base_url} within {time_limit:g}s") from None

    def _encode(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        lines = [method, b" ", self.path_prefix, target, b" HTTP/1.1\r\nHost: ", self.host_header, b"\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if body or method not in (b"GET", b"HEAD"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        lines.append(body)
        return b"".join(lines)

    async def _exchange(
        self, connection: _Connection, data: bytes, deadline: float, time_limit: float, no_body: bool
    ) -> UpstreamResponse:
        # A plain timer rather than asyncio.timeout(): this is the hot path, and on expiry the connection is
        # closed anyway (its state is unknown), which is all a timeout has to do here.
        waiter = connection.send(data, no_body)
        timer = self._loop.call_at(
            deadline, connection.expire, f"no answer from {self.base_url} within {time_limit:g}s"
        )
        try:
            response = await waiter
        except BaseException:
            # Timed out, cancelled, or failed mid-answer: the connection's state is unknown, drop it.
            connection.close()
            raise
        finally:
            timer.cancel()
        self._release(connection)
        return response

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recently used one: least likely to be dropped
            if connection.closed:
                continue
            if now - connection.idle_since > self.idle_timeout:
                connection.close()
                continue
            return connection
        return None

    async def _acquire(self) -> tuple[_Connection, bool]:
        while True:
            connection = self._take_idle()
            if connection is not None:
                return connection, True
            if self._open < self.max_connections:
                return await self._connect_new(), False
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # we were woken but give up: pass the turn on
                raise

    async def _connect_new(self) -> _Connection:
        if self._closed:
            raise UpstreamError(CONNECT, f"the pool for {self.base_url} is closed")
        self._open += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await self._loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            self._open -= 1
            self._wake()
            raise UpstreamError(CONNECT, f"connecting to {self.base_url} took over {self.connect_timeout:g}s") from None
        except OSError as exc:
            self._open -= 1
            self._wake()
            raise UpstreamError(CONNECT, f"cannot connect to {self.base_url}: {exc.strerror or exc}") from None
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        return protocol

    def _release(self, connection: _Connection) -> None:
        if connection.closed:
            return  # _forget has done the accounting
        if self._closed:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        self._wake()

    def _forget(self, connection: _Connection) -> None:
        """Called once per connection when it closes, whoever closed it."""
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close idle connections now; busy ones close when their answer is in."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
