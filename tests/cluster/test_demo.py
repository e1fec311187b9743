"""End to end: both demo stories told for real, and what every observer saw.

Each story runs as `shadowgate demo` runs it (operator, model servers, router and clients as processes,
the router authenticated as its ServiceAccount and watching its ConfigMap), on the session's control
plane and database, faster (two steps, fewer samples). Then the assertions read what each party has:
the ShadowDeployment's status and conditions, its Events, the router's ConfigMap, the rows in
predictions, outcomes, deployment_events and deployment_metrics, and, as the router's clients and the
model servers saw it, which side each request went to at each weight.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shadowgate_dev.demo.registry import DemoRegistry
from shadowgate_dev.demo.report import print_report
from shadowgate_dev.demo.scenarios import SCENARIOS, Pace
from shadowgate_dev.demo.stack import Environment
from shadowgate_dev.demo.story import StoryResult, tell
from shadowgate_dev.localenv.binaries import KUBERNETES
from shadowgate_router.hashing import salt_for, threshold, to_candidate
from tests.conftest import REPO_ROOT, Kubectl
from tests.support.operator import events_for, router_config, rows

pytestmark = [pytest.mark.cluster, pytest.mark.database]

# Two steps, 150 scored requests each: the same story as `make demo`, in about half the time.
STEPS = [10, 50]
MIN_SAMPLES = 150
PACE = Pace(rate=100, analysis={"minSamples": MIN_SAMPLES}, traffic={"steps": STEPS}, after_end=4, timeout=150)
MARGIN = 1.0
"""Seconds around each transition left out of the split checks: the router applies a new weight within
milliseconds of the operator writing it, and the deployment_events row is written just after."""
ACCOUNTS = 5_000


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRegistry]:
    """The demo's MLflow server (its venv built once, then cached), shared by the two stories: each
    registers its own versions of trade-signal."""
    registry = DemoRegistry(tmp_path_factory.mktemp("mlflow")).begin()
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def environment(
    kubeconfig: str, dsn: str, namespace: str, shadow_crd: str, kubectl: Kubectl, tmp_path: Path
) -> Iterator[Environment]:
    yield Environment(KUBERNETES.path("kubectl"), Path(kubeconfig), dsn, namespace, tmp_path / "story")
    # The story stops its operator: let the namespace go without it (the finalizer is the operator's).
    kubectl("patch", "shadowdeployment", "trade-signal", "-n", namespace, "--type=merge",
            "-p", '{"metadata":{"finalizers":null}}', check=False)  # fmt: skip


def told(environment: Environment, scenario: str, registry: DemoRegistry) -> tuple[StoryResult, str]:
    out = io.StringIO()
    started = time.monotonic()
    try:
        result = asyncio.run(tell(environment, SCENARIOS[scenario], PACE, out=out, registry=registry))
    finally:
        print(out.getvalue())  # shown when the test fails
        for log in sorted(environment.workdir.glob("*.log")):
            print(f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}")
    print(f"{scenario}: told in {time.monotonic() - started:.0f}s ({result.timings})")
    return result, out.getvalue()


def trades(result: StoryResult) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.traffic_log.read_text().splitlines()]


def check_split(result: StoryResult, events: list[dict[str, Any]], canary: bool) -> dict[int, tuple[int, int]]:
    """Every answered trade sent while a weight was in force went to the side the weight gives its account.

    The side is observed from outside the router: in canary mode by the client (X-Shadowgate-Served-By),
    in shadow mode by the candidate's model server (the trade ids it received). Returns, per weight,
    (trades sent to the candidate, trades) for the share checks.
    """
    changes = [(row["time"].timestamp(), int(row["weight"])) for row in events if row["weight"] is not None]
    windows = [
        (start + MARGIN, end - MARGIN, weight)
        for (start, weight), (end, _) in zip(changes, [*changes[1:], (math.inf, 0)], strict=True)
    ]
    salt = salt_for(result.environment.namespace, result.name)
    reached_candidate = set(result.candidate_ids)
    seen: dict[int, list[int]] = {}
    wrong = []
    for trade in trades(result):
        if trade["status"] != 200:
            continue
        window = next(((weight) for start, end, weight in windows if start <= trade["time"] <= end), None)
        if window is None:
            continue
        expected = to_candidate(trade["account"].encode(), salt, threshold(window))
        observed = trade["servedBy"] == "candidate" if canary else trade["trade"] in reached_candidate
        if canary:  # the candidate's server saw exactly the trades it answered
            assert observed == (trade["trade"] in reached_candidate), trade
        if observed != expected:
            wrong.append((trade, window))
        counts = seen.setdefault(window, [0, 0])
        counts[0] += observed
        counts[1] += 1
    assert not wrong, f"{len(wrong)} trades went to the other side than their weight gives, e.g. {wrong[:3]}"
    for weight, (to_candidate_count, total) in seen.items():
        share, expected_share = to_candidate_count / total, weight / 100
        # Binomial noise of the trades and of which accounts fall below the weight.
        noise = math.sqrt(expected_share * (1 - expected_share) * (1 / total + 1 / ACCOUNTS))
        assert abs(share - expected_share) <= 4 * noise + 0.002, (weight, to_candidate_count, total)
    return {weight: (counts[0], counts[1]) for weight, counts in seen.items()}


def check_records(result: StoryResult, dsn: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """predictions and outcomes hold exactly what the clients and the model servers saw; returns the
    (deployment_events, deployment_metrics) rows."""
    key = (result.environment.namespace, result.name)
    predictions = rows(
        dsn,
        """SELECT request_id, served_by, mode, weight, fallback, production_prediction, candidate_prediction,
                  production_status, production_error, candidate_status, candidate_error, production_version,
                  candidate_version
           FROM predictions WHERE namespace = $1 AND deployment = $2""",
        *key,
    )
    answered = [trade for trade in trades(result) if trade["status"] == 200]
    assert len(answered) == result.traffic["answered"] == result.traffic["sent"] > 1_000, result.traffic
    assert sorted(p["request_id"] for p in predictions) == sorted(t["trade"] for t in answered)
    called_candidate = {p["request_id"] for p in predictions if p["candidate_status"] or p["candidate_error"]}
    assert called_candidate == set(result.candidate_ids), "the router's rows disagree with the candidate's server"
    called_production = {p["request_id"] for p in predictions if p["production_status"] or p["production_error"]}
    assert called_production == set(result.production_ids), "the router's rows disagree with production's server"
    served = {t["trade"]: t["servedBy"] for t in answered}
    assert all(p["served_by"] == served[p["request_id"]] for p in predictions)
    assert not any(p["fallback"] for p in predictions)
    spec = result.manifest["spec"]
    assert {p["production_version"] for p in predictions if p["served_by"] == "production"} == {
        spec["production"]["version"]
    }
    assert {p["candidate_version"] for p in predictions if p["request_id"] in called_candidate} == {
        spec["candidate"]["version"]
    }

    outcomes = rows(dsn, "SELECT request_id, outcome FROM outcomes WHERE namespace = $1 AND deployment = $2", *key)
    assert len(outcomes) == result.traffic["outcomesPosted"] == len(answered)
    assert {o["request_id"] for o in outcomes} == set(served)
    assert {o["outcome"] for o in outcomes} == {0.0, 1.0}

    events = rows(
        dsn,
        "SELECT time, event, phase, step, weight, message FROM deployment_events "
        "WHERE namespace = $1 AND deployment = $2 ORDER BY time",
        *key,
    )
    metrics = rows(
        dsn,
        "SELECT time, step, weight, samples, production_value, candidate_value, improvement, overall_score, "
        "p_value, decision, reason FROM deployment_metrics WHERE namespace = $1 AND deployment = $2 ORDER BY time",
        *key,
    )
    return events, metrics


def check_notifications(result: StoryResult, events: list[dict[str, Any]], transcript: str) -> None:
    """The demo's receiver got one CloudEvent per transition the story shows (its deployment_events rows),
    in order, each with a new id and the weight the transition set; the story printed a line for each."""
    received = result.notifications
    assert [n.reason for n in received] == [e["event"] for e in events], received
    assert [n.type for n in received] == [f"io.shadowgate.rollout.{e['event']}" for e in events]
    assert [n.data["weight"] for n in received] == [e["weight"] for e in events]
    assert len({n.id for n in received}) == len(received)
    assert received[-1].data["phase"] == result.phase
    shown = [line for line in transcript.splitlines() if line.startswith("==> notification io.shadowgate.")]
    assert shown == [f"==> {n.line()}" for n in received], transcript


def mlflow_state(result: StoryResult) -> tuple[str, dict[str, dict[str, str]]]:
    """Where the alias points and the tags of production's and the candidate's versions, asked of MLflow
    itself (not the story's read-back)."""
    spec = result.manifest["spec"]
    url, model, alias = (
        spec["registry"]["mlflow"]["trackingUri"],
        spec["candidate"]["registeredModel"]["name"],
        (spec["registry"]["alias"]),
    )
    api = f"{url}/api/2.0/mlflow"
    with httpx.Client(timeout=30) as http:
        answer = http.get(f"{api}/registered-models/alias", params={"name": model, "alias": alias})
        assert answer.status_code == 200, answer.text
        tags = {}
        for side in ("production", "candidate"):
            version = spec[side]["registeredModel"]["version"]
            found = http.get(f"{api}/model-versions/get", params={"name": model, "version": version})
            assert found.status_code == 200, found.text
            tags[side] = {tag["key"]: tag["value"] for tag in found.json()["model_version"].get("tags", [])}
    return str(answer.json()["model_version"]["version"]), tags


def check_registry(result: StoryResult, transcript: str, reason: str) -> tuple[str, dict[str, dict[str, str]]]:
    """The story registered the versions it named, showed what MLflow holds after the end (each line
    printed), and that is what MLflow says; returns (the alias's version, each side's tags)."""
    spec = result.manifest["spec"]
    assert spec["registry"]["alias"] == "champion"
    assert spec["production"]["registeredModel"]["name"] == spec["candidate"]["registeredModel"]["name"]
    assert "==> MLflow at http://127.0.0.1:" in transcript and "registered model trade-signal" in transcript
    alias, tags = mlflow_state(result)
    assert result.registry is not None
    assert result.registry.alias_version == alias
    assert result.registry.tags[spec["candidate"]["registeredModel"]["version"]] == {
        key: value for key, value in tags["candidate"].items() if key.startswith("shadowgate.")
    }
    names = (spec["production"]["name"], spec["candidate"]["name"])
    assert all(line in transcript.splitlines() for line in result.registry.lines(names)), transcript
    assert tags["candidate"]["shadowgate.reason"] == reason
    rollout = f"{result.environment.namespace}/{result.name}"
    assert (tags["candidate"]["shadowgate.rollout"], tags["candidate"]["trading.model"]) == (
        rollout, result.scenario.candidate_model,
    )  # fmt: skip
    return alias, tags


def check_report(result: StoryResult, chart: Path, ending: str) -> str:
    out = io.StringIO()
    print_report(result, chart, out=out)
    report = out.getvalue()
    assert re.search(rf"trade-signal\s+\w+\s+\d+\s+{result.phase}\s", report), report  # kubectl get
    assert "Events:" in report and "AnalysisStarted" in report
    listed = report.split(f"notifications received ({len(result.notifications)} CloudEvents")[1]
    assert all(f"  {n.line()}" in listed for n in result.notifications), report
    assert f"Would have ended: {ending}" in report  # shadowgate replay over the recorded rows
    header = chart.read_bytes()[:8]
    assert header == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 20_000
    return report


def test_a_better_model_is_shadowed_step_by_step_and_promoted(
    environment: Environment, kubectl: Kubectl, dsn: str, registry: DemoRegistry
) -> None:
    result, transcript = told(environment, "promote", registry)
    namespace, name = environment.namespace, result.name

    status = result.shadow["status"]
    assert (status["phase"], status["currentStep"], status["currentWeight"]) == ("Promoted", 1, 100)
    assert status["lastDecision"]["action"] == "Promote"
    assert status["samples"] >= MIN_SAMPLES
    measured = status["metrics"]
    assert measured["overallScore"] >= 0.7 and measured["pValue"] <= 0.01
    assert measured["improvement"] > 0.1
    assert measured["candidate"]["metricValue"] < measured["production"]["metricValue"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["Promoted"]["status"], conditions["Promoted"]["reason"]) == ("True", "Promoted")
    assert conditions["Progressing"]["status"] == conditions["RolledBack"]["status"] == "False"
    # No kubelet runs the router's pods here (the router runs as a local process): Ready says so.
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "RouterUnavailable")
    generation = result.shadow["metadata"]["generation"]
    assert all(c["observedGeneration"] == generation for c in conditions.values())

    kube_events = events_for(kubectl, namespace, name)
    assert [e["reason"] for e in kube_events] == ["AnalysisStarted", "StepAdvanced", "Promoted"]
    assert all(e["type"] == "Normal" for e in kube_events)
    assert "passed" in kube_events[1]["message"] and "advancing to step 2 (50% shadow)" in kube_events[1]["message"]

    config = router_config(kubectl, namespace, name)
    assert (config["mode"], config["weight"], config["phase"]) == ("canary", 100, "Promoted")
    assert config["candidate"]["name"] == "trade-signal-v2"
    assert config["candidate"]["url"] == result.manifest["spec"]["candidate"]["url"]

    events, metrics = check_records(result, dsn)
    assert [e["event"] for e in events] == ["AnalysisStarted", "StepAdvanced", "Promoted"]
    assert [e["weight"] for e in events] == [10, 50, 100]
    decisions = [m["decision"] for m in metrics]
    assert decisions[-1] == "Promote" and decisions.count("Advance") == 1 and set(decisions) <= {
        "Wait", "Advance", "Promote"
    }  # fmt: skip
    assert [m["weight"] for m in metrics] == sorted(m["weight"] for m in metrics)
    assert {m["weight"] for m in metrics} == {10, 50}
    for decided in (m for m in metrics if m["decision"] != "Wait"):
        assert decided["samples"] >= MIN_SAMPLES and decided["p_value"] <= 0.01
        assert decided["candidate_value"] < decided["production_value"]

    split = check_split(result, events, canary=False)
    assert {10, 50, 100} <= set(split), split
    assert all(total >= 200 for _, total in split.values()), split
    # After the promotion every answer comes from the candidate, as its clients see it.
    after = Counter(t["servedBy"] for t in trades(result) if t["time"] > result.decided_at + MARGIN)
    assert set(after) == {"candidate"} and after["candidate"] >= 200, after

    check_notifications(result, events, transcript)
    # MLflow: champion moved from production's version to the candidate's; both versions tagged.
    spec = result.manifest["spec"]
    promoted = next(e for e in status["lastTransition"]["events"] if e["reason"] == "Promoted")
    alias, tags = check_registry(result, transcript, promoted["message"])
    assert alias == spec["candidate"]["registeredModel"]["version"] != spec["production"]["registeredModel"]["version"]
    assert (tags["candidate"]["shadowgate.outcome"], tags["candidate"]["shadowgate.replaces"]) == (
        "promoted", spec["production"]["registeredModel"]["version"],
    )  # fmt: skip
    assert (tags["production"]["shadowgate.outcome"], tags["production"]["shadowgate.replaced_by"]) == (
        "replaced", alias,
    )  # fmt: skip
    check_report(result, environment.workdir / "promote.png", "Promote")
    assert "Advance" in transcript and "Promote" in transcript  # the live table showed each decision


def test_a_worse_model_is_canaried_and_rolled_back_before_it_reaches_more_accounts(
    environment: Environment, kubectl: Kubectl, dsn: str, registry: DemoRegistry
) -> None:
    result, transcript = told(environment, "rollback", registry)
    namespace, name = environment.namespace, result.name

    status = result.shadow["status"]
    assert (status["phase"], status["currentStep"], status["currentWeight"]) == ("RolledBack", 0, 0)
    assert status["lastDecision"]["action"] == "RollBack"
    measured = status["metrics"]
    assert measured["overallScore"] <= -0.3 and measured["improvement"] < -0.2
    assert measured["candidate"]["metricValue"] > measured["production"]["metricValue"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["RolledBack"]["status"], conditions["RolledBack"]["reason"]) == ("True", "RolledBack")
    assert "rolled back" in conditions["RolledBack"]["message"]
    assert conditions["Progressing"]["status"] == conditions["Promoted"]["status"] == "False"

    kube_events = events_for(kubectl, namespace, name)
    assert [(e["type"], e["reason"]) for e in kube_events] == [("Normal", "AnalysisStarted"), ("Warning", "RolledBack")]

    config = router_config(kubectl, namespace, name)
    assert (config["mode"], config["weight"], config["phase"]) == ("canary", 0, "RolledBack")
    assert config["candidate"]["name"] == "trade-signal-v3"

    events, metrics = check_records(result, dsn)
    assert [(e["event"], e["weight"]) for e in events] == [("AnalysisStarted", 10), ("RolledBack", 0)]
    assert [m["decision"] for m in metrics][-1] == "RollBack"
    assert all(m["weight"] == 10 and m["decision"] == "Wait" for m in metrics[:-1])
    assert metrics[-1]["samples"] >= MIN_SAMPLES and metrics[-1]["candidate_value"] > metrics[-1]["production_value"]

    split = check_split(result, events, canary=True)
    assert split[10][1] >= 500, split
    after = Counter(t["servedBy"] for t in trades(result) if t["time"] > result.decided_at + MARGIN)
    assert set(after) == {"production"} and after["production"] >= 200, after

    check_notifications(result, events, transcript)
    # MLflow: the candidate's version tagged with the reason; champion stays on production's.
    rolled_back = next(e for e in status["lastTransition"]["events"] if e["reason"] == "RolledBack")
    alias, tags = check_registry(result, transcript, rolled_back["message"])
    assert alias == result.manifest["spec"]["production"]["registeredModel"]["version"]
    assert tags["candidate"]["shadowgate.outcome"] == "rolled_back"
    assert not any(key.startswith("shadowgate.") for key in tags["production"])
    check_report(result, environment.workdir / "rollback.png", "RollBack")
    assert "RollBack" in transcript


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_during_the_demo_leaves_nothing_running(tmp_path: Path) -> None:
    """`shadowgate demo` itself, interrupted while it trades: every process it started is gone, and so
    are the control plane's and the database's directories."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "shadowgate_operator.cli", "demo", "--scenario", "rollback", "--output", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )
    assert demo.stdout is not None
    transcript = []
    try:
        # Trades and outcomes flowing, the analysis running: the first analysis prints its table's header.
        trading = False
        for line in demo.stdout:
            transcript.append(line)
            trading = trading or line.startswith("==> trading:")
            if trading and line.rstrip().endswith("decision"):
                break
        else:
            pytest.fail("the demo ended before its first analysis:\n" + "".join(transcript))
        started = descendants(demo.pid)
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") for pid in started}
        assert any(b"trading.traffic" in c for c in commands.values()) and any(b"etcd" in c for c in commands.values())
        assert any(b"mlflow server" in c for c in commands.values()), commands  # the demo's registry
        assert len(started) >= 10, commands
        # The control plane's and the database's directories, from etcd's and PostgreSQL's command lines.
        directories = {
            Path(found.group(1).decode())
            for command in commands.values()
            if (found := re.search(rb"(?:--data-dir=| -D )(/\S*/shadowgate-(?:cp|pg)-[^/\s]+)", command))
        }
        assert len(directories) == 2 and all(d.is_dir() for d in directories), commands
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    transcript.append(rest)
    output = "".join(transcript)
    assert demo.returncode == 130, output
    assert "interrupted after" in output and "everything it started is stopped" in output
    left = [pid for pid in started if alive(pid)]
    assert not left, {pid: commands[pid] for pid in left}
    assert not [d for d in directories if d.exists()]
