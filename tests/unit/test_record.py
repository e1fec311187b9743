"""The record of one ShadowDeployment: which children an analysis must apply, and what it validates again."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shadowgate_operator.analysis.window import CATCH_UP_SECONDS
from shadowgate_operator.api import Metric, ShadowDeployment
from shadowgate_operator.builders import Manifest, OperatorSettings, router_objects
from shadowgate_operator.record import RESYNC_SECONDS, Rollout, Rollouts, child_key
from shadowgate_operator.rollout import plan_rollout
from tests.admission_cases import load_example, merge_patch

T0 = datetime(2026, 11, 25, 9, 30, tzinfo=UTC)
SETTINGS = OperatorSettings(router_image="registry.example/shadowgate:0.1.0")
BASE = {"metadata": {"namespace": "models", "uid": "6f1c2a57-0d1e-4c55-9a1b-2f3e4d5c6b7a", "generation": 1}}


def planned(patch: dict[str, Any] | None = None, *, analyse_at: datetime | None = None) -> ShadowDeployment:
    """The example as a reconcile plans it (Progressing at step 1), with `patch` applied to the object read."""
    sd = ShadowDeployment.model_validate(merge_patch(merge_patch(load_example(), BASE), patch or {}))
    plan = plan_rollout(sd, analyse_at or T0, analyse=analyse_at is not None)
    return sd.model_copy(update={"status": plan.status})


class Builds:
    """router_objects, counted."""

    def __init__(self, sd: ShadowDeployment):
        self.sd, self.count = sd, 0

    def __call__(self) -> list[Manifest]:
        self.count += 1
        return router_objects(self.sd, SETTINGS)


def apply_all(record: Rollout, sd: ShadowDeployment) -> Builds:
    builds = Builds(sd)
    for child in record.needs_apply(sd, builds):
        record.applied_ok(child)
    return builds


def test_children_are_built_again_only_when_what_they_are_built_from_changes() -> None:
    record = Rollout("models", "fraud-detector")
    first = planned()
    assert apply_all(record, first).count == 1
    # An analysis that changes only the decision (or nothing): no build, nothing to apply.
    analysed = planned(analyse_at=T0 + timedelta(seconds=30))
    assert analysed.status.last_decision != first.status.last_decision
    builds = Builds(analysed)
    assert (record.needs_apply(analysed, builds), builds.count) == ([], 0)
    # A new first step: built again, and only the children that differ are applied.
    stepped = planned({"spec": {"traffic": {"steps": [15, 50, 100]}}})
    builds = Builds(stepped)
    changed = record.needs_apply(stepped, builds)
    assert builds.count == 1
    assert [child_key(child) for child in changed] == ["ConfigMap/fraud-detector-router"]


def test_a_child_not_applied_as_built_is_built_and_applied_again() -> None:
    record = Rollout("models", "fraud-detector")
    sd = planned()
    children = record.needs_apply(sd, Builds(sd))
    for child in children[1:]:  # the first one refused (by RBAC, an admission policy)
        record.applied_ok(child)
    again = Builds(sd)
    assert [child_key(child) for child in record.needs_apply(sd, again)] == [child_key(children[0])]
    assert again.count == 1
    record.applied_ok(children[0])
    record.applied.clear()  # a start or a takeover forgets what was applied: everything again
    assert len(record.needs_apply(sd, Builds(sd))) == len(children)


def test_router_inputs_hold_everything_the_children_are_built_from() -> None:
    """Two objects alike in uid, name, spec, phase and weight but in nothing else of status build the same
    children (otherwise a child would not follow a change the record does not see)."""
    sd = planned()
    other = planned(analyse_at=T0 + timedelta(hours=1)).model_copy(deep=True)
    status = other.status.model_copy(
        update={"message": "other", "samples": 7, "current_step": 2, "observed_generation": 9, "conditions": []}
    )
    other = other.model_copy(update={"status": status})
    assert (sd.status.phase, sd.status.current_weight) == (other.status.phase, other.status.current_weight)
    assert router_objects(sd, SETTINGS) == router_objects(other, SETTINGS)


def test_the_body_is_validated_once_per_body() -> None:
    record = Rollout("models", "fraud-detector")
    record.body = merge_patch(load_example(), BASE)
    sd = record.shadow_deployment()
    assert record.shadow_deployment() is sd
    record.seen({**record.body, "metadata": {**record.body["metadata"], "resourceVersion": "2"}})
    assert record.shadow_deployment() is not sd


def test_a_new_evidence_window_starts_the_analysis_over_and_a_new_shadow_step_moves_its_step_window() -> None:
    record = Rollout("models", "fraud-detector")
    assert record.catch_up_delay() is None  # nothing to catch up before the first window
    sd = planned()
    first = record.window(sd)
    assert first is not None and record.window(sd) is first
    assert record.catch_up_delay() == CATCH_UP_SECONDS  # its first read comes soon
    later = T0 + timedelta(minutes=10)
    step_two = sd.model_copy(
        update={"status": sd.status.model_copy(update={"current_step": 1, "step_started_at": later})}
    )
    assert record.window(step_two) is first and first.step_since == later  # shadow: evidence carries over
    rmse = step_two.model_copy(
        update={
            "spec": step_two.spec.model_copy(
                update={"analysis": step_two.spec.analysis.model_copy(update={"metric": Metric.RMSE})}
            )
        }
    )
    assert record.window(rmse) is not first


def test_objects_seen_together_resync_spread_over_a_period_then_a_period_apart() -> None:
    """1,000 objects created within 90 s once resynced within one 4-minute band (bench/operator); now each one's
    first resync falls at a random point of the period after it is first seen, the next ones a period apart."""
    rollouts = Rollouts()
    start = time.monotonic()
    records = [rollouts.get("bench", f"model-{index:04d}") for index in range(1000)]
    end = time.monotonic()
    offsets = [record.resync_at - start for record in records]
    assert all(0.0 <= offset <= RESYNC_SECONDS + (end - start) for offset in offsets)
    tenths = [sum(1 for offset in offsets if k * RESYNC_SECONDS / 10 <= offset < (k + 1) * RESYNC_SECONDS / 10)
              for k in range(10)]  # fmt: skip
    assert all(50 <= count <= 150 for count in tenths), tenths  # 100 expected in each; 5 standard deviations

    record = records[0]
    due = time.monotonic() - RESYNC_SECONDS / 4  # held up a quarter of a period (behind a long reconcile)
    record.dsn, record.resync_at = "postgresql://db/x", due
    record.resync_if_due()
    assert (record.check_children, record.dsn) == (True, None)  # the children read and compared, the DSN read
    assert record.resync_at == due + RESYNC_SECONDS  # a period after it was due: the object keeps its phase
    record.check_children = False
    record.resync_if_due()  # not due again before then
    assert not record.check_children
    record.resync_at = due - 2.5 * RESYNC_SECONDS  # held up for periods (a machine suspended): the next one to come
    record.resync_if_due()
    assert record.resync_at == pytest.approx(due + RESYNC_SECONDS / 2)
