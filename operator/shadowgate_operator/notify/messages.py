"""What a notification says: one Event of a transition, with the rollout's numbers, for each receiver.

A promotion or a rollback is also written back to the model registry when spec.registry names one
(`registry_writeback`): queued and retried as a message like the others, to the receiver `registry:mlflow`
(a name no spec.notifications entry can take), its body what the registry is to be told.

Pure: no I/O. `Announcement.of` reads a transition's Event and the status it led to; `envelope` renders it
in a receiver's format (`cloudevent`, `slack`) as the exact headers and bytes to post, built once when the
message is queued, so every attempt sends the same body with the same id.

CloudEvents are built and serialized with the CloudEvents SDK (`cloudevents` on PyPI, the v2 core API): it
checks the required attributes and their types against the 1.0 spec and writes the structured JSON mode
(``application/cloudevents+json``) the way the spec's own parsers read it, rather than a hand-written
approximation of the format.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cloudevents.core.bindings.http import to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from shadowgate_operator.api import GROUP, PLURAL, VERSION, NotificationFormat, NotificationTarget, ShadowDeployment

EVENT_TYPE_PREFIX = "io.shadowgate.rollout."
"""CloudEvents `type`: this prefix and the Event reason, e.g. io.shadowgate.rollout.Promoted."""
GATE_TYPE_PREFIX = "io.shadowgate.gate."
"""CloudEvents `type` of a gate's request (spec.gates): this prefix and the gate's type, e.g.
io.shadowgate.gate.confirmPromotion."""
SLACK_CONTENT_TYPE = "application/json"


def message_id(uid: str, sequence: int, index: int) -> str:
    """The id of the `index`-th Event of transition `sequence` of the object with this uid: the same each
    time the transition is announced (a restart, a takeover), different for a new object of the same name."""
    return f"{uid}.t{sequence}.{index}"


@dataclass(frozen=True)
class Envelope:
    """Exactly what is posted: headers and body."""

    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Announcement:
    """One Event of a transition and the numbers behind it, as receivers are told."""

    id: str
    namespace: str
    name: str
    uid: str
    sequence: int
    time: dt.datetime
    type: str
    """Normal or Warning, as the Event."""
    reason: str
    """The Event's reason: AnalysisStarted, StepAdvanced, Promoted, RolledBack, Failed, Paused, ..."""
    message: str
    """The Event's message: the reason in words, with the numbers it compared."""
    phase: str
    mode: str
    step: int | None
    steps: int
    weight: int | None
    samples: int | None
    metric: str
    production: dict[str, str]
    candidate: dict[str, str]
    metrics: dict[str, Any]
    """status.metrics as the API shows it (camelCase): overallScore, pValue, improvement, per-side values."""
    action: str | None = None
    """The shadowgate.io/action value the transition carried out, if a person asked for it."""

    @classmethod
    def of(
        cls,
        sd: ShadowDeployment,
        *,
        sequence: int,
        time: dt.datetime,
        index: int,
        event_type: str,
        reason: str,
        message: str,
        action: str | None = None,
    ) -> Announcement:
        """The `index`-th Event of transition `sequence`, read with the status it led to (sd.status)."""
        status, spec = sd.status, sd.spec
        uid = sd.metadata.uid or ""
        return cls(
            id=message_id(uid, sequence, index),
            namespace=sd.namespace,
            name=sd.name,
            uid=uid,
            sequence=sequence,
            time=time,
            type=event_type,
            reason=reason,
            message=message,
            phase=status.phase_or_pending.value,
            mode=spec.traffic.mode.value,
            step=status.current_step,
            steps=len(spec.traffic.steps),
            weight=status.current_weight,
            samples=status.samples,
            metric=spec.analysis.metric.value,
            production={"name": spec.production.name, "version": spec.production.version},
            candidate={"name": spec.candidate.name, "version": spec.candidate.version},
            metrics=status.metrics.to_dict() if status.metrics is not None else {},
            action=action,
        )

    @property
    def source(self) -> str:
        """The object's API path: a URI reference naming the producer, as CloudEvents asks."""
        return f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{self.name}"

    def data(self) -> dict[str, Any]:
        """The CloudEvent's `data`: everything a program needs, camelCase as in the API."""
        data: dict[str, Any] = {
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "sequence": self.sequence,
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
            "phase": self.phase,
            "mode": self.mode,
            "step": self.step,
            "steps": self.steps,
            "weight": self.weight,
            "samples": self.samples,
            "metric": self.metric,
            "production": self.production,
            "candidate": self.candidate,
            "metrics": self.metrics,
        }
        if self.action is not None:
            data["action"] = self.action
        return data


def cloudevent(
    announcement: Announcement, *, event_type: str | None = None, extra: dict[str, Any] | None = None
) -> Envelope:
    """A CloudEvents 1.0 event in structured JSON mode (`event_type` and `extra` data: a gate's request)."""
    event = CloudEvent(
        attributes={
            "specversion": "1.0",
            "id": announcement.id,
            "source": announcement.source,
            "type": event_type or EVENT_TYPE_PREFIX + announcement.reason,
            "subject": announcement.name,
            "time": announcement.time.astimezone(dt.UTC),
            "datacontenttype": "application/json",
        },
        data={**announcement.data(), **(extra or {})},
    )
    message = to_structured(event, JSONFormat())
    return Envelope(headers=dict(message.headers), body=message.body)


def gate_request(sd: ShadowDeployment, *, id: str, time: dt.datetime, gate: str, moment: str, purpose: str) -> Envelope:
    """What a gate (spec.gates) is posted: a CloudEvent of the shape notifications have, of type
    io.shadowgate.gate.<moment>, whose data says what it is asked to let through (`message`: "Asked to let
    through ..."; after a rollback, "Told of ...") and names the gate (`gate`)."""
    transition = sd.status.last_transition
    verb = "Told of" if moment == "postRollback" else "Asked to let through"
    announcement = dataclasses.replace(
        Announcement.of(
            sd, sequence=transition.sequence if transition is not None else 0, time=time, index=0,
            event_type="Normal", reason=moment, message=f"{verb} {purpose}.",
        ),
        id=id,
    )  # fmt: skip
    return cloudevent(announcement, event_type=GATE_TYPE_PREFIX + moment, extra={"gate": gate})


# Slack's limits: a header's text at most 150 characters, a section's 3000, a field's 2000, ten fields.
_HEADER_LIMIT, _SECTION_LIMIT, _FIELD_LIMIT = 150, 3000, 2000
_ICONS = {
    "Promoted": ":white_check_mark:",
    "RolledBack": ":rewind:",
    "Failed": ":x:",
    "Paused": ":double_vertical_bar:",
}


def _escape(text: str) -> str:
    """Slack mrkdwn: &, < and > are control characters and must be escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    return f"{value:.4g}"


def slack(announcement: Announcement) -> Envelope:
    """A Slack incoming-webhook payload: a `text` line (notifications, clients without blocks) and blocks
    with the reason in words and the numbers as fields."""
    a = announcement
    who = f"{a.namespace}/{a.name}"
    icon = _ICONS.get(a.reason, ":warning:" if a.type == "Warning" else ":information_source:")
    metrics = a.metrics
    production, candidate = metrics.get("production") or {}, metrics.get("candidate") or {}
    step = "n/a" if a.step is None else f"{a.step + 1} of {a.steps}"
    models = f"{a.production['name']} {a.production['version']} → {a.candidate['name']} {a.candidate['version']}"
    sides = f"production {_number(production.get('metricValue'))}, candidate {_number(candidate.get('metricValue'))}"
    fields = [
        ("Phase", a.phase),
        ("Step", f"{step} ({_number(a.weight)}% to the candidate, {a.mode})"),
        ("Samples", _number(a.samples)),
        ("Score", _number(metrics.get("overallScore"))),
        (a.metric, sides),
        ("Improvement", _number(metrics.get("improvement"))),
        ("p-value", _number(metrics.get("pValue"))),
        ("Models", models),
    ]
    reason = _cut(f"{icon} {_escape(a.message)}", _SECTION_LIMIT)
    footer = f"id {a.id} · {a.time.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
    payload = {
        "text": _cut(f"{who}: {a.reason}: {_escape(a.message)}", _SECTION_LIMIT),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": _cut(f"{who} {a.reason}", _HEADER_LIMIT)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": reason}},
            {
                "type": "section",
                "fields": [
                    {"type": "mrkdwn", "text": _cut(f"*{_escape(title)}*\n{_escape(value)}", _FIELD_LIMIT)}
                    for title, value in fields
                ],
            },
            {"type": "context", "elements": [{"type": "mrkdwn", "text": footer}]},
        ],
    }
    body = json.dumps(payload, ensure_ascii=False).encode()
    return Envelope(headers={"Content-Type": SLACK_CONTENT_TYPE}, body=body)


RENDERERS = {NotificationFormat.CLOUDEVENTS: cloudevent, NotificationFormat.SLACK: slack}


class Channel(StrEnum):
    """How a queued message is sent: a receiver's format (spec.notifications), or a registry write-back."""

    CLOUDEVENTS = "cloudevents"
    SLACK = "slack"
    MLFLOW = "mlflow"
    """A write-back to MLflow's model registry: the body is a `WriteBack` as JSON."""


REGISTRY_RECEIVER = "registry:mlflow"
REGISTRY_OUTCOMES = {"Promoted": "promoted", "RolledBack": "rolled_back"}
"""The Events written back to the registry, and the outcome each records."""


@dataclass(frozen=True)
class Outgoing:
    """One message for one receiver, as it is queued."""

    id: str
    receiver: str
    namespace: str
    deployment: str
    format: Channel
    url_secret: str
    """The Secret holding the URL (a registry write-back: its credentials; empty when it needs none)."""
    url_key: str
    envelope: Envelope


def outgoing(announcement: Announcement, targets: list[NotificationTarget]) -> list[Outgoing]:
    """The messages of one announcement: one per receiver that wants its reason."""
    return [
        Outgoing(
            id=announcement.id,
            receiver=target.name,
            namespace=announcement.namespace,
            deployment=announcement.name,
            format=Channel(target.format.value),
            url_secret=target.url_secret_ref.name,
            url_key=target.url_secret_ref.key,
            envelope=RENDERERS[target.format](announcement),
        )
        for target in targets
        if target.wants(announcement.reason)
    ]


def registry_writeback(announcement: Announcement, sd: ShadowDeployment) -> list[Outgoing]:
    """The write-back of a Promoted or RolledBack Event to the registry of spec.registry, if it names one:
    what `registry.ModelRegistry.promoted` / `rolled_back` are to be called with, as a queued message."""
    registry, candidate = sd.spec.registry, sd.spec.candidate.registered_model
    outcome = REGISTRY_OUTCOMES.get(announcement.reason)
    if registry is None or candidate is None or outcome is None:
        return []
    production = sd.spec.production.registered_model
    body = {
        "trackingUri": registry.mlflow.tracking_uri,
        "alias": registry.alias,
        "outcome": outcome,
        "candidate": {"model": candidate.name, "version": candidate.version},
        "production": None if production is None else {"model": production.name, "version": production.version},
        "rollout": f"{announcement.namespace}/{announcement.name}",
        "link": announcement.source,
        "reason": announcement.message,
        "time": announcement.time.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    credentials = registry.mlflow.credentials_secret_ref
    return [
        Outgoing(
            id=announcement.id,
            receiver=REGISTRY_RECEIVER,
            namespace=announcement.namespace,
            deployment=announcement.name,
            format=Channel.MLFLOW,
            url_secret=credentials.name if credentials is not None else "",
            url_key="",
            envelope=Envelope(headers={"Content-Type": "application/json"}, body=json.dumps(body).encode()),
        )
    ]
