"""Shadow mode must not let the candidate slow production down: with every request mirrored to a candidate
that is 10x slower, answers 500s or hangs (until the mirror timeout), production's answers are unchanged and
its p99 stays within the noise of runs with a healthy candidate, measured in the same test."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.load import Result, client_session, percentile, run_load
from tests.support.router import ModelServer, Router, router_config

pytestmark = pytest.mark.database

PRODUCTION_MS = 5.0
REQUESTS = 300
RATE = 200.0
ROUNDS = 7


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[ModelServer, ModelServer]]:
    production = ModelServer(tmp_path, bias=0, latency_ms=PRODUCTION_MS)
    candidate = ModelServer(tmp_path, bias=100, latency_ms=PRODUCTION_MS)
    production.start()
    candidate.start()
    yield production, candidate
    production.stop()
    candidate.stop()


def summary(results: list[Result]) -> tuple[float, float]:
    latencies = [result.latency * 1000 for result in results]
    return percentile(latencies, 0.5), percentile(latencies, 0.99)


SCENARIOS = {
    "healthy": {"latencyMs": PRODUCTION_MS, "errorRate": 0.0, "hang": False},
    "10x slower": {"latencyMs": PRODUCTION_MS * 10, "errorRate": 0.0, "hang": False},
    "answering 500": {"latencyMs": PRODUCTION_MS, "errorRate": 1.0, "hang": False},
    "hung": {"latencyMs": PRODUCTION_MS, "errorRate": 0.0, "hang": True},
}


async def measure(url: str, name: str, session: aiohttp.ClientSession) -> list[Result]:
    results = await run_load(url, REQUESTS, rate=RATE, session=session)
    assert [result.status for result in results] == [200] * REQUESTS, name
    assert {result.served_by for result in results} == {"production"}, name
    predictions = [json.loads(result.body)["outputs"][0]["data"][0] for result in results]
    assert predictions == [index + 1 for index in range(REQUESTS)], f"{name}: production's answers changed"
    return results


async def test_a_slow_failing_or_hung_candidate_does_not_touch_production(
    servers: tuple[ModelServer, ModelServer], tmp_path: Path, dsn: str
) -> None:
    """The scenarios take turns, round after round, and each is judged by its median round: a neighbour's
    burst of CPU on this shared 2-core machine then lands on all of them alike or is outvoted. The noise
    allowance is how far the healthy rounds spread among themselves."""
    production, candidate = servers
    config = router_config(production.url, candidate.url, mode="shadow", weight=100, mirrorTimeoutSeconds=1)
    router = Router.with_file(tmp_path, dsn, config).start()
    url = f"{router.url}/v2/models/fraud/infer"
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in SCENARIOS}
    try:
        async with client_session() as session:
            await run_load(url, 200, rate=RATE, session=session)  # warm up connections on every side
            for _ in range(ROUNDS):
                for name, behaviour in SCENARIOS.items():
                    candidate.control(**behaviour)
                    latencies = [result.latency * 1000 for result in await measure(url, name, session)]
                    rounds[name].append((percentile(latencies, 0.5), percentile(latencies, 0.99)))
        timeouts = router.metric("shadowgate_router_requests_total", side="candidate", status="timeout")
    finally:
        candidate.control(hang=False)
        router.stop()
    p50 = {name: statistics.median(p50 for p50, _ in values) for name, values in rounds.items()}
    p99 = {name: statistics.median(p99 for _, p99 in values) for name, values in rounds.items()}
    healthy = sorted(p99 for _, p99 in rounds["healthy"])
    # The spread of the healthy rounds, their extremes left out, and at least 3 ms or half the healthy p99:
    # a round's p99 is its third-slowest answer, and on a busy machine (CI at stop 22) a 10x slower
    # candidate's extra open copies moved it 4 ms in a 17 ms tail. Production waiting on the candidate would
    # add its 45 ms more (up to the 1 s mirror timeout when hung), well above this allowance.
    noise = max(healthy[-2] - healthy[1], 3.0, 0.5 * p99["healthy"])
    healthy_p50 = sorted(p50 for p50, _ in rounds["healthy"])
    # The same for the median: at least 1 ms or a quarter of the healthy median, since on a busy machine
    # (a fresh-machine run at load 10-20) a 10x slower candidate's extra open copies cost production about
    # 1 ms of CPU time; production waiting on the candidate would add its 50 ms.
    noise_p50 = max(healthy_p50[-2] - healthy_p50[1], 1.0, 0.25 * statistics.median(healthy_p50))
    report = ", ".join(f"{name}: p50 {p50[name]:.1f} ms p99 {p99[name]:.1f} ms" for name in SCENARIOS)
    print(f"production through the router, {RATE:g} req/s all mirrored (median of {ROUNDS} rounds): {report}")
    assert timeouts > 0, "the hung candidate's copies should have been recorded as timeouts"
    for name in ("10x slower", "answering 500", "hung"):
        assert p99[name] <= p99["healthy"] + noise, f"{name}: {report}; noise {noise:.1f} ms; rounds {rounds}"
        assert p50[name] <= p50["healthy"] + noise_p50, f"{name}: {report}; noise {noise_p50:.1f} ms; rounds {rounds}"
