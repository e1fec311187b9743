"""Run the real operator (`shadowgate operator`) as a process against the test cluster, and wait on what it does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shadowgate_operator.builders import ROUTER_SECRET_LABEL

T = TypeVar("T")
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


class OperatorProcess:
    """`shadowgate operator` in a subprocess, its output in a log file the test can show on failure."""

    def __init__(self, kubeconfig: str, log_path: Path, *args: str, env: dict[str, str] | None = None):
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "shadowgate_operator.cli", "operator", *args]
        self.env = {**os.environ, "KUBECONFIG": kubeconfig, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM lets kopf stop gracefully; kill=True simulates a crash."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def assert_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"operator exited with {self.process.returncode}:\n{self.log()[-4000:]}")


def eventually(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll until probe returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def metric(url: str, sample_name: str, /, **labels: str) -> float:
    """The sum of the samples named `sample_name` (with these labels) an operator's /metrics shows; 0 when
    none."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def get_json(kubectl: Kubectl, *args: str) -> Any:
    result = kubectl("get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def events_for(
    kubectl: Callable[..., subprocess.CompletedProcess[str]], namespace: str, name: str
) -> list[dict[str, Any]]:
    """Events about the ShadowDeployment `name` as it exists now (not an earlier one of that name), oldest first."""
    current = get_json(kubectl, "shadowdeployment", name, "-n", namespace)
    if current is None:
        return []
    selector = f"involvedObject.uid={current['metadata']['uid']}"
    listing = get_json(kubectl, "events", "-n", namespace, "--field-selector", selector)
    items: list[dict[str, Any]] = listing["items"] if listing else []
    # resourceVersion orders them exactly (timestamps have one-second resolution).
    return sorted(items, key=lambda event: int(event["metadata"]["resourceVersion"]))


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shadowdeployment.yaml"


def example(name: str = "fraud-detector", **spec_changes: Any) -> dict[str, Any]:
    """examples/shadowdeployment.yaml under another name, with top-level spec fields replaced."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"].update(spec_changes)
    return manifest


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def router_secret(name: str, key: str, value: str, *, labelled: bool = True) -> dict[str, Any]:
    """A Secret a ShadowDeployment may name: labelled shadowgate.io/router-secret=true (`labelled=False`: not)."""
    labels = {ROUTER_SECRET_LABEL: "true"} if labelled else {}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": labels},
        "stringData": {key: value},
    }


def shadow(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = get_json(kubectl, "shadowdeployment", name, "-n", namespace)
    return found


def wait_phase(kubectl: Kubectl, namespace: str, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        obj = get_json(kubectl, "shadowdeployment", name, "-n", namespace)
        return obj if obj and obj.get("status", {}).get("phase") == phase else None

    return eventually(reached, timeout, f"{namespace}/{name} to reach phase {phase}")


def router_config(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    configmap = get_json(kubectl, "configmap", f"{name}-router", "-n", namespace)
    loaded: dict[str, Any] = json.loads(configmap["data"]["config.json"])
    return loaded


def reasons(kubectl: Kubectl, namespace: str, name: str) -> list[str]:
    return [event["reason"] for event in events_for(kubectl, namespace, name)]


def wait_reasons(kubectl: Kubectl, namespace: str, name: str, expected: list[str], timeout: float = 15) -> None:
    """Until the object's Events are exactly `expected`: the operator posts a transition's Events right
    after the status that records it, so a test that saw the status waits for them."""
    eventually(lambda: reasons(kubectl, namespace, name) == expected, timeout, f"the Events {expected} of {name}")


def rows(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """The rows a query returns, as dicts: what the operator (or the router) wrote to the database."""

    async def run() -> list[dict[str, Any]]:
        connection = await asyncpg.connect(dsn)
        try:
            return [dict(row) for row in await connection.fetch(sql, *args)]
        finally:
            await connection.close()

    return asyncio.run(run())


def analyses(dsn: str, namespace: str, name: str) -> int:
    """How many analyses of `name` the operator has recorded: its deployment_metrics rows, one per analysis.
    (status.lastDecision is no such count: an analysis that decides as the last one leaves it as it was.)"""
    found = rows(dsn, "SELECT count(*) AS n FROM deployment_metrics WHERE namespace = $1 AND deployment = $2",
                 namespace, name)  # fmt: skip
    return int(found[0]["n"])
