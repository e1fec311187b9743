"""bench/hostile: production's latency through the router while a peer attacks it, beside a baseline measured in
the same run; and the rows a router killed with SIGKILL during a database outage loses (issue 12).

Everything runs on this machine over loopback: a throwaway PostgreSQL, production's and a healthy candidate's
model servers (tests/support/model_server.py), hostile model servers (tests/support/hostile.py) and
`shadowgate router`, each a process; attackers are processes of their own (this script with --attack), so
their work lands on the router, not on the load generator. Production's latency is measured open-loop at
--rate requests/s (latency from each request's scheduled start) for --seconds per case, every request
mirrored to the candidate and recorded:

- baseline: a healthy candidate, no attacker;
- D3 header: a client sending a 128 MB header in 64 KB pieces, over and over;
- D4 pipelining: a client pipelining 20,000 requests without reading the answers, over and over;
- D1 nested JSON: a client posting JSON nested 100,000 deep as fast as it is answered;
- D2 nested answers: a candidate answering JSON nested 100,000 deep;
- D5 50 MB answers: a candidate answering 50 MB bodies (10% mirrored: 20 a second);
- D3 upstream header: a candidate answering a 128 MB header.

For each: production's p50 and p99, requests that failed, the router's peak memory (RSS sampled every
0.1 s) and the rows recorded. The issue measured before the fixes: p99 15.7 s and 887 of 1,250 requests
failed under D3, 1,227 of 1,500 timed out under D4, 87 -> 434 MB under D5, and every row lost under D2.

Then (unless --kill-outage 0) the durability figure: predictions at --rate and their outcomes, the database
stopped, the router killed with SIGKILL --kill-outage seconds later, the database started and a new router
on the same spool: answered predictions whose row never arrives (target: at most one second of traffic).

    make bench-hostile          # about 6 minutes
    .venv/bin/python bench/hostile/run.py --seconds 5 --kill-outage 10     # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.durability import kill_during_outage  # noqa: E402
from tests.support.load import client_session, percentile, run_load  # noqa: E402
from tests.support.router import (  # noqa: E402
    HostileModelServer,
    Router,
    model_pair,
    router_config,
    wait_until,
)

from shadowgate_dev.localenv import Postgres  # noqa: E402
from shadowgate_operator.migrate import migrate_dsn  # noqa: E402

MB = 1024 * 1024
INFER = "/v2/models/fraud/infer"


# Attackers: run as `run.py --attack NAME --port PORT` in a process of their own, until killed.


def attack_header(port: int) -> None:
    """D3: a 128 MB header, 64 KB at a time, again and again."""
    piece = b"a" * 65_536
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: ")
                for _ in range(128 * MB // len(piece)):
                    connection.sendall(piece)
        except OSError:
            time.sleep(0.01)  # refused and closed: once more


def attack_pipeline(port: int) -> None:
    """D4: 20,000 pipelined requests, never reading an answer; a new connection when the router drops it."""
    requests = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                connection.sendall(requests)
                while connection.recv(1, socket.MSG_PEEK):  # hold it open, unread, until the router closes
                    time.sleep(1)
        except OSError:
            time.sleep(0.01)


def attack_nested(port: int) -> None:
    """D1: JSON nested 100,000 deep, posted as fast as it is answered, on one keep-alive connection."""
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        INFER.encode(),
        len(body),
        body,
    )
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                reader = connection.makefile("rb")
                while True:
                    connection.sendall(request)
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    if not line:
                        break
                    reader.read(length)
        except OSError:
            time.sleep(0.01)


ATTACKS = {"header": attack_header, "pipeline": attack_pipeline, "nested": attack_nested}


@contextmanager
def attacker(name: str | None, port: int, logs: Path) -> Iterator[None]:
    if name is None:
        yield
        return
    with (logs / f"attack-{name}.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, __file__, "--attack", name, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        time.sleep(1.0)  # let it get going
        yield
    finally:
        process.kill()
        process.wait(10)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far: what a case cost the router, whatever the load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def peak_rss(pid: int) -> Iterator[list[float]]:
    """Samples the process's resident memory every 0.1 s; yields a list whose first item is the peak in MB."""
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            except OSError:
                return
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


@contextmanager
def profiled(py_spy: str | None, pid: int, output: Path) -> Iterator[None]:
    """With --py-spy: the router sampled by py-spy while the case runs, its stacks written (collapsed) to
    `output`, for where the time goes; not part of the figures (sampling costs the router a little)."""
    if py_spy is None:
        yield
        return
    process = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        process.wait(30)
        print(f"  py-spy stacks: {output}", flush=True)


@dataclass
class Case:
    name: str
    attack: str | None = None
    candidate: tuple[str, int] | None = None
    """(hostile mode, size), or None for the healthy candidate."""
    weight: int = 100


CASES = [
    Case("baseline (healthy candidate, no attacker)"),
    Case("D3 client sends a 128 MB header", attack="header"),
    Case("D4 client pipelines 20,000 requests, reads none", attack="pipeline"),
    Case("D1 client posts JSON nested 100,000 deep", attack="nested"),
    Case("D2 candidate answers JSON nested 100,000 deep", candidate=("nested", 100_000)),
    Case("D5 candidate answers 50 MB bodies (10% mirrored)", candidate=("huge-body", 50_000_000), weight=10),
    Case("D3 candidate answers a 128 MB header", candidate=("huge-header", 128 * MB)),
]


@dataclass
class Measured:
    case: Case
    p50: float
    p99: float
    failed: int
    requests: int
    rss: float
    rows: int
    cpu: float
    """The router's CPU seconds per second of the case (1.0: a whole core), attacker's work included."""


async def measure(router: Router, rate: float, seconds: float) -> tuple[list[float], int, int]:
    count = int(rate * seconds)
    async with client_session() as session:
        results = await run_load(router.url + INFER, count, rate, session=session)
    latencies = [result.latency * 1000 for result in results if result.status == 200]
    failed = sum(result.status != 200 for result in results)
    return latencies, failed, count


def run_cases(args: argparse.Namespace, work: Path, postgres: Postgres) -> list[Measured]:
    measured: list[Measured] = []
    only = args.only or []
    cases = [case for case in CASES if case is CASES[0] or not only or any(word in case.name for word in only)]
    with model_pair(work) as (production, candidate):
        for case in cases:
            hostile: HostileModelServer | None = None
            if case.candidate is not None:
                hostile = HostileModelServer(work, *case.candidate)
                hostile.start()
            upstream = hostile.url if hostile is not None else candidate.url
            deployment = f"hostile-{len(measured)}-{int(time.time())}"
            config = router_config(production.url, upstream, deployment=deployment, weight=case.weight)
            router = Router.with_file(work, postgres.dsn, config, "--log-level", "WARNING").start()
            try:
                asyncio.run(measure(router, args.rate, 1.0))  # warm up every connection
                assert router.process is not None
                cpu_before = cpu_seconds(router.process.pid)
                with (
                    attacker(case.attack, router.port, work),
                    peak_rss(router.process.pid) as rss,
                    profiled(args.py_spy, router.process.pid, work / f"py-spy-{len(measured)}.txt"),
                ):
                    latencies, failed, count = asyncio.run(measure(router, args.rate, args.seconds))
                    cpu = cpu_seconds(router.process.pid) - cpu_before
                wait_until(lambda r=router: r.pending_rows() == 0, 60, "the rows to be written")
                rows = int(router.metric("shadowgate_router_rows_written_total", table="predictions"))
            finally:
                router.stop()
                if hostile is not None:
                    hostile.stop()
            result = Measured(
                case,
                percentile(latencies, 0.5) if latencies else float("nan"),
                percentile(latencies, 0.99) if latencies else float("nan"),
                failed,
                count,
                rss[0],
                rows,
                cpu / args.seconds,
            )
            measured.append(result)
            print(
                f"  {case.name}: p50 {result.p50:.1f} ms, p99 {result.p99:.1f} ms, {failed} of {count} failed, "
                f"router peak {result.rss:.0f} MB, router CPU {result.cpu:.2f} s/s",
                flush=True,
            )
    return measured


def report(measured: list[Measured]) -> None:
    baseline = measured[0]
    print("\nproduction through the router, while a peer attacks (same run):")
    print(f"{'case':<52} {'p50 ms':>8} {'p99 ms':>8} {'x base p99':>10} {'failed':>12} {'peak MB':>8} {'CPU s/s':>8}")
    for result in measured:
        ratio = result.p99 / baseline.p99 if baseline.p99 else float("nan")
        failed = f"{result.failed}/{result.requests}"
        print(
            f"{result.case.name:<52} {result.p50:>8.1f} {result.p99:>8.1f} {ratio:>10.1f} {failed:>12} "
            f"{result.rss:>8.0f} {result.cpu:>8.2f}"
        )
    spread = statistics.median(result.p99 for result in measured)
    print(f"(median p99 over all cases {spread:.1f} ms; rows recorded per case: {[m.rows for m in measured]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="production requests/s during each case")
    parser.add_argument("--seconds", type=float, default=15, help="seconds of load per case")
    parser.add_argument("--kill-outage", type=float, default=60, help="outage before the SIGKILL, s (0: skip)")
    parser.add_argument("--kill-rate", type=float, default=200, help="predictions/s through the outage and kill")
    parser.add_argument("--only", nargs="*", help="only the baseline and the cases whose name holds one of these")
    parser.add_argument("--py-spy", metavar="PATH", help="sample the router with this py-spy during each case")
    parser.add_argument("--attack", choices=sorted(ATTACKS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack:
        ATTACKS[args.attack](args.port)
        return 0
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"bench/hostile: {os.cpu_count()} cores, load average before: {load}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="shadowgate-bench-hostile-"))
    with Postgres() as postgres:
        asyncio.run(migrate_dsn(postgres.dsn))
        print(f"hostile peers: {args.rate:g} req/s for {args.seconds:g} s per case", flush=True)
        measured = run_cases(args, work, postgres)
    report(measured)
    if args.kill_outage > 0:
        print(f"\nSIGKILL after a {args.kill_outage:g} s database outage at {args.kill_rate:g} req/s:", flush=True)

        async def durability() -> str:
            from shadowgate_dev.localenv import Postgres as Fresh

            with Fresh() as own:
                await migrate_dsn(own.dsn)
                with model_pair(work) as servers:
                    result = await kill_during_outage(
                        work, own, servers, rate=args.kill_rate, before=5.0, outage=args.kill_outage
                    )
            return result.summary()

        print(f"  {asyncio.run(durability())}")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average after: {load}; logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
