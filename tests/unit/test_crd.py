"""The generated CRD: fresh on disk, structural, bounded for CEL, and explainable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowgate_operator import api, crd
from shadowgate_operator.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO_ROOT / "crds" / crd.CRD_FILENAME


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd.openapi_schema()


def test_checked_in_crd_is_fresh() -> None:
    assert CHECKED_IN.exists(), f"{CHECKED_IN} is missing: run `make crds`"
    assert CHECKED_IN.read_text() == crd.render(), f"{CHECKED_IN} is stale: run `make crds` and commit it"


def test_rendering_is_deterministic() -> None:
    assert crd.render() == crd.render()


def test_identity_of_the_resource() -> None:
    manifest = yaml.safe_load(crd.render())
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "shadowdeployments.shadowgate.io"
    assert spec["group"] == "shadowgate.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "ShadowDeployment"
    assert spec["names"]["shortNames"] == ["shadow"]
    assert spec["names"]["categories"] == ["shadowgate"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    assert f"{api.GROUP}/{api.VERSION}" == api.API_VERSION


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        assert "$ref" not in node and "title" not in node and "$defs" not in node, path
        assert node.get("additionalProperties") is not False, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, f"{path}: only int-or-string may use anyOf"
        else:
            assert "type" in node, f"{path} has no type"
        assert node.get("default", 0) is not None, f"{path} defaults to null"


def test_strings_and_lists_are_bounded_for_cel_cost(schema: dict[str, Any]) -> None:
    for path, node in walk(schema["properties"]["spec"]):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path}: strings need maxLength or CEL cost estimates explode"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: lists need maxItems"


def test_every_spec_field_is_explained(schema: dict[str, Any]) -> None:
    undocumented = [
        path
        for path, node in walk(schema["properties"]["spec"])
        if path and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert undocumented == [], "add a docstring under these fields so `kubectl explain` helps"


def test_exclusive_bounds_use_the_openapi_v3_0_form(schema: dict[str, Any]) -> None:
    threshold = schema["properties"]["spec"]["properties"]["analysis"]["properties"]["promotionThreshold"]
    assert threshold["minimum"] == 0 and threshold["exclusiveMinimum"] is True and threshold["maximum"] == 1


def test_optional_fields_are_absent_not_nullable(schema: dict[str, Any]) -> None:
    analysis = schema["properties"]["spec"]["properties"]["analysis"]
    assert "nullable" not in analysis["properties"]["maxLatencyP99Ms"]
    assert "default" not in analysis["properties"]["maxLatencyP99Ms"]
    assert set(schema["properties"]["spec"]["required"]) == {"production", "candidate", "database", "outcomes"}


def test_nested_defaults_are_spelled_out(schema: dict[str, Any]) -> None:
    """The API server checks a default against CEL rules without filling nested defaults first."""
    spec = schema["properties"]["spec"]["properties"]
    assert spec["traffic"]["default"] == api.Traffic().to_dict()
    assert spec["analysis"]["default"]["weights"] == {"quality": 0.7, "latency": 0.2, "errors": 0.1}
    assert spec["traffic"]["properties"]["steps"]["default"] == [10]


def test_status_has_no_defaults(schema: dict[str, Any]) -> None:
    assert [path for path, node in walk(schema["properties"]["status"]) if "default" in node] == []


def test_quantities_are_int_or_string(schema: dict[str, Any]) -> None:
    requests = schema["properties"]["spec"]["properties"]["router"]["properties"]["resources"]["properties"]["requests"]
    quantity = requests["additionalProperties"]
    assert quantity["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    # The form of a quantity is a rule with words (ResourceRequirements), not a pattern kubectl would quote.
    assert quantity["x-kubernetes-int-or-string"] is True and "pattern" not in quantity
    assert quantity["maxLength"] == 64


def test_every_rule_of_the_types_is_in_the_crd(schema: dict[str, Any]) -> None:
    in_crd = {
        (validation["rule"], validation["message"])
        for _, node in walk(schema)
        for validation in node.get("x-kubernetes-validations", [])
    }
    declared = {
        (rule.cel, rule.message)
        for model in vars(api).values()
        if isinstance(model, type) and issubclass(model, api.ApiModel)
        for rule in model.__rules__
    }
    assert len(declared) >= 12
    assert in_crd == declared


def test_conditions_are_a_map_keyed_by_type(schema: dict[str, Any]) -> None:
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_printer_columns_point_at_real_fields(schema: dict[str, Any]) -> None:
    names = [column["name"] for column in crd.PRINTER_COLUMNS if not column.get("priority")]
    assert names == ["Mode", "Weight", "Phase", "Ready", "Samples", "Score", "Age"]
    wide = [column["name"] for column in crd.PRINTER_COLUMNS]
    assert wide[:3] == ["Mode", "Step", "Weight"]
    for column in crd.PRINTER_COLUMNS:
        path = column["jsonPath"].replace('[?(@.type=="Ready")]', "[]")
        parts = path.lstrip(".").split(".")
        if parts[0] == "metadata":
            continue
        node = schema
        for part in parts:
            node = node["properties"][part.removesuffix("[]")]
            if part.endswith("[]"):
                node = node["items"]
        expected = {"date": "string", "integer": "integer", "number": "number", "string": "string"}[column["type"]]
        assert node["type"] == expected, column


def test_every_default_is_in_its_description_as_kubectl_explain_shows_it(schema: dict[str, Any]) -> None:
    """kubectl explain prints descriptions, not defaults: each description ends by saying it."""
    spec = schema["properties"]["spec"]
    with_defaults = [(path, node) for path, node in walk(spec) if "default" in node and "properties" not in node]
    assert len(with_defaults) >= 20
    for path, node in with_defaults:
        assert node["description"].endswith(f"Default: {crd._shown(node['default'])}."), path
    analysis = spec["properties"]["analysis"]["properties"]
    assert analysis["minSamples"]["description"].endswith("Default: 100.")
    assert spec["properties"]["traffic"]["properties"]["steps"]["description"].endswith("Default: [10].")
    assert spec["properties"]["paused"]["description"].endswith("Default: false.")


def test_every_allowed_value_is_named_where_kubectl_would_cut_the_list(schema: dict[str, Any]) -> None:
    """kubectl explain's field list shows four enum values, then "....": the description names them all."""
    for path, node in walk(schema):
        if "enum" in node:
            assert all(str(value) in node["description"] for value in node["enum"]), path
    metric = schema["properties"]["spec"]["properties"]["analysis"]["properties"]["metric"]
    assert len(metric["enum"]) > crd.KUBECTL_ENUM_LIMIT
    assert "One of: mae, rmse, accuracy, directionalAccuracy, logLoss." in metric["description"]


def test_cli_check_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd", "--output-dir", str(tmp_path), "--check"]) == 1
    assert "run `make crds`" in capsys.readouterr().err
    assert main(["crd", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / crd.CRD_FILENAME).read_text() == crd.render()
    assert main(["crd", "--output-dir", str(tmp_path), "--check"]) == 0
    (tmp_path / crd.CRD_FILENAME).write_text(crd.render().replace("maxItems: 20", "maxItems: 21"))
    assert main(["crd", "--output-dir", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "-                    maxItems: 21" in err and "+                    maxItems: 20" in err
