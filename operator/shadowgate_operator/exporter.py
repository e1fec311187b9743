"""The operator's own Prometheus metrics: what each rollout is doing, and what went wrong with the API.

What the operator exports, kept apart from what it reads (metrics.py, queries.py). One registry per
Reconciler rather than the process-global one, so tests can run several. Series are per
ShadowDeployment (namespace, name) and removed when it goes, so they stay bounded.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from shadowgate_operator.api import ConditionStatus, ConditionType, Phase, ShadowDeploymentStatus

ROLLOUT = ("namespace", "name")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.phase = Gauge(
            "shadowgate_rollout_phase",
            "1 for the phase each ShadowDeployment is in, 0 for the others.",
            [*ROLLOUT, "phase"],
            registry=registry,
        )
        self.weight = Gauge(
            "shadowgate_rollout_weight_percent",
            "Percent of requests the router sends to the candidate.",
            ROLLOUT,
            registry=registry,
        )
        self.samples = Gauge(
            "shadowgate_rollout_samples", "Scored requests in the current step.", ROLLOUT, registry=registry
        )
        self.score = Gauge(
            "shadowgate_rollout_overall_score",
            "The latest analysis' overall score, from -1 to 1 (absent before the first one).",
            ROLLOUT,
            registry=registry,
        )
        self.ready = Gauge(
            "shadowgate_rollout_ready", "1 when the Ready condition is True, else 0.", ROLLOUT, registry=registry
        )
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

    def serve(self, address: str) -> None:
        """Serve /metrics on HOST:PORT from a background thread."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)

    def observe(self, namespace: str, name: str, status: ShadowDeploymentStatus) -> None:
        current = status.phase_or_pending
        for phase in Phase:
            self.phase.labels(namespace, name, phase.value).set(1 if phase is current else 0)
        self.weight.labels(namespace, name).set(status.current_weight or 0)
        self.samples.labels(namespace, name).set(status.samples or 0)
        score = status.metrics.overall_score if status.metrics is not None else None
        if score is None:
            self._remove(self.score, namespace, name)
        else:
            self.score.labels(namespace, name).set(score)
        ready = status.condition(ConditionType.READY)
        self.ready.labels(namespace, name).set(1 if ready is not None and ready.status is ConditionStatus.TRUE else 0)

    def forget(self, namespace: str, name: str) -> None:
        """The ShadowDeployment is gone: drop its series."""
        for phase in Phase:
            self._remove(self.phase, namespace, name, phase.value)
        for gauge in (self.weight, self.samples, self.score, self.ready):
            self._remove(gauge, namespace, name)

    @staticmethod
    def _remove(gauge: Gauge, *labels: str) -> None:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)
