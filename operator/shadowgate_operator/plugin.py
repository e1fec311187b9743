"""`kubectl shadow`: see and steer ShadowDeployments (the `kubectl-shadow` console script).

kubectl runs any `kubectl-<name>` on PATH as `kubectl <name>`. Like kubectl, it reads KUBECONFIG (or
~/.kube/config) and takes --kubeconfig, --context and -n/--namespace (default: the context's).

    kubectl shadow status [NAME]     phase, step, weight, samples, score, p-value, last decision, metrics
    kubectl shadow promote NAME      send 100% to the candidate now
    kubectl shadow abort NAME        roll back now (weight 0)
    kubectl shadow retry NAME        start the analysis again after a promotion, rollback or failure
    kubectl shadow pause NAME        freeze the weight (sets spec.paused)
    kubectl shadow resume NAME       continue (clears spec.paused)
    kubectl shadow history NAME      what happened and why, from the database's deployment_events

promote, abort and retry set the annotation shadowgate.io/action to `verb:<n>` with a new n, so asking
twice is acted on twice; the operator records what it did in status.lastAction and an Event. pause and
resume write spec.paused: the one field a person changes by hand; where Git owns the spec (Argo CD,
Flux), change it in Git instead, or the next sync puts it back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from shadowgate_operator.api import (
    ACTION_ANNOTATION,
    GROUP,
    PLURAL,
    VERSION,
    ActionVerb,
    ModelMetrics,
    Phase,
    ShadowDeployment,
)

ACTION_VERBS = tuple(verb.value for verb in ActionVerb)  # promote, abort, retry: what the operator accepts
WAIT_SECONDS = 15.0


class PluginError(RuntimeError):
    """Something the user can act on; printed without a traceback."""


# --- what is shown: pure functions of the objects and the time -----------------------------------


def age(since: dt.datetime | None, now: dt.datetime) -> str:
    """kubectl-style age: 45s, 7m, 3h, 2d."""
    if since is None:
        return ""
    seconds = max(0, int((now - since).total_seconds()))
    for limit, unit, size in ((120, "s", 1), (120 * 60, "m", 60), (48 * 3600, "h", 3600)):
        if seconds < limit:
            return f"{seconds // size}{unit}"
    return f"{seconds // 86400}d"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, like kubectl get."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "   ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [headers, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.1f}%"


def _step(sd: ShadowDeployment) -> str:
    if sd.status.current_step is None:
        return ""
    return f"{sd.status.current_step + 1}/{len(sd.spec.traffic.steps)}"


SUMMARY = ("NAME", "MODE", "PHASE", "STEP", "WEIGHT", "SAMPLES", "SCORE", "P-VALUE", "READY", "LAST DECISION")


def summary_row(sd: ShadowDeployment, now: dt.datetime) -> list[str]:
    status = sd.status
    metrics = status.metrics
    ready = next((c for c in status.conditions if c.type.value == "Ready"), None)
    decision = status.last_decision
    return [
        sd.name,
        sd.spec.traffic.mode.value,
        status.phase_or_pending.value,
        _step(sd),
        "" if status.current_weight is None else f"{status.current_weight}%",
        "" if status.samples is None else str(status.samples),
        _number(metrics.overall_score if metrics else None),
        _number(metrics.p_value if metrics else None),
        "" if ready is None else f"{ready.status.value} ({ready.reason})",
        "" if decision is None else f"{decision.action.value}, {age(decision.time, now)} ago",
    ]


def _model_row(side: str, name: str, version: str, measured: ModelMetrics | None) -> list[str]:
    measured = measured or ModelMetrics()
    return [
        side,
        f"{name} {version}",
        _number(measured.metric_value, 4),
        _percent(measured.error_rate),
        _number(measured.latency_p50_ms),
        _number(measured.latency_p99_ms),
    ]


def describe(sd: ShadowDeployment, now: dt.datetime) -> str:
    """Everything status says about one ShadowDeployment, for a person."""
    spec, status = sd.spec, sd.status
    lines = [f"Name:        {sd.namespace}/{sd.name}", f"Phase:       {status.phase_or_pending.value}"]
    if status.message:
        lines.append(f"Message:     {status.message}")
    steps = ", ".join(f"{percent}%" for percent in spec.traffic.steps)
    lines.append(f"Traffic:     {spec.traffic.mode.value}, steps {steps}; now step {_step(sd) or '-'} at "
                 f"{status.current_weight if status.current_weight is not None else '-'}%"
                 + (" (paused by spec.paused)" if spec.paused else ""))  # fmt: skip
    if status.last_decision is not None:
        decision = status.last_decision
        lines.append(f"Decision:    {decision.action.value}, {age(decision.time, now)} ago: {decision.reason}")
    if status.last_action is not None:
        action = status.last_action
        lines.append(f"Last action: {ACTION_ANNOTATION}={action.value}, {age(action.time, now)} ago")
    if status.conditions:
        lines += ["", "Conditions:"]
        rows = [[c.type.value, c.status.value, c.reason, age(c.last_transition_time, now), c.message]
                for c in status.conditions]  # fmt: skip
        lines += ["  " + line for line in table(["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], rows).splitlines()]
    metrics = status.metrics
    lines += ["", f"Analysis ({spec.analysis.metric.value}, step {(metrics.step or 0) + 1 if metrics else '-'}):"]
    if metrics is None:
        lines.append("  no analysis of this step yet")
        return "\n".join(lines)
    rows = [
        _model_row("production", spec.production.name, spec.production.version, metrics.production),
        _model_row("candidate", spec.candidate.name, spec.candidate.version, metrics.candidate),
    ]
    headers = ["SIDE", "MODEL", spec.analysis.metric.value.upper(), "ERRORS", "P50 MS", "P99 MS"]
    lines += ["  " + line for line in table(headers, rows).splitlines()]

    def shown(text: str) -> str:
        return text or "-"

    analysis = spec.analysis
    lines.append(
        f"  samples {status.samples or 0} (min {analysis.min_samples}), "
        f"improvement {shown(_percent(metrics.improvement))}, score {shown(_number(metrics.overall_score))} "
        f"(promote at {analysis.promotion_threshold:g}, roll back at -{analysis.rollback_threshold:g}), "
        f"p-value {shown(_number(metrics.p_value))} better / {shown(_number(metrics.p_value_worse))} worse, "
        f"agreement {shown(_percent(metrics.agreement))}"
    )
    return "\n".join(lines)


def next_action(body: dict[str, Any], verb: str) -> str:
    """`verb:<n>` with n above any nonce in the annotation or status.lastAction, so the operator acts on it."""
    seen = [
        (body.get("metadata", {}).get("annotations") or {}).get(ACTION_ANNOTATION) or "",
        ((body.get("status") or {}).get("lastAction") or {}).get("value") or "",
    ]
    nonces = [int(match.group(1)) for value in seen if (match := re.search(r":(\d+)$", value))]
    return f"{verb}:{max(nonces, default=0) + 1}"


HISTORY = ("TIME", "EVENT", "PHASE", "STEP", "WEIGHT", "MESSAGE")


def history_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            record["time"].astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            record["event"],
            record["phase"] or "",
            "" if record["step"] is None else str(record["step"] + 1),
            "" if record["weight"] is None else f"{record['weight']}%",
            record["message"],
        ]
        for record in records
    ]


# --- the API server and the database ---------------------------------------------------------------


@dataclass
class Cluster:
    """The API server, reached the way kubectl does (kubeconfig, context), with plain REST calls.

    A command-line tool starts for every call: the credentials come from the operator's small loader
    (kubeaccess; the kubernetes package only for exec/auth-provider users) instead of the whole client.
    """

    http: httpx.Client
    headers: Callable[[], dict[str, str]]
    namespace: str

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None, namespace: str | None) -> Cluster:
        from shadowgate_common.kubeaccess import KubeAccessError, load

        try:
            access = load(kubeconfig, context)
        except (KubeAccessError, OSError, ValueError) as exc:
            raise PluginError(f"no usable kubeconfig: {exc}") from None
        http = httpx.Client(base_url=access.server, verify=access.verify, timeout=httpx.Timeout(30, connect=5))
        return cls(http, access.headers, namespace or access.namespace)

    def _call(self, what: str, method: str, path: str, **options: Any) -> Any:
        headers = {"Accept": "application/json", **self.headers(), **options.pop("headers", {})}
        try:
            response = self.http.request(method, path, headers=headers, **options)
        except httpx.HTTPError as exc:
            raise PluginError(f"{what}: cannot reach the API server {self.http.base_url}: {exc}") from None
        if response.status_code == 404:
            raise PluginError(f"{what}: not found")
        if response.status_code >= 400:
            try:
                message = str(response.json()["message"])
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise PluginError(f"{what}: HTTP {response.status_code}: {message}")
        return response.json()

    def _path(self, name: str = "", namespace: str | None = None) -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace or self.namespace}/{PLURAL}"
        return f"{path}/{name}" if name else path

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(f"shadowdeployment {self.namespace}/{name}", "GET", self._path(name))
        return result

    def list_all(self, all_namespaces: bool) -> list[dict[str, Any]]:
        if all_namespaces:
            listing = self._call("shadowdeployments", "GET", f"/apis/{GROUP}/{VERSION}/{PLURAL}")
        else:
            listing = self._call(f"shadowdeployments in {self.namespace}", "GET", self._path())
        items: list[dict[str, Any]] = listing["items"]
        return sorted(items, key=lambda item: (item["metadata"]["namespace"], item["metadata"]["name"]))

    def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the object."""
        result: dict[str, Any] = self._call(
            f"shadowdeployment {self.namespace}/{name}",
            "PATCH",
            self._path(name),
            content=json.dumps(patch),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        return result

    def events(self, uid: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.uid={uid}"
        path = f"/api/v1/namespaces/{self.namespace}/events"
        items: list[dict[str, Any]] = self._call("events", "GET", path, params={"fieldSelector": selector})["items"]
        return items

    def secret_value(self, name: str, key: str) -> str:
        path = f"/api/v1/namespaces/{self.namespace}/secrets/{name}"
        data = self._call(f"secret {self.namespace}/{name}", "GET", path).get("data") or {}
        if key not in data:
            raise PluginError(f"secret {self.namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode()


async def read_history(dsn: str, namespace: str, name: str, limit: int) -> list[dict[str, Any]]:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch(
            """SELECT time, event, phase, step, weight, message FROM deployment_events
               WHERE namespace = $1 AND deployment = $2 ORDER BY time DESC LIMIT $3""",
            namespace,
            name,
            limit,
        )
    finally:
        await connection.close()
    return [dict(row) for row in reversed(rows)]


# --- the verbs ---------------------------------------------------------------------------------------


def _typed(body: dict[str, Any]) -> ShadowDeployment:
    try:
        return ShadowDeployment.model_validate(body)
    except ValidationError as exc:
        meta = body.get("metadata", {})
        raise PluginError(
            f"shadowdeployment {meta.get('namespace')}/{meta.get('name')} cannot be read: {exc}"
        ) from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def status_command(cluster: Cluster, args: argparse.Namespace) -> int:
    now = _now()
    if args.name:
        sd = _typed(cluster.get(args.name))
        print(table(SUMMARY, [summary_row(sd, now)]))
        print()
        print(describe(sd, now))
        return 0
    items = [_typed(body) for body in cluster.list_all(args.all_namespaces)]
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {cluster.namespace}"
        print(f"No ShadowDeployments in {where}.")
        return 0
    if args.all_namespaces:
        print(table(("NAMESPACE", *SUMMARY), [[sd.namespace, *summary_row(sd, now)] for sd in items]))
    else:
        print(table(SUMMARY, [summary_row(sd, now) for sd in items]))
    return 0


def _wait(cluster: Cluster, name: str, seconds: float, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    deadline = time.monotonic() + seconds
    while True:
        body = cluster.get(name)
        if done(body):
            return body
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def action_command(cluster: Cluster, args: argparse.Namespace) -> int:
    """Set the verb, then wait for the operator to act on it: status.lastAction names the value once it is
    handled, and the Event of that transition (annotated with the value) says what was done; it is posted
    right after the status, so it is waited for too (the answer is never an earlier Event's)."""
    value = next_action(cluster.get(args.name), args.command)
    cluster.patch(args.name, {"metadata": {"annotations": {ACTION_ANNOTATION: value}}})
    print(f"shadowdeployment {cluster.namespace}/{args.name}: {ACTION_ANNOTATION}={value}")
    if args.wait <= 0:
        return 0
    deadline = time.monotonic() + args.wait
    handled = _wait(
        cluster,
        args.name,
        args.wait,
        lambda body: ((body.get("status") or {}).get("lastAction") or {}).get("value") == value,
    )
    if handled is None:
        print(f"the operator has not acted on it within {args.wait:g}s (is it running?); it will when it can")
        return 0
    uid = handled["metadata"]["uid"]
    event = None
    while event is None:
        event = next((e for e in cluster.events(uid) if _action_of(e) == value), None)
        if event is None:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    sd = _typed(cluster.get(args.name))
    if event is not None and event.get("reason") == "ActionIgnored":
        print(f"ignored by the operator: {event.get('message', '')}")
        return 1
    print(f"{sd.status.phase_or_pending.value}: {sd.status.message or ''}".rstrip())
    return 0


def _action_of(event: dict[str, Any]) -> str | None:
    """The shadowgate.io/action value an Event of the operator's answers, if any."""
    value = ((event.get("metadata") or {}).get("annotations") or {}).get(ACTION_ANNOTATION)
    return str(value) if value is not None else None


def pause_command(cluster: Cluster, args: argparse.Namespace) -> int:
    paused = args.command == "pause"
    body = cluster.patch(args.name, {"spec": {"paused": paused}})
    generation = body["metadata"].get("generation")
    print(f"shadowdeployment {cluster.namespace}/{args.name}: spec.paused={str(paused).lower()}")
    print("note: this writes spec; if Git owns this object (Argo CD, Flux), make the same change there")
    if args.wait <= 0:
        return 0
    seen = _wait(
        cluster, args.name, args.wait, lambda body: (body.get("status") or {}).get("observedGeneration") == generation
    )
    if seen is None:
        print(f"the operator has not seen the change within {args.wait:g}s (is it running?)")
        return 0
    sd = _typed(seen)
    if paused and sd.status.phase is not Phase.PAUSED:
        print(f"nothing to pause: the rollout is {sd.status.phase_or_pending.value}")
    else:
        print(f"{sd.status.phase_or_pending.value}: {sd.status.message or ''}".rstrip())
    return 0


def history_command(cluster: Cluster, args: argparse.Namespace) -> int:
    dsn = args.dsn
    if dsn is None:
        sd = _typed(cluster.get(args.name))
        reference = sd.spec.database.secret_ref
        dsn = cluster.secret_value(reference.name, reference.key)
    try:
        records = asyncio.run(read_history(dsn, cluster.namespace, args.name, args.limit))
    except (OSError, TimeoutError) as exc:
        raise PluginError(
            f"cannot reach the database ({type(exc).__name__}: {exc}); from outside the cluster, "
            "kubectl port-forward to it and pass --dsn postgresql://...@127.0.0.1:PORT/..."
        ) from None
    except Exception as exc:  # asyncpg's errors: a wrong password, no such table, ...
        raise PluginError(f"cannot read deployment_events: {type(exc).__name__}: {exc}") from None
    if not records:
        print(f"No events recorded for {cluster.namespace}/{args.name}.")
        return 0
    print(table(HISTORY, history_rows(records)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the verb, whichever was given wins (argparse would reset it otherwise).
    common.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file (default: $KUBECONFIG)")
    common.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context (default: current)")
    common.add_argument(
        "-n", "--namespace", default=argparse.SUPPRESS, help="namespace (default: the context's, else default)"
    )
    parser = argparse.ArgumentParser(
        prog="kubectl shadow",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = verbs.add_parser("status", parents=[common], help="phase, step, weight, score, last decision, metrics")
    status.add_argument("name", nargs="?", help="one ShadowDeployment, in detail (default: a table of all)")
    status.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    status.set_defaults(func=status_command)

    helps = {
        "promote": "send 100%% of requests to the candidate now",
        "abort": "roll back now: no requests to the candidate",
        "retry": "start the analysis again at step 1 (after a promotion, rollback or failure)",
        "pause": "freeze the weight where it is (sets spec.paused)",
        "resume": "continue the rollout (clears spec.paused)",
    }
    for verb, text in helps.items():
        sub = verbs.add_parser(verb, parents=[common], help=text, description=text.replace("%%", "%"))
        sub.add_argument("name", help="the ShadowDeployment")
        sub.add_argument(
            "--wait", type=float, default=WAIT_SECONDS, metavar="SECONDS", help="wait for the operator (0: do not)"
        )
        sub.set_defaults(func=action_command if verb in ACTION_VERBS else pause_command)

    history = verbs.add_parser("history", parents=[common], help="what happened and why, from deployment_events")
    history.add_argument("name", help="the ShadowDeployment")
    history.add_argument(
        "--dsn", help="PostgreSQL DSN (default: the one in the Secret named by spec.database.secretRef)"
    )
    history.add_argument("--limit", type=int, default=50, help="the most recent N events (default: 50)")
    history.set_defaults(func=history_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cluster = Cluster.connect(
            getattr(args, "kubeconfig", None), getattr(args, "context", None), getattr(args, "namespace", None)
        )
        result: int = args.func(cluster, args)
        return result
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
