"""A small open-loop load generator for router tests: requests start on a fixed schedule, whatever the
previous ones are doing, and latency counts from the scheduled start (so a stall shows up in p99 rather
than silently slowing the load down). Loopback only; bounded by the number of requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class Result:
    index: int
    status: int
    latency: float
    """Seconds from the scheduled start to the whole answer; errors count too."""
    request_id: str
    served_by: str
    body: bytes
    scheduled: float
    """Seconds from the start of the run."""


def infer_body(index: int) -> bytes:
    """A v2 request whose prediction (the model servers sum the inputs) identifies the request."""
    return json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [index]}]}).encode()


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_load(
    url: str,
    count: int,
    rate: float,
    *,
    headers: Callable[[int], dict[str, str]] = lambda index: {},
    body: Callable[[int], bytes] = infer_body,
    request_timeout: float = 10.0,
    session: aiohttp.ClientSession | None = None,
) -> list[Result]:
    """Send `count` POSTs to `url` at `rate` per second; returns one Result per request, in index order.

    Pass a `session` to reuse its warm connections across runs (a new one pays connection setup at first).
    """
    if session is None:
        async with client_session() as own:
            return await run_load(
                url, count, rate, headers=headers, body=body, request_timeout=request_timeout, session=own
            )
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    started = time.perf_counter()

    async def one(index: int) -> Result:
        scheduled = index / rate
        delay = started + scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            async with session.post(
                url,
                data=body(index),
                headers={"Content-Type": "application/json", **headers(index)},
                timeout=client_timeout,
            ) as response:
                content = await response.read()
                status = response.status
                request_id = response.headers.get("X-Request-Id", "")
                served_by = response.headers.get("X-Shadowgate-Served-By", "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            content, status, request_id, served_by = str(exc).encode(), 0, "", ""
        latency = time.perf_counter() - started - scheduled
        return Result(index, status, latency, request_id, served_by, content, scheduled)

    return list(await asyncio.gather(*(one(index) for index in range(count))))
