"""bench/router: the latency the router adds, and its maximum rate, against nginx with `mirror` as a peer.

Everything runs on this machine over loopback: a throwaway PostgreSQL (recording is on), two model servers
(tests/support/model_server.py: production and candidate), `shadowgate router` in shadow mode mirroring
every request (the same work as nginx's `mirror`, plus a row per request in the database), and nginx
(Debian's package, one worker process: the same one-core budget as the router's one event loop) with
`mirror` in front of the same two servers.

1. Fixed rate: open-loop load at --rate requests/s (default 500) against the production server directly,
   through nginx and through the router, interleaved in rounds so that other work on the machine lands on
   all three alike. Latency counts from each request's scheduled start. Added latency = the median over
   rounds of each round's percentile through the proxy, minus the same direct (a burst of someone else's
   work that hits one round is outvoted); the percentiles over all requests pooled are printed beside it.
   Targets: router adds <= 1 ms at p50 and <= 5 ms at p99.
2. Maximum rate: wrk (Debian's package; C, so the load generator takes as little of the 2 cores as
   possible) with 16 connections against each of the three. Targets: router >= half of nginx-with-mirror
   (the first), >= 0.8x (issue 14: no worse than before gRPC).
3. gRPC, in the same run: ModelInfer straight to production's gRPC port and through the router's (mirrored
   and recorded the same way), interleaved with the HTTP targets in the fixed-rate rounds (a grpcio
   client), and at the maximum rate with h2load (nghttp2's C load generator, 16 connections). Targets: the
   router adds <= 1 ms at p50 and <= 5 ms at p99 over the direct gRPC call. (No nginx gRPC baseline: nginx
   cannot mirror gRPC.)
4. The floor for gRPC, in the same run: bench/router/bare_grpc_proxy.py, a grpc.aio bytes proxy with none of
   the router's logic (it answers from production, mirrors every call to the candidate and sends initial
   metadata of its own, as the router does; it reads, records and counts nothing), on the same grpcio set-up
   as the router, measured like the router (latency, maximum rate, CPU per request). What the router adds
   beyond it is the router's own cost; the rest is grpcio's (bench/router/README.md).

It installs nginx, wrk and h2load with apt-get when they are missing (as root). Traffic goes to 127.0.0.1 only and
every phase is bounded in time. Take figures when `uptime` shows the machine otherwise idle: the load
average is printed before and after.

    make bench-router
    .venv/bin/python bench/router/run.py --seconds 6 --rounds 2 --max-seconds 5   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import uvloop
from stack import (
    Processes,
    cpu_seconds,
    free_port,
    load_average,
    router_config,
    start_bare_proxy,
    start_model_servers,
    start_router,
    wait_http,
)

from shadowgate_dev.localenv import Postgres
from shadowgate_operator.migrate import migrate_dsn
from shadowgate_router.oip import inference_pb2
from shadowgate_router.upstream import UpstreamError, UpstreamPool

BODY = json.dumps({"inputs": [{"name": "x", "shape": [4], "datatype": "FP64", "data": [0.1, 0.2, 0.3, 0.4]}]})
PATH = "/v2/models/fraud/infer"
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def grpc_body() -> bytes:
    """The same request as BODY, as a ModelInferRequest (typed contents, as the REST JSON carries them)."""
    request = inference_pb2.ModelInferRequest(model_name="fraud")
    request.inputs.add(name="x", datatype="FP64", shape=[4]).contents.fp64_contents.extend([0.1, 0.2, 0.3, 0.4])
    return request.SerializeToString()


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream production {{ server 127.0.0.1:{production}; keepalive 256; }}
    upstream candidate {{ server 127.0.0.1:{candidate}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=2048;
        location / {{
            mirror /mirror;
            mirror_request_body on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://production;
        }}
        location = /mirror {{
            internal;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://candidate$request_uri;
        }}
    }}
}}
"""

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


def ensure_tools() -> None:
    packages = {"nginx": "nginx", "wrk": "wrk", "h2load": "nghttp2-client"}
    missing = [package for tool, package in packages.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench/router needs {' and '.join(missing)}: apt-get install {' '.join(missing)} (as root)")
    print(f"installing {' '.join(missing)} from Debian's packages", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, check=False, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)


@dataclass
class Target:
    name: str
    url: str
    """http://host:port, or host:port for gRPC."""
    grpc: bool = False
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    max_rate: list[float] = field(default_factory=list)
    max_latency: list[tuple[float, float]] = field(default_factory=list)

    rounds: list[list[float]] = field(default_factory=list)
    """The latencies of each fixed-rate round."""
    pid: int | None = None
    """The proxy process whose CPU time per request is measured (None: not measured)."""
    cpu_us: list[float] = field(default_factory=list)
    """The proxy process's CPU time per request in each fixed-rate round (router targets only): unlike
    latency, hardly moved by other work on the machine, so a change to the hot path shows here first."""

    def percentile(self, fraction: float) -> float:
        """Over every request of every round."""
        return _percentile(self.latencies, fraction)

    def round_median(self, fraction: float) -> float:
        """The median over rounds of each round's percentile: a burst of other work on the machine that
        hits one round is outvoted instead of setting the figure. Rounds in which nothing was answered are
        left out (their timeouts are counted in `errors`, which fails the run); NaN if no round was answered."""
        answered = [latencies for latencies in self.rounds if latencies]
        if not answered:
            return float("nan")
        return statistics.median(_percentile(latencies, fraction) for latencies in answered)


def _percentile(values: list[float], fraction: float) -> float:
    """NaN when nothing was answered (every request timed out): a FAIL, not a crash of the report."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def fixed_rate(
    target: Target, rate: float, seconds: float, client: UpstreamPool | grpc.aio.Channel, record: bool = True
) -> None:
    """Open loop: request i starts at i/rate whatever the others are doing; latency from that moment."""
    headers = [(b"Content-Type", b"application/json")]
    body = BODY.encode()
    count = int(rate * seconds)
    started = time.perf_counter()
    latencies: list[float] = []
    if isinstance(client, grpc.aio.Channel):
        infer = client.unary_unary(GRPC_METHOD)
        message = grpc_body()

    async def one(index: int) -> None:
        scheduled = started + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if isinstance(client, UpstreamPool):
            try:
                response = await client.request(b"POST", PATH.encode(), headers, body, 10)
                ok = response.status == 200
            except UpstreamError:
                ok = False
        else:
            try:
                await infer(message, timeout=10)
                ok = True
            except grpc.aio.AioRpcError:
                ok = False
        if not record:
            return
        if ok:
            latencies.append((time.perf_counter() - scheduled) * 1000)
        else:
            target.errors += 1

    await asyncio.gather(*(one(index) for index in range(count)))
    if record:
        target.latencies += latencies
        target.rounds.append(latencies)


async def fixed_rate_rounds(targets: list[Target], rate: float, seconds: float, rounds: int) -> None:
    """One warm connection pool (or gRPC channel) per target for the whole phase, targets taking turns in
    each round."""
    clients: list[UpstreamPool | grpc.aio.Channel] = [
        grpc.aio.insecure_channel(target.url) if target.grpc else UpstreamPool(target.url, max_connections=512)
        for target in targets
    ]
    for target, client in zip(targets, clients, strict=True):
        await fixed_rate(target, rate, 1.0, client, record=False)  # warm up connections and code paths
    for _ in range(rounds):
        for target, client in zip(targets, clients, strict=True):
            before = cpu_seconds(target.pid) if target.pid is not None else 0.0
            await fixed_rate(target, rate, seconds, client)
            if target.pid is not None:
                await asyncio.sleep(0.5)  # the copies' ends and the last flush belong to this round
                target.cpu_us.append((cpu_seconds(target.pid) - before) / int(rate * seconds) * 1e6)
    for client in clients:
        await client.close()


def wrk(target: Target, seconds: float, connections: int, script: Path) -> None:
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), target.url + PATH],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", result.stdout)
    if rate is None:
        sys.exit(f"cannot read wrk's output:\n{result.stdout}")
    if non_2xx:
        target.errors += int(non_2xx.group(1))
    target.max_rate.append(float(rate.group(1)))
    target.max_latency.append((_wrk_ms(result.stdout, "50%"), _wrk_ms(result.stdout, "99%")))


def h2load(target: Target, seconds: float, connections: int, body: Path) -> None:
    """gRPC at the maximum rate: h2load POSTs the length-prefixed message over HTTP/2 (prior knowledge).
    It counts HTTP 200s; a gRPC error would also be a 200, so main() checks the router's gRPC codes."""
    result = subprocess.run(
        ["h2load", "-t1", f"-c{connections}", "-m1", f"-D{seconds:g}", "-d", str(body),
         "-H", "content-type: application/grpc", "-H", "te: trailers", f"http://{target.url}{GRPC_METHOD}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    )  # fmt: skip
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", result.stdout)
    failed = re.search(r"requests: .*?(\d+) failed, (\d+) errored", result.stdout)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", result.stdout)
    if rate is None or failed is None:
        sys.exit(f"cannot read h2load's output:\n{result.stdout}")
    target.errors += int(failed.group(1)) + int(failed.group(2))
    target.max_rate.append(float(rate.group(1)))
    mean_ms = _h2load_ms(mean.group(1)) if mean else float("nan")
    target.max_latency.append((mean_ms, float("nan")))


def _h2load_ms(value: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if found is None:
        return float("nan")
    number, unit = float(found.group(1)), found.group(2)
    return number / 1000 if unit == "us" else number * 1000 if unit == "s" else number


def grpc_codes(url: str) -> dict[str, float]:
    """The router's answers to gRPC clients by code."""
    codes: dict[str, float] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        found = re.match(r'shadowgate_router_grpc_responses_total\{code="(\w+)"\} ([\d.e+]+)', line)
        if found:
            codes[found.group(1)] = float(found.group(2))
    return codes


def _wrk_ms(output: str, label: str) -> float:
    found = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    if found is None:
        return float("nan")
    value, unit = float(found.group(1)), found.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def count_rows(dsn: str, deployment: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM predictions WHERE deployment = $1", deployment)
        return count
    finally:
        await connection.close()


def router_pending(url: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(("shadowgate_router_record_queue_rows", "shadowgate_router_spool_rows")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500, help="requests/s of the fixed-rate phase")
    parser.add_argument("--seconds", type=float, default=5, help="seconds per target per fixed-rate round")
    parser.add_argument("--rounds", type=int, default=7, help="fixed-rate rounds (targets interleaved)")
    parser.add_argument("--max-seconds", type=float, default=10, help="seconds per target per wrk run")
    parser.add_argument("--max-rounds", type=int, default=2, help="wrk runs per target (interleaved; best kept)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--weight", type=int, default=100, help="share mirrored by the router (nginx mirrors all)")
    parser.add_argument("--model-latency-ms", type=float, default=0.0, help="model servers' own latency")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for the whole bench and every process it starts (all targets alike); a negative value "
        "(root) lets a shared machine's other work wait instead of skewing the figures",
    )
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # inherited by the model servers, PostgreSQL, the router, nginx and wrk

    ensure_tools()
    print(f"load average before: {load_average()} (2 cores; other work skews every figure); niceness "
          f"{os.getpriority(os.PRIO_PROCESS, 0)}", flush=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="shadowgate-bench-router-"))
    deployment = f"bench-{int(time.time())}"
    with Postgres() as postgres, Processes(work) as processes:
        asyncio.run(migrate_dsn(postgres.dsn))
        servers = start_model_servers(processes, args.model_latency_ms)
        router = start_router(processes, work, postgres.dsn, router_config(deployment, servers, args.weight))
        ports = {"nginx": free_port()}
        nginx_dir = work / "nginx"
        nginx_dir.mkdir()
        (nginx_dir / "nginx.conf").write_text(
            NGINX_CONF.format(dir=nginx_dir, port=ports["nginx"], production=servers.ports["production"],
                              candidate=servers.ports["candidate"])
        )  # fmt: skip
        processes.start("nginx", ["nginx", "-c", str(nginx_dir / "nginx.conf"), "-p", str(nginx_dir)])
        wait_http(f"http://127.0.0.1:{ports['nginx']}/v2/health/ready", "nginx")
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=BODY))
        message = grpc_body()
        grpc_frame = work / "infer.grpc"  # gRPC's framing: not compressed, 4-byte big-endian length, message
        grpc_frame.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)

        bare, bare_port = start_bare_proxy(processes, servers, ["--mirror", "--initial-metadata"])

        targets = [
            Target("direct to production", servers.url("production")),
            Target("nginx with mirror", f"http://127.0.0.1:{ports['nginx']}"),
            Target("shadowgate router", f"http://127.0.0.1:{router.http}", pid=router.pid),
            Target("gRPC direct", servers.grpc_address("production"), grpc=True),
            Target("gRPC via router", f"127.0.0.1:{router.grpc}", grpc=True, pid=router.pid),
            Target("gRPC bare grpc.aio", f"127.0.0.1:{bare_port}", grpc=True, pid=bare.pid),
        ]
        print(f"fixed rate: {args.rate:g} req/s, {args.rounds} rounds of {args.seconds:g} s per target", flush=True)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(fixed_rate_rounds(targets, args.rate, args.seconds, args.rounds))
        print(f"maximum rate: wrk (HTTP) and h2load (gRPC), {args.connections} connections, "
              f"{args.max_rounds} x {args.max_seconds:g} s", flush=True)  # fmt: skip
        for _ in range(args.max_rounds):
            for target in targets:
                if target.grpc:
                    h2load(target, args.max_seconds, args.connections, grpc_frame)
                else:
                    wrk(target, args.max_seconds, args.connections, script)
                time.sleep(1)
        failed_grpc = sum(
            count for code, count in grpc_codes(f"http://127.0.0.1:{router.metrics}").items() if code != "OK"
        )
        targets[4].errors += int(failed_grpc)

        deadline = time.monotonic() + 60
        while router_pending(f"http://127.0.0.1:{router.metrics}") and time.monotonic() < deadline:
            time.sleep(0.2)
        recorded = asyncio.run(count_rows(postgres.dsn, deployment))
        print(f"load average after: {load_average()}")
        return report(targets, args, recorded)


def report(targets: list[Target], args: argparse.Namespace, recorded: int) -> int:
    direct, nginx, router, grpc_direct, grpc_router, grpc_bare = targets
    print()
    print(f"fixed rate {args.rate:g} req/s, all rounds pooled            | median of {len(direct.rounds)} rounds "
          f"| maximum rate (wrk/h2load, best run)")  # fmt: skip
    print(f"{'':22}{'p50 ms':>8}{'p99 ms':>8}{'p99.9 ms':>9}{'errors':>7}   |{'p50 ms':>8}{'p99 ms':>8}   |"
          f"{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}")  # fmt: skip
    for target in targets:
        best = max(range(len(target.max_rate)), key=lambda index: target.max_rate[index])
        p50, p99 = target.max_latency[best]
        at_max = f"{p50:8.1f}{p99:8.1f}" if not target.grpc else f"{p50:8.1f} (mean)"  # h2load has no percentiles
        print(
            f"{target.name:22}{target.percentile(0.5):8.2f}{target.percentile(0.99):8.2f}"
            f"{target.percentile(0.999):9.2f}{target.errors:7d}   |{target.round_median(0.5):8.2f}"
            f"{target.round_median(0.99):8.2f}   |{target.max_rate[best]:8.0f}{at_max}"
        )
    figures: dict[str, Any] = {"rate": args.rate, "weight": args.weight, "recorded_rows": recorded, "nice": args.nice}
    for target in targets:
        figures[target.name] = {
            "p50_ms": target.percentile(0.5),
            "p99_ms": target.percentile(0.99),
            "p999_ms": target.percentile(0.999),
            "round_median_p50_ms": target.round_median(0.5),
            "round_median_p99_ms": target.round_median(0.99),
            "max_rps": max(target.max_rate),
        }
    for proxy, baseline in ((nginx, direct), (router, direct), (grpc_router, grpc_direct), (grpc_bare, grpc_direct)):
        added = figures[proxy.name]
        added["added_p50_ms"] = proxy.round_median(0.5) - baseline.round_median(0.5)
        added["added_p99_ms"] = proxy.round_median(0.99) - baseline.round_median(0.99)
        added["added_p50_ms_pooled"] = proxy.percentile(0.5) - baseline.percentile(0.5)
        added["added_p99_ms_pooled"] = proxy.percentile(0.99) - baseline.percentile(0.99)
        print(
            f"added by {proxy.name} at {args.rate:g} req/s (median of rounds): p50 +{added['added_p50_ms']:.2f} ms, "
            f"p99 +{added['added_p99_ms']:.2f} ms (all requests pooled: p50 +{added['added_p50_ms_pooled']:.2f} ms, "
            f"p99 +{added['added_p99_ms_pooled']:.2f} ms)"
        )
    ratio = max(router.max_rate) / max(nginx.max_rate)
    figures["router_vs_nginx_max_rps"] = ratio
    router_added, nginx_added = figures[router.name], figures[nginx.name]
    print(
        f"router / nginx: added p50 {router_added['added_p50_ms'] / max(nginx_added['added_p50_ms'], 1e-9):.2f}x, "
        f"added p99 {router_added['added_p99_ms'] / max(nginx_added['added_p99_ms'], 1e-9):.2f}x, "
        f"max rate {ratio:.2f}x"
    )
    for proxy in (router, grpc_router, grpc_bare):
        figures[proxy.name]["cpu_us_per_request"] = statistics.median(proxy.cpu_us)
    print(
        f"router CPU per request (median of rounds, mirrored and recorded): HTTP "
        f"{statistics.median(router.cpu_us):.0f} us, gRPC {statistics.median(grpc_router.cpu_us):.0f} us; "
        f"a bare grpc.aio proxy (mirrors, sends initial metadata, nothing else): "
        f"{statistics.median(grpc_bare.cpu_us):.0f} us"
    )
    grpc_added = figures[grpc_router.name]
    grpc_ratio = max(grpc_router.max_rate) / max(grpc_direct.max_rate)
    figures["grpc_router_vs_direct_max_rps"] = grpc_ratio
    print(
        f"gRPC via router / direct: max rate {grpc_ratio:.2f}x (the direct call is not mirrored); bare grpc.aio "
        f"proxy / direct: {max(grpc_bare.max_rate) / max(grpc_direct.max_rate):.2f}x"
    )
    # An added latency is only a figure when neither side lost requests: timed-out requests are missing from
    # the percentiles, and a starved baseline can make the difference look small or negative.
    http_whole = router.errors == 0 and direct.errors == 0
    grpc_whole = grpc_router.errors == 0 and grpc_direct.errors == 0
    verdicts = [
        ("router adds <= 1 ms at p50", http_whole and router_added["added_p50_ms"] <= 1.0),
        ("router adds <= 5 ms at p99", http_whole and router_added["added_p99_ms"] <= 5.0),
        ("router max rate >= half of nginx-with-mirror's", ratio >= 0.5),
        ("router max rate >= 0.8x nginx-with-mirror's", ratio >= 0.8),
        ("gRPC: router adds <= 1 ms at p50", grpc_whole and grpc_added["added_p50_ms"] <= 1.0),
        ("gRPC: router adds <= 5 ms at p99", grpc_whole and grpc_added["added_p99_ms"] <= 5.0),
        ("no errors", all(target.errors == 0 for target in targets)),
    ]
    print(f"rows recorded by the router: {recorded} (recording was on throughout)")
    for what, ok in verdicts:
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
