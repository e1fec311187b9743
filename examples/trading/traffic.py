"""The demo's clients: trades sent to the router as they open, and each trade's outcome posted when it closes.

    python -m trading.traffic --router http://127.0.0.1:8080 --token-file token --rate 200 [--duration 60]

Every trade is one Open Inference Protocol v2 request to ``/v2/models/trade-signal/infer`` whose
``X-Request-Id`` is the trade id (the router keeps it, so the outcome can name it) and whose
``X-Account-Id`` is the account (the ShadowDeployment's sticky header: an account's trades all land on
the same side). Requests leave on a fixed schedule (open loop: a slow answer does not slow the load).
The trade closes 1-4 s later and its outcome, 1 for a profit and 0 otherwise, is posted to the router's
``POST /outcomes`` with the bearer token, in batches, as trades close. On SIGTERM or SIGINT it stops
opening trades, waits for the answers in flight and posts every outcome still due at once, so no
answered trade goes without its outcome.

``--log FILE`` writes one JSON line per trade (time sent, trade id, account, HTTP status, which side
answered according to ``X-Shadowgate-Served-By``); the last line on stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from trading.market import FEATURES, Market, Trade
from trading.server import MODEL_NAME, event_loop_factory

OUTCOME_PERIOD = 0.25
"""Seconds between outcome batches."""
MAX_IN_FLIGHT = 256
"""Requests waiting for an answer at once; beyond it the schedule waits (and says so in `late`)."""


def infer_body(trade: Trade) -> bytes:
    """The trade's indicators as an Open Inference Protocol v2 request, one named tensor per indicator."""
    inputs = [{"name": name, "shape": [1], "datatype": "FP64", "data": [trade.features[name]]} for name in FEATURES]
    return json.dumps({"id": trade.trade_id, "inputs": inputs}).encode()


@dataclass
class Summary:
    sent: int = 0
    answered: int = 0
    """Requests answered with a 200."""
    failed: int = 0
    served_by: Counter[str] = field(default_factory=Counter)
    outcomes_posted: int = 0
    outcome_failures: int = 0
    late: int = 0
    """Requests that left more than 100 ms after their scheduled time (the client, not the router, lagged)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "failed": self.failed,
            "servedBy": dict(self.served_by),
            "outcomesPosted": self.outcomes_posted,
            "outcomeFailures": self.outcome_failures,
            "late": self.late,
        }


class TrafficGenerator:
    def __init__(
        self,
        router: str,
        token: str,
        *,
        rate: float,
        market: Market,
        log: IO[str] | None = None,
        request_timeout: float = 10.0,
    ):
        self.router = router.rstrip("/")
        self.token = token
        self.rate = rate
        self.market = market
        self.log = log
        self.request_timeout = request_timeout
        self.summary = Summary()
        self._due: list[tuple[float, str, int]] = []  # (closes at, trade id, outcome), a heap
        self._in_flight: set[asyncio.Task[None]] = set()
        self._finished = asyncio.Event()
        """Set once no trade is open any more: the outcomes still due are posted at once."""

    async def run(self, stop: asyncio.Event, duration: float | None = None) -> Summary:
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            poster = asyncio.create_task(self._post_outcomes(session))
            try:
                await self._open_trades(session, stop, duration)
                if self._in_flight:
                    await asyncio.wait(self._in_flight)
            finally:
                self._finished.set()
                await poster
        return self.summary

    async def _open_trades(self, session: aiohttp.ClientSession, stop: asyncio.Event, duration: float | None) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        index = 0
        while not stop.is_set() and (duration is None or loop.time() - started < duration):
            scheduled = started + index / self.rate
            delay = scheduled - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            if delay < -0.1:
                self.summary.late += 1
            while len(self._in_flight) >= MAX_IN_FLIGHT:
                await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(self._trade(session, self.market.next_trade()))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            index += 1

    async def _trade(self, session: aiohttp.ClientSession, trade: Trade) -> None:
        self.summary.sent += 1
        sent_at = time.time()
        headers = {"Content-Type": "application/json", "X-Request-Id": trade.trade_id, "X-Account-Id": trade.account}
        status, served_by = 0, ""
        try:
            async with session.post(
                f"{self.router}/v2/models/{MODEL_NAME}/infer", data=infer_body(trade), headers=headers
            ) as response:
                await response.read()
                status, served_by = response.status, response.headers.get("X-Shadowgate-Served-By", "")
        except (aiohttp.ClientError, TimeoutError):
            pass
        if status == 200:
            self.summary.answered += 1
            self.summary.served_by[served_by] += 1
            closes_at = asyncio.get_running_loop().time() + trade.hold_seconds
            heapq.heappush(self._due, (closes_at, trade.trade_id, trade.outcome))
        else:
            self.summary.failed += 1
        if self.log is not None:
            record = {"time": round(sent_at, 6), "trade": trade.trade_id, "account": trade.account, "status": status}
            self.log.write(json.dumps({**record, "servedBy": served_by}) + "\n")

    async def _post_outcomes(self, session: aiohttp.ClientSession) -> None:
        """Every OUTCOME_PERIOD, post the outcomes of the trades that closed; once finished, all the rest."""
        loop = asyncio.get_running_loop()
        while not self._finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), OUTCOME_PERIOD)
            await self._post_due(session, loop.time())
        await self._post_due(session, float("inf"))

    async def _post_due(self, session: aiohttp.ClientSession, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            batch: list[dict[str, Any]] = []
            while self._due and self._due[0][0] <= now and len(batch) < 5_000:
                _, trade_id, outcome = heapq.heappop(self._due)
                batch.append({"request_id": trade_id, "outcome": float(outcome)})
            await self._post(session, batch)

    async def _post(self, session: aiohttp.ClientSession, batch: list[dict[str, Any]]) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        for attempt in range(3):
            try:
                async with session.post(f"{self.router}/outcomes", json={"outcomes": batch}, headers=headers) as answer:
                    text = await answer.text()
                    if answer.status == 202:
                        self.summary.outcomes_posted += len(batch)
                        return
                    print(f"outcomes refused ({answer.status}): {text}", file=sys.stderr, flush=True)
                    if answer.status < 500:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                print(f"outcomes not posted (attempt {attempt + 1}): {exc!r}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)
        self.summary.outcome_failures += len(batch)


async def _main(args: argparse.Namespace, token: str) -> Summary:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    market = Market(seed=args.seed, accounts=args.accounts, prefix=args.prefix)
    log = args.log.open("w", buffering=1 << 16) if args.log else None
    try:
        generator = TrafficGenerator(args.router, token, rate=args.rate, market=market, log=log)
        reporter = asyncio.create_task(_report(generator, args.report_every)) if args.report_every else None
        summary = await generator.run(stop, args.duration)
        if reporter is not None:
            reporter.cancel()
        return summary
    finally:
        if log is not None:
            log.close()


async def _report(generator: TrafficGenerator, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        summary = generator.summary
        print(
            f"sent {summary.sent:,}, answered {summary.answered:,} ({dict(summary.served_by)}), "
            f"failed {summary.failed:,}, outcomes posted {summary.outcomes_posted:,}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trading.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--router", required=True, help="the router's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the outcome bearer token")
    parser.add_argument("--rate", type=float, default=200.0, help="trades opened per second")
    parser.add_argument("--duration", type=float, help="seconds to run (default: until SIGTERM or SIGINT)")
    parser.add_argument("--accounts", type=int, default=50_000, help="distinct accounts the trades come from")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prefix", default="T", help="trade ids are PREFIX-0000001, ...")
    parser.add_argument("--log", type=Path, help="write one JSON line per trade here")
    parser.add_argument("--report-every", type=float, default=0.0, help="print counts every this many seconds")
    args = parser.parse_args(argv)
    token = args.token_file.read_text().strip()
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        summary = runner.run(_main(args, token))
    print(json.dumps(summary.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
