"""What the demo shows once the story has ended: the cluster's view, the decision history and a chart.

- `kubectl get shadowdeployments` and the Events of `kubectl describe`: what anyone with kubectl sees;
- the notifications the demo's CloudEvents receiver got: one per transition, what a team's would get;
- the decision history: `shadowgate replay` re-runs the analysis over the rows recorded in PostgreSQL
  under the spec the operator recorded (what actually happened is in the Events just above);
- what the clients saw after the decision (X-Shadowgate-Served-By of the last requests);
- a PNG chart from deployment_metrics: the candidate's weight, the overall score against the
  thresholds (saying which points are latency and errors only), and each model's analysis metric
  (saying whether lower is better) over time.
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

from shadowgate_dev.demo.story import METRICS_ROWS, StoryResult

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


HIGHER_IS_BETTER = frozenset({"accuracy", "directionalAccuracy"})
"""The analysis metrics where a higher value is better; for mae, rmse and logLoss lower is better."""


def chart_figure(
    spec: dict[str, Any],
    title: str,
    start: dt.datetime,
    metrics: list[dict[str, Any]],
    events: list[dict[str, Any]],
) -> Any:
    """The demo's chart as a matplotlib Figure: three panels over seconds since the apply, each titled with
    what it shows and how to read it.

    - the candidate's weight as the router applied it, on a scale that fits the weights (a 5% step and
      its drop to 0 stay visible), each level labelled;
    - the overall score against both thresholds; while a step has fewer than minSamples scored requests
      the points are hollow: the score then holds only latency and errors (quality not counted yet);
    - each model's analysis metric over the step so far, saying whether lower or higher is better.

    Decisions are vertical lines, labelled above the top panel (never on a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    analysis, traffic = spec["analysis"], spec["traffic"]
    metric = analysis["metric"]
    min_samples = analysis["minSamples"]

    def seconds(moment: dt.datetime) -> float:
        return (moment - start).total_seconds()

    times = [seconds(row["time"]) for row in metrics]
    nan = float("nan")
    figure, (weight_axis, score_axis, loss_axis) = plt.subplots(
        3, 1, figsize=(10, 10.5), sharex=True, gridspec_kw={"height_ratios": [1, 1.3, 1.3], "hspace": 0.62}
    )
    figure.suptitle(title, fontsize=13)

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
    # Linear up to the smallest step, logarithmic above: 5% and 0% stay apart beside 100%.
    levels = sorted({0, *weights})
    smallest = min([level for level in levels if level > 0] or [1])
    weight_axis.set_yscale("symlog", linthresh=smallest, linscale=0.6)
    weight_axis.set_ylim(-0.1 * smallest, max(weights) * 1.6)
    weight_axis.set_yticks(levels, [f"{level}%" for level in levels])
    weight_axis.minorticks_off()
    for begin, finish, level in zip(weight_times, weight_times[1:], weights, strict=False):
        if finish - begin > 0:
            weight_axis.annotate(
                f"{level}%", ((begin + finish) / 2, level), textcoords="offset points", xytext=(0, 3),
                ha="center", va="bottom", fontsize=8, color="tab:blue",
            )  # fmt: skip
    weight_axis.set_ylabel("weight (%)")
    weight_axis.set_title("Share of requests sent to the candidate (the router's weight)", loc="left", fontsize=10)
    weight_axis.grid(alpha=0.3)

    waiting = [(row["samples"] or 0) < min_samples for row in metrics]
    scores = [row["overall_score"] if row["overall_score"] is not None else nan for row in metrics]
    score_axis.plot(times, scores, color="tab:purple", linewidth=1, alpha=0.6)
    judged = [(t, v) for t, v, w in zip(times, scores, waiting, strict=True) if not w]
    early = [(t, v) for t, v, w in zip(times, scores, waiting, strict=True) if w]
    if judged:
        score_axis.plot(*zip(*judged, strict=True), "o", color="tab:purple")
    if early:
        score_axis.plot(*zip(*early, strict=True), "o", markerfacecolor="white", color="tab:purple")
    promote_at, rollback_at = analysis["promotionThreshold"], -analysis["rollbackThreshold"]
    score_axis.axhline(promote_at, color="tab:green", linestyle="--")
    score_axis.axhline(rollback_at, color="tab:red", linestyle="--")
    score_axis.set_ylim(-1.1, 1.1)
    score_axis.set_ylabel("overall score")
    score_axis.set_title(
        "Overall score of the candidate: quality, latency and errors weighted, from -1 to +1", loc="left", fontsize=10
    )
    handles = [
        Line2D([], [], marker="o", color="tab:purple", label=f"score, once the step has {min_samples} scored requests"),
        Line2D(
            [], [], marker="o", markerfacecolor="white", color="tab:purple", linestyle="none",
            label=f"score while waiting for {min_samples} scored requests: latency and errors only",
        ),
        Line2D([], [], color="tab:green", linestyle="--",
               label=f"promotionThreshold {promote_at:+.2f}: at or above, and significant: the step passes"),
        Line2D([], [], color="tab:red", linestyle="--",
               label=f"-rollbackThreshold {rollback_at:+.2f}: at or below: rolled back"),
        Line2D([], [], color="black", alpha=0.4, linestyle=":",
               label="a decision of the operator (named above the top panel)"),
    ]  # fmt: skip
    # Below the panel, in the gap before the next one: never over a point.
    score_axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.03), ncol=2, fontsize=8, frameon=False)
    score_axis.grid(alpha=0.3)

    for side, color in (("production", "tab:gray"), ("candidate", "tab:orange")):
        values = [row[f"{side}_value"] if row[f"{side}_value"] is not None else nan for row in metrics]
        label = f"{spec[side]['name']} ({side})"
        loss_axis.plot(times, values, marker="o", color=color, label=label)
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    loss_axis.set_ylabel(f"{metric} ({better} is better)")
    loss_axis.set_title(
        f"Quality: each model's {metric} on its scored requests in the step so far ({better} is better)",
        loc="left",
        fontsize=10,
    )
    loss_axis.set_xlabel("seconds since kubectl apply")
    loss_axis.legend(loc="best", fontsize=8)
    loss_axis.grid(alpha=0.3)

    decided = [(when, row["decision"]) for row, when in zip(metrics, times, strict=True) if row["decision"] != "Wait"]
    previous_x = -1e9
    level = 0
    step = 0
    for moment, decision in decided:
        for axis in (weight_axis, score_axis, loss_axis):
            axis.axvline(moment, color="black", alpha=0.4, linewidth=1, linestyle=":")
        if decision == "Advance":
            step += 1
            to = traffic["steps"][min(step, len(traffic["steps"]) - 1)]
        else:
            to = {"Promote": 100}.get(decision, 0)
        # Above the top panel, under its title's line; two close decisions are staggered.
        level = 1 - level if moment - previous_x < 0.12 * end else 0
        previous_x = moment
        weight_axis.annotate(
            f"{decision} \u2192 {to}%", (moment, 1.0), xycoords=("data", "axes fraction"),
            textcoords="offset points", xytext=(0, 2 + 11 * level), ha="center", va="bottom", fontsize=8,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "0.6", "linewidth": 0.5},
        )  # fmt: skip
    loss_axis.set_xlim(0, end)
    figure.subplots_adjust(top=0.9, bottom=0.06, left=0.08, right=0.98)
    return figure


def write_chart(result: StoryResult, metrics: list[dict[str, Any]], events: list[dict[str, Any]], path: Path) -> Path:
    """The chart (see chart_figure) of the story's rows, as a PNG at `path`."""
    import matplotlib.pyplot as plt

    spec = result.manifest["spec"]
    how = {"shadow": "shadowed", "canary": "canaried"}.get(spec["traffic"]["mode"], spec["traffic"]["mode"])
    title = (
        f"{result.name}: candidate {spec['candidate']['name']} {how} beside production "
        f"{spec['production']['name']}: {result.phase}"
    )
    start = dt.datetime.fromtimestamp(result.applied_at, dt.UTC)
    figure = chart_figure(spec, title, start, metrics, events)
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
    if result.manifest["spec"].get("notifications"):
        _heading(out, f"notifications received ({len(result.notifications)} CloudEvents, one per transition)")
        for event in result.notifications:
            print(f"  {event.line()}", file=out)
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
