"""Fuzzing the admission rules without a cluster: what the types accept, the router and the API server can use.

Random model URLs and resources (strategies in tests/support/fuzz.py, shared with the API-server
comparison in tests/cluster/test_admission.py): every URL the types accept parses the way the router
parses it (scheme, a host, a port from 1 to 65535, no credentials, no link-local address), and every
accepted spec builds children whose router configuration the router's own model reads back.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shadowgate_operator import api, builders
from shadowgate_router.config import RouterConfig
from tests.admission_cases import load_example, merge_patch
from tests.support.fuzz import model_urls, resources

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _example() -> dict[str, Any]:
    return merge_patch(load_example(), {"metadata": {"namespace": "models", "uid": "u-1"}})  # type: ignore[no-any-return]


def _validate(patch: dict[str, Any]) -> api.ShadowDeployment | None:
    document = merge_patch(_example(), patch)  # a deep copy
    try:
        return api.ShadowDeployment.model_validate(document)
    except ValidationError:
        return None


@FUZZ
@given(model_urls())
def test_every_accepted_url_is_one_the_router_can_connect_to(url: str) -> None:
    if api.url_problems(url):
        return
    parts = urlsplit(url)  # what the router's upstream pool does with it
    assert parts.scheme in ("http", "https")
    assert parts.hostname, url
    assert parts.port is None or 1 <= parts.port <= 65535, url
    assert parts.username is None and parts.password is None, url
    assert not parts.query and not parts.fragment, url
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        # A name: its last label is not a number, so no resolver reads it as an IPv4 address.
        assert not parts.hostname.rsplit(".", 1)[-1].isdigit(), url
        assert parts.hostname.lower() not in api.METADATA_HOSTS
        return
    assert not address.is_link_local and not address.is_multicast and not address.is_unspecified, url
    # A literal address connects without a resolver.
    socket.getaddrinfo(parts.hostname, parts.port or 80, flags=socket.AI_NUMERICHOST)


@FUZZ
@given(model_urls())
def test_the_types_refuse_a_url_exactly_when_the_chain_finds_a_problem(url: str) -> None:
    accepted = _validate({"spec": {"candidate": {"service": None, "url": url}}}) is not None
    assert accepted == (api.url_problems(url) == []) or len(url) > 2048


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_urls(), resources(), st.sampled_from(["shadow", "canary"]))
def test_every_accepted_spec_builds_a_router_config_the_router_reads(
    url: str, wanted: dict[str, Any], mode: str
) -> None:
    sd = _validate({"spec": {"candidate": {"service": None, "url": url}, "router": {"resources": wanted}}})
    if sd is None:
        return
    children = builders.router_objects(sd, builders.OperatorSettings(router_image="shadowgate:test"))
    config_map = next(child for child in children if child["kind"] == "ConfigMap")
    config = RouterConfig.from_configmap_data(config_map["data"])
    assert config.candidate.url == url.rstrip("/") and "@" not in config.candidate.url  # no password stored
    container = next(child for child in children if child["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    limits, requests = container["resources"].get("limits", {}), container["resources"].get("requests", {})
    for name, amount in requests.items():
        if name in limits:
            assert api.quantity_value(amount) <= api.quantity_value(limits[name])


def test_quantities_compare_as_kubernetes_rounds_them() -> None:
    assert api.quantity_value("1Gi") == 2**30 and api.quantity_value("500m") * 2 == 1
    assert api.quantity_value("1e3") == api.quantity_value("1k") == 1000
    # Kubernetes keeps nine decimals and rounds up: these two are the same quantity to the API server.
    assert api.quantity_value("1.0000000002") == api.quantity_value("1.0000000001")
    assert api.quantity_value(".5") == api.quantity_value("0.5") == api.quantity_value("500m")
