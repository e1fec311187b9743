"""The operator/router contract: what a router accepts from its ConfigMap, and how it says no."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shadowgate_router.config import CONFIG_KEY, RouterConfig, RouterConfigError, parse_json_path

GOOD: dict[str, Any] = {
    "deployment": "fraud-detector",
    "namespace": "models",
    "mode": "canary",
    "weight": 20,
    "phase": "Progressing",
    "protocol": "json",
    "predictionPath": "result.score",
    "confidencePath": "result.probabilities[1]",
    "production": {"name": "fraud-v1", "version": "1", "url": "http://a.models.svc:8080", "modelName": "fraud"},
    "candidate": {"name": "fraud-v2", "version": "2", "url": "http://b.models.svc:8080/", "modelName": "fraud"},
    "stickyHeader": "X-Account-Id",
    "fallbackToProduction": True,
    "timeoutSeconds": 10,
    "mirrorTimeoutSeconds": 2.5,
}


def data(**changes: Any) -> dict[str, str]:
    return {CONFIG_KEY: json.dumps({**GOOD, **changes})}


def test_round_trip_keeps_everything() -> None:
    config = RouterConfig.from_configmap_data(data())
    assert RouterConfig.from_configmap_data(config.to_configmap_data()) == config
    assert config.candidate.base_url == "http://b.models.svc:8080"
    assert json.loads(config.to_configmap_data()[CONFIG_KEY])["revision"] == config.revision


def test_revision_is_recomputed_not_trusted() -> None:
    honest = RouterConfig.from_configmap_data(data())
    assert RouterConfig.from_configmap_data(data(revision="forged")).revision == honest.revision
    assert RouterConfig.from_configmap_data(data(weight=21)).revision != honest.revision


@pytest.mark.parametrize(
    ("configmap_data", "message"),
    [
        ({}, "has no 'config.json' key"),
        (None, "has no 'config.json' key"),
        ({CONFIG_KEY: "{not json"}, "config.json is not valid JSON"),
        ({CONFIG_KEY: "[1, 2]"}, "must hold a JSON object, not list"),
        (data(weight=101), "config.json: weight: Input should be less than or equal to 100"),
        (data(mode="blue"), "config.json: mode: Input should be 'shadow' or 'canary'"),
        (data(predictionPath="outputs[0"), "config.json: predictionPath: String should match pattern"),
        (data(timeoutSeconds=0), "config.json: timeoutSeconds: Input should be greater than 0"),
        (data(extra=1), "config.json: extra: Extra inputs are not permitted"),
        (data(production={"name": "x"}), "config.json: production.version: Field required"),
    ],
)
def test_bad_configs_are_refused_with_a_readable_reason(configmap_data: dict[str, str] | None, message: str) -> None:
    with pytest.raises(RouterConfigError) as refused:
        RouterConfig.from_configmap_data(configmap_data)
    assert message in str(refused.value)


def test_every_problem_is_listed() -> None:
    with pytest.raises(RouterConfigError) as refused:
        RouterConfig.from_configmap_data(data(weight=-1, timeoutSeconds=-1))
    assert len(str(refused.value).splitlines()) == 2


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("outputs[0].data[0]", ("outputs", 0, "data", 0)),
        ("predictions[0]", ("predictions", 0)),
        ("[0].score", (0, "score")),
        ("result", ("result",)),
        ("a-b.c_d[12][3]", ("a-b", "c_d", 12, 3)),
    ],
)
def test_parse_json_path(path: str, parts: tuple[str | int, ...]) -> None:
    assert parse_json_path(path) == parts


@pytest.mark.parametrize("path", ["", ".a", "a.", "a[", "a[x]", "a..b", "0a"])
def test_parse_json_path_rejects_malformed_paths(path: str) -> None:
    with pytest.raises(ValueError, match="is not a path"):
        parse_json_path(path)


@pytest.mark.parametrize(
    ("mode", "weight", "answers_all"),
    [("canary", 100, True), ("canary", 50, False), ("shadow", 100, False), ("shadow", 0, False)],
)
def test_the_candidate_answers_everything_only_in_canary_at_100(mode: str, weight: int, answers_all: bool) -> None:
    config = RouterConfig.from_configmap_data(data(mode=mode, weight=weight))
    assert config.candidate_answers_all is answers_all
