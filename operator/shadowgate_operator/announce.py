"""What a reconcile says besides status: the Events and history rows of transitions, and warnings.

The Events, rows and notifications of a transition are derived from status.lastTransition and the
status it led to (the functions below are pure), so the operator that wrote the transition, or the next
one after a crash or a takeover, produces the same Event names, the same rows and the same message ids:
posting or writing them twice leaves one copy (kube.Kube.post_event with a name, store.Database.write,
which queues the notifications in the transaction that writes the rows). A transition is thus announced
to each receiver of spec.notifications exactly once, even when the operator is killed between writing
the transition and queueing its messages, or between queueing and delivering them (the queue is in the
database; the delivery worker, notify.deliver, sends each message at least once, under the same id).
`Announcer` posts them, and the warnings whose cause stays (a refused API call, a database away, an
unknown verb) once per cause. A gate's hold (GateRefused, GateTimedOut, GateUnreachable) is also told to
spec.notifications, once per hold: its message id names the hold (its moment and since when) and the
reason, so however often the gate is asked while it holds, and after a restart, one message goes out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from shadowgate_operator.api import ACTION_ANNOTATION, GROUP, GateWait, ShadowDeployment, Transition
from shadowgate_operator.exporter import OperatorMetrics
from shadowgate_operator.gates.verdict import GATE_WARNINGS
from shadowgate_operator.kube import KubeError
from shadowgate_operator.notify.messages import Announcement, Outgoing, outgoing, registry_writeback
from shadowgate_operator.ports import Cluster
from shadowgate_operator.record import Rollout
from shadowgate_operator.rollout import Notice
from shadowgate_operator.store import EventRow, MetricsRow

logger = logging.getLogger(__name__)

TRANSITION_ANNOTATION = f"{GROUP}/transition"
"""On each Event of a transition: its sequence number."""


def event_name(name: str, uid: str, transition: Transition, index: int) -> str:
    """Unique per object (its uid: a new object of the same name starts its sequence again), transition
    and Event."""
    return f"{name}.{uid[:8]}.t{transition.sequence}.{index}"


def event_annotations(transition: Transition) -> dict[str, str]:
    """The transition's sequence number and, when it handled a manual verb, the shadowgate.io/action value
    it handled (`kubectl shadow promote` waits for the Event carrying its value)."""
    annotations = {TRANSITION_ANNOTATION: str(transition.sequence)}
    if transition.action is not None:
        annotations[ACTION_ANNOTATION] = transition.action
    return annotations


def event_rows(sd: ShadowDeployment, transition: Transition) -> list[EventRow]:
    """One deployment_events row per Event, a microsecond apart so that they keep their order."""
    status = sd.status
    return [
        EventRow(
            time=transition.time + dt.timedelta(microseconds=index),
            namespace=sd.namespace,
            deployment=sd.name,
            event=event.reason,
            phase=status.phase_or_pending.value,
            step=status.current_step,
            weight=status.current_weight,
            message=event.message,
            details={"sequence": transition.sequence},
        )
        for index, event in enumerate(transition.events)
    ]


def analysis_row(sd: ShadowDeployment, time: dt.datetime, step: int, weight: int, samples: int) -> MetricsRow | None:
    """The deployment_metrics row of an analysis whose result is in `sd`'s status (planned)."""
    measured, decision = sd.status.metrics, sd.status.last_decision
    if decision is None:
        return None
    return MetricsRow(
        time=time,
        namespace=sd.namespace,
        deployment=sd.name,
        step=step,
        weight=weight,
        samples=samples,
        metric=sd.spec.analysis.metric.value,
        production_value=measured.production.metric_value if measured and measured.production else None,
        candidate_value=measured.candidate.metric_value if measured and measured.candidate else None,
        improvement=measured.improvement if measured else None,
        overall_score=measured.overall_score if measured else None,
        p_value=measured.p_value if measured else None,
        decision=decision.action.value,
        reason=decision.reason,
        metrics=measured.to_dict() if measured else None,
    )


def transition_rows(sd: ShadowDeployment, transition: Transition) -> tuple[list[EventRow], list[MetricsRow]]:
    """The history rows of a transition: its Events, and the analysis that decided it, if one did."""
    metrics = []
    judged = transition.analysed
    if judged is not None:
        row = analysis_row(sd, transition.time, judged.step, judged.weight, judged.samples)
        metrics = [row] if row is not None else []
    return event_rows(sd, transition), metrics


def transition_notifications(sd: ShadowDeployment, transition: Transition) -> list[Outgoing]:
    """The messages announcing a transition: one per Event and receiver of spec.notifications that wants
    its reason, and a registry write-back for a Promoted or RolledBack Event when spec.registry names one,
    with ids derived from the object's uid, the transition's sequence and the Event's index."""
    if not sd.spec.notifications and sd.spec.registry is None:
        return []
    messages: list[Outgoing] = []
    for index, event in enumerate(transition.events):
        announcement = Announcement.of(
            sd, sequence=transition.sequence, time=transition.time, index=index, event_type=event.type.value,
            reason=event.reason, message=event.message, action=transition.action,
        )  # fmt: skip
        messages += outgoing(announcement, sd.spec.notifications) + registry_writeback(announcement, sd)
    return messages


def hold_message_id(uid: str, hold: GateWait, reason: str) -> str:
    """The id of the message telling of a gate's hold: the same for the whole hold (however many looks,
    restarts), another for the next hold (a later `since`) or another reason."""
    return f"{uid}.hold.{hold.type.value}.{int(hold.since.timestamp())}.{reason}"


def hold_notifications(sd: ShadowDeployment, notice: Notice, time: dt.datetime) -> list[Outgoing]:
    """The messages telling spec.notifications that a gate holds the rollout (`notice`, a gate's Warning,
    read with the status that holds: sd.status.gate), one per receiver that wants its reason."""
    hold = sd.status.gate
    if notice.reason not in GATE_WARNINGS or hold is None or not sd.spec.notifications:
        return []
    transition = sd.status.last_transition
    announcement = Announcement.of(
        sd, sequence=transition.sequence if transition is not None else 0, time=time, index=0,
        event_type=notice.type, reason=notice.reason, message=notice.message,
    )  # fmt: skip
    announcement = dataclasses.replace(announcement, id=hold_message_id(sd.metadata.uid or "", hold, notice.reason))
    return outgoing(announcement, sd.spec.notifications)


@dataclass
class Announcer:
    kube: Cluster
    metrics: OperatorMetrics

    async def publish(self, record: Rollout, body: dict[str, Any], sd: ShadowDeployment) -> None:
        """The Events and rows of the transition in `sd`'s status, unless this operator handed them out
        already (record.published). A failed post leaves it to the next reconcile, which posts it again."""
        transition = sd.status.last_transition
        if transition is None or transition.sequence <= record.published:
            return
        meta = body["metadata"]
        for index, event in enumerate(transition.events):
            try:
                created = await self.kube.post_event(
                    body, event.type.value, event.reason, event.message, transition.time,
                    name=event_name(meta["name"], meta["uid"], transition, index),
                    annotations=event_annotations(transition),
                )  # fmt: skip
            except KubeError as exc:
                logger.warning("%s/%s: Event %s not posted yet: %s", *record.key, event.reason, exc)
                return
            if created:
                self.metrics.events.labels(event.type.value, event.reason).inc()
        events, metrics = transition_rows(sd, transition)
        record.rows.add(events, metrics, transition_notifications(sd, transition))
        record.published = transition.sequence

    async def warn(
        self,
        record: Rollout,
        body: dict[str, Any],
        sd: ShadowDeployment,
        warnings: list[Notice],
        observed: AbstractSet[str],
    ) -> None:
        """Warnings whose cause is present now, each said once (record.say_once), with its history row."""
        now = dt.datetime.now(dt.UTC)
        status = sd.status
        for notice in record.say_once(warnings, observed):
            self.metrics.events.labels(notice.type, notice.reason).inc()
            try:
                await self.kube.post_event(body, notice.type, notice.reason, notice.message, now.replace(microsecond=0))
            except KubeError as exc:  # a warning is worth a log line, not a failed reconcile
                logger.warning("%s/%s: could not record Event %s: %s", *record.key, notice.reason, exc)
            record.rows.add(events=[
                EventRow(now, sd.namespace, sd.name, notice.reason, status.phase_or_pending.value,
                         status.current_step, status.current_weight, notice.message)
            ], notifications=hold_notifications(sd, notice, now))  # fmt: skip
