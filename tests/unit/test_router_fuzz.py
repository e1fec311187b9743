"""Fuzzing the router's HTTP paths with Hypothesis (issue 12): request lines, headers, chunked bodies,
pipelining, and JSON bodies for the v2, v1 and json protocols and for /outcomes, sent as raw bytes to real
routers (one per protocol) in front of real model servers on loopback.

Whatever arrives, the router answers each request with a well-formed HTTP/1.1 response that is not a 5xx
of its own making (a 500 is a bug; 502/504 would mean a model server failed, which these do not), logs no
error, and keeps serving: a well-formed request on a fresh connection still gets its answer.

Bounded in time: a fixed number of examples per test (about 15 s in all on an idle machine, under a minute on
a busy one), derandomized when CI is set so that `make test` is repeatable; run with
SHADOWGATE_FUZZ_EXAMPLES=5000 to search longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowgate_router.app import RouterApp, Settings
from tests.support.model_server import ModelServer
from tests.support.router import free_port, router_config

EXAMPLES = int(os.environ.get("SHADOWGATE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOKEN = "fuzz-token"
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]*\r\n")


class _StaticSource:
    def __init__(self, app: RouterApp, config: dict[str, Any]) -> None:
        self.app, self.config = app, config

    async def run(self) -> None:
        self.app.offer({"config.json": json.dumps(self.config)}, "the fuzz test")
        await asyncio.Event().wait()


class _Errors(logging.Handler):
    """Errors the router logs (a handler that raised, a parser callback that failed)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@dataclass
class Routers:
    ports: dict[str, int]
    errors: _Errors


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routers]:
    """A v2, a v1 and a json router (database unreachable: rows go to their spools) and two model servers,
    in an event loop of their own on a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-routers", daemon=True)
    thread.start()
    work = tmp_path_factory.mktemp("fuzz")
    servers = {"production": free_port(), "candidate": free_port()}
    apps: list[RouterApp] = []
    tasks: list[asyncio.Task[None]] = []

    async def start() -> dict[str, int]:
        for name, port in servers.items():
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(ModelServer("fraud").serve(port, ready), name=name))
            await ready.wait()
        urls = {name: f"http://127.0.0.1:{port}" for name, port in servers.items()}
        ports = {}
        for protocol, paths in (
            ("v2", {}),
            ("v1", {"predictionPath": "predictions[0]", "confidencePath": None}),
            ("json", {"predictionPath": "result.score", "confidencePath": "result.probabilities[1]"}),
        ):
            settings = Settings(
                dsn="postgresql://nobody@127.0.0.1:9/none",
                spool_dir=work / protocol,
                host="127.0.0.1",
                port=0,
                metrics_host="127.0.0.1",
                metrics_port=0,
                grpc_host=None,
                outcome_token=TOKEN,
                body_limit=256 * 1024,
                drain_seconds=1,
                flush_seconds=0.5,
            )
            app = RouterApp(settings)
            config = router_config(urls["production"], urls["candidate"], protocol=protocol, weight=50, **paths)
            await app.start(_StaticSource(app, config))
            apps.append(app)
            ports[protocol] = app.port
        return ports

    errors = _Errors()
    logging.getLogger("shadowgate_router").addHandler(errors)
    try:
        ports = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
        yield Routers(ports, errors)
    finally:

        async def stop() -> None:
            for app in apps:
                await app.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        logging.getLogger("shadowgate_router").removeHandler(errors)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send `data`, half-close, read until the router closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        with contextlib.suppress(OSError):  # the router may refuse early and close
            connection.sendall(data)
            connection.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := connection.recv(65536):
                received += chunk
    return received


def check(routers: Routers, protocol: str, data: bytes, path: str) -> None:
    port = routers.ports[protocol]
    before = len(routers.errors.records)
    answer = exchange(port, data)
    statuses = [int(status) for status in STATUS_LINE.findall(answer)]
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
    assert not [status for status in statuses if status >= 500], f"{path}: {answer[:600]!r}"
    assert routers.errors.records[before:] == [], routers.errors.records[before:]
    health = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200 "), "the router stopped serving"


# Strategies: what a client may send.

TOKENS = st.sampled_from(["fraud", "other", "..", "%2f", "%00", "a b", "{x}", "\u00e9", "", "versions", "1"])
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@st.composite
def json_body(draw: st.DrawFn, protocol: str) -> bytes:
    """A body that is a plausible request for the protocol, something else JSON, deep JSON, or not JSON."""
    kind = draw(st.sampled_from(["plausible", "any", "deep", "bytes", "empty"]))
    if kind == "plausible":
        data = draw(st.lists(JSON_VALUE, max_size=4))
        document: Any
        if protocol == "v2":
            document = {"id": draw(st.text(max_size=10)), "inputs": [{"name": "x", "shape": [len(data)],
                                                                     "datatype": "FP64", "data": data}]}  # fmt: skip
        elif protocol == "v1":
            document = {"instances": [data]}
        else:
            document = {"features": data}
        return json.dumps(document).encode()
    if kind == "any":
        return json.dumps(draw(JSON_VALUE)).encode()
    if kind == "deep":
        depth = draw(st.integers(min_value=30, max_value=5000))
        return b'{"inputs":' + b"[" * depth + b"]" * depth + b"}"
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return b""


@st.composite
def outcome_body(draw: st.DrawFn) -> bytes:
    request_id = st.one_of(
        st.text(alphabet=string.ascii_letters + string.digits + "-_.:", min_size=1, max_size=12),
        st.text(max_size=12),
        st.just("a\u0000b"),
    )
    outcome = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5), JSON_LEAF)
    item = st.fixed_dictionaries(
        {"request_id": request_id, "outcome": outcome},
        optional={"time": st.one_of(st.text(max_size=25), st.integers(), st.just("2026-01-02T03:04:05Z"))},
    )
    shape = draw(st.sampled_from(["one", "list", "wrapped", "other"]))
    if shape == "one":
        return json.dumps(draw(item)).encode()
    if shape == "list":
        return json.dumps(draw(st.lists(item, max_size=5))).encode()
    if shape == "wrapped":
        return json.dumps({"outcomes": draw(st.lists(item, max_size=5))}).encode()
    return draw(json_body("json"))


def path_for(protocol: str, draw: st.DrawFn) -> str:
    name = draw(TOKENS)
    version = draw(TOKENS)
    choices = {
        "v2": [f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{version}/infer", f"/v2/models/{name}",
               f"/v2/models/{name}/ready", "/v2/health/ready", f"/v2/{name}"],
        "v1": [f"/v1/models/{name}:predict", f"/v1/models/{name}", f"/v1/{name}"],
        "json": [f"/{name}", f"/api/{name}/score", "/metrics", "/outcomes/x"],
    }[protocol]  # fmt: skip
    path: str = draw(st.sampled_from([*choices, "/healthz", "/readyz", "/outcomes", "/metrics", "*", ""]))
    if draw(st.booleans()):
        path += "?" + draw(st.text(alphabet="abc=&%?/#", max_size=10))
    return path


HEADER_NAMES = st.sampled_from(
    ["Content-Type", "X-Request-Id", "X-Account-Id", "Authorization", "Cookie", "Expect", "Connection",
     "Upgrade", "Inference-Header-Content-Length", "Content-Encoding", "X-Other", "Bad Name", "", "Host"]
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.sampled_from(["application/json", "text/plain", "100-continue", "close", "keep-alive", "Upgrade",
                     "websocket", f"Bearer {TOKEN}", "Bearer wrong", "12", "-1", "abc", "gzip", ""]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=30),
)  # fmt: skip


@st.composite
def request(draw: st.DrawFn, protocol: str, body_for: str = "infer") -> tuple[bytes, str]:
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "P0ST"]))
    path = path_for(protocol, draw)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x"]))
    body = outcome_body() if body_for == "outcomes" or path == "/outcomes" else json_body(protocol)
    payload = draw(body)
    lines = [f"{method} {path} {version}".encode("latin-1", "replace"), b"Host: router"]
    for name, value in draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)):
        lines.append(f"{name}: {value}".encode("latin-1", "replace"))
    if path == "/outcomes" and draw(st.booleans()):
        lines.append(f"Authorization: Bearer {TOKEN}".encode())
    framing = draw(st.sampled_from(["length", "length", "chunked", "wrong-length", "none"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(payload))
        encoded = payload
    elif framing == "wrong-length":
        lines.append(b"Content-Length: %d" % draw(st.integers(min_value=0, max_value=len(payload) + 5)))
        encoded = payload
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(payload)), max_size=4)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True) if b > a]
        encoded = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
        if draw(st.booleans()):
            encoded = encoded[: draw(st.integers(min_value=0, max_value=len(encoded)))]  # torn
    else:
        encoded = payload
    return b"\r\n".join(lines) + b"\r\n\r\n" + encoded, path


@pytest.mark.parametrize("protocol", ["v2", "v1", "json"])
@FUZZ
@given(data=st.data())
def test_inference_requests(routers: Routers, protocol: str, data: st.DataObject) -> None:
    raw, path = data.draw(request(protocol))
    check(routers, protocol, raw, path)


@FUZZ
@given(data=st.data())
def test_pipelined_requests(routers: Routers, data: st.DataObject) -> None:
    protocol = data.draw(st.sampled_from(["v2", "v1", "json"]))
    requests = data.draw(st.lists(request(protocol), min_size=2, max_size=4))
    check(routers, protocol, b"".join(raw for raw, _ in requests), " + ".join(path for _, path in requests))


@FUZZ
@given(data=st.data())
def test_outcomes(routers: Routers, data: st.DataObject) -> None:
    body = data.draw(outcome_body())
    auth = data.draw(st.sampled_from([f"Bearer {TOKEN}", f"Bearer {TOKEN}", "Bearer wrong", ""]))
    raw = (
        b"POST /outcomes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: %s\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (auth.encode(), len(body), body)
    )
    check(routers, "v2", raw, "/outcomes")


@FUZZ
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes(routers: Routers, raw: bytes) -> None:
    check(routers, "v2", raw, "(bytes)")


def test_the_fuzzed_routers_still_answer_good_requests(routers: Routers) -> None:
    """The routers under fuzz are doing their job, not refusing everything."""
    good = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}]}).encode()
    answer = exchange(
        routers.ports["v2"],
        b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(good), good),
    )
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:300]
