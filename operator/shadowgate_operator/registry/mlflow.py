"""MLflow's model registry through its REST API (MLflow 2.x and 3.x, open source or managed).

Calls (https://mlflow.org/docs/latest/api_reference/rest-api.html):
- POST /api/2.0/mlflow/registered-models/alias {name, alias, version}: move an alias to a version;
- POST /api/2.0/mlflow/model-versions/set-tag {name, version, key, value}: tag a version.
Both are idempotent, so a write-back retried after a failure or an operator restart changes nothing more.
Credentials, when the server wants them: a bearer token, or a user name and password (MLflow's basic
auth app), as MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME / _PASSWORD would give the MLflow client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from shadowgate_operator.registry import ModelVersionRef, Outcome

TAG_PREFIX = "shadowgate."
"""Tags written: shadowgate.outcome, shadowgate.rollout, shadowgate.link, shadowgate.time, shadowgate.reason,
shadowgate.replaced_by (on production) and shadowgate.replaces (on the candidate)."""
MAX_TAG_VALUE = 5000
"""MLflow refuses tag values longer than this (5000 characters in the open-source server)."""


class RegistryError(RuntimeError):
    """The registry refused a call or could not be reached; `retry` says whether trying again may help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass
class MlflowRegistry:
    url: str
    """The tracking server, e.g. http://mlflow.mlops:5000."""
    http: httpx.AsyncClient
    token: str | None = None
    username: str | None = None
    password: str | None = None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        auth = httpx.BasicAuth(self.username, self.password or "") if self.username else None
        try:
            response = await self.http.post(
                f"{self.url.rstrip('/')}/api/2.0/mlflow/{path}", json=body, headers=headers,
                auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            raise RegistryError(f"MLflow at {self.url} not reached: {type(exc).__name__}: {exc}", retry=True) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("message") or response.text
            except ValueError:
                detail = response.text
            retry = response.status_code >= 500 or response.status_code in (401, 403, 429)
            raise RegistryError(f"MLflow {path}: HTTP {response.status_code}: {str(detail)[:300]}", retry=retry)
        result = response.json() if response.content else {}
        return result if isinstance(result, dict) else {}

    async def set_alias(self, version: ModelVersionRef, alias: str) -> None:
        await self._post("registered-models/alias", {"name": version.model, "alias": alias, "version": version.version})

    async def set_tags(self, version: ModelVersionRef, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            await self._post(
                "model-versions/set-tag",
                {"name": version.model, "version": version.version, "key": key, "value": value[:MAX_TAG_VALUE]},
            )

    async def promoted(
        self, candidate: ModelVersionRef, production: ModelVersionRef | None, outcome: Outcome, alias: str
    ) -> None:
        common = {"rollout": outcome.rollout, "link": outcome.link, "time": outcome.time, "reason": outcome.reason}
        # Tags first: if the alias then fails, a retry does it all again, and nothing claims a move not made.
        await self.set_tags(
            candidate,
            _tags(outcome="promoted", **common, **({"replaces": production.version} if production else {})),
        )
        if production is not None:
            await self.set_tags(production, _tags(outcome="replaced", replaced_by=candidate.version, **common))
        await self.set_alias(candidate, alias)

    async def rolled_back(self, candidate: ModelVersionRef, outcome: Outcome) -> None:
        await self.set_tags(
            candidate,
            _tags(outcome="rolled_back", rollout=outcome.rollout, link=outcome.link, time=outcome.time,
                  reason=outcome.reason),
        )  # fmt: skip


def _tags(**values: str) -> dict[str, str]:
    return {f"{TAG_PREFIX}{key}": value for key, value in values.items()}
