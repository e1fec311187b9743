"""Run `shadowgate operator` with every Kubernetes API request it makes counted, whatever its version.

    python bench/operator/counting.py COUNTS.json operator --namespace bench ...

The operator's own calls go through httpx and kopf's through aiohttp; both clients are wrapped before
the operator starts, so the baseline (an older checkout on PYTHONPATH) and the current code are counted
the same way. Every second the counts are written to COUNTS.json: per client, method and kind of call
(a watch is a GET with watch=true and is counted once, when it is opened), with the kind of object (no
names), and apart, the requests answered with an HTTP error. SIGUSR1 and SIGUSR2 start and
stop a profile of it (COUNTS-1.pstats, COUNTS-2.pstats, ...), in CPU time.
"""

from __future__ import annotations

import collections
import cProfile
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

COUNTS: collections.Counter[str] = collections.Counter()
REFUSED: collections.Counter[str] = collections.Counter()
"""Requests answered with an HTTP error (e.g. 409: a write from a stale read), by label and status."""


def _resource(url: str) -> str:
    """The kind of object a request is about: `secrets`, `shadowdeployments/status`, ... (no names)."""
    parts = urlsplit(url).path.strip("/").split("/")
    at = parts.index("namespaces") + 2 if "namespaces" in parts[:-1] else (2 if parts[:1] == ["api"] else 3)
    rest = parts[at:]
    return "/".join(rest[:1] + rest[2:3]) or "-"


def _label(client: str, method: str, url: str, params: Any) -> str:
    text = f"{url} {params or ''}"
    watch = "watch=true" in text or "watch=True" in text or "'watch': 'true'" in text or "'watch': True" in text
    return f"{client} {method.upper()}{' (watch)' if watch else ''} {_resource(url)}"


def _wrap_httpx() -> None:
    import httpx

    original = httpx.AsyncClient.send

    async def send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        label = _label("operator", request.method, str(request.url), None)
        COUNTS[label] += 1
        response = await original(self, request, **kwargs)
        if response.status_code >= 400:
            REFUSED[f"{label} {response.status_code}"] += 1
        return response

    httpx.AsyncClient.send = send  # type: ignore[method-assign]


def _wrap_aiohttp() -> None:
    import aiohttp

    original = aiohttp.ClientSession._request

    async def _request(self: aiohttp.ClientSession, method: str, url: Any, **kwargs: Any) -> Any:
        COUNTS[_label("kopf", method, str(url), kwargs.get("params"))] += 1
        return await original(self, method, url, **kwargs)

    aiohttp.ClientSession._request = _request  # type: ignore[method-assign]


def _dump_forever(path: Path) -> None:
    while True:
        snapshot = {"time": time.time(), "counts": dict(COUNTS), "refused": dict(REFUSED)}
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(snapshot))
        os.replace(temporary, path)
        time.sleep(1.0)


def _profile_on_signals(path: Path) -> None:
    """SIGUSR1 starts profiling the operator (its event loop runs in this, the main, thread); SIGUSR2 stops
    and writes the statistics (pstats) to `path` with the profile's number: 1 the start-up, 2 the steady window."""
    # CPU time, not wall time: on a shared machine a wall-clock profile charges to whatever code ran when
    # the scheduler took the CPU away (a socket send that woke the API server, say).
    profiler = cProfile.Profile(time.process_time)
    taken = 0

    def start(*_: Any) -> None:
        profiler.enable()

    def stop(*_: Any) -> None:
        nonlocal profiler, taken
        profiler.disable()
        taken += 1
        profiler.dump_stats(path.with_name(f"{path.stem}-{taken}{path.suffix}"))
        profiler = cProfile.Profile(time.process_time)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def main() -> int:
    path = Path(sys.argv[1])
    _wrap_httpx()
    _wrap_aiohttp()
    _profile_on_signals(path.with_suffix(".pstats"))
    threading.Thread(target=_dump_forever, args=(path,), daemon=True).start()
    import shadowgate_operator
    from shadowgate_operator.cli import main as cli_main

    print(f"counting API requests of {Path(shadowgate_operator.__file__).parent}", file=sys.stderr, flush=True)
    result: int = cli_main(sys.argv[2:])
    return result


if __name__ == "__main__":
    sys.exit(main())
