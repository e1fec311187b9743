"""A model server for one of the demo's models, over the Open Inference Protocol v2 (KServe, Triton, MLServer).

    python -m trading.server --model v2 --port 8502 [--latency-ms 5] [--error-rate 0.1]

It trains its model at start (models.py), then serves it as ``trade-signal``:

- ``POST /v2/models/trade-signal/infer`` (and ``.../versions/{version}/infer``): one input tensor per
  indicator (``rsi``, ``macd``, ...; shape ``[n]`` or ``[n, 1]``), or a single ``[n, 5]`` tensor with
  the indicators in market.FEATURES order; answers ``outputs[0]`` = ``probability``, the chance each
  trade closes in profit (``FP64``, shape ``[n]``), with the request's ``id`` echoed.
- ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/trade-signal[/ready]``: server and
  model metadata and readiness, as the protocol defines them.
- ``GET /stats``: inference requests and injected failures so far; ``?ids=1`` adds the request ids
  (``X-Request-Id``) it answered, which is how a test sees which requests the router sent here.

``--latency-ms`` adds a service time (log-normal around that median, as real model servers have a
tail) and ``--error-rate`` answers that share of inference requests with a 500: the hard gates'
material.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web

from trading import market
from trading.models import MODELS, TrainedModel, train

MODEL_NAME = "trade-signal"
PLATFORM = "scikit-learn"


class BadRequest(ValueError):
    """The request is not a valid inference request for this model; the message says why."""


def features_from(document: Any) -> npt.NDArray[np.float64]:
    """The [n, 5] feature matrix of an inference request (columns in market.FEATURES order)."""
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list) or not document["inputs"]:
        raise BadRequest('send {"inputs": [{"name", "shape", "datatype", "data"}, ...]}')
    tensors: dict[str, npt.NDArray[np.float64]] = {}
    for tensor in document["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise BadRequest("every input needs a name")
        try:
            values = np.asarray(tensor.get("data"), dtype=np.float64)
        except (TypeError, ValueError):
            raise BadRequest(f"input {tensor['name']!r}: data must be numbers") from None
        shape = tensor.get("shape")
        if isinstance(shape, list) and all(isinstance(size, int) for size in shape):
            if int(np.prod(shape)) != values.size:
                raise BadRequest(f"input {tensor['name']!r}: shape {shape} does not hold {values.size} values")
            values = values.reshape(shape)
        tensors[tensor["name"]] = values
    if len(tensors) == 1 and next(iter(tensors.values())).ndim == 2:
        (matrix,) = tensors.values()
        if matrix.shape[1] != len(market.FEATURES):
            names = ", ".join(market.FEATURES)
            raise BadRequest(f"a single input must have shape [n, {len(market.FEATURES)}]: {names}")
    else:
        missing = [name for name in market.FEATURES if name not in tensors]
        unknown = sorted(set(tensors) - set(market.FEATURES))
        if missing or unknown:
            raise BadRequest(
                f"inputs must be {', '.join(market.FEATURES)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(unknown)}" if unknown else "")
            )
        columns = [tensors[name].reshape(-1) for name in market.FEATURES]
        if len({column.size for column in columns}) != 1:
            raise BadRequest("every input must have the same number of rows")
        matrix = np.column_stack(columns)
    if not np.all(np.isfinite(matrix)):
        raise BadRequest("inputs must be finite numbers")
    return matrix


@dataclass
class Stats:
    requests: int = 0
    failures: int = 0
    request_ids: list[str] = field(default_factory=list)


class ModelServer:
    def __init__(self, model: TrainedModel, *, latency_ms: float = 0.0, error_rate: float = 0.0, seed: int = 0):
        self.model = model
        self.latency_ms = latency_ms
        self.error_rate = error_rate
        self.random = random.Random(seed)
        self.stats = Stats()
        self.app = web.Application()
        self.app.add_routes(
            [
                web.post("/v2/models/{name}/infer", self.infer),
                web.post("/v2/models/{name}/versions/{version}/infer", self.infer),
                web.get("/v2/models/{name}/ready", self.model_ready),
                web.get("/v2/models/{name}", self.model_metadata),
                web.get("/v2/health/live", self.health),
                web.get("/v2/health/ready", self.health),
                web.get("/v2", self.server_metadata),
                web.get("/stats", self.get_stats),
            ]
        )

    @property
    def version(self) -> str:
        return self.model.recipe.version

    def _unknown(self, request: web.Request) -> web.Response | None:
        name, version = request.match_info["name"], request.match_info.get("version")
        if name != MODEL_NAME:
            problem = f"model {name!r} is not served here; it is {MODEL_NAME!r}"
        elif version is not None and version != self.version:
            problem = f"version {version!r} is not served here; it is {self.version!r}"
        else:
            return None
        return web.json_response({"error": problem}, status=404)

    async def infer(self, request: web.Request) -> web.Response:
        if (unknown := self._unknown(request)) is not None:
            return unknown
        try:
            document = await request.json(loads=json.loads)
            features = features_from(document)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "the body is not JSON"}, status=400)
        except BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.stats.requests += 1
        self.stats.request_ids.append(request.headers.get("X-Request-Id", ""))
        started = time.perf_counter()
        chances = self.model.predict(features)
        if self.latency_ms > 0:
            service_time = self.latency_ms / 1000 * self.random.lognormvariate(0.0, 0.3)
            await asyncio.sleep(max(0.0, service_time - (time.perf_counter() - started)))
        if self.error_rate > 0 and self.random.random() < self.error_rate:
            self.stats.failures += 1
            return web.json_response({"error": "injected failure (--error-rate)"}, status=500)
        answer = {
            "model_name": MODEL_NAME,
            "model_version": self.version,
            "outputs": [
                {
                    "name": "probability",
                    "shape": [len(chances)],
                    "datatype": "FP64",
                    "data": [round(float(chance), 6) for chance in chances],
                }
            ],
        }
        if isinstance(document.get("id"), str):
            answer["id"] = document["id"]
        return web.json_response(answer)

    async def model_ready(self, request: web.Request) -> web.Response:
        return self._unknown(request) or web.json_response({"name": MODEL_NAME, "ready": True})

    async def model_metadata(self, request: web.Request) -> web.Response:
        if (unknown := self._unknown(request)) is not None:
            return unknown
        return web.json_response(
            {
                "name": MODEL_NAME,
                "versions": [self.version],
                "platform": PLATFORM,
                "description": self.model.recipe.description,
                "inputs": [{"name": name, "datatype": "FP64", "shape": [-1]} for name in market.FEATURES],
                "outputs": [{"name": "probability", "datatype": "FP64", "shape": [-1]}],
            }
        )

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"live": True, "ready": True})

    async def server_metadata(self, _: web.Request) -> web.Response:
        return web.json_response({"name": f"{MODEL_NAME}-{self.model.name}", "version": self.version, "extensions": []})

    async def get_stats(self, request: web.Request) -> web.Response:
        stats: dict[str, Any] = {"requests": self.stats.requests, "failures": self.stats.failures}
        if request.query.get("ids"):
            stats["requestIds"] = self.stats.request_ids
        return web.json_response(stats)

    async def serve(self, host: str, port: int) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=1024).start()
        print(f"serving {MODEL_NAME} {self.model.name} ({self.version}) on http://{host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trading.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True, help="which model to train and serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="median service time added to each inference")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of inferences answered with a 500")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model = train(args.model)
    holdout, outcomes = market.history(20_000, seed=99)
    print(
        f"trained {MODEL_NAME} {args.model} ({model.recipe.description}) in {time.perf_counter() - started:.1f}s; "
        f"log loss on fresh trades {market.log_loss(outcomes, model.predict(holdout)):.3f}",
        flush=True,
    )
    server = ModelServer(model, latency_ms=args.latency_ms, error_rate=args.error_rate, seed=args.port)

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await server.serve(args.host, args.port)

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(run())
    return 0


def event_loop_factory() -> Any:
    """uvloop's event loop when it is installed (it is a dependency of shadowgate): cheaper per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
