"""The kopf glue (handlers.py) driven without kopf: when a new object's loop first reconciles, and the diff
base kopf builds at every watch event."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from shadowgate_operator import handlers
from shadowgate_operator.handlers import FINALIZER, LeanDiffBase
from shadowgate_operator.record import Rollouts


class Stopped:
    """kopf.DaemonStopped's part the loop uses."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __bool__(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        await self.event.wait()


class Ticks:
    """The Reconciler's part the loop uses; each tick notes whether the record held kopf's finalizer then."""

    def __init__(self) -> None:
        self.rollouts = Rollouts()
        self.held_finalizer: list[bool] = []
        self.ticked = asyncio.Event()

    def resume(self, namespace: str, name: str) -> None:
        self.rollouts.get(namespace, name).wake.set()

    async def tick(self, namespace: str, name: str) -> float:
        record = self.rollouts.get(namespace, name)
        record.wake.clear()
        self.held_finalizer.append(record.settled(FINALIZER))
        self.ticked.set()
        return 3600.0


def body(version: int, *finalizers: str) -> dict[str, Any]:
    meta = {"namespace": "models", "name": "fresh", "generation": 1, "resourceVersion": str(version)}
    return {"metadata": meta | {"finalizers": list(finalizers)}, "spec": {"paused": False}}


async def run_loop(reconciler: Ticks, first: dict[str, Any]) -> tuple[asyncio.Task[None], Stopped]:
    stopped = Stopped()
    memo, logger = SimpleNamespace(reconciler=reconciler), logging.getLogger(__name__)
    running = handlers.rollout_loop(
        stopped=stopped, namespace="models", name="fresh", body=kopf.Body(first), memo=memo, logger=logger
    )
    return asyncio.create_task(running), stopped


async def stop(loop: asyncio.Task[None], stopped: Stopped) -> None:
    stopped.event.set()
    async with asyncio.timeout(10):
        await loop


async def test_a_new_objects_first_reconcile_waits_for_the_copy_holding_kopfs_finalizer() -> None:
    """kopf starts the loop at the object's first watch event, then adds its finalizer: a status written from
    the first copy met a conflict (409) for most of 1,000 new objects (bench/operator)."""
    reconciler = Ticks()
    loop, stopped = await run_loop(reconciler, body(1))
    for _ in range(50):  # the loop runs as far as it can without the watch event
        await asyncio.sleep(0)
    assert reconciler.held_finalizer == []
    reconciler.rollouts.seen(body(2, FINALIZER))  # the watch event of kopf's patch
    async with asyncio.timeout(10):
        await reconciler.ticked.wait()
    assert reconciler.held_finalizer == [True]
    await stop(loop, stopped)


async def test_an_object_holding_the_finalizer_is_reconciled_at_once() -> None:
    reconciler = Ticks()
    loop, stopped = await run_loop(reconciler, body(7, "other.example/keep", FINALIZER))
    async with asyncio.timeout(10):
        await reconciler.ticked.wait()
    assert reconciler.held_finalizer == [True]
    await stop(loop, stopped)


async def test_without_the_finalizer_the_loop_still_starts_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "FINALIZER_WAIT_SECONDS", 0.05)
    reconciler = Ticks()
    loop, stopped = await run_loop(reconciler, body(1))
    async with asyncio.timeout(10):
        await reconciler.ticked.wait()
    assert reconciler.held_finalizer == [False]
    await stop(loop, stopped)


async def test_a_loop_stopped_while_it_waits_for_the_finalizer_ends_without_a_reconcile() -> None:
    reconciler = Ticks()
    loop, stopped = await run_loop(reconciler, body(1))
    await asyncio.sleep(0)
    await stop(loop, stopped)
    assert reconciler.held_finalizer == []


def test_the_lean_diff_base_is_kopfs_without_copying_status_and_managed_fields() -> None:
    raw = {
        "apiVersion": "shadowgate.io/v1alpha1",
        "kind": "ShadowDeployment",
        "metadata": {
            "name": "fresh", "namespace": "models", "uid": "u-1", "resourceVersion": "9", "generation": 2,
            "labels": {"team": "risk"},
            "annotations": {"shadowgate.io/action": "promote", "note": "kept"},
            "finalizers": [FINALIZER],
            "managedFields": [{"manager": "shadowgate-operator", "fieldsV1": {"f:status": {"f:phase": {}}}}],
        },
        "spec": {"traffic": {"steps": [5, 50]}},
        "status": {"phase": "Progressing", "conditions": [{"type": "Ready", "status": "False"}]},
    }  # fmt: skip
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="shadowgate.io", key="last-handled-configuration")
    lean = LeanDiffBase(prefix="shadowgate.io", key="last-handled-configuration")
    assert lean.build(body=kopf.Body(raw)) == kopfs.build(body=kopf.Body(raw))
    assert lean.build(body=kopf.Body(raw))["spec"] == {"traffic": {"steps": [5, 50]}}
