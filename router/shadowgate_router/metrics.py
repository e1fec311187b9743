"""The router's own Prometheus metrics (what it exports, not what the operator queries).

Each router owns a registry rather than using the process-global one, so several routers can live in
one test process. Label sets are small and fixed (side: production or candidate; role: answer, its
answer went to the client, mirror, a shadow copy, or fallback, production after a candidate failure;
status class), so series stay bounded whatever the traffic; the hot path binds its children once
instead of looking labels up per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "shadowgate_router_requests",
            "Model server calls by side, role and outcome (HTTP status, or timeout/connect/closed/bad_response; "
            "circuit_open: a candidate call its circuit breaker skipped).",
            ["side", "role", "status"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "shadowgate_router_upstream_latency_seconds",
            "Time from sending a request to a model server to having its whole answer.",
            ["side", "role"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_latency = Histogram(
            "shadowgate_router_request_latency_seconds",
            "Time from the router having a client's request to handing the answer to the socket.",
            ["served_by"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.responses = Counter(
            "shadowgate_router_responses", "Answers to clients by HTTP status.", ["status"], registry=registry
        )
        self.mirror_dropped = Counter(
            "shadowgate_router_mirror_dropped",
            "Shadow copies not sent because the mirror concurrency limit was reached.",
            registry=registry,
        )
        self.duplicate_ids = Counter(
            "shadowgate_router_duplicate_request_ids",
            "Predictions recorded with a request id this replica recorded recently (its last 50,000 to 100,000): "
            "recorded anyway; the analysis scores each id once.",
            registry=registry,
        )
        self.fallbacks = Counter(
            "shadowgate_router_fallbacks",
            "Canary requests answered by production after the candidate failed.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "shadowgate_router_record_queue_rows",
            "Rows recorded in memory, not yet in the spool (they go there every flush interval).",
            ["table"],
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "shadowgate_router_spool_bytes",
            "Bytes of rows in the spool, not yet in the database.",
            ["table"],
            registry=registry,
        )
        self.spool_rows = Gauge(
            "shadowgate_router_spool_rows", "Rows in the spool, not yet in the database.", ["table"], registry=registry
        )
        self.rows_written = Counter(
            "shadowgate_router_rows_written", "Rows committed to the database.", ["table"], registry=registry
        )
        self.rows_rejected = Counter(
            "shadowgate_router_rows_rejected",
            "Rows the database refused as invalid, set aside in the spool directory's rejected file.",
            ["table"],
            registry=registry,
        )
        self.rows_dropped = Counter(
            "shadowgate_router_rows_dropped",
            "Rows lost because the database stayed away until the spool reached --spool-limit-mb.",
            ["table"],
            registry=registry,
        )
        self.rows_conflicting = Counter(
            "shadowgate_router_rows_conflicting",
            "Rows not written because one with the same key and another value was recorded first "
            "(an outcome posted again for the same request and time with a different value).",
            ["table"],
            registry=registry,
        )
        self.database_errors = Counter(
            "shadowgate_router_database_errors",
            "Failed attempts to write to the database.",
            ["table"],
            registry=registry,
        )
        self.grpc_responses = Counter(
            "shadowgate_router_grpc_responses",
            "Answers to gRPC clients by status code name (the model server's, or the router's own).",
            ["code"],
            registry=registry,
        )
        self.refusals = Counter(
            "shadowgate_router_refusals",
            "Requests the router refused itself, without calling a model server: protocol http (status: the "
            "HTTP code, e.g. 400 malformed, 404 unknown path or model, 405, 413 too large, 415 unreadable type "
            "or coding) or grpc (status: the gRPC code's name). POST /outcomes has outcome_refusals.",
            ["protocol", "status"],
            registry=registry,
        )
        self.outcomes = Counter(
            "shadowgate_router_outcomes", "Outcomes accepted through POST /outcomes.", registry=registry
        )
        self.outcome_refusals = Counter(
            "shadowgate_router_outcome_refusals",
            "POST /outcomes calls refused, by HTTP status.",
            ["status"],
            registry=registry,
        )
        self.config_info = Gauge(
            "shadowgate_router_config_info",
            "1 for the configuration in force (its revision, mode and phase).",
            ["revision", "mode", "phase"],
            registry=registry,
        )
        self.config_weight = Gauge(
            "shadowgate_router_config_weight_percent", "Candidate weight in force.", registry=registry
        )
        self.config_applied = Counter("shadowgate_router_config_applied", "Configurations applied.", registry=registry)
        self.config_refused = Counter(
            "shadowgate_router_config_refused",
            "Configurations refused as invalid (the last good one stays).",
            registry=registry,
        )
        self.config_errors = Counter(
            "shadowgate_router_config_watch_errors", "Failed reads or watches of the ConfigMap.", registry=registry
        )
        self.inflight = Gauge("shadowgate_router_inflight_mirrors", "Shadow copies in flight.", registry=registry)
        self.breaker_state = Gauge(
            "shadowgate_router_candidate_breaker_state",
            "The candidate's circuit breaker: 0 closed (calls go through), 1 half-open (a few probe calls), "
            "2 open (no calls; each skipped one is counted in requests_total as circuit_open and recorded as a "
            "candidate failure); per protocol (http, grpc: a breaker each).",
            ["protocol"],
            registry=registry,
        )
        self.breaker_opened = Counter(
            "shadowgate_router_candidate_breaker_opened",
            "Times the candidate's circuit breaker opened (its calls kept failing with no usable answer).",
            ["protocol"],
            registry=registry,
        )

    def render(self) -> tuple[bytes, bytes]:
        """The exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()
