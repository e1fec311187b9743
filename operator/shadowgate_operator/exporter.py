"""The operator's own Prometheus metrics: what each rollout is doing, and what went wrong with the API.

What the operator exports, kept apart from what it reads (metrics.py, analysis/). One registry per
Reconciler rather than the process-global one, so tests can run several. The per-rollout series are
read from the operator's records when scraped (`follow`): a ShadowDeployment's series go with its
record, so there is nothing to remove when it is deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shadowgate_operator.api import ConditionStatus, ConditionType, Phase, ShadowDeploymentStatus

ROLLOUT = ("namespace", "name")


class Followed(Protocol):
    """What the exporter reads of a record (record.Rollout)."""

    namespace: str
    name: str
    status: ShadowDeploymentStatus | None

    @property
    def rows_waiting(self) -> int: ...


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "shadowgate_operator_events",
            "Events the operator recorded, by type and reason (Promoted, RolledBack, PermissionDenied, ...).",
            ["type", "reason"],
            registry=registry,
        )
        self.permission_denied = Counter(
            "shadowgate_operator_permission_denied",
            "Kubernetes API calls refused for lack of rights, by what was attempted (e.g. apply Deployment).",
            ["verb", "kind"],
            registry=registry,
        )
        self.api_requests = Counter(
            "shadowgate_operator_api_requests",
            "Kubernetes API requests the Reconciler made, by verb, kind and HTTP status (0: no answer); kopf's "
            "own watches and metadata patches are not included.",
            ["verb", "kind", "code"],
            registry=registry,
        )

    def count_request(self, verb: str, kind: str, code: int) -> None:
        self.api_requests.labels(verb, kind, str(code)).inc()

    def follow(self, records: Iterable[Followed]) -> None:
        """Export the rollout series of these records (read at each scrape)."""
        self.registry.register(_RolloutCollector(records))

    def serve(self, address: str) -> None:
        """Serve /metrics on HOST:PORT from a background thread."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)


class _RolloutCollector(Collector):
    def __init__(self, records: Iterable[Followed]):
        self.records = records

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        phase, weight, samples, score, ready, waiting = families = self._families()
        for record in self.records:
            status = record.status
            if status is None:
                continue
            key = [record.namespace, record.name]
            current = status.phase_or_pending
            for each in Phase:
                phase.add_metric([*key, each.value], 1 if each is current else 0)
            weight.add_metric(key, status.current_weight or 0)
            samples.add_metric(key, status.samples or 0)
            if status.metrics is not None and status.metrics.overall_score is not None:
                score.add_metric(key, status.metrics.overall_score)
            condition = status.condition(ConditionType.READY)
            ready.add_metric(key, 1 if condition is not None and condition.status is ConditionStatus.TRUE else 0)
            waiting.add_metric(key, record.rows_waiting)
        return iter(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        labels = list(ROLLOUT)
        return (
            GaugeMetricFamily(
                "shadowgate_rollout_phase",
                "1 for the phase each ShadowDeployment is in, 0 for the others.",
                labels=[*labels, "phase"],
            ),
            GaugeMetricFamily(
                "shadowgate_rollout_weight_percent",
                "Percent of requests the router sends to the candidate.",
                labels=labels,
            ),
            GaugeMetricFamily("shadowgate_rollout_samples", "Scored requests in the current step.", labels=labels),
            GaugeMetricFamily(
                "shadowgate_rollout_overall_score",
                "The latest analysis' overall score, from -1 to 1 (absent before the first one).",
                labels=labels,
            ),
            GaugeMetricFamily("shadowgate_rollout_ready", "1 when the Ready condition is True, else 0.", labels=labels),
            GaugeMetricFamily(
                "shadowgate_rollout_history_rows_waiting",
                "deployment_events and deployment_metrics rows waiting for the database (it is away).",
                labels=labels,
            ),
        )
