"""`shadowgate demo`: the whole story on one machine, as it would happen on a cluster.

A local control plane (etcd, kube-apiserver, kube-controller-manager) and a throwaway PostgreSQL come up;
the CRDs are installed; the operator, two model servers (real scikit-learn models, trained at start),
the router and a stream of trades run as local processes. The scenario's ShadowDeployment from
examples/demo/ is applied, and a row per analysis shows the rollout until the operator promotes the
candidate (``--scenario promote``) or rolls it back (``--scenario rollback``). Then it prints
`kubectl get shadowdeployments`, the Events, the decision history, and writes a chart.

Everything it started is stopped when it ends or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

from shadowgate_dev.demo.scenarios import SCENARIOS, Pace
from shadowgate_dev.localenv import ComponentError, ControlPlane, Postgres
from shadowgate_dev.localenv.binaries import REPO_ROOT, ensure_binaries
from shadowgate_dev.localenv.crds import install_crds

DEMO_NAMESPACE = "shadowgate-demo"


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _crds() -> list[Path]:
    """The CustomResourceDefinitions in crds/ (not the optional peering ones' neighbours that are not CRDs)."""
    found = []
    for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        if documents and all(doc.get("kind") == "CustomResourceDefinition" for doc in documents):
            found.append(path)
    return found


def _minutes(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s" if seconds >= 60 else f"{seconds:.0f}s"


def _interrupt(signum: int, _: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    from shadowgate_dev.demo.registry import DemoRegistry
    from shadowgate_dev.demo.report import print_report
    from shadowgate_dev.demo.stack import Environment
    from shadowgate_dev.demo.story import tell

    scenario = SCENARIOS[args.scenario]
    pace = Pace(
        rate=args.rate,
        candidate_latency_ms=args.candidate_latency_ms,
        candidate_error_rate=args.candidate_error_rate,
    )
    output: Path = args.output / scenario.name
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    started = time.monotonic()
    # Ctrl-C, and SIGTERM alike, stop everything in order. (SIGINT is set explicitly: a shell that starts
    # a command in the background hands it SIGINT ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    _say(f"scenario {scenario.name}: {scenario.summary}")
    # MLflow first: its server takes some 15 s to import and start (or its venv is built meanwhile).
    registry = DemoRegistry(output / "mlflow").begin()
    try:
        binaries = ensure_binaries()
        with ControlPlane(binaries=binaries) as plane, Postgres() as database:
            timings = {"control plane, PostgreSQL, CRDs": 0.0}
            _say(f"control plane up at {plane.server_url} ({plane.startup_seconds:.1f}s)")
            timescale = "" if database.timescale else f"; plain, no timescaledb: {database.timescale_reason}"
            _say(f"PostgreSQL up at {database.dsn} ({database.server}{timescale})")
            environment = Environment(binaries.kubectl, plane.kubeconfig, database.dsn, DEMO_NAMESPACE, output)
            install_crds(binaries.kubectl, plane.kubeconfig, _crds())
            environment.kubectl_run("create", "namespace", DEMO_NAMESPACE)
            _say(f"CRDs installed; namespace {DEMO_NAMESPACE}")
            timings["control plane, PostgreSQL, CRDs"] = time.monotonic() - started
            result = asyncio.run(tell(environment, scenario, pace, registry=registry))
            timings.update(result.timings)
            reporting = time.monotonic()
            print_report(result, output / f"{scenario.name}.png")
            timings["report and chart"] = time.monotonic() - reporting
            _say(f"logs, the trade log and the chart are in {output}")
            if args.hold:
                _say(f"holding; KUBECONFIG={plane.kubeconfig} SHADOWGATE_DSN={database.dsn}; Ctrl-C stops")
                while True:
                    time.sleep(3600)
    except ComponentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        registry.stop()
        _say(f"interrupted after {_minutes(time.monotonic() - started)}; everything it started is stopped")
        return 130
    finally:
        registry.stop()
    parts = ", ".join(f"{part} {_minutes(seconds)}" for part, seconds in timings.items())
    _say(f"done in {_minutes(time.monotonic() - started)} ({parts}); everything it started is stopped")
    faults = args.candidate_error_rate > 0 or args.candidate_latency_ms is not None
    if result.phase != scenario.ends_in and not faults:
        print(f"error: the story ended in {result.phase}, not {scenario.ends_in}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole story (shadow and promote, or canary and roll back) on one machine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="promote", help="which story to tell")
    parser.add_argument("--rate", type=float, default=Pace().rate, help="trades (requests) per second")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(tempfile.gettempdir()) / "shadowgate-demo",
        help="where the chart and the logs go (a directory per scenario, replaced on each run)",
    )
    parser.add_argument("--candidate-latency-ms", type=float, help="slow the candidate down (the p99 gate)")
    parser.add_argument(
        "--candidate-error-rate", type=float, default=0.0, help="share of the candidate's answers that fail"
    )
    parser.add_argument(
        "--hold", action="store_true", help="keep the control plane and database up after the end, until Ctrl-C"
    )
    parser.set_defaults(func=run)
