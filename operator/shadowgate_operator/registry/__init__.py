"""Writing a rollout's outcome back to the model registry, behind one small interface (`ModelRegistry`).

On Promoted the registry should say which version now serves: the serving alias (default `champion`)
moves to the candidate's version, and both versions are tagged with the outcome and a link to the
ShadowDeployment. On RolledBack the candidate's version is tagged with the reason. MLflow is the first
implementation (`mlflow.MlflowRegistry`, its REST API over httpx: the operator needs no MLflow client
library); another registry implements the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ModelVersionRef:
    """A version of a registered model."""

    model: str
    version: str


@dataclass(frozen=True)
class Outcome:
    """What a rollout decided, as the registry records it."""

    rollout: str
    """namespace/name of the ShadowDeployment."""
    link: str
    """Where to read more: the object's API path, or a dashboard URL."""
    reason: str
    """The decision in words, with its numbers (the Event's message)."""
    time: str
    """When it was decided, RFC 3339."""


class ModelRegistry(Protocol):
    async def promoted(
        self, candidate: ModelVersionRef, production: ModelVersionRef | None, outcome: Outcome, alias: str
    ) -> None:
        """`alias` now names the candidate's version; both versions say what happened. Idempotent."""
        ...

    async def rolled_back(self, candidate: ModelVersionRef, outcome: Outcome) -> None:
        """The candidate's version says it was rolled back, and why. Idempotent."""
        ...
