"""What the demo shows once the story has ended: the cluster's view, the decision history and a chart.

- `kubectl get shadowdeployments` and the Events of `kubectl describe`: what anyone with kubectl sees;
- the decision history: `shadowgate replay` re-runs the analysis over the rows recorded in PostgreSQL
  under the spec the operator recorded (what actually happened is in the Events just above);
- what the clients saw after the decision (X-Shadowgate-Served-By of the last requests);
- a PNG chart from deployment_metrics: the candidate's weight, the overall score against the
  thresholds, and each model's error (the analysis metric) over time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from shadowgate_operator.demo.story import METRICS_ROWS, StoryResult

EVENT_ROWS = """
    SELECT time, event, phase, step, weight, message
    FROM deployment_events WHERE namespace = $1 AND deployment = $2 ORDER BY time"""


def _heading(out: TextIO, text: str) -> None:
    print(f"\n==> {text}", file=out, flush=True)


def describe_events(result: StoryResult) -> str:
    """The Events section of `kubectl describe shadowdeployment`."""
    described = result.environment.kubectl_run(
        "describe", "shadowdeployment", result.name, "-n", result.environment.namespace
    ).stdout
    start = described.find("\nEvents:")
    return described[start + 1 :].rstrip() if start >= 0 else described.rstrip()


def decision_history(result: StoryResult) -> str:
    """`shadowgate replay NAMESPACE/NAME`: the decisions re-taken over the recorded rows."""
    replayed = subprocess.run(
        [
            sys.executable, "-m", "shadowgate_operator.cli", "replay",
            f"{result.environment.namespace}/{result.name}", "--dsn", result.environment.dsn,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # Its list of what actually happened repeats the Events shown just before.
    return (replayed.stdout.split("\nWhat actually happened")[0] + replayed.stderr).rstrip()


def served_after_decision(result: StoryResult, margin: float = 1.0) -> Counter[str]:
    """Which side answered the trades sent after the decision was in force (from the client's log)."""
    seen: Counter[str] = Counter()
    with result.traffic_log.open() as log:
        for line in log:
            trade = json.loads(line)
            if trade["time"] >= result.decided_at + margin and trade["status"] == 200:
                seen[trade["servedBy"]] += 1
    return seen


async def recorded(result: StoryResult) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(deployment_metrics rows, deployment_events rows) of the story's ShadowDeployment, oldest first."""
    connection = await asyncpg.connect(result.environment.dsn)
    try:
        arguments = (result.environment.namespace, result.name)
        metrics = [dict(row) for row in await connection.fetch(METRICS_ROWS, *arguments)]
        events = [dict(row) for row in await connection.fetch(EVENT_ROWS, *arguments)]
    finally:
        await connection.close()
    return metrics, events


def write_chart(result: StoryResult, metrics: list[dict[str, Any]], events: list[dict[str, Any]], path: Path) -> Path:
    """Weight, overall score and each model's error per analysis, against seconds since the apply."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = result.manifest["spec"]
    analysis, traffic = spec["analysis"], spec["traffic"]
    start = dt.datetime.fromtimestamp(result.applied_at, dt.UTC)

    def seconds(moment: dt.datetime) -> float:
        return (moment - start).total_seconds()

    times = [seconds(row["time"]) for row in metrics]
    nan = float("nan")
    figure, (weight_axis, score_axis, loss_axis) = plt.subplots(
        3, 1, figsize=(10, 8), sharex=True, gridspec_kw={"height_ratios": [1, 1.2, 1.2]}
    )
    how = {"shadow": "shadowed", "canary": "canaried"}.get(traffic["mode"], traffic["mode"])
    figure.suptitle(
        f"{result.name}: {spec['candidate']['name']} {how} beside {spec['production']['name']} - {result.phase}",
        fontsize=13,
    )

    # The weight as the router had it: each event row carries the weight from then on.
    weight_times, weights = [0.0], [traffic["steps"][0]]
    for event in events:
        if event["weight"] is not None and event["event"] != "AnalysisStarted":
            weight_times.append(seconds(event["time"]))
            weights.append(event["weight"])
    end = max([*times, *weight_times]) + 5
    weight_times.append(end)
    weights.append(weights[-1])
    weight_axis.step(weight_times, weights, where="post", color="tab:blue", linewidth=2)
    weight_axis.set_ylabel("candidate weight (%)")
    weight_axis.set_ylim(-5, 105)
    weight_axis.grid(alpha=0.3)

    scores = [row["overall_score"] if row["overall_score"] is not None else nan for row in metrics]
    score_axis.plot(times, scores, marker="o", color="tab:purple", label="overall score")
    score_axis.axhline(analysis["promotionThreshold"], color="tab:green", linestyle="--", label="promotionThreshold")
    score_axis.axhline(-analysis["rollbackThreshold"], color="tab:red", linestyle="--", label="-rollbackThreshold")
    score_axis.set_ylabel("overall score")
    score_axis.set_ylim(-1.05, 1.05)
    score_axis.legend(loc="lower left", fontsize=8)
    score_axis.grid(alpha=0.3)

    for side, color in (("production", "tab:gray"), ("candidate", "tab:orange")):
        values = [row[f"{side}_value"] if row[f"{side}_value"] is not None else nan for row in metrics]
        label = f"{spec[side]['name']} ({side})"
        loss_axis.plot(times, values, marker="o", color=color, label=label)
    loss_axis.set_ylabel(f"{analysis['metric']}\n(over the step so far)")
    loss_axis.set_xlabel("seconds since kubectl apply")
    loss_axis.legend(loc="upper right", fontsize=8)
    loss_axis.grid(alpha=0.3)

    for row, moment in zip(metrics, times, strict=True):
        if row["decision"] != "Wait":
            for axis in (weight_axis, score_axis, loss_axis):
                axis.axvline(moment, color="black", alpha=0.25, linewidth=1)
            weight_axis.annotate(
                row["decision"], (moment, 100), textcoords="offset points", xytext=(3, -12), fontsize=8
            )
    loss_axis.set_xlim(0, end)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def print_report(result: StoryResult, chart: Path, out: TextIO = sys.stdout) -> Path:
    """Everything the demo shows after the end; returns the chart's path."""
    environment = result.environment
    _heading(out, f"kubectl get shadowdeployments -n {environment.namespace}")
    print(environment.kubectl_run("get", "shadowdeployments", "-n", environment.namespace).stdout.rstrip(), file=out)
    _heading(out, f"kubectl describe shadowdeployment {result.name} -n {environment.namespace}  (its Events)")
    print(describe_events(result), file=out)
    _heading(out, f"decision history: shadowgate replay {environment.namespace}/{result.name} --dsn {environment.dsn}")
    print(decision_history(result), file=out)
    seen = served_after_decision(result)
    total = sum(seen.values())
    if total:
        sides = ", ".join(f"{count:,} by {side}" for side, count in seen.most_common())
        _heading(out, f"after the decision, {total:,} trades were answered: {sides} (X-Shadowgate-Served-By)")
    metrics, events = asyncio.run(recorded(result))
    write_chart(result, metrics, events, chart)
    _heading(out, f"chart: {chart}")
    return chart
