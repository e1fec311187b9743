"""The router's own HTTP/1.1 server and client on loopback sockets: framing, limits, reuse, failures."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from shadowgate_router.httpserver import LINGER_SECONDS, HttpServer, Request, Response, json_response
from shadowgate_router.upstream import BAD_RESPONSE, CLOSED, CONNECT, TIMEOUT, UpstreamError, UpstreamPool


async def echo(request: Request) -> Response:
    if request.path == "/slow":
        await asyncio.sleep(0.2)
    return json_response(200, {"path": request.path, "query": request.query.decode(), "body": request.body.decode()})


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    http = HttpServer(echo, body_limit=1000)
    await http.start("127.0.0.1", 0)
    yield http
    await http.shutdown(1)


async def exchange(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        if until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        await writer.wait_closed()


def post(path: str, body: bytes, *extra: bytes) -> bytes:
    headers = b"".join(line + b"\r\n" for line in extra)
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (path.encode(), len(body), headers, body)


async def test_pipelined_requests_are_answered_in_order(server: HttpServer) -> None:
    data = post("/slow", b"1") + post("/fast", b"2") + post("/last", b"3", b"Connection: close")
    answer = await exchange(server.port, data)
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert answer.index(b'"body":"1"') < answer.index(b'"body":"2"') < answer.index(b'"body":"3"')
    assert answer.rstrip().endswith(b'"body":"3"}')


async def test_chunked_bodies_are_decoded(server: HttpServer) -> None:
    data = b"POST /c?x=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    data += b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    answer = await exchange(server.port, data)
    assert b'"body":"abcde"' in answer and b'"query":"x=1"' in answer


async def test_expect_100_continue_is_honoured(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK")
    writer.close()
    await writer.wait_closed()


async def test_a_declared_oversized_body_is_refused_before_it_is_sent(server: HttpServer) -> None:
    answer = await exchange(server.port, b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"the limit is 1000" in answer and b"Connection: close" in answer


async def test_an_oversized_chunked_body_is_refused(server: HttpServer) -> None:
    chunk = b"400\r\n" + b"a" * 1024 + b"\r\n"
    data = b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2
    answer = await exchange(server.port, data)
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_too_many_headers_get_431(server: HttpServer) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % n for n in range(150))
    answer = await exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_garbage_gets_400_with_a_reason(server: HttpServer) -> None:
    answer = await exchange(server.port, b"HELLO THERE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"malformed HTTP request" in answer and b"X-Request-Id: " in answer


async def test_http_1_0_closes_after_the_answer(server: HttpServer) -> None:
    answer = await exchange(server.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer


async def test_an_answer_to_head_has_no_body(server: HttpServer) -> None:
    answer = await exchange(
        server.port, b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: " in head
    assert rest.startswith(b"HTTP/1.1 200 OK"), "the next answer follows the headers directly"


async def test_shutdown_lets_a_request_in_flight_finish(server: HttpServer) -> None:
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/slow", b"x"))
    await asyncio.sleep(0.05)
    await server.shutdown(5)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer
    writer.close()
    await writer.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


# The client side, against small raw servers whose behaviour each test controls.

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.open = 0
        self.peak = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await self.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/base"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def keep_alive(delay: float = 0.0, requests: int = 1_000) -> Behaviour:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(requests):
            request = await read_request(reader)
            await asyncio.sleep(delay)
            body = request.split(b"\r\n", 1)[0]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    return serve


async def test_connections_are_reused_and_the_base_path_is_kept() -> None:
    async with RawServer(keep_alive()) as raw:
        pool = UpstreamPool(raw.url)
        for n in range(20):
            response = await pool.request(b"POST", b"/infer?n=%d" % n, [(b"X-A", b"1")], b"{}", 5)
            assert response.status == 200
            assert response.body == b"POST /base/infer?n=%d HTTP/1.1" % n
        await pool.close()
    assert raw.connections == 1


async def test_the_pool_never_opens_more_than_its_limit() -> None:
    async with RawServer(keep_alive(delay=0.02)) as raw:
        pool = UpstreamPool(raw.url, max_connections=3)
        answers = await asyncio.gather(*(pool.request(b"POST", b"/x", [], b"{}", 5) for _ in range(30)))
        await pool.close()
    assert all(answer.status == 200 for answer in answers)
    assert raw.peak <= 3


async def test_a_slow_server_times_out_without_hanging() -> None:
    async with RawServer(keep_alive(delay=10)) as raw:
        pool = UpstreamPool(raw.url)
        started = time.monotonic()
        with pytest.raises(UpstreamError) as failed:
            await pool.request(b"POST", b"/x", [], b"{}", 0.2)
        assert failed.value.kind == TIMEOUT
        assert time.monotonic() - started < 1
        await pool.close()


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with RawServer(keep_alive()) as raw:
        url = raw.url
    pool = UpstreamPool(url)
    with pytest.raises(UpstreamError) as failed:
        await pool.request(b"POST", b"/x", [], b"{}", 2)
    assert failed.value.kind == CONNECT
    await pool.close()


async def test_a_reused_connection_the_server_dropped_is_retried_once() -> None:
    async with RawServer(keep_alive(requests=1)) as raw:  # closes after each answer, without saying so
        pool = UpstreamPool(raw.url)
        for _ in range(5):
            assert (await pool.request(b"POST", b"/x", [], b"{}", 5)).status == 200
            await asyncio.sleep(0.01)
        await pool.close()
    assert raw.connections == 5


async def test_a_server_dying_mid_answer_is_reported() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    async with RawServer(half) as raw:
        pool = UpstreamPool(raw.url)
        with pytest.raises(UpstreamError) as failed:
            await pool.request(b"POST", b"/x", [], b"{}", 5)
        assert failed.value.kind == CLOSED
        await pool.close()


async def test_an_answer_delimited_by_close_is_complete() -> None:
    async def old_style(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"ok": 1}')
        await writer.drain()

    async with RawServer(old_style) as raw:
        pool = UpstreamPool(raw.url)
        response = await pool.request(b"POST", b"/x", [], b"{}", 5)
        assert (response.status, response.body) == (200, b'{"ok": 1}')
        await pool.close()


async def test_an_answer_to_head_ends_with_its_head_whatever_content_length_says() -> None:
    """A HEAD answer announces the length a GET would have and sends no body (found by the HTTP fuzz test)."""

    async def head_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader)
            if request.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 142\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with RawServer(head_server) as raw:
        pool = UpstreamPool(raw.url)
        answer = await pool.request(b"HEAD", b"/v2/models//infer", [], b"{}", 2)
        assert (answer.status, answer.body) == (200, b"")
        assert dict(answer.headers)[b"content-length"] == b"142"
        after = await pool.request(b"POST", b"/x", [], b"{}", 2)  # the pool goes on serving
        assert (after.status, after.body) == (200, b"ok")
        await pool.close()


# Issue 12: peers that attack the server (D3 huge heads, D4 pipelining without reading, Upgrade).


async def test_a_header_that_never_ends_is_refused_once_it_passes_the_limit(server: HttpServer) -> None:
    """D3: counted as it arrives, not when httptools hands over the finished value (built quadratically)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
    for _ in range(32):
        writer.write(b"a" * 65_536)  # 2 MB and counting, the line never ends
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 431 ")
    writer.close()


async def test_after_a_refusal_what_the_client_sends_is_dropped_up_to_a_budget(server: HttpServer) -> None:
    """D3 (client): after the 431 the router reads and drops the rest for LINGER_SECONDS, so that the client
    reads the 431 rather than a reset, but no more than LINGER_BYTES of it: then it stops reading, the
    client's sends stall (they used to be read whole: 128 MB per connection), and the connection is closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 431 ")
    piece, sent, stalled = b"a" * 1024 * 1024, 0, False
    while sent < 100 * len(piece):
        writer.write(piece)
        try:
            await asyncio.wait_for(writer.drain(), 1)
        except TimeoutError:
            stalled = True
            break
        except ConnectionError:
            break
        sent += len(piece)
    assert stalled, f"the router read all {sent:,} bytes sent after the refusal"
    # What was sent is the budget (1 MiB) plus what the two kernels buffer (a few MB on loopback).
    assert sent < 40 * len(piece), sent
    with contextlib.suppress(ConnectionError):  # then the connection is closed: EOF (or a reset) in time
        await asyncio.wait_for(reader.read(), LINGER_SECONDS + 5)
    writer.transport.abort()


async def test_chunked_trailers_are_counted_like_headers(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-Trailer: ")
    for _ in range(32):
        writer.write(b"a" * 65_536)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 431 ")
    writer.close()


async def test_large_heads_within_the_limits_still_pass_when_pipelined(server: HttpServer) -> None:
    headers = [b"X-H%d: %s" % (n, b"v" * 900) for n in range(60)]  # about 55 KB of headers
    data = (post("/first", b"x" * 900, *headers) + post("/second", b"y", *headers, b"Connection: close")) * 1
    answer = await exchange(server.port, data)
    assert answer.count(b"HTTP/1.1 200 OK") == 2


async def test_an_upgrade_request_gets_one_answer_then_the_connection_closes(server: HttpServer) -> None:
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    answer = await exchange(server.port, upgrade + b"\x81\x05hello")
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in answer


class Recording:
    """A handler for the fairness tests: /gate waits for the test, /big answers 64 KB, the rest a few bytes;
    it notes who asked, and the most output any connection had buffered when it was called."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[str] = []
        self.server: HttpServer | None = None
        self.most_buffered = 0

    async def __call__(self, request: Request) -> Response:
        assert self.server is not None
        for connection in self.server.connections:
            if connection.transport is not None:
                self.most_buffered = max(self.most_buffered, connection.transport.get_write_buffer_size())
        if request.path == "/gate":
            await self.gate.wait()
        self.calls.append(request.path.split("/")[1])
        if request.path.startswith("/big"):
            return Response(200, b"b" * 65_536)
        return Response(200, b"ok")


@pytest.fixture
async def recording() -> AsyncIterator[Recording]:
    handler = Recording()
    handler.server = HttpServer(handler)
    await handler.server.start("127.0.0.1", 0)
    yield handler
    await handler.server.shutdown(1)


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()


async def test_pipelined_answers_of_two_clients_interleave(recording: Recording) -> None:
    """D4: between two answers on one connection the loop serves the others."""
    assert recording.server is not None
    clients = [await asyncio.open_connection("127.0.0.1", recording.server.port) for _ in range(2)]
    for tag, (_, writer) in zip("ab", clients, strict=True):
        writer.write(get("/gate") + get(f"/{tag}") * 200)
    deadline = time.monotonic() + 5
    while sum(len(connection._queue) for connection in recording.server.connections) < 2 * 16:
        assert time.monotonic() < deadline, "the requests were not read"
        await asyncio.sleep(0.01)
    recording.gate.set()
    for reader, _ in clients:
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 201:
            answers += await asyncio.wait_for(reader.read(65_536), 5)
    for _, writer in clients:
        writer.close()
    order = [call for call in recording.calls if call in ("a", "b")]
    switches = sum(1 for before, after in itertools.pairwise(order) if before != after)
    assert len(order) == 400 and switches >= 100, f"answered in runs: {switches} switches"


async def test_a_client_that_does_not_read_its_answers_is_not_answered_further(recording: Recording) -> None:
    """D4: write backpressure. 2,000 pipelined requests for 64 KB answers, none read: the server stops
    answering once the socket is full instead of buffering 128 MB, and the others are served meanwhile."""
    assert recording.server is not None
    recording.gate.set()
    flood = socket.socket()
    flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flood.connect(("127.0.0.1", recording.server.port))
    flood.setblocking(False)
    _, writer = await asyncio.open_connection(sock=flood)
    writer.write(get("/big") * 2_000)
    deadline = time.monotonic() + 10
    while recording.calls.count("big") < 20:  # the flood is being answered (a few MB fit the sockets)
        assert time.monotonic() < deadline, "the flood was not answered at all"
        await asyncio.sleep(0.01)
    other_reader, other_writer = await asyncio.open_connection("127.0.0.1", recording.server.port)
    other_writer.write(get("/other"))
    assert (await asyncio.wait_for(other_reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200 OK")
    answered = recording.calls.count("big")
    assert answered < 1_000, f"{answered} answers of 64 KB were produced for a client reading none"
    assert recording.most_buffered < 1_000_000, f"{recording.most_buffered} bytes buffered for one client"
    other_writer.close()
    writer.close()


# Issue 12 D3/D5: a model server is a peer like any other; what it sends is bounded.


def answering(head: bytes, body_size: int, piece: int = 65_536) -> Behaviour:
    """Answer every request with `head`, then `body_size` bytes of body in pieces."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(head)
            sent = 0
            while sent < body_size:
                writer.write(b"a" * min(piece, body_size - sent))
                sent += piece
                await writer.drain()

    return serve


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 4_000_000 + b"\r\nContent-Length: 0\r\n\r\n", "head is over"),
        (b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 4_000_000, "head is over"),  # never ends
        (b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 500 + b"Content-Length: 0\r\n\r\n", "over 100 header fields"),
    ],
)
async def test_an_answer_with_an_oversized_head_fails_the_call(head: bytes, says: str) -> None:
    async with RawServer(answering(head, 0)) as raw:
        pool = UpstreamPool(raw.url)
        with pytest.raises(UpstreamError) as failed:
            await pool.request(b"POST", b"/x", [], b"{}", 5)
        assert failed.value.kind == BAD_RESPONSE and says in failed.value.detail
        await pool.close()


@pytest.mark.parametrize("framing", [b"Content-Length: 50000000\r\n", b"Connection: close\r\n"])
async def test_an_oversized_answer_fails_the_call_and_frees_its_memory(framing: bytes) -> None:
    async with RawServer(answering(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n", 50_000_000)) as raw:
        pool = UpstreamPool(raw.url, response_limit=1_000_000)
        with pytest.raises(UpstreamError) as failed:
            await pool.request(b"POST", b"/x", [], b"{}", 5)
        assert failed.value.kind == BAD_RESPONSE and "over the limit of 1000000 bytes" in failed.value.detail
        assert pool.receiving == 0
        await pool.close()


async def test_an_answer_announced_over_the_limit_is_refused_before_its_body_is_read() -> None:
    """D5: a Content-Length over response_limit fails the call at its head: the server here never sends the
    body, so only a refusal at the head ends the call before its deadline."""

    async def head_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n")
        await writer.drain()
        await reader.read()  # holds the connection open until the client drops it

    async with RawServer(head_only) as raw:
        pool = UpstreamPool(raw.url, response_limit=1_000_000)
        with pytest.raises(UpstreamError) as failed:
            await pool.request(b"POST", b"/x", [], b"{}", 30)
        assert failed.value.kind == BAD_RESPONSE
        assert "an answer of 50000000 bytes (Content-Length), over the limit of 1000000 bytes" in failed.value.detail
        assert pool.receiving == 0
        await pool.close()


async def test_answers_being_received_at_once_share_a_memory_limit() -> None:
    size = 3_000_000
    async with RawServer(answering(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size, size, 4096)) as raw:
        pool = UpstreamPool(raw.url, response_limit=4_000_000, memory_limit=8_000_000)
        outcomes = await asyncio.gather(
            *(pool.request(b"POST", b"/x", [], b"{}", 10) for _ in range(6)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, UpstreamError)]
        answered = [o for o in outcomes if not isinstance(o, BaseException)]
        assert refused and all("at once from one model server" in error.detail for error in refused)
        assert answered and all(len(answer.body) == size for answer in answered)
        assert pool.receiving == 0
        assert len((await pool.request(b"POST", b"/x", [], b"{}", 10)).body) == size, "later calls go through"
        await pool.close()


async def test_a_client_that_half_closes_still_gets_its_answers(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(post("/slow", b"1") + post("/fast", b"2"))
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and b'"body":"2"' in answer
    writer.close()


async def test_a_client_that_half_closes_mid_request_is_told(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"in the middle of a request" in answer
    writer.close()
