"""A sample fraud model behind the Open Inference Protocol (v2) for shadowgate's example; stdlib only.

Both sample models estimate the same thing, the probability that a transaction is fraud, from its
three features; NOISE says how far off a model is (fraud-v1 0.25, fraud-v2 0.05). So the candidate is
the better model, and shadowgate promotes it once the outcomes prove it. traffic.py draws the outcomes
from the same world (`fraud_probability`).

    MODEL_NAME=fraud MODEL_VERSION=2.0.0 NOISE=0.05 PORT=8080 python model_server.py
"""

from __future__ import annotations

import json
import math
import os
import random
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = os.environ.get("MODEL_NAME", "fraud")
VERSION = os.environ.get("MODEL_VERSION", "1")
NOISE = float(os.environ.get("NOISE", "0.1"))


def fraud_probability(features: list[float]) -> float:
    """The sample world's truth: how likely a transaction with these features is fraud."""
    a, b, c = ([*features, 0.0, 0.0, 0.0])[:3]
    return 1.0 / (1.0 + math.exp(-(1.5 * a - b + 0.5 * c - 1.0)))


def predict(features: list[float]) -> float:
    """This model's estimate: the truth, off by NOISE, kept inside (0, 1) for the log loss."""
    return min(0.99, max(0.01, fraud_probability(features) + random.gauss(0.0, NOISE)))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the router reuses connections

    def do_GET(self) -> None:
        if self.path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
            self._send(200, {"live": True, "ready": True})
        elif self.path == f"/v2/models/{MODEL}":
            self._send(200, {"name": MODEL, "versions": [VERSION], "platform": "python"})
        else:
            self._send(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != f"/v2/models/{MODEL}/infer":
            self._send(404, {"error": f"no model at {self.path}"})
            return
        try:
            request = json.loads(body)
            features = [float(value) for value in request["inputs"][0]["data"]]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self._send(400, {"error": f"expected {{'inputs': [{{'data': [numbers]}}]}}: {exc}"})
            return
        output = {"name": "fraud_probability", "shape": [1], "datatype": "FP64", "data": [predict(features)]}
        answer = {"model_name": MODEL, "model_version": VERSION, "id": request.get("id", ""), "outputs": [output]}
        self._send(200, answer)

    def _send(self, status: int, document: dict[str, Any]) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise here
        pass


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print(f"model {MODEL} {VERSION} (noise {NOISE}) on :{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
