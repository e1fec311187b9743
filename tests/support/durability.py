"""What a router killed with SIGKILL while the database is away loses (issue 12 D8): the scenario, shared by
tests/cluster/test_router_durability.py (a short outage) and bench/hostile (the 60 s figure).

Predictions at a fixed rate, and an outcome for each answered one posted every 0.25 s; the database stops;
the router is killed with SIGKILL (as the OOM killer or a node would) while it still is; then the database
comes back and a new router starts on the same spool directory (as a restarted container does on its
emptyDir). Lost: requests answered 200 (outcomes answered 202) whose row never reaches the database.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from shadowgate_dev.localenv import Postgres
from tests.support.load import client_session, infer_body
from tests.support.router import ModelServer, Router, router_config, wait_until

JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class KillResult:
    rate: float
    predictions_answered: int
    predictions_lost: int
    outcomes_accepted: int
    outcomes_lost: int
    spooled_at_kill: float

    @property
    def seconds_lost(self) -> float:
        """The rows lost, in seconds of prediction traffic."""
        return self.predictions_lost / self.rate

    def summary(self) -> str:
        return (
            f"{self.predictions_lost} of {self.predictions_answered} answered predictions lost "
            f"({self.seconds_lost:.2f} s of traffic at {self.rate:g} req/s), {self.outcomes_lost} of "
            f"{self.outcomes_accepted} accepted outcomes lost; {self.spooled_at_kill:.0f} rows on disk at the kill"
        )


async def kill_during_outage(
    work: Path,
    postgres: Postgres,
    servers: tuple[ModelServer, ModelServer],
    *,
    rate: float = 200.0,
    before: float = 3.0,
    outage: float = 10.0,
    deployment: str = "killed",
    router_args: tuple[str, ...] = (),
) -> KillResult:
    config = router_config(servers[0].url, servers[1].url, deployment=deployment, mode="shadow", weight=100)
    spool = work / f"spool-{deployment}"
    router = Router.with_file(work, postgres.dsn, config, *router_args, spool_dir=spool).start()
    answered: list[str] = []
    accepted: list[str] = []
    killed = asyncio.Event()
    spooled: list[float] = [0.0]

    async def predictions(session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        url = f"{router.url}/v2/models/fraud/infer"
        tasks: list[asyncio.Task[None]] = []

        async def one(index: int) -> None:
            try:
                async with session.post(
                    url, data=infer_body(index), headers=JSON, timeout=aiohttp.ClientTimeout(total=10)
                ) as r:
                    await r.read()
                    if r.status == 200:
                        answered.append(r.headers["X-Request-Id"])
            except (aiohttp.ClientError, TimeoutError):
                pass

        index = 0
        while not killed.is_set():
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
            index += 1
        await asyncio.gather(*tasks)

    async def outcomes(session: aiohttp.ClientSession) -> None:
        sent = 0
        headers = {"Authorization": f"Bearer {router.token}"}
        while not killed.is_set():
            await asyncio.sleep(0.25)
            fresh = answered[sent:]
            if not fresh:
                continue
            batch = [{"request_id": request_id, "outcome": 1.0} for request_id in fresh]
            sent += len(fresh)
            try:
                async with session.post(f"{router.url}/outcomes", json=batch, headers=headers) as r:
                    if r.status == 202:
                        accepted.extend(fresh)
            except (aiohttp.ClientError, TimeoutError):
                pass

    async def outage_then_kill() -> None:
        await asyncio.sleep(before)
        await asyncio.to_thread(postgres.stop)
        await asyncio.sleep(outage)
        spooled[0] = await asyncio.to_thread(router.pending_rows)
        assert router.process is not None
        router.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(router.process.wait, 10)
        killed.set()

    try:
        async with client_session() as session:
            await asyncio.gather(predictions(session), outcomes(session), outage_then_kill())
    finally:
        router.stop()
    await asyncio.to_thread(postgres.start)
    restarted = Router.with_file(work, postgres.dsn, config, *router_args, spool_dir=spool).start()
    try:
        wait_until(lambda: restarted.pending_rows() == 0, 120, "the restarted router to write what it found")
    finally:
        restarted.stop()
    connection = await asyncpg.connect(postgres.dsn)
    try:
        recorded = {
            table: {
                row["request_id"]
                for row in await connection.fetch(
                    f"SELECT DISTINCT request_id FROM {table} WHERE deployment = $1", deployment
                )
            }
            for table in ("predictions", "outcomes")
        }
    finally:
        await connection.close()
    return KillResult(
        rate=rate,
        predictions_answered=len(answered),
        predictions_lost=len(set(answered) - recorded["predictions"]),
        outcomes_accepted=len(accepted),
        outcomes_lost=len(set(accepted) - recorded["outcomes"]),
        spooled_at_kill=spooled[0],
    )
