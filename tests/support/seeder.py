"""Write prediction and outcome rows the way the router would, in a background thread, for analysis tests.

Each tick inserts a batch of requests stamped now, each with its outcome, so they fall in whatever
analysis window is current. Models are described by their error: a production and a candidate loss
scale, a candidate error rate and latency.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import threading
from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True)
class Model:
    error_scale: float = 1.0
    """Standard deviation of the prediction error around the outcome."""
    error_rate: float = 0.0
    """Share of requests answered with HTTP 500."""
    latency_ms: float = 5.0


class Seeder:
    """Insert `batch` shadow-mode requests every `period` seconds until stopped."""

    def __init__(
        self,
        dsn: str,
        namespace: str,
        deployment: str,
        production: Model,
        candidate: Model,
        *,
        batch: int = 50,
        period: float = 0.5,
        seed: int = 7,
    ):
        self.dsn, self.namespace, self.deployment = dsn, namespace, deployment
        self.production, self.candidate = production, candidate
        self.batch, self.period = batch, period
        self.random = random.Random(seed)
        self.stopped = threading.Event()
        self.inserted = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"seeder-{deployment}", daemon=True)

    def __enter__(self) -> Seeder:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join(10)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._loop())
        except BaseException as exc:  # surfaced by __exit__
            self.error = exc

    def _answer(self, model: Model, outcome: float) -> tuple[float | None, int, float]:
        if self.random.random() < model.error_rate:
            return None, 500, model.latency_ms
        return outcome + self.random.gauss(0.0, model.error_scale), 200, model.latency_ms * (0.5 + self.random.random())

    async def _loop(self) -> None:
        connection = await asyncpg.connect(self.dsn)
        try:
            while not self.stopped.is_set():
                now = dt.datetime.now(dt.UTC)
                predictions, outcomes = [], []
                for _ in range(self.batch):
                    self.inserted += 1
                    request_id = f"{self.deployment}-{self.inserted}"
                    outcome = self.random.gauss(0.0, 1.0)
                    p_value, p_status, p_latency = self._answer(self.production, outcome)
                    c_value, c_status, c_latency = self._answer(self.candidate, outcome)
                    predictions.append(
                        (now, self.namespace, self.deployment, request_id, "production", "shadow", 10,
                         "1", p_value, p_latency, p_status, "2", c_value, c_latency, c_status)
                    )  # fmt: skip
                    outcomes.append((now, self.namespace, self.deployment, request_id, outcome))
                await connection.copy_records_to_table(
                    "predictions",
                    records=predictions,
                    columns=[
                        "time", "namespace", "deployment", "request_id", "served_by", "mode", "weight",
                        "production_version", "production_prediction", "production_latency_ms", "production_status",
                        "candidate_version", "candidate_prediction", "candidate_latency_ms", "candidate_status",
                    ],
                )  # fmt: skip
                await connection.copy_records_to_table(
                    "outcomes",
                    records=outcomes,
                    columns=["time", "namespace", "deployment", "request_id", "outcome"],
                )
                self.stopped.wait(self.period)
        finally:
            await connection.close()
