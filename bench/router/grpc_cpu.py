"""CPU per gRPC ModelInfer call: the router against a bare grpc.aio bytes proxy (the floor), same run.

The same servers as bench/router/run.py (a throwaway PostgreSQL, two tests/support/model_server.py
processes with gRPC ports, `shadowgate router` in shadow mode mirroring and recording every call), plus
bench/router/bare_grpc_proxy.py in front of the same two servers (production answered, every call mirrored
to the candidate, nothing parsed or recorded). A grpcio client sends open-loop load at --rate to each target
in turn, in rounds; each proxy's CPU time (user + system, /proc) per call is printed, with the direct call's
model server CPU beside it, the CPU of the whole path per call (the load generator, both model servers and
the proxy) and the cores that path needs at --issue-rate (500 calls/s), and each process's CPU by thread for
the last round. --router ENV and --bare OPTIONS (repeatable) start several of each: a router with PYTHONPATH
pointing at another checkout is an A/B in one run; --bare='--mirror --initial-metadata --sync 8' is the same
floor on grpcio's synchronous server. With --py-spy FILE, one extra round of the first router is sampled by
py-spy (pip install py-spy; only samples holding the GIL) into FILE (.json speedscope, .svg flamegraph, else
collapsed stacks).

    .venv/bin/python bench/router/grpc_cpu.py --rate 300 --seconds 5 --rounds 3
    .venv/bin/python bench/router/grpc_cpu.py --rounds 5 --router="PYTHONPATH=/work/main/operator:/work/main/router" \
        --router="" --bare="--mirror --initial-metadata" --bare="--mirror --initial-metadata GRPC_EXPERIMENTS="
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import uvloop
from run import GRPC_METHOD, grpc_body
from stack import (
    Processes,
    cpu_seconds,
    load_average,
    router_config,
    start_bare_proxy,
    start_model_servers,
    start_router,
)

from shadowgate_dev.localenv import Postgres
from shadowgate_operator.migrate import migrate_dsn


async def load(address: str, rate: float, seconds: float) -> tuple[int, list[float]]:
    """Open-loop calls at `rate`; returns (errors, latencies ms from each call's scheduled start)."""
    channel = grpc.aio.insecure_channel(address)
    infer = channel.unary_unary(GRPC_METHOD)
    message = grpc_body()
    errors = 0
    latencies: list[float] = []
    count = int(rate * seconds)
    started = time.perf_counter()

    async def one(index: int) -> None:
        nonlocal errors
        scheduled = started + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await infer(message, timeout=10)
        except grpc.aio.AioRpcError:
            errors += 1
        else:
            latencies.append((time.perf_counter() - scheduled) * 1000)

    await asyncio.gather(*(one(index) for index in range(count)))
    await channel.close()
    return errors, latencies


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of a process, by thread name (summed over threads of one name; the
    main thread, which runs the event loop, as "main")."""
    found: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def run_round(address: str, rate: float, seconds: float) -> tuple[int, list[float]]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(load(address, rate, seconds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--issue-rate", type=float, default=500, help="the rate the path's CPU is scaled to (issue 14's 500 calls/s)"
    )
    parser.add_argument("--py-spy", type=Path, help="also sample one router round into this file")
    parser.add_argument(
        "--router", action="append", help="a router with this environment (KEY=VALUE ...); repeatable; default: one"
    )
    parser.add_argument("--no-bare", action="store_true", help="skip the bare proxy")
    parser.add_argument(
        "--bare",
        action="append",
        help="a bare proxy with these options ('--mirror' mirrors to the candidate; bare_grpc_proxy.py's others); "
        "repeatable; default: one, '--mirror'",
    )
    args = parser.parse_args()
    print(f"load average before: {load_average()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="shadowgate-grpc-cpu-"))
    with Postgres() as postgres, Processes(work) as processes:
        asyncio.run(migrate_dsn(postgres.dsn))
        servers = start_model_servers(processes)
        config = router_config("grpc-cpu", servers)
        targets: dict[str, tuple[str, int]] = {"direct": (servers.grpc_address("production"), servers.production.pid)}
        router_pid = 0
        for number, variant in enumerate(args.router or [""]):
            env = dict(option.split("=", 1) for option in variant.split())
            router = start_router(processes, work, postgres.dsn, config, name=f"router{number}", env=env)
            targets[f"router {variant}".strip()] = (f"127.0.0.1:{router.grpc}", router.pid)
            router_pid = router_pid or router.pid
        for number, variant in enumerate(args.bare or ([] if args.no_bare else ["--mirror"])):
            options = variant.split()
            env = dict(option.split("=", 1) for option in options if "=" in option and not option.startswith("-"))
            options = [option for option in options if option.split("=", 1)[0] not in env]
            bare, port = start_bare_proxy(processes, servers, options, name=f"bare{number}", env=env)
            targets[f"bare {variant}"] = (f"127.0.0.1:{port}", bare.pid)
        for address, _ in targets.values():
            run_round(address, args.rate, 1.0)  # warm up
        cpu: dict[str, list[float]] = {name: [] for name in targets}
        path_cpu: dict[str, list[float]] = {name: [] for name in targets}
        p50: dict[str, list[float]] = {name: [] for name in targets}
        p99: dict[str, list[float]] = {name: [] for name in targets}
        errors = dict.fromkeys(targets, 0)
        per_thread: dict[str, dict[str, int]] = {}
        for _ in range(args.rounds):
            for name, (address, pid) in targets.items():
                path = {os.getpid(), servers.production.pid, servers.candidate.pid, pid}
                path_before = sum(cpu_seconds(member) for member in path)
                before = cpu_seconds(pid)
                threads_before = thread_cpu(pid)
                failed, latencies = run_round(address, args.rate, args.seconds)
                time.sleep(0.3)
                threads_after = thread_cpu(pid)
                calls = int(args.rate * args.seconds)
                per_thread[name] = {
                    thread: round((seconds - threads_before.get(thread, 0.0)) / calls * 1e6)
                    for thread, seconds in threads_after.items()
                    if seconds - threads_before.get(thread, 0.0) > 0
                }
                cpu[name].append((cpu_seconds(pid) - before) / calls * 1e6)
                path_cpu[name].append((sum(cpu_seconds(member) for member in path) - path_before) / calls * 1e6)
                latencies.sort()
                if latencies:
                    p50[name].append(latencies[len(latencies) // 2])
                    p99[name].append(latencies[int(len(latencies) * 0.99)])
                errors[name] += failed
        if args.py_spy:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(router_pid), "--rate", "250",
                 "--format", {".json": "speedscope", ".svg": "flamegraph"}.get(args.py_spy.suffix, "raw"),
                 "--output", str(args.py_spy), "--threads", "--gil", "--duration", str(int(args.seconds))],
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            router_address = next(address for address, pid in targets.values() if pid == router_pid)
            run_round(router_address, args.rate, args.seconds)
            spy.wait(60)
        print(f"load average after: {load_average()}")
        print(f"{args.rate:g} calls/s, {args.rounds} rounds of {args.seconds:g} s (median of rounds)")
        print(f"{'':36}{'CPU us/call':>12}{'path us':>9}{'cores@' + format(args.issue_rate, 'g'):>10}{'p50 ms':>8}"
              f"{'p99 ms':>8}{'errors':>7}   (CPU: the server's own for direct)")  # fmt: skip
        for name in targets:
            path_us = statistics.median(path_cpu[name])
            print(f"{name:36}{statistics.median(cpu[name]):12.0f}{path_us:9.0f}{path_us * args.issue_rate / 1e6:10.2f}"
                  f"{statistics.median(p50[name] or [-1]):8.2f}{statistics.median(p99[name] or [-1]):8.2f}"
                  f"{errors[name]:7d}   rounds: " + " ".join(f"{value:.0f}" for value in cpu[name]))  # fmt: skip
        print(f"path us: CPU per call of every process on the path (this load generator, both model servers and the "
              f"proxy; not PostgreSQL); cores@{args.issue_rate:g}: what that path needs at {args.issue_rate:g} "
              f"calls/s, against the machine's {os.cpu_count()} cores")  # fmt: skip
        if any(errors.values()):
            print("errors (client timeouts): the machine could not keep up with --rate, so calls were still queued "
                  "when a round's CPU was read; lower --rate or wait for a quieter machine")  # fmt: skip
        for name, threads in per_thread.items():
            print(f"{name}: CPU us/call by thread in the last round: {threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
