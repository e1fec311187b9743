"""bench/operator: one operator, 1,000 ShadowDeployments, on the local control plane.

For each variant (by default the baseline, main before issue 17, and the code in this checkout), in
the same run and on the same machine: a fresh control plane (etcd, kube-apiserver,
kube-controller-manager) and PostgreSQL, one `shadowgate operator --namespace bench`, then N
ShadowDeployments (default 1,000) whose model URLs never get traffic (analysis interval 30 s, one
router replica each: no kubelet runs, so no router pod ever starts). It measures:

- the time from the first create until every object has reached its first phase (Progressing);
- in the steady state after that (a settling pause, then a window of several intervals): the
  operator's CPU (share of one core) and memory (RSS, and its peak), and the Kubernetes API requests
  it makes per minute, counted inside the operator process for kopf's client and the operator's own
  (bench/operator/counting.py wraps both, so every variant is counted the same way), with the writes
  (POST, PUT, PATCH, DELETE) per analysis interval;
- the time for a weight change (a new first step in one object's spec) to reach that object's router
  ConfigMap while the others idle, a few times (median and worst).

    make bench-operator                                        # 1,000 objects, baseline and current
    .venv/bin/python bench/operator/run.py --objects 200 --variants current   # quicker, this code only

The machine's load average is printed beside the figures: other work on the machine skews them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kubernetes

from shadowgate_dev.localenv import ControlPlane, Postgres
from shadowgate_dev.localenv.binaries import KUBERNETES

REPO = Path(__file__).resolve().parents[2]
BASELINE = "3e5ae46"
"""main before issue 17: the Reconciler that re-applies every child each interval."""
NAMESPACE = "bench"
WRITES = ("POST", "PUT", "PATCH", "DELETE")
TICKS = os.sysconf("SC_CLK_TCK")
WEIGHT_TIMEOUT = 120.0


@dataclass
class Variant:
    name: str
    root: Path
    """A checkout holding operator/, router/, crds/ and migrations/."""


@dataclass
class Figures:
    variant: str
    objects: int
    created_seconds: float = 0.0
    progressing_seconds: float | None = None
    progressing: int = 0
    start_cpu: float = 0.0
    """CPU seconds the operator used from the first create until all were Progressing (or the timeout)."""
    start_plane_cpu: float = 0.0
    """The same for the control plane (etcd, kube-apiserver, kube-controller-manager): the same 2 cores."""
    cpu_percent: float = 0.0
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    window_seconds: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    """Requests of the window answered with an HTTP error, by label and status."""
    refused_at_start: dict[str, int] = field(default_factory=dict)
    """The same from the start until all were Progressing (e.g. 409: status written from a stale read)."""
    objects_changed: dict[str, int] = field(default_factory=dict)
    """Of the objects whose resourceVersion moved in the steady window: how many saw each field change."""
    events: dict[str, int] = field(default_factory=dict)
    """Events first posted in the steady window, by reason: what the writes announced."""
    weight_change_seconds: list[float] = field(default_factory=list)
    weight_changes_missed: int = 0
    """Weight changes that did not reach the ConfigMap within WEIGHT_TIMEOUT (the rest are not tried)."""
    load: str = ""

    def per_minute(self, match: str = "") -> float:
        total = sum(count for label, count in self.requests.items() if match in label)
        return total * 60 / self.window_seconds if self.window_seconds else 0.0

    def writes_per_minute(self) -> float:
        total = sum(count for label, count in self.requests.items() if label.split()[1] in WRITES)
        return total * 60 / self.window_seconds if self.window_seconds else 0.0


# --- the cluster ---------------------------------------------------------------------------------


class Api:
    """The admin's REST calls to the API server (creating objects, reading phases and ConfigMaps)."""

    def __init__(self, kubeconfig: Path):
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        import ssl

        verify = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        verify.load_cert_chain(configuration.cert_file, configuration.key_file)
        self.http = httpx.AsyncClient(
            base_url=configuration.host, verify=verify, timeout=60, limits=httpx.Limits(max_connections=16)
        )

    async def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        response = await self.http.request(method, path, json=body, headers={"Content-Type": content_type})
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    async def close(self) -> None:
        await self.http.aclose()


SHADOWS = f"/apis/shadowgate.io/v1alpha1/namespaces/{NAMESPACE}/shadowdeployments"


def shadow_deployment(index: int) -> dict[str, Any]:
    """An object whose model servers never get traffic (nothing listens on the discard port)."""
    return {
        "apiVersion": "shadowgate.io/v1alpha1",
        "kind": "ShadowDeployment",
        "metadata": {"name": f"model-{index:04d}"},
        "spec": {
            "production": {"name": "prod", "version": "1", "url": "http://127.0.0.1:9"},
            "candidate": {"name": "cand", "version": "2", "url": "http://127.0.0.1:9"},
            "traffic": {"mode": "shadow", "steps": [5, 50]},
            "analysis": {"interval": "30s", "minSamples": 100, "maxStepDuration": "24h"},
            "router": {"replicas": 1},
            "database": {"secretRef": {"name": "bench-db"}},
            "outcomes": {"tokenSecretRef": {"name": "bench-outcomes"}},
        },
    }


async def create_all(api: Api, objects: int) -> None:
    semaphore = asyncio.Semaphore(16)

    async def create(index: int) -> None:
        async with semaphore:
            await api.call("POST", SHADOWS, shadow_deployment(index))

    await asyncio.gather(*(create(index) for index in range(objects)))


TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


async def phases(api: Api) -> dict[str, str]:
    """Each object's phase, from the printer columns (as `kubectl get` asks): polled every second, so it asks
    for a table of names and phases rather than 1,000 whole objects (which loaded the API server the
    operator shares the machine with)."""
    response = await api.http.get(SHADOWS, params={"includeObject": "None"}, headers={"Accept": TABLE})
    response.raise_for_status()
    table = response.json()
    columns = [column["name"] for column in table["columnDefinitions"]]
    name, phase = columns.index("Name"), columns.index("Phase")
    return {row["cells"][name]: row["cells"][phase] or "" for row in table["rows"]}


async def objects(api: Api) -> dict[str, dict[str, Any]]:
    listing = await api.call("GET", SHADOWS)
    return {item["metadata"]["name"]: item for item in listing["items"]}


def _meta(item: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in item["metadata"].items() if key not in ("resourceVersion", "managedFields")}


def what_changed(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Of the objects whose resourceVersion moved: how many saw each status field (or metadata) change."""
    fields: dict[str, int] = {}
    for name, item in after.items():
        old = before.get(name)
        if old is not None and old["metadata"]["resourceVersion"] == item["metadata"]["resourceVersion"]:
            continue
        old_status, status = (old or {}).get("status") or {}, item.get("status") or {}
        changed = [f"status.{key}" for key in sorted(old_status.keys() | status.keys())
                   if old_status.get(key) != status.get(key)]  # fmt: skip
        if old is None or (_meta(old), old["spec"]) != (_meta(item), item["spec"]):
            changed.append("metadata/spec")
        for key in changed or ["(nothing seen)"]:
            fields[key] = fields.get(key, 0) + 1
    return fields


async def events_since(api: Api, since: str) -> dict[str, int]:
    """Events created at or after `since` (RFC 3339, whole seconds), counted by reason.

    By the API server's creationTimestamp, not firstTimestamp: the operator stamps a transition's Events
    with the transition's time, which under load can be well before the Event is posted."""
    listing = await api.call("GET", f"/api/v1/namespaces/{NAMESPACE}/events")
    reasons: dict[str, int] = {}
    for event in listing["items"]:
        if (event["metadata"].get("creationTimestamp") or "") >= since:
            reasons[event["reason"]] = reasons.get(event["reason"], 0) + 1
    return reasons


async def router_weight(api: Api, name: str) -> int | None:
    try:
        configmap = await api.call("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps/{name}-router")
    except RuntimeError:
        return None
    return int(json.loads(configmap["data"]["config.json"])["weight"])


# --- the operator process ------------------------------------------------------------------------


class Operator:
    def __init__(self, variant: Variant, kubeconfig: Path, workdir: Path):
        self.counts = workdir / f"{variant.name}-counts.json"
        self.log = workdir / f"{variant.name}-operator.log"
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONPATH": os.pathsep.join(str(variant.root / root) for root in ("operator", "router", "common")),
            "SHADOWGATE_MIGRATIONS": str(variant.root / "migrations"),
        }
        argv = [sys.executable, str(Path(__file__).with_name("counting.py")), str(self.counts)]
        argv += ["operator", "--namespace", NAMESPACE]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def memory_mb(self) -> tuple[float, float]:
        """(RSS, peak RSS) in MB."""
        values = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
        return values["VmRSS"], values["VmHWM"]

    def requests(self, which: str = "counts") -> dict[str, int]:
        """The requests made so far, by label (`which="refused"`: those answered with an HTTP error)."""
        try:
            counts: dict[str, int] = json.loads(self.counts.read_text()).get(which, {})
        except (OSError, ValueError):
            return {}
        return counts

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the operator exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def cpu_seconds(*pids: int) -> float:
    """User and system CPU seconds the processes used so far (those gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> None:
    subprocess.run(
        [str(KUBERNETES.path("kubectl")), *args],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        input=stdin,
        text=True,
        check=True,
        capture_output=True,
    )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- one variant ---------------------------------------------------------------------------------


async def measure(variant: Variant, args: argparse.Namespace, workdir: Path) -> Figures:
    figures = Figures(variant.name, args.objects, load=loadavg())
    # A Service range for thousands of routers (the default /24 holds 253: later Services were refused with 500).
    with ControlPlane(service_cidr="10.0.0.0/20") as plane, Postgres() as postgres:
        kubeconfig = plane.kubeconfig
        kubectl(kubeconfig, "apply", "--server-side", "-f", str(variant.root / "crds"))
        kubectl(kubeconfig, "wait", "--for=condition=Established", "crd/shadowdeployments.shadowgate.io")
        kubectl(kubeconfig, "create", "namespace", NAMESPACE)
        for secret, key, value in (("bench-db", "dsn", postgres.dsn), ("bench-outcomes", "token", "bench")):
            kubectl(kubeconfig, "create", "secret", "generic", secret, "-n", NAMESPACE, f"--from-literal={key}={value}")
            # Labelled for the router (issue 12 D13: an operator that checks it uses only labelled Secrets).
            kubectl(kubeconfig, "label", "secret", secret, "-n", NAMESPACE, "shadowgate.io/router-secret=true")
        operator = Operator(variant, kubeconfig, workdir)
        api = Api(kubeconfig)
        try:
            print(f"[{variant.name}] operator started; creating {args.objects} ShadowDeployments", flush=True)
            if args.profile:
                while not operator.counts.exists():  # written once counting.py handles the signals
                    operator.check()
                    await asyncio.sleep(0.1)
                operator.process.send_signal(signal.SIGUSR1)
            started, cpu_before = time.monotonic(), (operator.cpu_seconds(), cpu_seconds(*plane.pids()))
            await create_all(api, args.objects)
            figures.created_seconds = time.monotonic() - started
            deadline = started + args.progressing_timeout
            while time.monotonic() < deadline:
                operator.check()
                seen = await phases(api)
                figures.progressing = sum(1 for phase in seen.values() if phase == "Progressing")
                if figures.progressing == args.objects:
                    figures.progressing_seconds = time.monotonic() - started
                    break
                await asyncio.sleep(1.0)
            figures.start_cpu = operator.cpu_seconds() - cpu_before[0]
            figures.start_plane_cpu = cpu_seconds(*plane.pids()) - cpu_before[1]
            if args.profile:
                operator.process.send_signal(signal.SIGUSR2)
            shown = f"{figures.progressing_seconds:.0f} s" if figures.progressing_seconds else "not reached"
            print(f"[{variant.name}] {figures.progressing}/{args.objects} Progressing ({shown})", flush=True)

            await asyncio.sleep(args.settle)
            operator.check()
            before = await objects(api)
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if args.profile:
                operator.process.send_signal(signal.SIGUSR1)
            figures.refused_at_start = operator.requests("refused")
            cpu, counts, window_start = operator.cpu_seconds(), operator.requests(), time.monotonic()
            await asyncio.sleep(args.window)
            operator.check()
            if args.profile:
                operator.process.send_signal(signal.SIGUSR2)
            seen_after = await objects(api)
            figures.objects_changed = what_changed(before, seen_after)
            for moment, listing in (("before", before), ("after", seen_after)):  # for a look at what changed
                (workdir / f"{variant.name}-window-{moment}.json").write_text(json.dumps(listing))
            figures.events = await events_since(api, since)
            figures.window_seconds = time.monotonic() - window_start
            figures.cpu_percent = 100 * (operator.cpu_seconds() - cpu) / figures.window_seconds
            after = operator.requests()
            figures.requests = {label: after.get(label, 0) - counts.get(label, 0) for label in after}
            refused = operator.requests("refused")
            figures.refused = {
                label: count - figures.refused_at_start.get(label, 0)
                for label, count in refused.items()
                if count > figures.refused_at_start.get(label, 0)
            }
            figures.rss_mb, figures.peak_rss_mb = operator.memory_mb()
            print(f"[{variant.name}] steady window done: {figures.cpu_percent:.1f}% CPU", flush=True)

            target = "model-0000"
            for first_step in args.weights:
                changed = time.monotonic()
                await api.call(
                    "PATCH",
                    f"{SHADOWS}/{target}",
                    {"spec": {"traffic": {"steps": [first_step, 50]}}},
                    "application/merge-patch+json",
                )
                while await router_weight(api, target) != first_step:
                    operator.check()
                    if time.monotonic() - changed > WEIGHT_TIMEOUT:
                        break
                    await asyncio.sleep(0.02)
                else:
                    figures.weight_change_seconds.append(time.monotonic() - changed)
                    continue
                # Not within the limit (an operator that is behind on everything): a figure, not a crash.
                figures.weight_changes_missed += 1
                print(f"[{variant.name}] weight {first_step}: not in the ConfigMap within {WEIGHT_TIMEOUT:.0f} s")
                break
        finally:
            await api.close()
            operator.stop()
            figures.load += f" -> {loadavg()}"
    return figures


def checkout(revision: str, workdir: Path) -> Path:
    """The repository at `revision`, extracted (operator, router, common when it has one, crds, migrations)."""
    root = workdir / f"checkout-{revision}"
    root.mkdir()
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", revision], check=True, capture_output=True, text=True
    ).stdout.split()
    roots = [name for name in ("operator", "router", "common", "crds", "migrations") if name in listed]
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, *roots], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


def report(results: Sequence[Figures], interval: float) -> str:
    headers = [
        "variant",
        "objects",
        "all Progressing",
        "start-up CPU s (operator / control plane)",
        "CPU (1 core)",
        "RSS / peak",
        "API req/min (operator + kopf)",
        "writes/min",
        "writes per interval",
        "weight change median / max",
        "load avg",
    ]
    rows = []
    for f in results:
        reached = f"{f.progressing_seconds:.0f} s" if f.progressing_seconds else f"{f.progressing} only"
        weights = f.weight_change_seconds
        change = f"{statistics.median(weights):.2f} / {max(weights):.2f} s" if weights else "-"
        if f.weight_changes_missed:
            change += f" ({f.weight_changes_missed} not within {WEIGHT_TIMEOUT:.0f} s)"
        rows.append(
            [
                f.variant,
                str(f.objects),
                reached,
                f"{f.start_cpu:.0f} / {f.start_plane_cpu:.0f}",
                f"{f.cpu_percent:.1f}%",
                f"{f.rss_mb:.0f} / {f.peak_rss_mb:.0f} MB",
                f"{f.per_minute():.0f} ({f.per_minute('operator'):.0f} + {f.per_minute('kopf'):.0f})",
                f"{f.writes_per_minute():.0f}",
                f"{f.writes_per_minute() * interval / 60:.0f}",
                change,
                f.load,
            ]
        )
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for f in results:
        detail = ", ".join(f"{label}: {count}" for label, count in sorted(f.requests.items()) if count)
        per_minute = ", ".join(
            f"{label} {count * 60 / f.window_seconds:.0f}" for label, count in sorted(f.requests.items()) if count
        )
        events = ", ".join(f"{reason} {count}" for reason, count in sorted(f.events.items())) or "none"
        lines.append(f"\n{f.variant}: requests in the {f.window_seconds:.0f} s window: {detail or 'none'}")
        lines.append(f"{f.variant}: per minute by verb: {per_minute or 'none'}")
        changed = ", ".join(f"{key} {count}" for key, count in sorted(f.objects_changed.items())) or "none"
        lines.append(f"{f.variant}: objects written in the window, by what changed: {changed}")
        lines.append(f"{f.variant}: Events posted in the window: {events}")
        for when, refusals in (("until all were Progressing", f.refused_at_start), ("in the window", f.refused)):
            listed = ", ".join(f"{label}: {count}" for label, count in sorted(refusals.items())) or "none"
            lines.append(f"{f.variant}: requests answered with an error {when}: {listed}")
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    try:
        variants = []
        for name in args.variants:
            root = REPO if name == "current" else checkout(args.baseline if name == "baseline" else name, workdir)
            variants.append(Variant(name, root))
        results = []
        for variant in variants:
            results.append(await measure(variant, args, workdir))
        print()
        print(report(results, interval=30.0))
        print(f"\nlogs and counts: {workdir}" if args.keep else "")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=1000, help="ShadowDeployments on the one operator")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["baseline", "current"],
        help="'baseline' (--baseline), 'current' (this checkout) or any git revision",
    )
    parser.add_argument("--baseline", default=BASELINE, help="the revision 'baseline' names")
    parser.add_argument(
        "--progressing-timeout", type=float, default=600, help="seconds to wait for all to be Progressing"
    )
    parser.add_argument("--settle", type=float, default=60, help="seconds after that before the steady window")
    parser.add_argument("--window", type=float, default=120, help="seconds of steady state measured")
    parser.add_argument(
        "--weights", type=int, nargs="+", default=[15, 25, 35], help="first steps set one after the other"
    )
    parser.add_argument("--keep", action="store_true", help="keep the operator logs and counts")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the start and the steady window (VARIANT-counts-1/2.pstats, with --keep)",
    )
    return asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
