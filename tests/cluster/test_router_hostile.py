"""Peers that attack or misbehave (issue 12): the router answers them with a 4xx or records them as failed,
never with a 500, a lost row or a stall of everyone else. Each test reproduces one finding of the issue."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from shadowgate_operator.migrate import migrate
from tests.support.hostile import HostileServer
from tests.support.load import run_load
from tests.support.router import HostileModelServer, ModelServer, Router, router_config, wait_until

pytestmark = pytest.mark.database


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    server = ModelServer(tmp_path_factory.mktemp("models"), bias=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    await migrate(connection)
    yield connection
    await connection.close()


@pytest.fixture
def deployment() -> str:
    return f"hostile-{secrets.token_hex(4)}"


StartRouter = Callable[..., Router]


@pytest.fixture
def start_router(tmp_path: Path, dsn: str, request: pytest.FixtureRequest) -> Iterator[StartRouter]:
    started: list[Router] = []

    def start(config: dict[str, Any], *args: str) -> Router:
        router = Router.with_file(tmp_path, dsn, config, *args)
        started.append(router)
        return router.start()

    yield start
    for router in started:
        router.stop()
    if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
        for router in started:
            print(f"--- {router.log_path} ---\n{router.log()[-5000:]}")


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Callable[[str, int], HostileModelServer]]:
    started: list[HostileModelServer] = []

    def start(mode: str, size: int) -> HostileModelServer:
        server = HostileModelServer(tmp_path, mode, size)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def rows(db: asyncpg.Connection, deployment: str, expected: int, table: str = "predictions") -> list[Any]:
    """Wait until `expected` rows of the deployment are in `table`."""
    deadline = time.monotonic() + 30
    while True:
        found = await db.fetch(f"SELECT * FROM {table} WHERE deployment = $1 ORDER BY time", deployment)
        if len(found) >= expected or time.monotonic() > deadline:
            assert len(found) == expected, f"{len(found)} {table} rows for {deployment}, expected {expected}"
            return found
        await asyncio.sleep(0.1)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def test_deeply_nested_json_from_a_client_gets_400_not_500(
    production: ModelServer, start_router: StartRouter, deployment: str
) -> None:
    """D1: inference and /outcomes."""
    router = start_router(router_config(production.url, production.url, deployment=deployment))
    auth = {"Authorization": f"Bearer {router.token}"}
    async with httpx.AsyncClient(timeout=10) as client:
        infer = await client.post(f"{router.url}/v2/models/fraud/infer", content=nested(100_000))
        wrapped = await client.post(f"{router.url}/v2/models/fraud/infer", content=b'{"inputs": ' + nested(500) + b"}")
        outcome = await client.post(f"{router.url}/outcomes", content=nested(100_000), headers=auth)
        fine = await client.post(f"{router.url}/v2/models/fraud/infer", json={"inputs": []})
    for answer in (infer, wrapped, outcome):
        assert answer.status_code == 400, answer.text
        assert "nested deeper than 64 levels" in answer.json()["error"]
    assert fine.status_code == 200


async def test_a_candidate_answering_deeply_nested_json_loses_no_row(
    production: ModelServer,
    hostile: Callable[[str, int], HostileModelServer],
    start_router: StartRouter,
    db: asyncpg.Connection,
    deployment: str,
) -> None:
    """D2: every request mirrored to a candidate whose answers are nested 100,000 deep; every row is
    recorded, production's prediction included, the candidate's marked as having none."""
    candidate = hostile("nested", 100_000)
    router = start_router(router_config(production.url, candidate.url, deployment=deployment, weight=100))
    results = await run_load(f"{router.url}/v2/models/fraud/infer", 300, rate=150)
    assert [result.status for result in results] == [200] * 300
    recorded = await rows(db, deployment, 300)
    assert {row["request_id"] for row in recorded} == {result.request_id for result in results}
    by_id = {row["request_id"]: row for row in recorded}
    for result in results:
        row = by_id[result.request_id]
        assert row["production_prediction"] == json.loads(result.body)["outputs"][0]["data"][0]
        assert (row["candidate_status"], row["candidate_error"], row["candidate_prediction"]) == (
            200,
            "no_prediction",
            None,
        )


def peak_rss_mb(router: Router) -> float:
    assert router.process is not None
    for line in Path(f"/proc/{router.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize(
    ("mode", "size"), [("huge-body", 50_000_000), ("huge-header", 32_000_000), ("many-headers", 5_000)]
)
async def test_a_candidate_sending_huge_answers_costs_its_calls_not_the_router(
    production: ModelServer,
    hostile: Callable[[str, int], HostileModelServer],
    start_router: StartRouter,
    db: asyncpg.Connection,
    deployment: str,
    mode: str,
    size: int,
) -> None:
    """D5 and D3 upstream: twenty 50 MB answers took the router from 87 to 434 MB (its pod limit is 512 Mi);
    an answer's endless head had no limit at all. Now each such call fails as bad_response, production
    answers every request, every row is recorded, and memory stays near where it started."""
    candidate = hostile(mode, size)
    # The breaker off: every one of the 40 calls is made and read up to its limit, which is what is measured.
    config = router_config(production.url, candidate.url, deployment=deployment, weight=100)
    router = start_router(config, "--breaker-failures", "0")
    before = peak_rss_mb(router)
    results = await run_load(f"{router.url}/v2/models/fraud/infer", 40, rate=20)
    assert [result.status for result in results] == [200] * 40
    recorded = await rows(db, deployment, 40)
    assert {(row["candidate_status"], row["candidate_error"]) for row in recorded} == {(None, "bad_response")}
    assert router.metric("shadowgate_router_requests_total", side="candidate", status="bad_response") == 40
    grown = peak_rss_mb(router) - before
    print(f"{mode}: router peak RSS {before:.0f} MB before, +{grown:.0f} MB after 40 mirrored answers of {size}")
    assert grown < 120, f"the router's peak memory grew by {grown:.0f} MB"


class HeaderRecorder:
    """A V2 model server in the test's own loop that notes the headers of every request it gets."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(line.decode().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
                headers = {name.lower(): value for name, value in fields.items()}
                await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(headers)
                body = b'{"outputs":[{"name":"score","datatype":"FP64","shape":[1],"data":[1.0]}]}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def __aenter__(self) -> HeaderRecorder:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("drop", "candidate_gets"),
    [
        (None, {"x-api-key", "x-account-id"}),  # the default: Authorization and Cookie stay with production
        (["X-Api-Key"], {"authorization", "cookie", "x-account-id"}),
        ([], {"authorization", "cookie", "x-api-key", "x-account-id"}),  # opted in to forward everything
    ],
)
async def test_client_credentials_are_not_mirrored_to_the_candidate_unless_asked(
    start_router: StartRouter, deployment: str, drop: list[str] | None, candidate_gets: set[str]
) -> None:
    """D14: Authorization and Cookie (and a configurable list) stay out of shadow copies by default."""
    sent = {"Authorization": "Bearer client-secret", "Cookie": "session=1", "X-Api-Key": "k", "X-Account-Id": "a"}
    async with HeaderRecorder() as production, HeaderRecorder() as candidate:
        changes = {} if drop is None else {"mirrorDropHeaders": drop}
        router = start_router(router_config(production.url, candidate.url, deployment=deployment, **changes))
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.post(f"{router.url}/v2/models/fraud/infer", json={"inputs": []}, headers=sent)
        assert answer.status_code == 200
        deadline = time.monotonic() + 10
        while not candidate.seen:
            assert time.monotonic() < deadline, "the shadow copy never arrived"
            await asyncio.sleep(0.05)
    interesting = {name.lower() for name in sent}
    assert set(production.seen[0]) & interesting == interesting, "production gets the request as sent"
    assert set(candidate.seen[0]) & interesting == candidate_gets


@pytest.mark.parametrize("protocol", ["v2", "json"])
async def test_metrics_are_served_on_their_own_port_only(
    production: ModelServer, start_router: StartRouter, deployment: str, protocol: str
) -> None:
    """Clients of the traffic port cannot read the router's metrics; Prometheus reads them on another."""
    config = router_config(production.url, production.url, deployment=deployment, protocol=protocol)
    router = start_router(config)
    async with httpx.AsyncClient(timeout=10) as client:
        traffic = await client.get(f"{router.url}/metrics")
        metrics = await client.get(f"{router.metrics_url}/metrics")
        elsewhere = await client.get(f"{router.metrics_url}/v2/health/ready")
    assert traffic.status_code == 404 and "shadowgate_router" not in traffic.text
    assert metrics.status_code == 200 and "shadowgate_router_config_info" in metrics.text
    assert elsewhere.status_code == 404


async def test_a_version_segment_that_is_not_a_plain_name_is_refused_not_forwarded(
    production: ModelServer, start_router: StartRouter, deployment: str
) -> None:
    router = start_router(router_config(production.url, production.url, deployment=deployment))
    before = production.stats()["requests"]
    for version in ("..", "%2e%2e", "1%2f..%2fadmin"):
        # Written by hand: HTTP clients remove '..' segments before sending; attackers do not.
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(
            b"POST /v2/models/fraud/versions/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\n{}" % version.encode()
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and b"is not a plain name" in answer, answer
    assert production.stats()["requests"] == before


async def test_reused_request_ids_are_recorded_and_counted(
    production: ModelServer, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """D6, the router's side: every request with a reused id is answered and recorded (the analysis scores
    the id once), and the repeats show in /metrics."""
    router = start_router(router_config(production.url, production.url, deployment=deployment, weight=0))
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(3):
            for request_id in ("trade-1", "trade-2", f"fresh-{n}"):
                answer = await client.post(
                    f"{router.url}/v2/models/fraud/infer", json={"inputs": []}, headers={"X-Request-Id": request_id}
                )
                assert answer.status_code == 200 and answer.headers["X-Request-Id"] == request_id
    recorded = await rows(db, deployment, 9)
    assert sorted(row["request_id"] for row in recorded).count("trade-1") == 3
    assert router.metric("shadowgate_router_duplicate_request_ids_total") == 4


async def test_an_outcome_correction_at_the_same_time_is_refused_or_counted_never_silently_dropped(
    production: ModelServer, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    router = start_router(router_config(production.url, production.url, deployment=deployment))
    url, auth = f"{router.url}/outcomes", {"Authorization": f"Bearer {router.token}"}
    moment = "2026-03-04T05:06:07Z"
    async with httpx.AsyncClient(timeout=10, headers=auth) as client:
        first = await client.post(url, json={"request_id": "t-1", "outcome": 1.0, "time": moment})
        assert first.status_code == 202
        await rows(db, deployment, 1, table="outcomes")
        retry = await client.post(url, json={"request_id": "t-1", "outcome": 1.0, "time": moment})
        both = await client.post(
            url,
            json=[
                {"request_id": "t-2", "outcome": 1, "time": moment},
                {"request_id": "t-2", "outcome": 0, "time": moment},
            ],
        )
        correction = await client.post(url, json={"request_id": "t-1", "outcome": 0.0, "time": moment})
        later = await client.post(url, json={"request_id": "t-1", "outcome": 0.0, "time": "2026-03-04T05:06:08Z"})
    assert (retry.status_code, correction.status_code, later.status_code) == (202, 202, 202)
    assert both.status_code == 400 and "a correction needs a later time" in both.json()["error"]
    recorded = await rows(db, deployment, 2, table="outcomes")
    assert [(row["request_id"], row["outcome"]) for row in recorded] == [("t-1", 1.0), ("t-1", 0.0)]
    wait_until(
        lambda: router.metric("shadowgate_router_rows_conflicting_total", table="outcomes") == 1,
        10,
        "the ignored correction to be counted",
    )
    assert "a row with the same namespace/deployment/request_id/time and another outcome" in router.log()


async def test_an_outcome_id_with_a_nul_is_refused(
    production: ModelServer, start_router: StartRouter, deployment: str
) -> None:
    router = start_router(router_config(production.url, production.url, deployment=deployment))
    async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {router.token}"}) as client:
        answer = await client.post(
            f"{router.url}/outcomes",
            json=[{"request_id": "ok", "outcome": 1}, {"request_id": "a\u0000b", "outcome": 1}],
        )
    assert answer.status_code == 400 and "visible ASCII" in answer.json()["error"]


# The candidate's circuit breaker (issue 12): a candidate whose every answer is refused is left alone for a
# while, and every request it is not called for is still recorded as its failure.

COOL_OFF = 5.0


def kinds(recorded: list[Any]) -> list[str | None]:
    return [row["candidate_error"] for row in recorded]


async def test_a_candidate_whose_answers_are_all_refused_is_left_alone_and_still_counted_as_failing(
    production: ModelServer, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """Shadow mode, every request mirrored to a candidate answering 5,000 headers (each answer refused as
    bad_response). After 10 failures in a row the breaker opens: no copy is sent for the cool-off, each
    skipped one is recorded as the candidate failing (circuit_open, no status, no latency) so the error
    rate still counts every request; production answers all. After the cool-off a probe goes through,
    fails, and the breaker opens again."""
    async with HostileServer("many-headers", 5_000) as candidate:
        config = router_config(production.url, candidate.url, deployment=deployment, weight=100)
        router = start_router(config, "--breaker-cool-off", str(COOL_OFF))
        url = f"{router.url}/v2/models/fraud/infer"
        results = await run_load(url, 60, rate=50)
        results += await run_load(url, int((COOL_OFF + 2) * 20), rate=20)  # past the cool-off
        recorded = await rows(db, deployment, len(results))
        calls = candidate.requests
    assert [(result.status, result.served_by) for result in results] == [(200, "production")] * len(results)
    by_id = {row["request_id"]: row for row in recorded}
    for result in results:
        assert by_id[result.request_id]["production_prediction"] == json.loads(result.body)["outputs"][0]["data"][0]

    errors = kinds(recorded)
    assert set(errors) == {"bad_response", "circuit_open"}, errors
    assert errors[:10] == ["bad_response"] * 10
    assert errors.count("bad_response") == calls, "every call made reached the candidate; no skipped one did"
    for row in recorded:
        skipped = row["candidate_error"] == "circuit_open"
        assert (row["candidate_status"], row["candidate_version"]) == (None, "2.0")
        assert (row["candidate_latency_ms"] is None) == skipped, "a call not made has no latency"

    # The request ids are stamped and admitted in one step, so the rows in time order show the breaker: from
    # the first skipped request, none is sent until the cool-off has passed since the last one admitted.
    first_skipped = errors.index("circuit_open")
    opened = recorded[first_skipped - 1]["time"]
    during = [row for row in recorded[first_skipped:] if (row["time"] - opened).total_seconds() < COOL_OFF]
    assert kinds(during) == ["circuit_open"] * len(during) and len(during) > 40
    probes = [index for index, kind in enumerate(errors) if kind == "bad_response" and index > first_skipped]
    assert probes, f"no probe after the cool-off: {errors}"
    assert (recorded[probes[0]]["time"] - opened).total_seconds() >= COOL_OFF
    assert len(probes) <= 3 and errors[-1] == "circuit_open", "the failed probe opened it again"

    candidate_calls = {
        status: router.metric("shadowgate_router_requests_total", side="candidate", role="mirror", status=status)
        for status in ("bad_response", "circuit_open")
    }
    assert candidate_calls == {"bad_response": calls, "circuit_open": errors.count("circuit_open")}
    assert router.metric("shadowgate_router_candidate_breaker_opened_total", protocol="http") >= 2
    assert router.metric("shadowgate_router_candidate_breaker_state", protocol="http") == 2
    assert "the candidate's circuit breaker opened (http): 10 calls in a row failed" in router.log()


async def test_in_canary_mode_the_open_breaker_falls_back_to_production_or_answers_503(
    production: ModelServer, start_router: StartRouter, db: asyncpg.Connection, deployment: str
) -> None:
    """Canary, 90% to a candidate whose answers are all refused. With fallbackToProduction production
    answers every request; the rows the breaker skipped say the candidate failed (circuit_open) and that
    production answered as the fallback, so the analysis scores them for the candidate, never for
    production (issue 11). Without fallback the client gets a 503 from the candidate's side at once."""
    async with HostileServer("many-headers", 5_000) as candidate:
        config = router_config(
            production.url, candidate.url, deployment=deployment, mode="canary", weight=90, fallbackToProduction=True
        )
        router = start_router(config, "--breaker-cool-off", "60")
        url = f"{router.url}/v2/models/fraud/infer"
        results = await run_load(url, 60, rate=50)
        recorded = await rows(db, deployment, 60)
        assert {(result.status, result.served_by) for result in results} == {(200, "production")}
        given = [row for row in recorded if row["candidate_error"] is not None]
        assert len(given) == len([row for row in recorded if row["candidate_version"] is not None]) > 40
        assert kinds(given)[:10] == ["bad_response"] * 10 and set(kinds(given)) == {"bad_response", "circuit_open"}
        for row in given:
            assert (row["served_by"], row["fallback"], row["candidate_status"]) == ("production", True, None)
            assert row["production_prediction"] is not None
        assert candidate.requests == kinds(given).count("bad_response")
        skipped = kinds(given).count("circuit_open")
        assert router.metric("shadowgate_router_requests_total", role="answer", status="circuit_open") == skipped
        assert router.metric("shadowgate_router_fallbacks_total") == len(given)

        old = router.readiness().json()["revision"]
        router.write_config({**config, "fallbackToProduction": False})
        wait_until(lambda: router.readiness().json()["revision"] != old, 5, "the new configuration")
        results = await run_load(url, 30, rate=50)
        calls = candidate.requests
    refused = [result for result in results if result.served_by == "candidate"]
    assert refused and {result.status for result in refused} == {503}, "the breaker is kept across the change"
    assert "the candidate's circuit breaker is open (10 calls in a row failed)" in json.loads(refused[0].body)["error"]
    assert calls == kinds(given).count("bad_response"), "no call reached the candidate while it was open"
