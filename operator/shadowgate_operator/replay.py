"""`shadowgate replay`: what the analysis would have done over recorded data, with other settings.

It runs the operator's own procedure (`rollout.plan_rollout`, which calls `decision.analyse`) interval by
interval over the rows the router recorded, starting from the spec the operator recorded in
`shadow_deployments`, with any setting overridden on the command line, and prints each step of the story.
At each moment it reads what the operator could have read then: the rows *recorded* by that moment
(`recorded_at`, as the live analysis reads them), not those stamped by it, and it carries the status from
look to look as the operator does, so the sequential tests keep their running minima and their state.
The recorded traffic is what it is: the candidate's share at each moment was the one the real rollout
gave it.

The samples column is status.samples, what `kubectl get shadow` shows: scored pairs in shadow mode, the
candidate's scored requests in canary mode (the header says which).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass

import asyncpg
from pydantic import ValidationError

from shadowgate_operator.api import (
    Decision,
    DecisionAction,
    ObjectMeta,
    ShadowDeployment,
    ShadowDeploymentSpec,
    TrafficMode,
)
from shadowgate_operator.decision import evidence_since
from shadowgate_operator.migrate import run_with_database
from shadowgate_operator.rollout import plan_rollout


@dataclass(frozen=True)
class ReplayStep:
    time: dt.datetime
    step: int
    weight: int
    samples: int
    decision: Decision


def _parse_time(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def override(spec: ShadowDeploymentSpec, args: argparse.Namespace) -> ShadowDeploymentSpec:
    """The recorded spec with the settings given on the command line; validated like an admission."""
    document = spec.to_dict()
    analysis = document.setdefault("analysis", {})
    for flag, field in (
        ("promotion_threshold", "promotionThreshold"),
        ("rollback_threshold", "rollbackThreshold"),
        ("min_samples", "minSamples"),
        ("confidence", "confidence"),
        ("interval", "interval"),
        ("metric", "metric"),
        ("max_error_rate", "maxErrorRate"),
        ("max_step_duration", "maxStepDuration"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            analysis[field] = value
    if args.steps:
        document.setdefault("traffic", {})["steps"] = [int(step) for step in args.steps.split(",")]
    return ShadowDeploymentSpec.model_validate(document)


async def replay(
    connection: asyncpg.Connection,
    namespace: str,
    name: str,
    spec: ShadowDeploymentSpec,
    start: dt.datetime,
    end: dt.datetime,
) -> list[ReplayStep]:
    """Run the operator's procedure every analysis interval from `start` to `end` over the rows recorded by
    each moment, carrying the status from look to look as the operator does."""
    from shadowgate_operator.analysis.sql import options_of
    from shadowgate_operator.analysis.window import window_metrics

    interval = dt.timedelta(seconds=spec.analysis.interval_seconds)
    resource = ShadowDeployment(metadata=ObjectMeta(name=name, namespace=namespace, generation=1), spec=spec)
    resource = resource.model_copy(update={"status": plan_rollout(resource, start).status})  # analysis starts
    options = options_of(spec)
    story: list[ReplayStep] = []
    moment = start + interval
    while moment <= end and not resource.status.phase_or_pending.finished:
        status = resource.status
        since = evidence_since(spec, status) or start
        metrics = await window_metrics(
            connection, namespace, name, spec.analysis.metric, spec.traffic.mode, since, None,
            recorded_until=moment, options=options, step_since=status.step_started_at or since,
        )  # fmt: skip
        plan = plan_rollout(resource, moment, analyse=True, metrics=metrics)
        decision = plan.status.last_decision
        assert decision is not None
        story.append(
            ReplayStep(moment, status.current_step or 0, status.current_weight or 0, plan.judged_samples or 0, decision)
        )
        resource = resource.model_copy(update={"status": plan.status})
        moment += interval
    return story


async def _recorded(
    connection: asyncpg.Connection, namespace: str, name: str
) -> tuple[ShadowDeploymentSpec | None, dt.datetime | None, dt.datetime | None, list[asyncpg.Record]]:
    spec_row = await connection.fetchrow(
        "SELECT spec FROM shadow_deployments WHERE namespace = $1 AND deployment = $2 ORDER BY generation DESC LIMIT 1",
        namespace, name,
    )  # fmt: skip
    bounds = await connection.fetchrow(
        "SELECT min(time) AS first, max(time) AS last FROM predictions WHERE namespace = $1 AND deployment = $2",
        namespace, name,
    )  # fmt: skip
    events = await connection.fetch(
        "SELECT time, event, message FROM deployment_events WHERE namespace = $1 AND deployment = $2 ORDER BY time",
        namespace, name,
    )  # fmt: skip
    spec = ShadowDeploymentSpec.model_validate(json.loads(spec_row["spec"])) if spec_row else None
    return spec, bounds["first"], bounds["last"], list(events)


def _print_story(story: list[ReplayStep], mode: TrafficMode) -> None:
    counted = "scored pairs" if mode is TrafficMode.SHADOW else "the candidate's scored requests"
    print(f"samples: status.samples, as `kubectl get shadow` shows it ({counted})\n")
    print(f"{'time':<20} {'step':>4} {'weight':>6} {'samples':>8}  decision   reason")
    previous: tuple[DecisionAction, int] | None = None
    for entry in story:
        shown = (entry.decision.action, entry.step)
        # Waits repeat every interval: show the first of a run and every change.
        if entry.decision.action is not DecisionAction.WAIT or shown != previous:
            print(
                f"{entry.time.strftime('%Y-%m-%d %H:%M:%S'):<20} {entry.step + 1:>4} {entry.weight:>5}% "
                f"{entry.samples:>8}  {entry.decision.action.value:<9}  {entry.decision.reason}"
            )
        previous = shown


async def _run(args: argparse.Namespace, dsn: str) -> int:
    namespace, _, name = args.resource.partition("/")
    connection = await asyncpg.connect(dsn)
    try:
        recorded_spec, first, last, events = await _recorded(connection, namespace, name)
        if recorded_spec is None:
            print(f"error: no recorded spec for {namespace}/{name} in shadow_deployments", file=sys.stderr)
            return 1
        if first is None or last is None:
            print(f"error: no predictions recorded for {namespace}/{name}", file=sys.stderr)
            return 1
        try:
            spec = override(recorded_spec, args)
        except ValidationError as exc:
            print(f"error: the settings given are not valid: {exc}", file=sys.stderr)
            return 2
        start = _parse_time(args.start) if args.start else first
        # By default one interval past the last row, so the last look sees every recorded request.
        end = _parse_time(args.end) if args.end else last + dt.timedelta(seconds=spec.analysis.interval_seconds)
        analysis = spec.analysis
        print(
            f"Replaying {namespace}/{name} from {start:%Y-%m-%d %H:%M:%S} to {end:%Y-%m-%d %H:%M:%S} every "
            f"{analysis.interval}: steps {spec.traffic.steps}, metric {analysis.metric.value}, minSamples "
            f"{analysis.min_samples}, promote at score >= {analysis.promotion_threshold}, roll back at <= "
            f"-{analysis.rollback_threshold}, confidence {analysis.confidence}"
        )
        story = await replay(connection, namespace, name, spec, start, end)
    finally:
        await connection.close()
    print()
    _print_story(story, spec.traffic.mode)
    outcome = story[-1].decision if story else None
    print()
    if outcome is None:
        print("Would have done nothing: the range is shorter than one analysis interval.")
    else:
        print(f"Would have ended: {outcome.action.value} at {outcome.time:%Y-%m-%d %H:%M:%S}: {outcome.reason}")
    if events:
        print("\nWhat actually happened (deployment_events):")
        for event in events:
            print(f"  {event['time']:%Y-%m-%d %H:%M:%S}  {event['event']:<18} {event['message']}")
    return 0


def run(args: argparse.Namespace) -> int:
    if "/" not in args.resource:
        print("error: name the resource as NAMESPACE/NAME", file=sys.stderr)
        return 2
    return run_with_database(args, lambda dsn: _run(args, dsn))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "replay",
        help="re-run the decision over recorded data with other settings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("resource", metavar="NAMESPACE/NAME", help="the ShadowDeployment whose data to replay")
    parser.add_argument("--dsn", help="database with the recorded rows (default: $SHADOWGATE_DSN)")
    parser.add_argument("--from", dest="start", metavar="TIME", help="ISO 8601 start (default: first prediction)")
    parser.add_argument(
        "--to", dest="end", metavar="TIME", help="ISO 8601 end (default: one interval after the last prediction)"
    )
    parser.add_argument("--promotion-threshold", type=float)
    parser.add_argument("--rollback-threshold", type=float)
    parser.add_argument("--min-samples", type=int)
    parser.add_argument("--confidence", type=float)
    parser.add_argument("--interval", help="analysis interval, e.g. 30s")
    parser.add_argument("--max-step-duration", help="e.g. 30m")
    parser.add_argument("--max-error-rate", type=float)
    parser.add_argument("--metric", choices=["mae", "rmse", "accuracy", "directionalAccuracy", "logLoss"])
    parser.add_argument("--steps", help="comma-separated percents, e.g. 5,10,20")
    parser.set_defaults(func=run)
