"""The ShadowDeployment API (shadowgate.io/v1alpha1): the types the CRD is generated from.

Defaults live on the types and derived values are getters on them, so the operator never repeats a
literal default. A cross-field rule is declared once with `@rule`: its CEL goes into the CRD
(``x-kubernetes-validations``, enforced by the API server) and the decorated method runs when Python
validates an object, e.g. one stored before the CRD gained the rule. Field docstrings are the
descriptions `kubectl explain` shows.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from fractions import Fraction as Exact
from itertools import pairwise
from typing import Annotated, Any, ClassVar, Final, Literal, Self, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictBool,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from shadowgate_router.config import DEFAULT_MIRROR_DROP_HEADERS, JSON_PATH_PATTERN
from shadowgate_router.config import Protocol as Protocol  # re-exported: part of this API
from shadowgate_router.config import TrafficMode as TrafficMode

GROUP = "shadowgate.io"
VERSION = "v1alpha1"
API_VERSION: Final = "shadowgate.io/v1alpha1"  # spelled out, not f"{GROUP}/{VERSION}": typed as a Literal
KIND: Final = "ShadowDeployment"
PLURAL = "shadowdeployments"
SINGULAR = "shadowdeployment"
SHORT_NAMES = ("shadow",)
CATEGORIES = ("shadowgate",)

ACTION_ANNOTATION = f"{GROUP}/action"
"""Manual verbs: ``promote``, ``abort`` or ``retry``, optionally ``verb:nonce`` so the same verb can be
asked for again. The operator acts once per distinct value and records it in status.lastAction."""

# Go-style durations as CEL's duration() parses them, limited to the units that make sense here.
# `[.]` rather than `\.` so the same text is valid inside a CEL string literal.
DURATION_PATTERN = r"^([0-9]+([.][0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:[.][0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""DNS-1035 label: what a Service name must be."""
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ROUTER_SUFFIX = "-router"
MAX_NAME_LENGTH = 63 - len(ROUTER_SUFFIX)
"""A ShadowDeployment's children are named ``<name>-router`` and must stay valid Service names."""


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as ``30s``, ``1m30s`` or ``1.5h``; ValueError when malformed."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 1h30m")
    return timedelta(seconds=sum(float(amount) * _UNIT_SECONDS[unit] for amount, unit in _DURATION_PART.findall(text)))


# --- rules: one declaration, enforced by the API server (CEL) and by Python -------------------------


@dataclass(frozen=True)
class Rule:
    """A cross-field invariant: CEL for the CRD, a Python check for objects read back."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None

    def to_schema(self) -> dict[str, str]:
        validation = {"rule": self.cel, "message": self.message}
        if self.field_path:
            validation["fieldPath"] = self.field_path
        return validation


_RULE_ATTRIBUTE = "__shadowgate_rule__"
Check = TypeVar("Check", bound=Callable[[Any], bool])


def rule(cel: str, message: str, *, field_path: str | None = None) -> Callable[[Check], Check]:
    """Declare the decorated method (True = valid) as a rule of its class, with its CEL twin."""

    def mark(check: Check) -> Check:
        setattr(check, _RULE_ATTRIBUTE, Rule(cel=cel, message=message, check=check, field_path=field_path))
        return check

    return mark


def _cel_duration_within(field: str, low: str, high: str) -> str:
    # A malformed duration is already rejected by the field's pattern; without the guard, CEL's
    # duration() would add a confusing evaluation error next to the pattern message.
    return (
        f"!{field}.matches('{DURATION_PATTERN}') || "
        f"(duration({field}) >= duration('{low}') && duration({field}) <= duration('{high}'))"
    )


def _within(text: str | None, low: str, high: str) -> bool:
    return text is None or parse_duration(low) <= parse_duration(text) <= parse_duration(high)


def cel_matches(pattern: str, text: str) -> bool:
    """CEL's ``matches`` in Python: an RE2 search, where a final ``$`` means the end of the text (Python's
    ``$`` would also match before a final newline). The patterns here use only what both engines read alike."""
    if pattern.endswith("$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, text) is not None


# --- model URLs: every accepted URL parses and could be connected to ---------------------------------
# One grammar, read the same by RE2 (CEL) and Python; CEL gets it in raw strings (r'...'), so a
# backslash means to the regex what it means in Python. Checked as a chain: each rule runs only when the ones
# before it hold, so a person sees the first thing wrong with a URL, in words.

_URL_SCHEME = "^https?://"
_DNS_NAME = "[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"
_IPV6_LITERAL = r"\[[0-9A-Fa-f:.]+\]"
_URL_HOST = f"({_DNS_NAME}|{_IPV6_LITERAL})"
_URL_PORT = (
    "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9][0-9]|6[0-4][0-9][0-9][0-9]|[1-5][0-9][0-9][0-9][0-9]"
    "|[1-9][0-9]?[0-9]?[0-9]?)"
)
_URL_PATH = "(/([-A-Za-z0-9._~!$&()*+,;=:@/]|%[0-9A-Fa-f][0-9A-Fa-f])*)?"
# A host whose last label is a number is an IPv4 address to URL parsers and resolvers (inet_aton reads
# 2852039166 and 0xa9fea9fe as 169.254.169.254): it must then be written as one, a.b.c.d.
_NUMERIC_HOST = "([-A-Za-z0-9]*[.])*([0-9]+|0[xX][0-9A-Fa-f]*)"
# The host of a URL the grammar accepted, without url(): the API server estimates the size of
# url(...).getHostname() as unbounded and refuses any rule using it as too costly.
_HOST_CEL = (
    r"(URL.matches(r'^https?://\[') ? URL.find(r'\[[^]]*\]').replace('[', '').replace(']', '')"
    " : URL.split('/')[2].split(':')[0])"
)
METADATA_HOSTS = ("metadata.google.internal", "metadata.goog")
METADATA_ADDRESSES = ("fd00:ec2::254", "100.100.100.200")
"""Cloud metadata services outside the link-local ranges (AWS over IPv6, Alibaba Cloud); the rest
(169.254.169.254 of AWS, GCP, Azure, OpenStack) are link-local and refused as such."""


def _url_hostname(url: str) -> str:
    found = re.match(r"https?://(\[[^\]/?#]*\]|[^:/?#]*)", url)
    host = found.group(1) if found else ""
    return host[1:-1] if host.startswith("[") else host


def _is_ip(text: str) -> bool:
    """CEL's ``isIP``: an IPv4 or IPv6 address, without a zone and not IPv4-mapped."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (isinstance(address, ipaddress.IPv6Address) and (address.ipv4_mapped or address.scope_id))


def _is_ipv6(text: str) -> bool:
    return _is_ip(text) and ipaddress.ip_address(text).version == 6


def _may_connect(host: str) -> bool:
    """Not a link-local, multicast, broadcast or unspecified address, nor a metadata service (loopback is
    allowed: a model server beside the router in its pod)."""
    if host.lower() in METADATA_HOSTS:
        return False
    if not _is_ip(host):
        return True
    address = ipaddress.ip_address(host)
    if address.is_loopback:
        return True
    # Go's netip.Addr.IsGlobalUnicast, which CEL's isGlobalUnicast() calls: private ranges count as unicast.
    unicast = not (
        address.is_unspecified
        or address.is_multicast
        or address.is_link_local
        or address == ipaddress.IPv4Address("255.255.255.255")
    )
    return unicast and address not in {ipaddress.ip_address(metadata) for metadata in METADATA_ADDRESSES}


_ROUTABLE_CEL = (
    f"!({_HOST_CEL}.lowerAscii() in {list(METADATA_HOSTS)})"
    f" && (!isIP({_HOST_CEL}) || ip({_HOST_CEL}).isLoopback() || (ip({_HOST_CEL}).isGlobalUnicast()"
    # cidr(...).containsIP, not ip(...) != ip(...): the API server estimates IP equality as unbounded.
    + "".join(
        f" && !cidr('{address}/{128 if ':' in address else 32}').containsIP({_HOST_CEL})"
        for address in METADATA_ADDRESSES
    )
    + "))"
)

# (CEL condition on URL, the same in Python, the message when it fails), in the order they are checked.
URL_CHECKS: tuple[tuple[str, Callable[[str], bool], str], ...] = (
    (
        f"URL.matches(r'{_URL_SCHEME}')",
        lambda url: cel_matches(_URL_SCHEME, url),
        "url must start with http:// or https://",
    ),
    (
        "!URL.matches(r'^https?://[^/?#]*@')",
        lambda url: not cel_matches("^https?://[^/?#]*@", url),
        "url must not contain a user name or password (user:password@host): the router's ConfigMap would "
        "show it to anyone who may read ConfigMaps in the namespace",
    ),
    (
        "!URL.matches(r'^https?://([:/?#]|$)')",
        lambda url: not cel_matches("^https?://([:/?#]|$)", url),
        "url must name a host, e.g. http://models.example:8080",
    ),
    (
        f"URL.matches(r'^https?://{_URL_HOST}([:/?#]|$)')",
        lambda url: cel_matches(f"^https?://{_URL_HOST}([:/?#]|$)", url),
        "url's host must be a DNS name (letters, digits, '-' and '.'), an IPv4 address, or an IPv6 address "
        "in closed brackets, e.g. http://[fd00::7]:8080",
    ),
    (
        f"!URL.matches(r'^https?://{_URL_HOST}:') || URL.matches(r'^https?://{_URL_HOST}:{_URL_PORT}([/?#]|$)')",
        lambda url: (
            not cel_matches(f"^https?://{_URL_HOST}:", url)
            or cel_matches(f"^https?://{_URL_HOST}:{_URL_PORT}([/?#]|$)", url)
        ),
        "url's port must be a number from 1 to 65535",
    ),
    (
        f"URL.matches(r'^https?://{_URL_HOST}(:{_URL_PORT})?{_URL_PATH}$')",
        lambda url: cel_matches(f"^https?://{_URL_HOST}(:{_URL_PORT})?{_URL_PATH}$", url),
        "url must be a base URL with at most a path (no query ? or fragment #, no spaces), "
        "other characters percent-encoded",
    ),
    (
        rf"!URL.matches(r'^https?://\[') || (isIP({_HOST_CEL}) && ip({_HOST_CEL}).family() == 6)",
        lambda url: not cel_matches(r"^https?://\[", url) or _is_ipv6(_url_hostname(url)),
        "url's host in brackets must be an IPv6 address (not IPv4-mapped), e.g. http://[fd00::7]:8080",
    ),
    (
        f"!URL.matches(r'^https?://{_NUMERIC_HOST}([:/]|$)') || isIP({_HOST_CEL})",
        lambda url: not cel_matches(f"^https?://{_NUMERIC_HOST}([:/]|$)", url) or _is_ip(_url_hostname(url)),
        "url's host ends in a number, so it is read as an IPv4 address, but is not one: "
        "write four numbers from 0 to 255, e.g. http://10.0.0.7:8080",
    ),
    (
        _ROUTABLE_CEL,
        lambda url: _may_connect(_url_hostname(url)),
        "url must not point at a link-local, multicast, broadcast or unspecified address or a cloud "
        "metadata service (169.254.0.0/16, fe80::/10, fd00:ec2::254, 100.100.100.200, metadata.google.internal)",
    ),
)


_URL_GRAMMAR_CHECK = 5
"""Index in URL_CHECKS of the check of the whole grammar (scheme, no credentials, host, port, path)."""


def url_problems(url: str) -> list[str]:
    """What is wrong with a model URL, first problem only (the chain stops there); [] when it is fine."""
    for _cel, check, message in URL_CHECKS:
        if not check(url):
            return [message]
    return []


def _url_rules(field: str) -> tuple[Rule, ...]:
    """The URL chain as rules of the model holding an optional URL in attribute `field` (camelCase on the
    wire and in CEL)."""
    rules, wire = [], to_camel(field)
    for index, (cel, _check, message) in enumerate(URL_CHECKS):
        # The whole-grammar check implies every check before it, and the host checks after it pass
        # whatever the other host checks say: after it, CEL's guard is that check alone (the same
        # chain, at a cost the API server accepts).
        guard = (
            URL_CHECKS[_URL_GRAMMAR_CHECK : _URL_GRAMMAR_CHECK + 1]
            if index > _URL_GRAMMAR_CHECK
            else URL_CHECKS[:index]
        )
        earlier = " && ".join(f"({condition})" for condition, _, _ in guard)
        expression = f"!has(self.{wire})" + (f" || !({earlier})" if earlier else "") + f" || ({cel})"

        def check(model: Any, index: int = index) -> bool:
            url = getattr(model, field)
            if url is None or not all(earlier_check(url) for _, earlier_check, _ in URL_CHECKS[:index]):
                return True
            return URL_CHECKS[index][1](url)

        cel_text = expression.replace("URL", f"self.{wire}")
        rules.append(Rule(cel=cel_text, message=message, check=check, field_path=f".{wire}"))
    return tuple(rules)


class ApiModel(BaseModel):
    """Base of the spec types: camelCase on the wire, unknown fields rejected, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )
    __rules__: ClassVar[tuple[Rule, ...]] = ()

    __declared_rules__: ClassVar[tuple[Rule, ...]] = ()
    """Rules built from data rather than written as methods (e.g. the chain of model URL checks)."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.__rules__ = tuple(
            getattr(member, _RULE_ATTRIBUTE) for member in vars(cls).values() if hasattr(member, _RULE_ATTRIBUTE)
        ) + tuple(vars(cls).get("__declared_rules__", ()))

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        broken = [declared.message for declared in self.__rules__ if not declared.check(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        if cls.__rules__:
            handler.resolve_ref_schema(json_schema)["x-kubernetes-validations"] = [
                declared.to_schema() for declared in cls.__rules__
            ]
        return json_schema

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase, JSON types, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Base of the status types. Unknown fields are ignored: status is read back from the cluster and
    may have been written by another operator version."""

    model_config = ConfigDict(extra="ignore")


# --- field types ------------------------------------------------------------------------------------

Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, max_length=32)]
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]
DnsSubdomain = Annotated[str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)]
Identifier = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", min_length=1, max_length=63)
]
VersionText = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.+]*[A-Za-z0-9])?$", min_length=1, max_length=63)
]
Url = Annotated[str, StringConstraints(max_length=2048)]
"""A model server's base URL; what makes one valid is the chain of rules in URL_CHECKS."""
JsonPath = Annotated[str, StringConstraints(pattern=JSON_PATH_PATTERN, min_length=1, max_length=256)]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_]*$", max_length=128)]
SecretKey = Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]+$", min_length=1, max_length=253)]
Percent = Annotated[int, Field(ge=1, le=100)]
Fraction = Annotated[float, Field(ge=0, le=1)]
QUANTITY_PATTERN = "^([0-9]+([.][0-9]*)?|[.][0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9][0-9]?)?$"
"""A Kubernetes quantity without a sign (requests and limits cannot be negative) and with a short exponent."""
Quantity = int | Annotated[str, StringConstraints(max_length=64)]
"""A Kubernetes resource quantity: ``500m``, ``256Mi``, ``1``."""

_QUANTITY_PARTS = re.compile(r"([0-9]+(?:[.][0-9]*)?|[.][0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9][0-9]?)?")
_QUANTITY_SUFFIXES: Mapping[str, Exact] = {
    "": Exact(1), "n": Exact(1, 10**9), "u": Exact(1, 10**6), "m": Exact(1, 1000),
    "k": Exact(10**3), "M": Exact(10**6), "G": Exact(10**9), "T": Exact(10**12),
    "P": Exact(10**15), "E": Exact(10**18),
    "Ki": Exact(2**10), "Mi": Exact(2**20), "Gi": Exact(2**30), "Ti": Exact(2**40),
    "Pi": Exact(2**50), "Ei": Exact(2**60),
}  # fmt: skip
ROUTER_RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
"""What a router container may ask for: no GPUs, hugepages or extended resources."""


def is_quantity(value: Any) -> bool:
    """What the resources rules accept: a whole number from 0, or a string matching QUANTITY_PATTERN."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and cel_matches(QUANTITY_PATTERN, value)


def quantity_value(value: int | str) -> Exact:
    """The exact amount, rounded up to a billionth as Kubernetes stores it (so `compareTo` agrees)."""
    if isinstance(value, int):
        return Exact(value)
    found = _QUANTITY_PARTS.fullmatch(value)
    if found is None:
        raise ValueError(f"{value!r} is not a quantity like 500m, 256Mi or 1")
    number, suffix = found.group(1), found.group(2) or ""
    if suffix[:1] in ("e", "E"):
        amount = Exact(number) * Exact(10) ** int(suffix[1:])
    else:
        amount = Exact(number) * _QUANTITY_SUFFIXES[suffix]
    return Exact(math.ceil(amount * 10**9), 10**9)


# --- spec -------------------------------------------------------------------------------------------


class ServiceRef(ApiModel):
    """A Kubernetes Service in front of a model server."""

    name: DnsLabel
    """Name of the Service."""
    port: int = Field(ge=1, le=65535)
    """Port of the Service that speaks HTTP."""
    namespace: DnsLabel | None = None
    """Namespace of the Service; defaults to the ShadowDeployment's."""

    def url(self, default_namespace: str) -> str:
        return f"http://{self.name}.{self.namespace or default_namespace}.svc:{self.port}"


class RegisteredModelRef(ApiModel):
    """A version of a registered model in the model registry."""

    name: Annotated[str, StringConstraints(pattern=r"^[^/:%]+$", min_length=1, max_length=256)]
    """The registered model's name, e.g. fraud (MLflow: as in models:/fraud/3)."""
    version: Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,17}$", max_length=18)]
    """Its version number in the registry, e.g. "3" (MLflow numbers versions 1, 2, ...)."""


class ModelEndpoint(ApiModel):
    """A model server: what it serves and where to reach it (exactly one of url or service)."""

    name: Identifier
    """The model's name, recorded with every prediction and shown in metrics."""
    version: VersionText
    """The model's version, recorded with every prediction."""
    model_name: Identifier | None = None
    """The name the model server knows the model by, used in the protocol path
    (/v2/models/{modelName}/infer, /v1/models/{modelName}:predict); defaults to name."""
    url: Url | None = None
    """Base URL of the model server, e.g. http://10.0.0.7:8080 (no query string)."""
    service: ServiceRef | None = None
    """A Service in front of the model server; resolved to http://{name}.{namespace}.svc:{port}."""
    grpc_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of the model server's gRPC endpoint (inference.GRPCInferenceService, plaintext), on the url's
    host or the Service: Triton 8001, MLServer and KServe 8081. Protocol v2 only; without it, gRPC calls
    the router would send to this server fail with UNAVAILABLE."""
    registered_model: RegisteredModelRef | None = None
    """This model's version in the model registry (spec.registry): on promotion the registry's alias moves
    to the candidate's version and both are tagged with the outcome; on rollback the candidate's is tagged."""

    __declared_rules__ = _url_rules("url")

    @rule("has(self.url) != has(self.service)", "set exactly one of url or service")
    def _one_address(self) -> bool:
        return (self.url is None) != (self.service is None)

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.name

    def base_url(self, default_namespace: str) -> str:
        """Where the router sends requests, with Services resolved in default_namespace unless they name one."""
        if self.url is not None:
            return self.url.rstrip("/")
        if self.service is None:  # excluded by _one_address; kept for the type checker
            raise ValueError(f"model endpoint {self.name!r} has neither url nor service")
        return self.service.url(default_namespace)

    def grpc_address(self, default_namespace: str) -> str | None:
        """HOST:PORT of the gRPC endpoint (the url's host or the Service's name), None without grpcPort."""
        if self.grpc_port is None:
            return None
        host = urlsplit(self.base_url(default_namespace)).hostname or ""
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    def same_server(self, other: ModelEndpoint) -> bool:
        """Whether both point at the same server and model name, i.e. would get identical requests."""
        same_address = (self.url is not None and self.url == other.url) or (
            self.service is not None and self.service == other.service
        )
        return same_address and self.served_model_name == other.served_model_name


class PredictionSelector(ApiModel):
    """Where the prediction (and its confidence) sit in a model's JSON answer."""

    path: JsonPath
    """Path to the predicted number, e.g. outputs[0].data[0] or result.score."""
    confidence_path: JsonPath | None = None
    """Path to the model's confidence in its prediction (used by logLoss), e.g. outputs[1].data[0]."""


DEFAULT_PREDICTION_PATHS: Mapping[Protocol, str] = {
    Protocol.V2: "outputs[0].data[0]",
    Protocol.V1: "predictions[0]",
}


class Traffic(ApiModel):
    """How much traffic the candidate sees, step by step."""

    mode: TrafficMode = TrafficMode.SHADOW
    """shadow: mirror requests to the candidate and always answer from production.
    canary: answer the candidate's share of requests from the candidate."""
    steps: list[Percent] = Field(default_factory=lambda: [10], min_length=1, max_length=20)
    """Percent of requests sent to the candidate at each step, strictly increasing, e.g. [5, 10, 20].
    The analysis must pass at every step; after the last one the candidate is promoted."""
    sticky_header: HeaderName | None = None
    """Hash this request header (an account, an instrument) so one key always lands on the same side.
    By default each request is assigned on its own request id."""
    fallback_to_production: StrictBool = True
    """Canary mode: when the candidate fails or times out, answer from production instead."""
    timeout: Duration = "10s"
    """How long the answering model may take before the router gives up (10ms to 5m)."""
    mirror_timeout: Duration = "5s"
    """How long a mirrored candidate call may take before it is recorded as a timeout (10ms to 5m)."""
    mirror_drop_headers: list[HeaderName] = Field(
        default_factory=lambda: list(DEFAULT_MIRROR_DROP_HEADERS), max_length=32
    )
    """Request headers left out of the copies mirrored to the candidate in shadow mode: the client's
    credentials by default (Authorization, Cookie). Add others that carry secrets; set [] to forward
    everything (a candidate that needs the client's credentials to answer)."""

    @rule(
        "self.steps.isSorted() && self.steps.all(s, self.steps.exists_one(t, t == s))",
        "traffic.steps must be strictly increasing, e.g. [5, 10, 20]",
        field_path=".steps",
    )
    def _steps_increase(self) -> bool:
        return all(earlier < later for earlier, later in pairwise(self.steps))

    @rule(
        _cel_duration_within("self.timeout", "10ms", "5m"),
        "traffic.timeout must be between 10ms and 5m",
        field_path=".timeout",
    )
    def _timeout_range(self) -> bool:
        return _within(self.timeout, "10ms", "5m")

    @rule(
        _cel_duration_within("self.mirrorTimeout", "10ms", "5m"),
        "traffic.mirrorTimeout must be between 10ms and 5m",
        field_path=".mirrorTimeout",
    )
    def _mirror_timeout_range(self) -> bool:
        return _within(self.mirror_timeout, "10ms", "5m")

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout).total_seconds()

    @property
    def mirror_timeout_seconds(self) -> float:
        return parse_duration(self.mirror_timeout).total_seconds()


class Metric(StrEnum):
    """The quality metric compared between the two models on scored requests."""

    MAE = "mae"
    RMSE = "rmse"
    ACCURACY = "accuracy"
    DIRECTIONAL_ACCURACY = "directionalAccuracy"
    LOG_LOSS = "logLoss"


class ScoreWeights(ApiModel):
    """Relative weights of the parts of the overall score; normalised to sum to 1."""

    quality: Fraction = 0.7
    """Weight of quality: the relative improvement in the analysis metric, times the evidence for it."""
    latency: Fraction = 0.2
    """Weight of the p99 latency guardrail: 1 when the candidate is no slower than production, 0 at 25%
    slower, -1 at 50% (a faster candidate scores no more than an equal one)."""
    errors: Fraction = 0.1
    """Weight of the error-rate guardrail: 1 when the candidate fails no more often than production, 0 at
    half of maxErrorRate more, -1 at maxErrorRate more (fewer errors score no more than equal ones)."""

    @rule(
        "self.quality + self.latency + self.errors > 0.0",
        "analysis.weights must not all be zero",
    )
    def _some_weight(self) -> bool:
        return self.quality + self.latency + self.errors > 0

    def normalized(self) -> tuple[float, float, float]:
        """(quality, latency, errors) scaled to sum to 1."""
        total = self.quality + self.latency + self.errors
        return self.quality / total, self.latency / total, self.errors / total


class SegmentBy(ApiModel):
    """Where a request's segment (an instrument, a market, a customer tier) is read from: exactly one of
    header or path. The router records it with every prediction."""

    header: HeaderName | None = None
    """A request header, e.g. X-Instrument."""
    path: JsonPath | None = None
    """A path into the JSON request body, e.g. parameters.instrument or inputs[5].data[0]."""

    @rule("has(self.header) != has(self.path)", "segmentBy: set exactly one of header or path")
    def _one_source(self) -> bool:
        return (self.header is None) != (self.path is None)


class Analysis(ApiModel):
    """How the candidate is judged at each step."""

    interval: Duration = "30s"
    """How often the outcomes are scored and a decision is taken (5s to 60s)."""
    min_samples: int = Field(default=100, ge=1, le=100_000_000)
    """Scored requests (predictions with an outcome) needed before the candidate can pass or fail on
    quality: scored pairs in shadow mode, counted since the analysis began (every shadow step asks the same
    question, so evidence carries over); the candidate's scored requests in canary mode, counted since the
    step began."""
    metric: Metric = Metric.MAE
    """The quality metric: mae, rmse or logLoss (lower is better); accuracy or directionalAccuracy.
    accuracy, directionalAccuracy and logLoss have bounded per-request losses (0/1; logLoss capped at
    lossCap, 9.21 by default), so promotion and rollback use a test that is exact at every sample size.
    mae and rmse are unbounded unless lossCap is set: their test is asymptotic and assumes a finite variance
    and no rare loss large enough that 50 scored requests would usually miss it (README, "How the operator
    decides")."""
    loss_cap: float | None = Field(default=None, gt=0, le=1e12)
    """Cap each request's loss at this value (mae: the absolute error, rmse: the squared error, logLoss:
    -ln of the probability given to the outcome; ignored by the accuracies, whose losses are 0 or 1). With
    a cap the losses are bounded and the test is exact at every sample size; the smaller the cap (within
    what real losses reach), the sooner it decides (bench/decision). logLoss is capped at 9.21 unless set
    (a probability clipped at 1e-4; at most 34.5, the 1e-15 clip). Unset for mae and rmse: no cap, the
    asymptotic test."""
    promotion_threshold: float = Field(default=0.7, gt=0, le=1)
    """Overall score at or above which a significant step passes."""
    rollback_threshold: float = Field(default=0.3, gt=0, le=1)
    """The candidate is rolled back when the overall score is at or below minus this value."""
    weights: ScoreWeights = Field(default_factory=ScoreWeights)
    """Relative weights of quality, latency and errors in the overall score."""
    max_error_rate: Fraction = 0.05
    """Hard gate: the candidate is rolled back at once when its error rate is shown to be above this (at
    gateConfidence), in the current step."""
    max_latency_p99_ms: float | None = Field(default=None, gt=0)
    """Hard gate: the candidate is rolled back at once when its p99 latency is shown to be above this many
    milliseconds (more than 1% of its requests slower, at gateConfidence), in the current step."""
    latency_tolerance_ms: float = Field(default=5.0, ge=0, le=60_000)
    """The latency guardrail counts a p99 slowdown only beyond this many milliseconds (and only as far as it
    is established): a few milliseconds of p99 are not a regression users feel."""
    confidence: float = 0.99
    """Confidence of the sequential significance test a step must pass, from 0.5 to 0.9999 (0.99 = 1% false
    promotions)."""
    rollback_confidence: float = 0.95
    """Confidence with which the candidate must be shown worse on quality to be rolled back, from 0.5 to
    0.9999: an identical candidate is rolled back at most 1 - rollbackConfidence of the time (5%), however
    often it is looked at. The test weighs regressions of 5% of the loss and more: one below about 2.5% is
    not rolled back on quality (its step times out instead, inconclusive)."""
    segment_by: SegmentBy | None = None
    """Compare the models per segment too (an instrument, a market): promotion then also needs every segment
    with at least minSamples scored requests or at least 10% of them (the 10 largest) to be shown, at
    confidence, no more than segmentTolerance worse than production. Status shows the largest segments.
    Unset: no segments."""
    segment_tolerance: float = Field(default=0.05, ge=0, le=1)
    """How much worse than production (relative to production's loss in the segment) a segment may be
    and still let the candidate pass: 0.05 = 5%."""
    gate_confidence: float = 0.99
    """Confidence with which a hard gate (maxErrorRate, maxLatencyP99Ms) must be shown exceeded to roll back,
    from 0.5 to 0.9999: a candidate within its gates trips each at most 1 - gateConfidence of the time (1%)."""
    max_step_duration: Duration | None = None
    """Give up on a step that is still undecided after this long (rolled back); unset waits forever."""
    require_approval: StrictBool = False
    """Hold a candidate that passed its last step until a person approves (`kubectl shadow promote`, i.e. the
    shadowgate.io/action=promote annotation): it keeps its share and is still analysed meanwhile, so it is
    still rolled back if it turns bad; an AwaitingApproval Event (and notification) says it is waiting."""

    # A rule, not minimum/maximum: "should be less than or equal to 0.9999" (or "... to 0" where a server
    # prints the bound as an integer) does not tell a person why 1 is refused.
    @rule(
        "self.confidence >= 0.5 && self.confidence <= 0.9999",
        "analysis.confidence must be from 0.5 to 0.9999 (0.99 = 1% false promotions); "
        "1 would ask for certainty, which no amount of data gives, so nothing would ever be promoted",
        field_path=".confidence",
    )
    def _confidence_range(self) -> bool:
        return 0.5 <= self.confidence <= 0.9999

    @rule(
        "self.rollbackConfidence >= 0.5 && self.rollbackConfidence <= 0.9999",
        "analysis.rollbackConfidence must be from 0.5 to 0.9999 (0.95 = an identical candidate rolled back at "
        "most 5% of the time)",
        field_path=".rollbackConfidence",
    )
    def _rollback_confidence_range(self) -> bool:
        return 0.5 <= self.rollback_confidence <= 0.9999

    @rule(
        "self.gateConfidence >= 0.5 && self.gateConfidence <= 0.9999",
        "analysis.gateConfidence must be from 0.5 to 0.9999 (0.99 = a candidate within its gates trips one at "
        "most 1% of the time)",
        field_path=".gateConfidence",
    )
    def _gate_confidence_range(self) -> bool:
        return 0.5 <= self.gate_confidence <= 0.9999

    @rule(
        _cel_duration_within("self.interval", "5s", "60s"),
        "analysis.interval must be between 5s and 60s",
        field_path=".interval",
    )
    def _interval_range(self) -> bool:
        return _within(self.interval, "5s", "60s")

    @rule(
        f"!has(self.maxStepDuration) || {_cel_duration_within('self.maxStepDuration', '5s', '720h')}",
        "analysis.maxStepDuration must be between 5s and 720h",
        field_path=".maxStepDuration",
    )
    def _step_duration_range(self) -> bool:
        return _within(self.max_step_duration, "5s", "720h")

    @rule(
        f"!has(self.maxStepDuration) || !self.maxStepDuration.matches('{DURATION_PATTERN}')"
        f" || !self.interval.matches('{DURATION_PATTERN}')"
        " || duration(self.maxStepDuration) >= duration(self.interval)",
        "analysis.maxStepDuration must be at least one analysis.interval",
        field_path=".maxStepDuration",
    )
    def _step_outlasts_interval(self) -> bool:
        return self.max_step_duration is None or parse_duration(self.max_step_duration) >= parse_duration(self.interval)

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval).total_seconds()

    @property
    def max_step_seconds(self) -> float | None:
        return None if self.max_step_duration is None else parse_duration(self.max_step_duration).total_seconds()


def _cel_quantity(value: str) -> str:
    """CEL twin of `is_quantity` for an int-or-string value."""
    return f"(type({value}) == int ? {value} >= 0 : ({value}.matches('{QUANTITY_PATTERN}') && isQuantity({value})))"


DEFAULT_ROUTER_REQUESTS: Mapping[str, Quantity] = {"cpu": "100m", "memory": "128Mi"}


class ResourceRequirements(ApiModel):
    """CPU and memory for each router container."""

    requests: dict[str, Quantity] = Field(default_factory=lambda: dict(DEFAULT_ROUTER_REQUESTS), max_length=16)
    """Resources reserved for the container, e.g. {cpu: 100m, memory: 128Mi}."""
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    """Resources the container may not exceed, e.g. {memory: 256Mi}."""

    @rule(
        f"self.requests.all(k, k in {list(ROUTER_RESOURCE_NAMES)})"
        f" && self.limits.all(k, k in {list(ROUTER_RESOURCE_NAMES)})",
        "router.resources may name only cpu, memory and ephemeral-storage",
    )
    def _known_names(self) -> bool:
        return all(name in ROUTER_RESOURCE_NAMES for name in [*self.requests, *self.limits])

    @rule(
        f"self.requests.all(k, {_cel_quantity('self.requests[k]')})"
        f" && self.limits.all(k, {_cel_quantity('self.limits[k]')})",
        "router.resources amounts must be Kubernetes quantities from 0, e.g. 500m, 256Mi or 1 (no sign)",
    )
    def _valid_amounts(self) -> bool:
        return all(is_quantity(value) for value in [*self.requests.values(), *self.limits.values()])

    @rule(
        "self.requests.all(k, !(k in self.limits)"
        f" || !({_cel_quantity('self.requests[k]')}) || !({_cel_quantity('self.limits[k]')})"
        " || quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
        "router.resources.requests must not exceed router.resources.limits (e.g. requests.memory <= limits.memory)",
    )
    def _requests_within_limits(self) -> bool:
        return all(
            name not in self.limits
            or not is_quantity(amount)
            or not is_quantity(self.limits[name])
            or quantity_value(amount) <= quantity_value(self.limits[name])
            for name, amount in self.requests.items()
        )


class RouterSpec(ApiModel):
    """The router Deployment the operator runs in front of both model servers."""

    replicas: int = Field(default=2, ge=1, le=50)
    """Router pods; each one routes, records and accepts outcomes."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU and memory requests and limits of the router container."""
    image: Annotated[str, StringConstraints(pattern=r"^\S+$", max_length=512)] | None = None
    """Router image; defaults to the image the operator was deployed with."""


class DsnSecretRef(ApiModel):
    """A key of a Secret in the ShadowDeployment's namespace holding a PostgreSQL DSN."""

    name: DnsSubdomain
    """Name of the Secret."""
    key: SecretKey = "dsn"
    """Key in the Secret whose value is the DSN, e.g. postgresql://user:pass@host:5432/db."""


class TokenSecretRef(ApiModel):
    """A key of a Secret in the ShadowDeployment's namespace holding a bearer token."""

    name: DnsSubdomain
    """Name of the Secret."""
    key: SecretKey = "token"
    """Key in the Secret whose value is the token."""


class DatabaseSpec(ApiModel):
    """The TimescaleDB (or PostgreSQL) database that stores predictions and outcomes."""

    secret_ref: DsnSecretRef
    """The Secret key holding the DSN; the router reads it from its environment."""


class RegistryCredentialsRef(ApiModel):
    """A Secret in the ShadowDeployment's namespace holding the registry's credentials: key `token` (a bearer
    token), or keys `username` and `password` (MLflow's basic auth), as MLFLOW_TRACKING_TOKEN or
    MLFLOW_TRACKING_USERNAME/_PASSWORD would give the MLflow client."""

    name: DnsSubdomain
    """Name of the Secret."""


class MlflowSpec(ApiModel):
    """An MLflow tracking server whose model registry holds the models."""

    tracking_uri: Url
    """The tracking server's URL, e.g. http://mlflow.mlops:5000 (the registry's REST API is under it)."""
    credentials_secret_ref: RegistryCredentialsRef | None = None
    """Where its credentials are, if it asks for any."""

    __declared_rules__ = _url_rules("tracking_uri")


ALIAS_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$"


class RegistrySpec(ApiModel):
    """The model registry told of the outcome: which version serves after a promotion (its alias), and the
    outcome and reason as tags of both versions. Written after the traffic change, retried with backoff,
    never holding the rollout; failures show as the NotificationsDelivered condition (receiver registry)."""

    mlflow: MlflowSpec
    """MLflow's model registry (open source or managed), through its REST API."""
    alias: Annotated[str, StringConstraints(pattern=ALIAS_PATTERN, max_length=255)] = "champion"
    """The alias naming the serving version: moved to the candidate's version on promotion."""

    @rule(
        "self.alias != 'latest' && !self.alias.matches('^[vV][0-9]+$')",
        "registry.alias must not be latest or v<number>: MLflow keeps those for versions",
        field_path=".alias",
    )
    def _alias_not_reserved(self) -> bool:
        return self.alias != "latest" and re.fullmatch(r"[vV][0-9]+", self.alias) is None


class OutcomesSpec(ApiModel):
    """How late outcomes reach the router's POST /outcomes."""

    token_secret_ref: TokenSecretRef
    """Clients must send this token as `Authorization: Bearer <token>`."""


EVENT_REASON_PATTERN = r"^[A-Z][A-Za-z0-9]*$"
EventReason = Annotated[str, StringConstraints(pattern=EVENT_REASON_PATTERN, max_length=128)]
"""The reason of a transition's Event: AnalysisStarted, StepAdvanced, Promoted, RolledBack, Failed, ..."""


class NotificationFormat(StrEnum):
    """What a notification receiver expects."""

    CLOUDEVENTS = "cloudevents"
    """A CloudEvents 1.0 event in structured JSON mode (Content-Type application/cloudevents+json)."""
    SLACK = "slack"
    """A Slack incoming webhook's payload (text and blocks); Mattermost and Rocket.Chat read it too."""


class UrlSecretRef(ApiModel):
    """A key of a Secret in the ShadowDeployment's namespace holding a receiver's URL (a Slack webhook
    URL is a credential)."""

    name: DnsSubdomain
    """Name of the Secret."""
    key: SecretKey = "url"
    """Key in the Secret whose value is the URL, e.g. https://hooks.slack.com/services/T0/B0/XXXX."""


class NotificationTarget(ApiModel):
    """A receiver told of each transition (at least once; each message carries an id for dropping
    duplicates)."""

    name: Identifier
    """Names the receiver in the operator's metrics and logs; unique within spec.notifications."""
    format: NotificationFormat = NotificationFormat.CLOUDEVENTS
    """cloudevents (any CloudEvents receiver: Knative, Argo Events, an HTTP endpoint of yours) or slack."""
    url_secret_ref: UrlSecretRef
    """The Secret key holding the receiver's URL; read when a message is sent, so a rotated URL is used
    from the next message on."""
    events: list[EventReason] = Field(default_factory=list, max_length=16)
    """Only these transitions (Event reasons, e.g. [Promoted, RolledBack]); empty: all of them."""

    def wants(self, reason: str) -> bool:
        return not self.events or reason in self.events


class GateType(StrEnum):
    """When a gate is asked (the moments Flagger calls pre-rollout, confirm-traffic-increase, confirm-promotion
    and post-rollout)."""

    PRE_ROLLOUT = "preRollout"
    """Before the candidate gets any traffic: a new ShadowDeployment, a new candidate, a retry. Held: phase
    Pending, the router sends the candidate nothing."""
    CONFIRM_STEP = "confirmStep"
    """Before each step advance (the analysis passed the step). Held: the candidate keeps its step's share and
    is still analysed, so it is still rolled back if it turns bad."""
    CONFIRM_PROMOTION = "confirmPromotion"
    """Before promotion (the analysis passed the last step), and before analysis.requireApproval's wait. Held
    like confirmStep. A person's `kubectl shadow promote` is not asked about."""
    POST_ROLLBACK = "postRollback"
    """After a rollback (by the analysis or by hand), once the router sends the candidate nothing: told, its
    answer shown; the rollback stands whatever it answers, and it is not asked again."""


class GateTimeoutAction(StrEnum):
    """What a gate that does not answer within its timeout means."""

    HOLD = "hold"
    """The rollout stays where it is, as if the gate had said no, and the gate is asked again later."""
    PROCEED = "proceed"
    """The rollout goes on, as if the gate had said yes (the timeout is still shown)."""


class Gate(ApiModel):
    """A webhook the operator asks before a move of the rollout (or tells after a rollback): a POST of a
    CloudEvents 1.0 event (structured JSON, type io.shadowgate.gate.<type>, the same data as a notification
    plus `gate`). A 2xx answer lets the rollout through; any other answer (the first 200 characters of its
    body are shown), a refused connection or a timeout holds it where it is: the GatesOpen condition is False
    with the answer, a Warning Event says it once, and the gate is asked again at the next analysis
    interval (not more often), until it says yes."""

    name: Identifier
    """Names the gate in conditions, Events and logs; unique within spec.gates."""
    type: GateType
    """preRollout, confirmStep, confirmPromotion or postRollback."""
    url_secret_ref: UrlSecretRef
    """The Secret key holding the gate's URL (the Secret must be labelled shadowgate.io/router-secret=true,
    like every Secret a ShadowDeployment names); read at each call, so a rotated URL is used at once."""
    timeout: Duration = "10s"
    """How long the operator waits for the gate's whole answer (connect, send, answer), from 1s to 30s."""
    on_timeout: GateTimeoutAction = GateTimeoutAction.HOLD
    """hold: no answer in time holds the rollout (asked again at the next interval); proceed: no answer in time
    lets it through."""

    @rule(
        _cel_duration_within("self.timeout", "1s", "30s"),
        "gates[].timeout must be between 1s and 30s",
        field_path=".timeout",
    )
    def _timeout_range(self) -> bool:
        return _within(self.timeout, "1s", "30s")

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout).total_seconds()


class ShadowDeploymentSpec(ApiModel):
    """The desired rollout of a candidate model beside the production model."""

    production: ModelEndpoint
    """The model serving today; its answer is returned unless the candidate is canaried or promoted."""
    candidate: ModelEndpoint
    """The model under evaluation. Changing it (or production) restarts the analysis."""
    protocol: Protocol = Protocol.V2
    """v2 (Open Inference Protocol: KServe, Triton, MLServer), v1 ({"instances"} in, {"predictions"} out)
    or json (any JSON API, read through prediction.path)."""
    prediction: PredictionSelector | None = None
    """Where the prediction is in an answer; required for protocol json. Defaults: v2 outputs[0].data[0],
    v1 predictions[0]."""
    traffic: Traffic = Field(default_factory=Traffic)
    """Shadow or canary, and the percent of requests the candidate sees at each step."""
    analysis: Analysis = Field(default_factory=Analysis)
    """How often and on what the candidate is judged, and the gates that roll it back at once."""
    router: RouterSpec = Field(default_factory=RouterSpec)
    """The router Deployment in front of both models."""
    database: DatabaseSpec
    """Where predictions and outcomes are stored."""
    outcomes: OutcomesSpec
    """How clients authenticate when they post outcomes."""
    paused: StrictBool = False
    """Freeze the rollout: traffic stays where it is and no decision is taken until unpaused."""
    notifications: list[NotificationTarget] = Field(default_factory=list, max_length=8)
    """Receivers told of each transition (analysis started, step advanced, promoted, rolled back, failed,
    paused, manual actions): CloudEvents or Slack webhooks, delivered at least once, retried with backoff,
    never delaying a decision."""
    registry: RegistrySpec | None = None
    """The model registry to write the outcome back to (needs candidate.registeredModel)."""
    gates: list[Gate] = Field(default_factory=list, max_length=8)
    """Webhooks asked before the rollout moves (preRollout, confirmStep, confirmPromotion) and told after a
    rollback (postRollback); a gate that does not answer 2xx holds the rollout until it does. Empty: no
    gates."""

    @rule(
        "has(self.registry) == has(self.candidate.registeredModel)",
        "registry and candidate.registeredModel go together: the registry needs the candidate's registered "
        "model and version to write the outcome to, and a registeredModel needs spec.registry to say where",
    )
    def _registry_needs_model(self) -> bool:
        return (self.registry is None) == (self.candidate.registered_model is None)

    @rule(
        "!has(self.notifications) || self.notifications.all(n, self.notifications.exists_one(m, m.name == n.name))",
        "each receiver in notifications needs its own name",
        field_path=".notifications",
    )
    def _notification_names_unique(self) -> bool:
        names = [target.name for target in self.notifications]
        return len(names) == len(set(names))

    @rule(
        "!has(self.gates) || self.gates.all(g, self.gates.exists_one(h, h.name == g.name))",
        "each gate in gates needs its own name",
        field_path=".gates",
    )
    def _gate_names_unique(self) -> bool:
        names = [gate.name for gate in self.gates]
        return len(names) == len(set(names))

    @rule(
        "self.protocol != 'json' || has(self.prediction)",
        "protocol json needs prediction.path: where the predicted number is in the model's answer",
    )
    def _json_needs_path(self) -> bool:
        return self.protocol is not Protocol.JSON or self.prediction is not None

    @rule(
        "self.protocol == 'v2' || (!has(self.production.grpcPort) && !has(self.candidate.grpcPort))",
        "grpcPort is for protocol v2 (gRPC is the Open Inference Protocol's inference.GRPCInferenceService)",
    )
    def _grpc_needs_v2(self) -> bool:
        return self.protocol is Protocol.V2 or (self.production.grpc_port is None and self.candidate.grpc_port is None)

    @rule(
        "self.candidate.version != self.production.version",
        "candidate.version must differ from production.version",
    )
    def _versions_differ(self) -> bool:
        return self.candidate.version != self.production.version

    # `namespace` is a CEL reserved word: CEL reaches the field as `__namespace__`.
    @rule(
        "!((has(self.candidate.url) && has(self.production.url) && self.candidate.url == self.production.url)"
        " || (has(self.candidate.service) && has(self.production.service)"
        " && self.candidate.service.name == self.production.service.name"
        " && self.candidate.service.port == self.production.service.port"
        " && has(self.candidate.service.__namespace__) == has(self.production.service.__namespace__)"
        " && (!has(self.candidate.service.__namespace__)"
        " || self.candidate.service.__namespace__ == self.production.service.__namespace__)))"
        " || (has(self.candidate.modelName) ? self.candidate.modelName : self.candidate.name)"
        " != (has(self.production.modelName) ? self.production.modelName : self.production.name)",
        "candidate and production point at the same server and model; "
        "give the candidate its own url/service or modelName",
    )
    def _endpoints_differ(self) -> bool:
        return not self.candidate.same_server(self.production)

    @property
    def prediction_path(self) -> str:
        if self.prediction is not None:
            return self.prediction.path
        return DEFAULT_PREDICTION_PATHS[self.protocol]

    @property
    def confidence_path(self) -> str | None:
        return None if self.prediction is None else self.prediction.confidence_path

    def analysis_revision(self) -> str:
        """Hash of the settings the quality evidence depends on: evidence gathered under other settings
        answers another question (an MAE p-value says nothing about log loss), so a change restarts it."""
        compared = {
            "metric": self.analysis.metric.value,
            "lossCap": self.analysis.loss_cap,
            "mode": self.traffic.mode.value,
            "stickyHeader": self.traffic.sticky_header,
            "fallbackToProduction": self.traffic.fallback_to_production,
            "segmentBy": self.analysis.segment_by.to_dict() if self.analysis.segment_by else None,
            "segmentTolerance": self.analysis.segment_tolerance,
        }
        return hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest()[:16]

    def candidate_revision(self) -> str:
        """Hash of what is being compared; status keeps it, and a new value restarts the analysis."""
        compared = self.model_dump(
            mode="json", by_alias=True, exclude_none=True, include={"production", "candidate", "protocol", "prediction"}
        )
        return hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest()[:16]


# --- status -----------------------------------------------------------------------------------------


class Phase(StrEnum):
    """Where the rollout is."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    PAUSED = "Paused"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        """No more analysis happens until the spec changes or someone asks for a retry."""
        return self in (Phase.PROMOTED, Phase.ROLLED_BACK, Phase.FAILED)


class ConditionType(StrEnum):
    """The conditions a ShadowDeployment reports."""

    READY = "Ready"
    PROGRESSING = "Progressing"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    NOTIFICATIONS_DELIVERED = "NotificationsDelivered"
    """Set when spec.notifications names receivers: False while deliveries to one keep failing."""
    GATES_OPEN = "GatesOpen"
    """Set when spec.gates names gates: False while one holds the rollout (or a postRollback gate failed)."""


class ConditionStatus(StrEnum):
    """Whether a condition holds."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StatusModel):
    """One aspect of the current state, in the Kubernetes conditions convention."""

    type: ConditionType
    status: ConditionStatus
    reason: Annotated[
        str, StringConstraints(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", min_length=1, max_length=1024)
    ]
    """A CamelCase word a program can match on."""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    """The same in words for a person."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The spec generation this condition was computed from."""
    last_transition_time: AwareDatetime
    """When status last changed."""


class ModelMetrics(StatusModel):
    """One model's numbers over the current step's window."""

    metric_value: float | None = None
    """The analysis metric (e.g. MAE) on scored requests."""
    error_rate: float | None = Field(default=None, ge=0, le=1)
    """Share of requests that failed or timed out."""
    latency_p50_ms: float | None = Field(default=None, ge=0)
    latency_p99_ms: float | None = Field(default=None, ge=0)


class ScoreComponents(StatusModel):
    """The parts of the overall score before weighting, each from -1 to 1."""

    quality: float = Field(ge=-1, le=1)
    """Relative improvement on the analysis metric over 5% (1 at 5% better or more, -1 at 5% worse),
    times the evidence for it (1 - its always-valid p-value): 0 until the difference is established."""
    latency: float = Field(ge=-1, le=1)
    """p99 guardrail: 1 when the candidate is no slower than production, 0 at 25% slower, -1 at 50%."""
    errors: float = Field(ge=-1, le=1)
    """Error guardrail: 1 when the candidate fails no more often than production, 0 at half of
    maxErrorRate more, -1 at maxErrorRate more."""


class QualityTest(StrEnum):
    """Which sequential test the quality p-values come from (stats.py)."""

    BETTING = "Betting"
    """Bounded losses, requests assigned one by one: exact at every sample size."""
    NORMAL_MIXTURE = "NormalMixture"
    """Unbounded losses: asymptotic, valid as the scored requests grow."""
    CLUSTERED_NORMAL_MIXTURE = "ClusteredNormalMixture"
    """A sticky key groups requests: asymptotic in the number of keys, variance clustered by key."""


class SegmentResult(StatusModel):
    """One segment (spec.analysis.segmentBy) in the latest analysis."""

    name: Annotated[str, StringConstraints(max_length=128)]
    """The segment's value ("(none)": requests without one; "(other)": values beyond the tracked ones)."""
    samples: int = Field(ge=0)
    """Scored pairs (shadow) or the smaller side's scored requests (canary) in the segment."""
    improvement: float | None = None
    """Relative improvement of the candidate in the segment (0.1 = 10% better)."""
    judged: bool = False
    """Whether the segment has enough data to hold promotion back (minSamples, and among the 10 largest)."""
    within_tolerance: bool | None = None
    """Judged segments: whether the candidate is shown no more than segmentTolerance worse in it."""
    p_value: float | None = Field(default=None, ge=0, le=1)
    """Always-valid p-value of "the candidate is more than segmentTolerance worse in this segment"."""


class AnalysisMetrics(StatusModel):
    """The latest analysis of the current step."""

    step: int | None = Field(default=None, ge=0, le=19)
    """The step (index into spec.traffic.steps) these metrics were measured in."""
    production: ModelMetrics | None = None
    candidate: ModelMetrics | None = None
    improvement: float | None = None
    """Relative improvement of the candidate on the analysis metric (0.1 = 10% better); for accuracy
    and directionalAccuracy, the relative reduction of the error rate (1 - accuracy)."""
    overall_score: float | None = Field(default=None, ge=-1, le=1)
    """Weighted score of quality, latency and errors, from -1 to 1; compared with the thresholds."""
    score_components: ScoreComponents | None = None
    """The parts of the overall score before weighting."""
    p_value: float | None = Field(default=None, ge=0, le=1)
    """Always-valid p-value of the candidate being better on quality (the smallest of the step so far); none
    until an analysis had minSamples."""
    p_value_worse: float | None = Field(default=None, ge=0, le=1)
    """Always-valid p-value of the candidate being worse on quality (the smallest of the step so far)."""
    agreement: float | None = Field(default=None, ge=0, le=1)
    """Share of paired requests where both models predicted the same (shadow mode)."""
    test: QualityTest | None = None
    """The test the p-values come from: Betting (exact), NormalMixture or ClusteredNormalMixture (asymptotic)."""
    units: int | None = Field(default=None, ge=0)
    """The independent units behind the quality test: scored requests, or sticky keys (the smaller side's in
    canary mode)."""
    quarantined: int | None = Field(default=None, ge=0)
    """Scored requests left out because a prediction or outcome was not a sane finite number."""
    unscored_repeats: int | None = Field(default=None, ge=0)
    """Predictions left unscored because their request id was scored already, or because they were made
    after their outcome was known: what replaying published outcomes' ids would have moved."""
    segments: list[SegmentResult] = Field(default_factory=list, max_length=10)
    """With spec.analysis.segmentBy: the largest segments."""


class CanaryBets(StatusModel):
    """The canary betting test's state (stats.TwoArmBets): each list is n and the sums of x, x^2, x^3, x^4."""

    production: list[float] = Field(default_factory=list, max_length=5)
    """Production's losses up to the previous analysis."""
    candidate: list[float] = Field(default_factory=list, max_length=5)
    """The candidate's losses up to the previous analysis."""
    centre: float | None = None
    """The pooled mean loss up to the previous analysis, the next bets' centre."""
    better: list[float] = Field(default_factory=list, max_length=5)
    """Accumulated scaled sums betting on the candidate being better."""
    worse: list[float] = Field(default_factory=list, max_length=5)
    """Accumulated scaled sums betting on the candidate being worse."""


class EvidenceState(StatusModel):
    """The sequential tests' running state, carried from one analysis to the next while the question stays
    the same: across shadow steps, within a canary step; reset when the candidate or the analysis settings
    change."""

    since: AwareDatetime
    """Start of the window the evidence is about (the analysis's start in shadow mode, the step's in canary)."""
    p_better: float = Field(default=1.0, ge=0, le=1)
    """Running minimum of the always-valid p-value of the candidate being better."""
    p_worse: float = Field(default=1.0, ge=0, le=1)
    """Running minimum of the always-valid p-value of the candidate being worse."""
    bets: CanaryBets | None = None
    """Canary mode with bounded losses: the betting test's state."""


class DecisionAction(StrEnum):
    """What an analysis decided."""

    WAIT = "Wait"
    ADVANCE = "Advance"
    PROMOTE = "Promote"
    ROLL_BACK = "RollBack"
    RESTART = "Restart"
    FAIL = "Fail"  # the candidate could not be judged (too few outcomes by maxStepDuration): phase Failed


class Decision(StatusModel):
    """The last decision and why, in words."""

    action: DecisionAction
    reason: Annotated[str, StringConstraints(max_length=4096)]
    """Why, in words: the numbers and the thresholds they were compared with."""
    time: AwareDatetime
    """When the decision last changed (its action or its reason), not when it was last checked: an analysis
    that decides the same again leaves the decision as it was, so an idle rollout's status is not rewritten
    at each interval."""


class ActionVerb(StrEnum):
    """Manual verbs accepted through the shadowgate.io/action annotation."""

    PROMOTE = "promote"
    ABORT = "abort"
    RETRY = "retry"


class HandledAction(StatusModel):
    """The last manual action the operator carried out (so each annotation value is acted on once)."""

    value: Annotated[str, StringConstraints(max_length=256)]
    """The annotation's value, nonce included."""
    verb: ActionVerb
    time: AwareDatetime


class EventType(StrEnum):
    """The type of a Kubernetes Event."""

    NORMAL = "Normal"
    WARNING = "Warning"


CAMEL_CASE_REASON = r"^[A-Z][A-Za-z0-9]*$"


class AnnouncedEvent(StatusModel):
    """One Event of a transition, as the operator posts it."""

    type: EventType
    reason: Annotated[str, StringConstraints(pattern=CAMEL_CASE_REASON, max_length=128)]
    """AnalysisStarted, StepAdvanced, Promoted, RolledBack, Failed, GateFailed, Paused, Resumed, ..."""
    message: Annotated[str, StringConstraints(max_length=1024)]


class AnalysedStep(StatusModel):
    """The step an analysis judged when it decided a transition (for its deployment_metrics row)."""

    step: int = Field(ge=0, le=19)
    weight: int = Field(ge=0, le=100)
    samples: int = Field(ge=0)
    """Scored requests the analysis counted."""


class Transition(StatusModel):
    """The latest transition (a new analysis, step, phase or manual verb) and the Events announcing it.

    It is written with the status it led to, before anything else: the operator then posts its Events
    and writes its deployment_events (and deployment_metrics) rows under names and times derived from
    `sequence` and `time`, and does so again after a restart or when a standby replica takes over. The
    API server and the database keep the first copy, so none is lost and none is doubled."""

    sequence: int = Field(ge=1)
    """1 for the first transition of this object, then one more for each."""
    time: AwareDatetime
    """When it was decided (with sub-second precision: it orders the history rows)."""
    action: Annotated[str, StringConstraints(max_length=256)] | None = None
    """The shadowgate.io/action value this transition carried out or ignored, if any."""
    analysed: AnalysedStep | None = None
    """The step an analysis judged, when an analysis decided this transition."""
    events: list[AnnouncedEvent] = Field(default_factory=list, max_length=8)


class GateOutcome(StrEnum):
    """How a gate answered."""

    PASSED = "Passed"
    """A 2xx answer."""
    REFUSED = "Refused"
    """Any other HTTP answer (a redirect is not followed)."""
    TIMED_OUT = "TimedOut"
    """No whole answer within the gate's timeout."""
    UNREACHABLE = "Unreachable"
    """No answer: no connection, no URL in its Secret, a URL the operator does not post to."""
    NOT_ALLOWED = "NotAllowed"
    """Its Secret is not labelled shadowgate.io/router-secret=true: not called."""


class GateAnswer(StatusModel):
    """One gate's latest answer."""

    name: Annotated[str, StringConstraints(max_length=63)]
    outcome: GateOutcome
    message: Annotated[str, StringConstraints(max_length=512)] = ""
    """What it answered, in words: the HTTP status and the start of the body, or why there was no answer."""


class GateWait(StatusModel):
    """The gates of one moment the rollout waits on (or, after a rollback, the postRollback gates told)."""

    type: GateType
    step: int | None = Field(default=None, ge=0, le=19)
    """The step the rollout is held at (the step it was rolled back from, for postRollback)."""
    since: AwareDatetime
    """When the wait began."""
    purpose: Annotated[str, StringConstraints(max_length=512)] = ""
    """What the gates are asked to let through, in words."""
    answers: list[GateAnswer] = Field(default_factory=list, max_length=8)
    """Each gate's latest answer."""


class ShadowDeploymentStatus(StatusModel):
    """What the operator observed and decided; written only by the operator."""

    phase: Phase | None = None
    """Where the rollout is: Pending (not reconciled yet, or held by a preRollout gate), Progressing, Paused,
    or finished: Promoted, RolledBack or Failed."""
    current_step: int | None = Field(default=None, ge=0, le=19)
    """Index into spec.traffic.steps of the step being analysed (0 is the first)."""
    current_weight: int | None = Field(default=None, ge=0, le=100)
    """Percent of requests the router currently sends to the candidate."""
    samples: int | None = Field(default=None, ge=0)
    """Scored requests in the current step."""
    step: Annotated[str, StringConstraints(pattern=r"^[0-9]+/[0-9]+$", max_length=8)] | None = None
    """The current step as `kubectl get -o wide` shows it: 2/3 is the second of three steps (currentStep + 1
    of spec.traffic.steps)."""
    score: float | None = Field(default=None, ge=-1, le=1)
    """The overall score as `kubectl get` shows it: metrics.overallScore once the step has minSamples scored
    requests, unset before (while it holds only latency and errors, quality not being established yet)."""
    metrics: AnalysisMetrics | None = None
    """The latest analysis of the current step."""
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready (the router serves), Progressing, Promoted, RolledBack, NotificationsDelivered when
    spec.notifications names receivers, and GatesOpen when spec.gates names gates."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The spec generation the operator last acted on."""
    last_decision: Decision | None = None
    """The latest decision of the analysis and its reason."""
    analysis_started_at: AwareDatetime | None = None
    """When the analysis of the current candidate revision began."""
    step_started_at: AwareDatetime | None = None
    """When the current step began."""
    candidate_revision: Annotated[str, StringConstraints(max_length=64)] | None = None
    """Hash of production and candidate the analysis belongs to; a change in spec restarts the analysis."""
    analysis_revision: Annotated[str, StringConstraints(max_length=64)] | None = None
    """Hash of the settings the evidence depends on (metric, lossCap, mode, stickyHeader, fallback,
    segmentBy); a change restarts the analysis at step 1 with no evidence."""
    evidence: EvidenceState | None = None
    """The sequential tests' running state (p-values' running minima, canary bets)."""
    last_action: HandledAction | None = None
    """The last manual verb (shadowgate.io/action annotation) carried out."""
    last_transition: Transition | None = None
    """The latest transition and the Events that announce it (see Transition)."""
    gate: GateWait | None = None
    """The gates (spec.gates) the rollout waits on now, with their latest answers; after a rollback, the
    postRollback gates told of it. Unset when no gate holds it."""
    message: Annotated[str, StringConstraints(max_length=4096)] | None = None
    """The current state in one sentence."""

    @property
    def phase_or_pending(self) -> Phase:
        return self.phase or Phase.PENDING

    def condition(self, condition_type: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type is condition_type), None)


# --- the resource -----------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The metadata fields the operator reads; the rest is ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class ManualAction:
    """A verb asked for through the shadowgate.io/action annotation."""

    verb: ActionVerb
    value: str
    """The whole annotation value; recorded in status.lastAction once handled."""

    @classmethod
    def parse(cls, value: str) -> ManualAction:
        verb, _, _nonce = value.strip().partition(":")
        try:
            return cls(verb=ActionVerb(verb.lower()), value=value)
        except ValueError:
            allowed = ", ".join(v.value for v in ActionVerb)
            raise ValueError(f"{ACTION_ANNOTATION}={value!r}: unknown verb (use {allowed})") from None


class ShadowDeployment(ApiModel):
    """Shadow or canary a candidate ML model beside the production model, score both on real outcomes,
    and promote or roll back the candidate automatically."""

    api_version: Literal["shadowgate.io/v1alpha1"] = API_VERSION
    kind: Literal["ShadowDeployment"] = KIND
    metadata: ObjectMeta
    spec: ShadowDeploymentSpec
    status: ShadowDeploymentStatus = Field(default_factory=ShadowDeploymentStatus)

    @rule(
        f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{SERVICE_NAME_PATTERN}')",
        f"metadata.name must be a DNS label of at most {MAX_NAME_LENGTH} characters starting with a letter: "
        f"the router Service is named <name>{ROUTER_SUFFIX}",
        field_path=".metadata.name",
    )
    def _name_fits_children(self) -> bool:
        name = self.metadata.name
        return len(name) <= MAX_NAME_LENGTH and re.fullmatch(SERVICE_NAME_PATTERN, name) is not None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        if not self.metadata.namespace:
            raise ValueError(f"ShadowDeployment {self.name!r} has no namespace")
        return self.metadata.namespace

    @property
    def router_name(self) -> str:
        """Name of every child object: ConfigMap, Deployment, Service, ServiceAccount, Role, RoleBinding."""
        return f"{self.name}{ROUTER_SUFFIX}"

    def pending_action(self) -> ManualAction | None:
        """The manual verb to carry out now: the annotation is set and differs from the one last handled.

        ValueError when the annotation holds an unknown verb.
        """
        value = self.metadata.annotations.get(ACTION_ANNOTATION)
        if not value:
            return None
        handled = self.status.last_action
        if handled is not None and handled.value == value:
            return None
        return ManualAction.parse(value)
