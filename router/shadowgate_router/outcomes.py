"""``POST /outcomes``: the real results that arrive after the prediction (a trade closed, a label landed).

A caller sends one outcome or a batch, authenticated with the bearer token from the Secret the
ShadowDeployment names. Outcomes go through the same no-loss recorder as predictions, into their own
table joined on request id at analysis time, so an outcome may arrive before its prediction row has
been written (or while the database is away).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pydantic import (
    AliasChoices,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from shadowgate_router import boundedjson
from shadowgate_router.recorder import EPOCH, now_us
from shadowgate_router.spool import Row

MAX_BATCH = 10_000
REQUEST_ID_MAX = 200


class Outcome(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: str = Field(
        min_length=1, max_length=REQUEST_ID_MAX, validation_alias=AliasChoices("request_id", "requestId")
    )
    """The X-Request-Id the router returned with the prediction (or the client's own id): like every id
    the router records, 1 to 200 visible ASCII characters (a NUL, which a text column cannot hold, sent
    whole batches down the recorder's slow path)."""
    outcome: float = Field(strict=True, allow_inf_nan=False)
    """What really happened, on the same scale as the prediction (a label, a return, a price)."""
    time: AwareDatetime | None = None
    """When it happened; now when omitted. An RFC 3339 time with a zone, or Unix seconds. With the request
    id, the outcome's identity: the same id and time again is a retry and lands once; a correction needs a
    later time (or none)."""

    @field_validator("request_id")
    @classmethod
    def _visible_ascii(cls, value: str) -> str:
        if not (value.isascii() and value.isprintable()) or " " in value:
            raise ValueError("must be visible ASCII characters only, like the X-Request-Id it belongs to")
        return value


_BATCH = TypeAdapter(list[Outcome])


class OutcomeRefused(ValueError):
    """The request cannot be accepted; `status` and the message go back to the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_token(expected: str | None, authorization: bytes | None) -> None:
    """Bearer-token check in constant time; raises OutcomeRefused (401 or 503)."""
    if not expected:
        raise OutcomeRefused(503, "outcomes are disabled: the router has no outcome token (SHADOWGATE_OUTCOME_TOKEN)")
    if authorization is None:
        raise OutcomeRefused(401, "send the outcome token as 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), expected.encode()):
        raise OutcomeRefused(401, "the outcome token is wrong")


def parse(body: bytes) -> list[Outcome]:
    """One outcome, a JSON list of them, or {"outcomes": [...]}; raises OutcomeRefused (400) saying why."""
    try:
        document: Any = boundedjson.loads(body)
    except ValueError as exc:  # UnicodeDecodeError and JsonTooDeep are ValueErrors too
        raise OutcomeRefused(400, f"malformed JSON: {exc}") from None
    if isinstance(document, dict) and set(document) == {"outcomes"}:
        document = document["outcomes"]
    single = isinstance(document, dict)
    items = [document] if single else document
    if not isinstance(items, list):
        raise OutcomeRefused(400, 'send an outcome object, a list of them, or {"outcomes": [...]}')
    if not items:
        raise OutcomeRefused(400, "the batch is empty")
    if len(items) > MAX_BATCH:
        raise OutcomeRefused(413, f"at most {MAX_BATCH} outcomes per call; this one has {len(items)}")
    try:
        outcomes = _BATCH.validate_python(items)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False)[:20]:
            location = error["loc"][1:] if single else error["loc"]
            where = ".".join(str(part) for part in location) or "(top level)"
            problems.append(f"{where}: {error['msg']}")
        raise OutcomeRefused(400, "; ".join(problems)) from None
    _refuse_ambiguous(outcomes)
    return outcomes


def _refuse_ambiguous(outcomes: list[Outcome]) -> None:
    """Two different outcomes of one request at one explicit time: which one holds cannot be told."""
    seen: dict[tuple[str, datetime], float] = {}
    for item in outcomes:
        if item.time is None:
            continue
        key = (item.request_id, item.time)
        if seen.setdefault(key, item.outcome) != item.outcome:
            raise OutcomeRefused(
                400,
                f"two different outcomes for request {item.request_id!r} at {item.time.isoformat()}: an outcome "
                "is identified by its request id and time, so a correction needs a later time (or none)",
            )


def to_rows(outcomes: list[Outcome], namespace: str, deployment: str, clock: Callable[[], int] = now_us) -> list[Row]:
    """Rows for the outcomes table: (time in microseconds, namespace, deployment, request_id, outcome)."""
    now = clock()
    return [
        (_micros(item.time) if item.time else now, namespace, deployment, item.request_id, float(item.outcome))
        for item in outcomes
    ]


def _micros(moment: datetime) -> int:
    delta = moment - EPOCH
    return delta.days * 86_400_000_000 + delta.seconds * 1_000_000 + delta.microseconds
