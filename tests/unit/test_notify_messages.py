"""What notifications say: CloudEvents read back by the CloudEvents SDK, Slack payloads, ids, the spec field."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from pydantic import ValidationError

from shadowgate_operator.announce import hold_message_id, hold_notifications
from shadowgate_operator.api import NotificationFormat, ShadowDeployment
from shadowgate_operator.notify.deliver import RetryPolicy, usable_url
from shadowgate_operator.notify.messages import Announcement, cloudevent, message_id, outgoing, slack
from shadowgate_operator.rollout import Notice
from tests.admission_cases import load_example, merge_patch

TIME = dt.datetime(2026, 11, 30, 23, 59, 58, 123456, tzinfo=dt.UTC)
STATUS: dict[str, Any] = {
    "phase": "Promoted",
    "currentStep": 2,
    "currentWeight": 100,
    "samples": 1234,
    "metrics": {
        "step": 2,
        "production": {"metricValue": 0.52, "errorRate": 0.0, "latencyP99Ms": 12.5},
        "candidate": {"metricValue": 0.41, "errorRate": 0.001, "latencyP99Ms": 11.0},
        "improvement": 0.2115,
        "overallScore": 0.83,
        "pValue": 0.0004,
    },
}
RECEIVERS = [
    {"name": "events", "urlSecretRef": {"name": "hooks"}},
    {"name": "team", "format": "slack", "urlSecretRef": {"name": "hooks", "key": "slack"}, "events": ["Promoted"]},
]


def rollout(status: dict[str, Any] | None = None, **spec: Any) -> ShadowDeployment:
    document = merge_patch(
        load_example(),
        {
            "metadata": {"namespace": "models", "uid": "0f6c1d2e-aaaa-bbbb-cccc-123456789abc"},
            "spec": {"notifications": RECEIVERS, **spec},
            "status": STATUS if status is None else status,
        },
    )
    return ShadowDeployment.model_validate(document)


def promoted(sd: ShadowDeployment | None = None) -> Announcement:
    return Announcement.of(
        sd or rollout(), sequence=7, time=TIME, index=0, event_type="Normal", reason="Promoted",
        message="candidate promoted: mae 0.41 vs 0.52 (21.2% better), score 0.83 >= 0.7, p = 0.0004",
    )  # fmt: skip


def test_the_cloudevent_is_structured_json_the_sdk_reads_back_with_the_numbers() -> None:
    envelope = cloudevent(promoted())
    assert envelope.headers["content-type"].startswith("application/cloudevents+json")
    event = from_http(HTTPMessage(headers=envelope.headers, body=envelope.body), JSONFormat())
    assert event.get_id() == "0f6c1d2e-aaaa-bbbb-cccc-123456789abc.t7.0"
    assert event.get_type() == "io.shadowgate.rollout.Promoted"
    assert event.get_source() == "/apis/shadowgate.io/v1alpha1/namespaces/models/shadowdeployments/fraud-detector"
    assert event.get_specversion() == "1.0"
    assert event.get_subject() == "fraud-detector"
    assert event.get_time() == TIME
    data = event.get_data()
    assert isinstance(data, dict)
    assert data["message"].startswith("candidate promoted: mae 0.41")
    assert (data["step"], data["steps"], data["weight"], data["samples"]) == (2, 3, 100, 1234)
    assert data["metrics"]["overallScore"] == 0.83 and data["metrics"]["pValue"] == 0.0004
    assert data["metrics"]["candidate"]["metricValue"] == 0.41
    assert data["candidate"] == {"name": "fraud-v2", "version": "2.0.0"}
    raw = json.loads(envelope.body)
    assert raw["specversion"] == "1.0" and raw["datacontenttype"] == "application/json"


def test_the_slack_payload_carries_the_reason_and_the_numbers_within_slacks_limits() -> None:
    payload = json.loads(slack(promoted()).body)
    assert payload["text"].startswith("models/fraud-detector: Promoted: candidate promoted")
    header, reason, numbers, context = payload["blocks"]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    assert "score 0.83 &gt;= 0.7" in reason["text"]["text"]  # mrkdwn control characters escaped
    fields = {f["text"].split("\n")[0].strip("*"): f["text"].split("\n", 1)[1] for f in numbers["fields"]}
    assert fields["Step"].startswith("3 of 3 (100% to the candidate")
    assert fields["Samples"] == "1234"
    assert fields["Score"] == "0.83" and fields["p-value"] == "0.0004"
    assert fields[promoted().metric] == "production 0.52, candidate 0.41"
    assert len(numbers["fields"]) <= 10 and all(len(f["text"]) <= 2000 for f in numbers["fields"])
    assert "0f6c1d2e-aaaa-bbbb-cccc-123456789abc.t7.0" in context["elements"][0]["text"]


def test_a_long_message_is_cut_to_slacks_limits() -> None:
    long = Announcement.of(
        rollout(), sequence=1, time=TIME, index=0, event_type="Warning", reason="RolledBack", message="x" * 5000
    )
    payload = json.loads(slack(long).body)
    assert len(payload["text"]) <= 3000 and len(payload["blocks"][1]["text"]["text"]) <= 3000


def test_before_any_analysis_the_numbers_are_dashes_not_errors() -> None:
    started = Announcement.of(
        rollout(status={"phase": "Progressing", "currentStep": 0, "currentWeight": 5}),
        sequence=1, time=TIME, index=0, event_type="Normal", reason="AnalysisStarted", message="analysis started",
    )  # fmt: skip
    numbers = json.loads(slack(started).body)["blocks"][2]["fields"]
    assert {"type": "mrkdwn", "text": "*Score*\nn/a"} in numbers
    assert json.loads(cloudevent(started).body)["data"]["metrics"] == {}


def test_ids_are_stable_per_object_transition_and_event() -> None:
    assert promoted().id == promoted().id == message_id("0f6c1d2e-aaaa-bbbb-cccc-123456789abc", 7, 0)
    assert cloudevent(promoted()).body == cloudevent(promoted()).body  # every attempt posts the same bytes
    assert message_id("u", 7, 1) != message_id("u", 7, 0) != message_id("v", 7, 0)


def test_each_receiver_gets_the_reasons_it_asked_for_in_its_format() -> None:
    sd = rollout()
    messages = outgoing(promoted(sd), sd.spec.notifications)
    assert [(m.receiver, m.format, m.url_secret, m.url_key) for m in messages] == [
        ("events", NotificationFormat.CLOUDEVENTS, "hooks", "url"),
        ("team", NotificationFormat.SLACK, "hooks", "slack"),
    ]
    step = Announcement.of(sd, sequence=3, time=TIME, index=0, event_type="Normal", reason="StepAdvanced", message="")
    assert [m.receiver for m in outgoing(step, sd.spec.notifications)] == ["events"]


@pytest.mark.parametrize(
    ("receivers", "error"),
    [
        ([RECEIVERS[0], {**RECEIVERS[1], "name": "events"}], "each receiver in notifications needs its own name"),
        ([{**RECEIVERS[0], "format": "teams"}], "format"),
        ([{**RECEIVERS[0], "events": ["promoted"]}], "events"),
        ([{"name": "x"}], "urlSecretRef"),
    ],
)
def test_the_spec_refuses_bad_receivers(receivers: list[dict[str, Any]], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        rollout(notifications=receivers)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://hooks.slack.com/services/T0/B0/abc", None),
        ("http://127.0.0.1:8080/hook?token=abc", None),
        ("ftp://example.com/hook", "http:// or https://"),
        ("https://user:pw@example.com/hook", "user name or password"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("https://example.com/hook#frag", "fragment"),
    ],
)
def test_urls_the_worker_posts_to(url: str, problem: str | None) -> None:
    found = usable_url(url)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() -> None:
    policy = RetryPolicy(first_delay=2.0, max_delay=60.0)
    for attempts, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)):
        for _ in range(50):
            assert ceiling / 2 <= policy.delay(attempts) <= ceiling
    assert policy.delay(1, retry_after=30.0) >= 30.0
    assert policy.delay(1, retry_after=3600.0) <= 60.0


def test_a_gate_hold_is_told_once_per_hold_whatever_its_warning_says_at_each_look() -> None:
    """The hold's messages are named by the hold (moment, since) and the reason: the same hold told again (a
    new answer body, a restart) is the same id, queued once; the next hold is another."""
    since = "2026-12-01T09:00:00Z"
    hold = {"type": "preRollout", "step": 0, "since": since, "purpose": "the candidate's first traffic"}
    sd = rollout({"phase": "Pending", "gate": hold})
    first, second = (
        hold_notifications(sd, Notice("Warning", "GateRefused", f"Gate smoke (preRollout): refused (look {n})"), TIME)
        for n in (1, 2)
    )
    assert [m.receiver for m in first] == ["events"]  # the Slack receiver wants Promoted only
    assert sd.status.gate is not None
    assert first[0].id == second[0].id == hold_message_id(sd.metadata.uid or "", sd.status.gate, "GateRefused")
    event = from_http(HTTPMessage(headers=first[0].envelope.headers, body=first[0].envelope.body), JSONFormat())
    assert event.get_type() == "io.shadowgate.rollout.GateRefused" and "(look 1)" in event.get_data()["message"]
    later = rollout({"phase": "Pending", "gate": {**hold, "since": "2026-12-01T09:10:00Z"}})
    assert hold_notifications(later, Notice("Warning", "GateRefused", "again"), TIME)[0].id != first[0].id
    # Not a gate's hold, or no hold: nothing.
    assert hold_notifications(sd, Notice("Warning", "PermissionDenied", "no"), TIME) == []
    assert hold_notifications(rollout({"phase": "Progressing"}), Notice("Warning", "GateRefused", "x"), TIME) == []
