"""The ShadowDeployment types: defaults, getters, and the Python twins of the CRD's rules."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from shadowgate_operator import api
from shadowgate_operator.api import (
    ACTION_ANNOTATION,
    ActionVerb,
    Metric,
    Phase,
    Protocol,
    ShadowDeployment,
    ShadowDeploymentSpec,
    ShadowDeploymentStatus,
    TrafficMode,
    parse_duration,
)
from tests.admission_cases import CASES, Case, load_example, merge_patch

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ALL_RULES = [
    rule
    for model in vars(api).values()
    if isinstance(model, type) and issubclass(model, api.ApiModel)
    for rule in model.__rules__
]


def example(patch: dict[str, Any] | None = None) -> ShadowDeployment:
    document = merge_patch(load_example(), {"metadata": {"namespace": "models"}, **(patch or {})})
    return ShadowDeployment.model_validate(document)


def minimal_spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "production": {"name": "m", "version": "1", "url": "http://prod:8080"},
        "candidate": {"name": "m", "version": "2", "url": "http://cand:8080"},
        "database": {"secretRef": {"name": "db"}},
        "outcomes": {"tokenSecretRef": {"name": "tok"}},
    }
    result: dict[str, Any] = merge_patch(spec, changes)
    return result


def test_the_example_is_valid_and_says_what_the_comment_promises() -> None:
    sd = example()
    assert sd.spec.traffic.mode is TrafficMode.SHADOW
    assert sd.spec.traffic.steps == [5, 10, 20]
    assert sd.spec.protocol is Protocol.V2
    assert (sd.spec.production.name, sd.spec.candidate.name) == ("fraud-v1", "fraud-v2")
    assert sd.router_name == "fraud-detector-router"


def test_defaults_live_on_the_types() -> None:
    spec = ShadowDeploymentSpec.model_validate(minimal_spec())
    assert spec.traffic.mode is TrafficMode.SHADOW
    assert spec.traffic.steps == [10]
    assert spec.traffic.fallback_to_production is True
    assert spec.analysis.interval_seconds == 30
    assert spec.analysis.min_samples == 100
    assert spec.analysis.metric is Metric.MAE
    assert (spec.analysis.promotion_threshold, spec.analysis.rollback_threshold) == (0.7, 0.3)
    assert spec.analysis.max_error_rate == 0.05
    assert spec.analysis.confidence == 0.99
    assert spec.analysis.max_step_seconds is None
    assert spec.router.replicas == 2
    assert spec.router.resources.requests == {"cpu": "100m", "memory": "128Mi"}
    assert spec.database.secret_ref.key == "dsn"
    assert spec.outcomes.token_secret_ref.key == "token"
    assert spec.paused is False


def test_defaults_are_not_shared_between_objects() -> None:
    first = ShadowDeploymentSpec.model_validate(minimal_spec())
    first.traffic.steps.append(50)
    assert ShadowDeploymentSpec.model_validate(minimal_spec()).traffic.steps == [10]


@pytest.mark.parametrize(
    ("protocol", "prediction", "path"),
    [
        ("v2", None, "outputs[0].data[0]"),
        ("v1", None, "predictions[0]"),
        ("json", {"path": "result.score"}, "result.score"),
        ("v2", {"path": "outputs[1].data[0]"}, "outputs[1].data[0]"),
    ],
)
def test_prediction_path_defaults_by_protocol(protocol: str, prediction: dict[str, str] | None, path: str) -> None:
    spec = ShadowDeploymentSpec.model_validate(minimal_spec(protocol=protocol, prediction=prediction))
    assert spec.prediction_path == path


def test_endpoints_resolve_to_base_urls() -> None:
    sd = example(
        {
            "spec": {
                "production": {"service": {"namespace": "serving"}},
                "candidate": {"service": None, "url": "http://10.0.0.7:8080/"},
            }
        }
    )
    assert sd.spec.production.base_url(sd.namespace) == "http://fraud-v1.serving.svc:8080"
    assert sd.spec.candidate.base_url(sd.namespace) == "http://10.0.0.7:8080"
    assert example().spec.candidate.base_url("models") == "http://fraud-v2.models.svc:8080"


def test_served_model_name_defaults_to_name() -> None:
    spec = ShadowDeploymentSpec.model_validate(minimal_spec(production={"modelName": "fraud"}))
    assert spec.production.served_model_name == "fraud"
    assert spec.candidate.served_model_name == "m"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("1.5s", 1.5), ("250ms", 0.25), ("2h", 7200)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "1d", "-5s", "5 s", "1.s"])
def test_parse_duration_rejects_what_the_crd_pattern_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_weights_are_normalised() -> None:
    spec = ShadowDeploymentSpec.model_validate(
        minimal_spec(analysis={"weights": {"quality": 1, "latency": 1, "errors": 0}})
    )
    assert spec.analysis.weights.normalized() == (0.5, 0.5, 0.0)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_python_refuses_what_the_api_server_refuses(case: Case) -> None:
    with pytest.raises(ValidationError) as refused:
        ShadowDeployment.model_validate(case.manifest())
    if any(case.message in rule.message for rule in ALL_RULES):
        assert case.message in str(refused.value)


@pytest.mark.parametrize("rule", ALL_RULES, ids=[rule.message[:40] for rule in ALL_RULES])
def test_every_rule_has_an_admission_case(rule: api.Rule) -> None:
    """So each CEL rule is exercised against a real API server by tests/cluster/test_admission.py."""
    assert any(case.message in rule.message for case in CASES), f"no case in tests/admission_cases.py for {rule}"


def test_rules_are_collected_per_class() -> None:
    assert [rule.field_path for rule in api.Traffic.__rules__] == [".steps", ".timeout", ".mirrorTimeout"]
    assert api.ServiceRef.__rules__ == ()


@pytest.mark.parametrize(
    "changes",
    [
        {"candidate": {"url": None, "service": {"name": "s", "port": 80}}},
        {"candidate": {"url": "http://prod:8080", "modelName": "other"}},  # same server, another model
        {"candidate": {"url": "http://prod:8080/"}},  # not the same string
    ],
)
def test_valid_neighbours_of_the_endpoint_rules(changes: dict[str, Any]) -> None:
    ShadowDeploymentSpec.model_validate(minimal_spec(**changes))


def test_services_in_other_namespaces_are_different_servers() -> None:
    service = {"url": None, "service": {"name": "s", "port": 80}}
    ShadowDeploymentSpec.model_validate(
        minimal_spec(production=service, candidate={**service, "service": {"name": "s", "port": 80, "namespace": "b"}})
    )
    with pytest.raises(ValidationError, match="point at the same server"):
        ShadowDeploymentSpec.model_validate(minimal_spec(production=service, candidate=service))


def test_candidate_revision_follows_what_is_compared() -> None:
    base = ShadowDeploymentSpec.model_validate(minimal_spec())
    retuned = ShadowDeploymentSpec.model_validate(minimal_spec(analysis={"minSamples": 5}, paused=True))
    new_candidate = ShadowDeploymentSpec.model_validate(minimal_spec(candidate={"version": "3"}))
    assert base.candidate_revision() == retuned.candidate_revision()
    assert base.candidate_revision() != new_candidate.candidate_revision()


def test_wire_form_is_camel_case_and_round_trips() -> None:
    sd = example()
    wire = sd.to_dict()
    assert wire["spec"]["analysis"]["maxLatencyP99Ms"] == 250
    assert wire["spec"]["traffic"]["stickyHeader"] == "X-Account-Id"
    assert ShadowDeployment.model_validate(wire) == sd


def test_status_ignores_fields_it_does_not_know() -> None:
    status = ShadowDeploymentStatus.model_validate({"phase": "Progressing", "kopf": {"progress": {}}})
    assert status.phase is Phase.PROGRESSING


def test_status_refuses_numbers_json_cannot_carry() -> None:
    with pytest.raises(ValidationError):
        ShadowDeploymentStatus.model_validate({"metrics": {"overallScore": math.nan}})


def test_missing_status_reads_as_pending() -> None:
    assert example().status.phase_or_pending is Phase.PENDING
    assert Phase.PROMOTED.finished and not Phase.PAUSED.finished


def _with_action(value: str | None, handled: str | None = None) -> ShadowDeployment:
    patch: dict[str, Any] = {"metadata": {"annotations": {ACTION_ANNOTATION: value}}}
    if handled is not None:
        patch["status"] = {"lastAction": {"value": handled, "verb": "promote", "time": NOW.isoformat()}}
    return example(patch)


def test_manual_action_is_pending_until_recorded() -> None:
    assert _with_action(None).pending_action() is None
    pending = _with_action("promote:1700000000")
    action = pending.pending_action()
    assert action is not None
    assert (action.verb, action.value) == (ActionVerb.PROMOTE, "promote:1700000000")
    assert _with_action("promote:1700000000", handled="promote:1700000000").pending_action() is None
    again = _with_action("promote:1700000001", handled="promote:1700000000").pending_action()
    assert again is not None and again.verb is ActionVerb.PROMOTE


def test_unknown_manual_verb_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="use promote, abort, retry"):
        _with_action("ship-it").pending_action()


def test_namespace_is_required_to_build_anything() -> None:
    sd = ShadowDeployment.model_validate(load_example())
    with pytest.raises(ValueError, match="has no namespace"):
        _ = sd.namespace
