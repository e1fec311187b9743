"""`kubectl shadow`'s pure parts: what it shows, the nonce it picks, how it reads its arguments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shadowgate_operator import plugin
from shadowgate_operator.api import ShadowDeployment
from tests.admission_cases import load_example, merge_patch

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def analysed() -> ShadowDeployment:
    status = {
        "phase": "Progressing", "currentStep": 1, "currentWeight": 10, "samples": 340,
        "lastDecision": {"action": "Wait", "reason": "Waiting for significance.", "time": "2026-11-25T11:59:48Z"},
        "metrics": {
            "step": 1, "improvement": 0.195, "overallScore": 0.62, "pValue": 0.004, "pValueWorse": 1.0,
            "agreement": 0.93,
            "production": {"metricValue": 0.41, "errorRate": 0.001, "latencyP50Ms": 12.0, "latencyP99Ms": 40.0},
            "candidate": {"metricValue": 0.33, "errorRate": 0.0, "latencyP50Ms": 11.0, "latencyP99Ms": 38.5},
        },
        "conditions": [{"type": "Ready", "status": "True", "reason": "RouterAvailable",
                        "message": "2 of 2 router replicas available.", "lastTransitionTime": "2026-11-25T11:50:00Z"}],
    }  # fmt: skip
    document = merge_patch(load_example(), {"metadata": {"namespace": "models"}, "status": status})
    return ShadowDeployment.model_validate(document)


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0s"), (119, "119s"), (120, "2m"), (7199, "119m"), (7200, "2h"), (3 * 86400, "3d")]
)
def test_ages_read_like_kubectl(seconds: int, shown: str) -> None:
    assert plugin.age(NOW - timedelta(seconds=seconds), NOW) == shown


def test_the_summary_row_and_the_detail() -> None:
    sd = analysed()
    assert plugin.summary_row(sd, NOW) == [
        "fraud-detector", "shadow", "Progressing", "2/3", "10%", "340", "0.62", "0.004",
        "True (RouterAvailable)", "Wait, 12s ago",
    ]  # fmt: skip
    detail = plugin.describe(sd, NOW)
    assert "Traffic:     shadow, steps 5%, 10%, 20%; now step 2/3 at 10%" in detail
    assert "Decision:    Wait, 12s ago: Waiting for significance." in detail
    lines = detail.splitlines()
    assert lines[lines.index("Analysis (logLoss, step 2):") + 1].split() == [
        "SIDE", "MODEL", "LOGLOSS", "ERRORS", "P50", "MS", "P99", "MS",
    ]  # fmt: skip
    assert "  production   fraud-v1 1.4.2   0.41      0.1%     12       40" in detail
    assert "  candidate    fraud-v2 2.0.0   0.33      0.0%     11       38.5" in detail
    assert (
        "samples 340 (min 200), improvement 19.5%, score 0.62 (promote at 0.7, roll back at -0.3), "
        "p-value 0.004 better / 1 worse, agreement 93.0%"
    ) in detail


@pytest.mark.parametrize(
    ("annotation", "handled", "expected"),
    [
        (None, None, "promote:1"),
        ("promote", "promote", "promote:1"),  # a bare value was handled: any nonce makes it new
        ("abort:4", "abort:4", "promote:5"),
        ("retry:2", "abort:7", "promote:8"),
    ],
)
def test_each_verb_gets_a_nonce_the_operator_has_not_seen(
    annotation: str | None, handled: str | None, expected: str
) -> None:
    body: dict[str, Any] = {"metadata": {"annotations": {"shadowgate.io/action": annotation} if annotation else {}}}
    if handled:
        body["status"] = {"lastAction": {"value": handled}}
    assert plugin.next_action(body, "promote") == expected


def test_kubectl_flags_before_or_after_the_verb() -> None:
    parser = plugin.build_parser()
    after = parser.parse_args(["promote", "fraud", "-n", "models", "--context", "prod"])
    before = parser.parse_args(["-n", "models", "--context", "prod", "promote", "fraud"])
    for args in (after, before):
        assert (args.command, args.name, args.namespace, args.context) == ("promote", "fraud", "models", "prod")
    assert not hasattr(parser.parse_args(["status"]), "namespace")  # then the context's namespace applies


def test_history_rows() -> None:
    record = {"time": NOW, "event": "Promoted", "phase": "Promoted", "step": 2, "weight": 100, "message": "done"}
    assert plugin.history_rows([record]) == [["2026-11-25 12:00:00", "Promoted", "Promoted", "3", "100%", "done"]]
