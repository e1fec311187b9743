"""The router's own HTTP/1.1 server and client on loopback sockets: framing, limits, reuse, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from shadowgate_router.httpserver import HttpServer, Request, Response, json_response
from shadowgate_router.upstream import CLOSED, CONNECT, TIMEOUT, UpstreamError, UpstreamPool


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
