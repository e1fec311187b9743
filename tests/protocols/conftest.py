"""tests/protocols: the router in front of real model servers (MLServer, KServe, Triton; tests/support/model_servers.py)
called by real clients (tritonclient http and grpc, requests, httpx). Run with `make test-protocols`; each
module marks itself `protocols`, which `make test` deselects."""

from __future__ import annotations

from typing import Any

# The router fixtures of the cluster tests: a migrated database connection, a fresh deployment name, and
# start_router (the router as a process, stopped after the test, its log printed when it failed).
from tests.cluster.test_router_proxy import db, deployment, rows, start_router  # noqa: F401
from tests.support.model_servers import ServerProcess
from tests.support.router import router_config


def real_config(pair: tuple[ServerProcess, ServerProcess], name: str, **changes: Any) -> dict[str, Any]:
    """The router's configuration for a real production (bias 0) and candidate (bias 100) pair."""
    production, candidate = pair
    config = router_config(
        production.url, candidate.url, grpc=(production.grpc_address, candidate.grpc_address), deployment=name
    )
    config["production"]["modelName"] = production.model
    config["candidate"]["modelName"] = candidate.model
    config.update(changes)
    return config
