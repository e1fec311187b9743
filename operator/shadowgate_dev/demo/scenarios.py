"""The demo's two stories and how fast they are told.

Each scenario is a ShadowDeployment in examples/demo/ plus the models the demo serves for it
(examples/trading/). The demo changes only what cannot be known in advance, the model servers' URLs
(their ports on this machine), the MLflow server's URL and the registry's version numbers (or leaves the
registry out when there is no MLflow), and whatever a `Pace` overrides (the tests go faster).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from shadowgate_dev.localenv.binaries import REPO_ROOT

if TYPE_CHECKING:
    from shadowgate_dev.demo.registry import Registered

EXAMPLES = REPO_ROOT / "examples"


@dataclass(frozen=True)
class Scenario:
    name: str
    manifest: Path
    production_model: str
    """examples/trading model (v1, v2, v3) behind spec.production."""
    candidate_model: str
    """examples/trading model behind spec.candidate."""
    ends_in: str
    """The phase the story ends in."""
    summary: str

    def load(self) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load(self.manifest.read_text())
        return loaded


SCENARIOS: dict[str, Scenario] = {
    "promote": Scenario(
        name="promote",
        manifest=EXAMPLES / "demo" / "promote.yaml",
        production_model="v1",
        candidate_model="v2",
        ends_in="Promoted",
        summary="shadow a better model (v2) beside production (v1): mirrored 5%, 20%, 50%, then promoted",
    ),
    "rollback": Scenario(
        name="rollback",
        manifest=EXAMPLES / "demo" / "rollback.yaml",
        production_model="v1",
        candidate_model="v3",
        ends_in="RolledBack",
        summary="canary a worse model (v3): it answers 5% of accounts until the analysis rolls it back",
    ),
}


@dataclass(frozen=True)
class Pace:
    """How hard the clients push and what the ShadowDeployment is overridden with."""

    rate: float = 100.0
    """Trades (requests) per second."""
    analysis: dict[str, Any] = field(default_factory=dict)
    """Merged into spec.analysis (camelCase keys), e.g. {"minSamples": 100}."""
    traffic: dict[str, Any] = field(default_factory=dict)
    """Merged into spec.traffic, e.g. {"steps": [10, 50]}."""
    after_end: float = 3.0
    """Seconds of traffic after the final decision: what clients see once it is in force."""
    timeout: float = 300.0
    """Give up when the story has not ended after this many seconds of traffic."""
    latency_ms: float = 5.0
    """Median service time of every model server (log-normal around it)."""
    candidate_latency_ms: float | None = None
    """The candidate's, when it should differ (the p99 gate); None: latency_ms."""
    candidate_error_rate: float = 0.0
    """Share of the candidate's answers that are 500s (the error-rate gate)."""


def manifest(
    scenario: Scenario, production_url: str, candidate_url: str, pace: Pace, registry: Registered | None = None
) -> dict[str, Any]:
    """The scenario's ShadowDeployment pointed at these model servers, with the pace's overrides, and at
    this MLflow server and its versions of the models (without `registry`: no registry write-back)."""
    document = copy.deepcopy(scenario.load())
    spec = document["spec"]
    spec["production"]["url"] = production_url
    spec["candidate"]["url"] = candidate_url
    if registry is None:
        spec.pop("registry", None)
        for side in ("production", "candidate"):
            spec[side].pop("registeredModel", None)
    else:
        spec["registry"]["mlflow"]["trackingUri"] = registry.url
        spec["registry"]["alias"] = registry.alias
        for side, model in (("production", scenario.production_model), ("candidate", scenario.candidate_model)):
            spec[side]["registeredModel"] = {"name": registry.model, "version": registry.versions[model]}
    spec["analysis"].update(pace.analysis)
    spec["traffic"].update(pace.traffic)
    return document
