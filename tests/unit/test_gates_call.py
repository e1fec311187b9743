"""gates.call against a real HTTP server on loopback: what a reply says (bounded, no URL), the label rule,
the timeout as a whole, and an answer reused within an analysis interval."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from shadowgate_operator.api import Gate, GateOutcome, ShadowDeployment
from shadowgate_operator.builders import ROUTER_SECRET_LABEL
from shadowgate_operator.gates.call import Gatekeeper, Remembered
from shadowgate_operator.gates.verdict import ANSWER_LIMIT, GateCall
from tests.admission_cases import load_example, merge_patch


class Server:
    """/big: 500 with 100 kB; /echo: 403 quoting the request line (its URL); /slow: 200 one byte a second;
    /ok: 200."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        paths = self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                paths.append(self.path)
                if self.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    for _ in range(100):
                        time.sleep(0.2)
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    return
                status, body = {
                    "/big": (500, b"failing\n\x1b[31m" + b"y" * 100_000),
                    "/ok": (200, b"go"),
                }.get(self.path, (403, f"refused {self.requestline} at http://127.0.0.1:{port}{self.path}".encode()))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        port = self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    made = Server()
    yield made
    made.stop()


class Secrets:
    """Secrets as the API server would return them (SecretReader)."""

    def __init__(self, urls: dict[str, str], *, labelled: bool = True) -> None:
        self.secret = {
            "metadata": {
                "namespace": "models",
                "name": "gates",
                "labels": {ROUTER_SECRET_LABEL: "true"} if labelled else {},
            },
            "data": {key: base64.b64encode(url.encode()).decode() for key, url in urls.items()},
        }

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.secret if name == "gates" else None


SD = ShadowDeployment.model_validate(merge_patch(load_example(), {"metadata": {"namespace": "models", "uid": "u1"}}))


def call(key: str, *, timeout: str = "10s", name: str = "check") -> GateCall:
    gate = Gate.model_validate(
        {"name": name, "type": "confirmStep", "urlSecretRef": {"name": "gates", "key": key}, "timeout": timeout}
    )
    return GateCall(gate, f"confirmStep:r:{0}", "step 2 of 3")


def ask(keeper: Gatekeeper, *calls: GateCall, remembered: dict[str, Remembered] | None = None) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        try:
            return await keeper.ask({} if remembered is None else remembered, SD, calls, 30.0)
        finally:
            await keeper.close()

    return asyncio.run(run())


def test_a_refusal_is_bounded_printable_and_never_quotes_the_url(server: Server) -> None:
    urls = {"big": f"http://127.0.0.1:{server.port}/big", "echo": f"http://127.0.0.1:{server.port}/echo?token=s3cret"}
    replies = ask(Gatekeeper(Secrets(urls)), call("big", name="big"), call("echo", name="echo"))
    big, echo = replies["big"], replies["echo"]
    assert big.outcome is GateOutcome.REFUSED and big.message.startswith("HTTP 500: 'failing [31myyy")
    assert len(big.message) <= len("HTTP 500: ''") + ANSWER_LIMIT and "\x1b" not in big.message
    assert echo.outcome is GateOutcome.REFUSED and echo.message.startswith("HTTP 403: 'refused POST /echo?token=s3cret")
    assert urls["echo"] not in echo.message and "<url>" in echo.message


def test_an_unlabelled_secret_is_not_read_for_a_url_and_nothing_is_posted(server: Server) -> None:
    replies = ask(Gatekeeper(Secrets({"ok": f"http://127.0.0.1:{server.port}/ok"}, labelled=False)), call("ok"))
    reply = replies["check"]
    assert reply.outcome is GateOutcome.NOT_ALLOWED and "spec.gates[].urlSecretRef" in reply.message
    assert "kubectl label secret gates -n models shadowgate.io/router-secret=true" in reply.message
    assert server.paths == []


def test_the_timeout_bounds_the_whole_answer_even_one_that_trickles(server: Server) -> None:
    began = time.monotonic()
    replies = ask(Gatekeeper(Secrets({"slow": f"http://127.0.0.1:{server.port}/slow"})), call("slow", timeout="1s"))
    assert replies["check"].outcome is GateOutcome.TIMED_OUT
    assert replies["check"].message == "no answer within 1s (timed out)"
    assert time.monotonic() - began < 5, "bounded by the gate's timeout, not by each read's"


def test_an_answer_is_reused_within_the_interval_for_the_same_question_only(server: Server) -> None:
    secrets = Secrets({"ok": f"http://127.0.0.1:{server.port}/ok"})
    remembered: dict[str, Remembered] = {}
    first = ask(Gatekeeper(secrets), call("ok"), remembered=remembered)["check"]
    assert first.outcome is GateOutcome.PASSED and first.message == "HTTP 200: 'go'"
    assert ask(Gatekeeper(secrets), call("ok"), remembered=remembered)["check"] == first
    assert server.paths == ["/ok"]
    other = GateCall(call("ok").gate, "confirmStep:r:1", "step 3 of 3")
    assert ask(Gatekeeper(secrets), other, remembered=remembered)["check"].key == "confirmStep:r:1"
    assert server.paths == ["/ok", "/ok"]


def test_no_url_or_a_url_the_operator_does_not_post_to_is_unreachable() -> None:
    secrets = Secrets({"meta": "http://169.254.169.254/latest"})
    replies = ask(Gatekeeper(secrets), call("missing", name="missing"), call("meta", name="meta"))
    assert (
        replies["missing"].outcome is GateOutcome.UNREACHABLE and "has no key 'missing'" in replies["missing"].message
    )
    assert replies["meta"].outcome is GateOutcome.UNREACHABLE and "169.254" not in replies["meta"].message.split(":")[0]
