"""The demo's notification receiver: a CloudEvents endpoint on loopback, as a team's own would be.

The scenarios' ShadowDeployments name it in spec.notifications; the story puts its URL in the Secret they
name (labelled shadowgate.io/router-secret=true, as every Secret a ShadowDeployment names must be). The
operator posts a CloudEvent for each transition; the receiver parses it with the CloudEvents SDK (as
tests/cluster/test_notify*.py do), drops an id it has seen (delivery is at least once) and keeps it for the
story, which prints a line per event as it arrives and hands the list to the report.

It serves from a thread of its own, so a slow poll of the story never holds the operator's post.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat

PATH = "/events"


@dataclass(frozen=True)
class Received:
    """One CloudEvent as the receiver got it."""

    id: str
    type: str
    """e.g. io.shadowgate.rollout.Promoted"""
    data: dict[str, Any]
    """What the operator said: reason, message, phase, step, steps, weight, metrics, ..."""

    @property
    def reason(self) -> str:
        return str(self.data.get("reason", ""))

    def line(self, width: int = 110) -> str:
        """One line: the type, the phase and step it led to, and the start of the Event's message (the
        whole of it is the live table's reason just above), cut to `width` characters."""
        step, steps, weight = self.data.get("step"), self.data.get("steps"), self.data.get("weight")
        where = "" if step is None else f" at step {step + 1}/{steps} ({weight}%)"
        text = f"notification {self.type}: {self.data.get('phase')}{where}: {self.data.get('message', '')}"
        return text if len(text) <= width else text[: width - 1] + "…"


class Receiver:
    """Answers 202 to each CloudEvent POSTed to /events (400 to anything else); `take` hands out the new ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Received] = []
        self._taken = 0
        self.refused: list[str] = []
        """What was posted and could not be read as a CloudEvent (a defect: said by the story)."""
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}{PATH}"

    @property
    def events(self) -> list[Received]:
        """Every event received so far, in order of arrival, each id once."""
        with self._lock:
            return list(self._events)

    def take(self) -> list[Received]:
        """The events received since the previous `take`."""
        with self._lock:
            new = self._events[self._taken :]
            self._taken = len(self._events)
        return new

    def _accept(self, headers: dict[str, str], body: bytes) -> int:
        try:
            event = from_http(HTTPMessage(headers=headers, body=body), JSONFormat())
            data = event.get_data()
            received = Received(event.get_id(), event.get_type(), data if isinstance(data, dict) else {})
        except Exception as exc:  # whatever the SDK refuses: answered 400, kept to be said
            with self._lock:
                self.refused.append(f"{type(exc).__name__}: {exc}")
            return 400
        with self._lock:
            if all(seen.id != received.id for seen in self._events):
                self._events.append(received)
        return 202

    def start(self) -> Receiver:
        accept = self._accept

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = accept(dict(self.headers.items()), body) if self.path == PATH else 404
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="demo-receiver", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
