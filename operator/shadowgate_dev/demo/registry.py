"""The demo's model registry: a local MLflow tracking server, the demo's models registered in it, and what
the operator wrote back, read through MLflow's REST API.

`DemoRegistry.begin` starts `mlflow server` (SQLite in the demo's work directory) at once when its venv is
cached, else builds the venv with uv in a thread while the control plane comes up (the same cached venv
as the registry tests: localenv.venvs). Before the ShadowDeployment is applied the story registers the
three trading models as versions 1, 2 and 3 of the registered model `trade-signal` (the alias `champion`
on production's) and names them in spec.production/candidate.registeredModel and spec.registry. After
the final transition it reads the alias and both versions' tags back from MLflow and prints them.

When MLflow cannot be had (no uv, no network for the first install, a server that does not start) the
demo says so in one line and tells the story without the registry.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shadowgate_dev.localenv.errors import ComponentError
from shadowgate_dev.localenv.mlflow import MLFLOW, MlflowServer
from shadowgate_dev.localenv.venvs import install
from shadowgate_operator.registry.mlflow import TAG_PREFIX

MODEL = "trade-signal"
"""The registered model the demo's versions belong to."""
TRADING_MODELS = ("v1", "v2", "v3")
"""examples/trading models, registered in this order (versions 1, 2, 3 on a new server)."""
SOURCE = "shadowgate-demo:/examples/trading"
"""Each version's source as MLflow records it, + /v1 etc.: the demo trains its models at start from
examples/trading (MLflow refuses a local path that is not in a run's artifacts)."""
READY_WITHIN = 300.0
"""Seconds the story waits for MLflow to answer (about 15 s idle; minutes on a machine under load)."""
WRITE_BACK_WAIT = 30.0
"""Seconds the story waits, after the end, for the operator's write-back to show in MLflow."""


class DemoRegistry:
    """A local MLflow server for the demo, or the one line that says why there is none."""

    def __init__(self, work: Path) -> None:
        self.server = MlflowServer(work)
        self.unavailable: str | None = None
        """Why the demo runs without a registry, once that is known."""
        self.install_seconds = 0.0
        self._installing: threading.Thread | None = None
        self._started = False

    @property
    def url(self) -> str:
        return self.server.url

    def begin(self) -> DemoRegistry:
        """Start the server now when its venv is cached; else build the venv in a thread meanwhile."""
        try:
            cached = MLFLOW.ready
        except (OSError, subprocess.SubprocessError) as exc:  # the venv's key runs the base Python
            self.unavailable = f"{type(exc).__name__}: {exc}"
            return self
        if cached:
            self._start()
        else:
            self._installing = threading.Thread(target=self._install, name="mlflow-install", daemon=True)
            self._installing.start()
        return self

    def _install(self) -> None:
        try:
            self.install_seconds = install(MLFLOW)
        except subprocess.CalledProcessError as exc:
            said = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            self.unavailable = f"{MLFLOW.requirements[0]} not installed with uv: {said[-1] if said else exc}"
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.unavailable = f"{MLFLOW.requirements[0]} not installed: {exc}"

    def _start(self) -> None:
        try:
            self.server.start()
            self._started = True
        except ComponentError as exc:
            self.unavailable = str(exc)

    async def ready(self) -> bool:
        """Whether the server answers (after its install and start); False with `unavailable` set."""
        if self._installing is not None:
            await asyncio.to_thread(self._installing.join)
            self._installing = None
            if self.unavailable is None:
                self._start()
        if self.unavailable is not None:
            return False
        try:
            await asyncio.to_thread(self.server.wait_ready, READY_WITHIN)
        except ComponentError as exc:
            self.unavailable = f"mlflow server did not start: {exc}".splitlines()[0]
            self.stop()
            return False
        return True

    def stop(self) -> None:
        if self._started:
            self.server.stop()


@dataclass(frozen=True)
class Registered:
    """The demo's versions in MLflow: each trading model's version number, and where the alias is."""

    url: str
    model: str
    versions: dict[str, str]
    """examples/trading model (v1, v2, v3) -> its version in the registry."""
    alias: str
    alias_version: str
    """The version the alias was on when the rollout began (production's)."""


async def call(http: httpx.AsyncClient, url: str, method: str, path: str, **body: Any) -> httpx.Response:
    """MLflow's REST API (https://mlflow.org/docs/latest/api_reference/rest-api.html), as anyone calls it."""
    endpoint = f"{url}/api/2.0/mlflow/{path}"
    return await (http.get(endpoint, params=body) if method == "GET" else http.post(endpoint, json=body))


def _checked(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code != 200:
        raise ComponentError("mlflow", f"{what}: HTTP {response.status_code}: {response.text[:300]}")
    found: dict[str, Any] = response.json()
    return found


def source(trading: str) -> str:
    return f"{SOURCE}/{trading}"


async def register(url: str, production: str, alias: str) -> Registered:
    """`MODEL` (made unless it exists) with a new version per trading model, `alias` on `production`'s."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        made = await call(
            http, url, "POST", "registered-models/create", name=MODEL,
            description="The demo's trading models (examples/trading); shadowgate writes rollouts back here.",
        )  # fmt: skip
        if made.status_code != 200 and "RESOURCE_ALREADY_EXISTS" not in made.text:
            _checked(made, f"registered-models/create {MODEL}")
        versions = {}
        for trading in TRADING_MODELS:
            created = _checked(
                await call(
                    http, url, "POST", "model-versions/create", name=MODEL,
                    source=source(trading),
                    description=f"examples/trading model {trading}",
                    tags=[{"key": "trading.model", "value": trading}],
                ),
                f"model-versions/create {MODEL} ({trading})",
            )  # fmt: skip
            versions[trading] = str(created["model_version"]["version"])
        _checked(
            await call(http, url, "POST", "registered-models/alias", name=MODEL, alias=alias,
                       version=versions[production]),
            f"registered-models/alias {alias}",
        )  # fmt: skip
    return Registered(url, MODEL, versions, alias, versions[production])


@dataclass
class ReadBack:
    """The registry as MLflow answers after the rollout: where the alias is, each version's tags."""

    registered: Registered
    production: str
    """Production's version number."""
    candidate: str
    """The candidate's version number."""
    alias_version: str | None
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    """Version -> its tags (only shadowgate.* ones)."""

    def written(self, phase: str) -> bool:
        """Whether the operator's write-back of `phase` is all there (the alias moves last on a promotion,
        the reason is tagged last on a rollback)."""
        if phase == "Promoted":
            return self.alias_version == self.candidate
        return f"{TAG_PREFIX}reason" in self.tags.get(self.candidate, {})

    def lines(self, names: tuple[str, str], width: int = 110) -> list[str]:
        """What the story prints: the alias, then each version's tags, one a line, cut to `width`."""
        registered = self.registered
        where = (
            "the candidate"
            if self.alias_version == self.candidate
            else "production"
            if self.alias_version == self.production
            else "neither"
        )
        moved = "moved from" if self.alias_version != registered.alias_version else "still on"
        said = [
            f"==> MLflow at {registered.url} (read back through its REST API): registered model {registered.model}",
            f"      alias {registered.alias} -> version {self.alias_version} ({where}; {moved} version "
            f"{registered.alias_version})",
        ]
        shown: dict[str, str] = {}
        for version, name in ((self.candidate, names[1]), (self.production, names[0])):
            tags = self.tags.get(version, {})
            if not tags:
                said.append(f"      version {version} ({name}): no shadowgate tag")
                continue
            said.append(f"      version {version} ({name}):")
            same = [key for key, value in tags.items() if shown.get(key) == value]
            for key, value in tags.items():
                if key not in same:
                    said.append(_cut(f"        {key} = {value}", width))
            if same:
                said.append(_cut(f"        {', '.join(same)}: as on version {self.candidate}", width))
            shown = shown or tags
        return said


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


async def read_back(registered: Registered, production: str, candidate: str) -> ReadBack:
    """The alias and both versions' shadowgate tags, as MLflow says now."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        alias = await call(http, registered.url, "GET", "registered-models/alias", name=registered.model,
                           alias=registered.alias)  # fmt: skip
        found = ReadBack(
            registered, production, candidate,
            str(alias.json()["model_version"]["version"]) if alias.status_code == 200 else None,
        )  # fmt: skip
        for version in (candidate, production):
            answer = _checked(
                await call(http, registered.url, "GET", "model-versions/get", name=registered.model, version=version),
                f"model-versions/get {version}",
            )
            found.tags[version] = {
                tag["key"]: tag["value"]
                for tag in answer["model_version"].get("tags", [])
                if tag["key"].startswith(TAG_PREFIX)
            }
    return found


async def wait_written(
    registered: Registered, production: str, candidate: str, phase: str, within: float = WRITE_BACK_WAIT
) -> tuple[ReadBack, bool]:
    """Read back until the write-back of `phase` shows (True), or `within` seconds have passed (False)."""
    deadline = time.monotonic() + within
    while True:
        found = await read_back(registered, production, candidate)
        if found.written(phase):
            return found, True
        if time.monotonic() > deadline:
            return found, False
        await asyncio.sleep(0.5)
