"""The demo's parts without a cluster: the synthetic market and its models, the model server's request
parsing, the scenarios' ShadowDeployments, the live table and the notification receiver."""

from __future__ import annotations

import datetime as dt
import io
import json
from typing import Any

import httpx
import numpy as np
import pytest

from shadowgate_dev.demo.progress import Counters, Progress
from shadowgate_dev.demo.receiver import Receiver
from shadowgate_dev.demo.registry import ReadBack, Registered
from shadowgate_dev.demo.report import chart_figure
from shadowgate_dev.demo.scenarios import SCENARIOS, Pace, manifest
from shadowgate_dev.demo.story import prometheus_sum
from shadowgate_operator.api import ShadowDeployment
from shadowgate_operator.notify.messages import Announcement, cloudevent
from trading import market
from trading.models import MODELS, TrainedModel, train
from trading.server import BadRequest, features_from
from trading.traffic import infer_body


@pytest.fixture(scope="module")
def models() -> dict[str, TrainedModel]:
    return {name: train(name) for name in MODELS}


def test_the_better_candidate_is_truly_better_and_the_worse_one_truly_worse(models: dict[str, TrainedModel]) -> None:
    """On fresh trades (not the training window), by the metric the demo's ShadowDeployments judge on."""
    features, outcomes = market.history(20_000, seed=2024)
    loss = {name: market.log_loss(outcomes, model.predict(features)) for name, model in models.items()}
    best_possible = market.log_loss(outcomes, market.probability(features))
    assert best_possible < loss["v2"] < loss["v1"] < loss["v3"]
    assert (loss["v1"] - loss["v2"]) / loss["v1"] > 0.15, loss  # the promote story needs a clear gain
    assert (loss["v3"] - loss["v1"]) / loss["v1"] > 0.25, loss  # and the rollback story a clear loss


def test_trades_are_reproducible_and_their_outcomes_follow_the_true_probability() -> None:
    first, second = market.Market(seed=5), market.Market(seed=5)
    trades = [first.next_trade() for _ in range(4_000)]
    assert [t.trade_id for t in trades[:3]] == ["T-0000001", "T-0000002", "T-0000003"]
    assert trades[:50] == [second.next_trade() for _ in range(50)]
    assert all(1 <= t.hold_seconds <= 4 and t.account.startswith("ACC-") for t in trades)
    won = sum(t.outcome for t in trades)
    expected = sum(t.probability for t in trades)
    assert abs(won - expected) < 4 * np.sqrt(expected)


def test_a_model_server_reads_named_tensors_or_one_matrix() -> None:
    trade = market.Market(seed=1).next_trade()
    named = features_from(json.loads(infer_body(trade)))
    assert named.shape == (1, len(market.FEATURES))
    assert list(named[0]) == [trade.features[name] for name in market.FEATURES]
    matrix = {"inputs": [{"name": "x", "shape": [2, 5], "datatype": "FP64", "data": list(range(10))}]}
    assert features_from(matrix).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ({}, "send {"),
        ({"inputs": [{"name": "rsi", "data": [1]}]}, "missing macd, volume_ratio, volatility, momentum"),
        ({"inputs": [{"name": "x", "shape": [1, 3], "data": [1, 2, 3]}]}, "shape [n, 5]"),
        ({"inputs": [{"name": "x", "shape": [2, 5], "data": [1]}]}, "does not hold 1 values"),
        ({"inputs": [{"name": "x", "shape": [1, 5], "data": ["a", 1, 2, 3, 4]}]}, "must be numbers"),
    ],
)
def test_a_model_server_says_what_is_wrong_with_a_request(document: dict[str, object], says: str) -> None:
    with pytest.raises(BadRequest) as refused:
        features_from(document)
    assert says in str(refused.value)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_each_scenario_is_a_valid_shadowdeployment_pointed_at_the_local_servers(name: str) -> None:
    scenario = SCENARIOS[name]
    pace = Pace(analysis={"minSamples": 150}, traffic={"steps": [10, 50]})
    document = manifest(scenario, "http://127.0.0.1:1001", "http://127.0.0.1:1002", pace)
    sd = ShadowDeployment.model_validate({**document, "metadata": {**document["metadata"], "namespace": "demo"}})
    assert sd.spec.production.url == "http://127.0.0.1:1001" and sd.spec.candidate.url == "http://127.0.0.1:1002"
    assert sd.spec.analysis.min_samples == 150 and sd.spec.traffic.steps == [10, 50]
    assert sd.spec.candidate.name.endswith(scenario.candidate_model)
    # Each transition goes to the demo's CloudEvents receiver, its URL in a Secret the demo writes.
    assert [(n.name, n.format, n.url_secret_ref.name, n.events) for n in sd.spec.notifications] == [
        ("demo-receiver", "cloudevents", "trade-signal-hooks", [])
    ]
    assert scenario.load()["spec"]["traffic"]["steps"] == [5, 20, 50]  # the file itself is untouched
    # Without MLflow the registry is left out (the CRD wants registry and registeredModel together) ...
    assert sd.spec.registry is None
    assert sd.spec.production.registered_model is None and sd.spec.candidate.registered_model is None
    # ... with it, the spec names the demo's server, and the versions it registered for these two models.
    registered = Registered("http://127.0.0.1:1003", "trade-signal", {"v1": "4", "v2": "5", "v3": "6"}, "champion", "4")
    document = manifest(scenario, "http://127.0.0.1:1001", "http://127.0.0.1:1002", pace, registered)
    sd = ShadowDeployment.model_validate({**document, "metadata": {**document["metadata"], "namespace": "demo"}})
    assert sd.spec.registry is not None and sd.spec.registry.mlflow.tracking_uri == "http://127.0.0.1:1003"
    assert sd.spec.registry.alias == "champion"
    assert sd.spec.production.registered_model is not None and sd.spec.candidate.registered_model is not None
    assert (sd.spec.production.registered_model.name, sd.spec.production.registered_model.version) == (
        "trade-signal", registered.versions[scenario.production_model],
    )  # fmt: skip
    assert sd.spec.candidate.registered_model.version == registered.versions[scenario.candidate_model]
    # The file names the versions a new server gives (1, 2, 3 for v1, v2, v3).
    file_spec = scenario.load()["spec"]
    assert file_spec["candidate"]["registeredModel"]["version"] == scenario.candidate_model.lstrip("v")


def test_the_registry_lines_say_where_the_alias_went_and_each_versions_tags() -> None:
    registered = Registered("http://127.0.0.1:5000", "trade-signal", {"v1": "1", "v2": "2", "v3": "3"}, "champion", "1")
    common = {"shadowgate.rollout": "demo/trade-signal", "shadowgate.reason": "Step 3 of 3 passed: " + "x" * 200}
    promoted = ReadBack(registered, "1", "2", "2", {
        "2": {"shadowgate.outcome": "promoted", **common, "shadowgate.replaces": "1"},
        "1": {"shadowgate.outcome": "replaced", **common, "shadowgate.replaced_by": "2"},
    })  # fmt: skip
    assert promoted.written("Promoted") and not ReadBack(registered, "1", "2", "1", {}).written("Promoted")
    lines = promoted.lines(("trade-signal-v1", "trade-signal-v2"))
    assert lines[1] == "      alias champion -> version 2 (the candidate; moved from version 1)"
    assert lines[2:5] == [
        "      version 2 (trade-signal-v2):",
        "        shadowgate.outcome = promoted",
        "        shadowgate.rollout = demo/trade-signal",
    ]
    assert lines[5].startswith("        shadowgate.reason = Step 3") and len(lines[5]) == 110
    assert lines[-3:] == [
        "        shadowgate.outcome = replaced",
        "        shadowgate.replaced_by = 2",
        "        shadowgate.rollout, shadowgate.reason: as on version 2",
    ]
    rolled_back = ReadBack(registered, "1", "3", "1", {"3": {"shadowgate.outcome": "rolled_back", **common}, "1": {}})
    assert rolled_back.written("RolledBack")
    assert rolled_back.lines(("trade-signal-v1", "trade-signal-v3"))[1:] == [
        "      alias champion -> version 1 (production; still on version 1)",
        "      version 3 (trade-signal-v3):",
        "        shadowgate.outcome = rolled_back",
        "        shadowgate.rollout = demo/trade-signal",
        ("        shadowgate.reason = Step 3 of 3 passed: " + "x" * 200)[:109] + "\u2026",
        "      version 1 (trade-signal-v1): no shadowgate tag",
    ]


def test_the_live_table_shows_each_analysis_and_the_reason_of_a_transition() -> None:
    out = io.StringIO()
    started = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    progress = Progress(
        out,
        started=started.timestamp(),
        steps=3,
        min_samples=200,
        names=("trade-signal-v1", "trade-signal-v2"),
        mode="shadow",
        metric="logLoss",
    )
    row = {
        "time": started + dt.timedelta(seconds=23),
        "step": 0,
        "weight": 5,
        "samples": 204,
        "production_value": 0.6439,
        "candidate_value": 0.4668,
        "improvement": 0.275,
        "overall_score": 1.0,
        "p_value": 0.00036,
        "p_value_worse": 1.0,
        "decision": "Advance",
        "reason": "Step 1 of 3 (5% shadow) passed: advancing to step 2 (20% shadow).",
    }
    progress.analysis(row, Counters(production=4_000, candidate=212))
    header, line, reason = out.getvalue().splitlines()
    assert header.split() == [
        "time", "step", "weight", "to", "cand.", "scored", "logLoss", "v1", "/", "v2", "change", "p-value", "score",
        "decision",
    ]  # fmt: skip
    assert line.split() == ["0:23", "1/3", "5%", "5.3%", "204/200", "0.644", "/", "0.467", "+27.5%", "0.00036",
                            "+1.00", "Advance"]  # fmt: skip
    assert reason.strip() == row["reason"]
    worse = {**row, "improvement": -0.5, "p_value": 1.0, "p_value_worse": 0.002, "decision": "Wait"}
    progress.analysis(worse, Counters(production=8_000, candidate=412))
    assert out.getvalue().splitlines()[-1].split()[8:11] == ["-50.0%", "0.002", "+1.00"]  # the worse side's p


def test_prometheus_sums_every_sample_of_one_metric_only() -> None:
    exposition = (
        "# HELP shadowgate_router_responses_total Answers.\n"
        'shadowgate_router_responses_total{status="200"} 10.0\n'
        'shadowgate_router_responses_total{status="502"} 2.0\n'
        "shadowgate_router_responses_created 1.7e9\n"
        "shadowgate_router_responses_total_other 5.0\n"
    )
    assert prometheus_sum(exposition, "shadowgate_router_responses_total") == 12.0


def _chart_rows(weights: list[int], decisions: dict[int, str], samples: list[int]) -> tuple[list[Any], list[Any]]:
    start = dt.datetime(2026, 11, 25, 15, 30, tzinfo=dt.UTC)
    metrics = [
        {
            "time": start + dt.timedelta(seconds=6 * (index + 1)), "samples": count,
            "overall_score": 0.3 if count < 150 else (1.0 if decisions.get(index) != "RollBack" else -0.4),
            "production_value": 0.64, "candidate_value": 0.47, "decision": decisions.get(index, "Wait"),
        }
        for index, count in enumerate(samples)
    ]  # fmt: skip
    events = [
        {"time": start + dt.timedelta(seconds=6 * (index + 1) + 2), "event": decision, "weight": weights[n + 1]}
        for n, (index, decision) in enumerate(sorted(decisions.items()))
    ]
    return metrics, events


def test_the_rollback_chart_shows_5_percent_and_says_what_each_panel_means() -> None:
    """What someone who has not read the README needs from the picture alone (the real charts: docs/)."""
    import matplotlib.pyplot as plt

    spec = manifest(SCENARIOS["rollback"], "http://127.0.0.1:1", "http://127.0.0.1:2", Pace())["spec"]
    metrics, events = _chart_rows([5, 0], {5: "RollBack"}, [10, 60, 100, 140, 190, 239])
    start = metrics[0]["time"] - dt.timedelta(seconds=6)
    figure = chart_figure(spec, "rollback", start, metrics, events)
    weight_axis, score_axis, loss_axis = figure.axes
    assert weight_axis.get_ylim()[1] < 10  # 5% fills the panel, and its drop to 0 is plain
    texts = [text.get_text() for axis in figure.axes for text in axis.texts]
    assert "5%" in texts and "0%" in texts and "RollBack \u2192 0%" in texts
    legend = [text.get_text() for text in score_axis.get_legend().get_texts()]
    assert any("latency and errors only" in line for line in legend)
    assert "lower is better" in loss_axis.get_title(loc="left") and "lower is better" in loss_axis.get_ylabel()
    # The decision's label sits above the weight panel, clear of every line in it.
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    label = next(text for text in weight_axis.texts if text.get_text().startswith("RollBack"))
    assert label.get_window_extent(renderer).y0 >= weight_axis.get_window_extent(renderer).y1
    plt.close(figure)


def test_the_promote_charts_decision_labels_do_not_overlap() -> None:
    import matplotlib.pyplot as plt

    spec = manifest(SCENARIOS["promote"], "http://127.0.0.1:1", "http://127.0.0.1:2", Pace())["spec"]
    metrics, events = _chart_rows(
        [5, 20, 50, 100], {6: "Advance", 8: "Advance", 9: "Promote"}, [20] * 6 + [211, 68, 268, 264]
    )
    figure = chart_figure(spec, "promote", metrics[0]["time"], metrics, events)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    decided = [t for t in figure.axes[0].texts if t.get_text().startswith(("Advance", "Promote"))]
    assert [t.get_text() for t in decided] == ["Advance \u2192 20%", "Advance \u2192 50%", "Promote \u2192 100%"]
    labels = [t.get_window_extent(renderer) for t in decided]
    assert len(labels) == 3
    assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1 :])
    plt.close(figure)


def test_the_receiver_reads_each_cloudevent_once_and_says_what_it_cannot_read() -> None:
    """What the operator posts (notify.messages.cloudevent), over real HTTP on loopback: kept once per id
    (delivery is at least once), handed out once by take(), shown as one line; a body that is not a
    CloudEvent is answered 400 and kept to be said."""
    document = manifest(SCENARIOS["promote"], "http://127.0.0.1:1", "http://127.0.0.1:2", Pace())
    document["metadata"].update(namespace="shadowgate-demo", uid="0f6c1d2e-aaaa-bbbb-cccc-123456789abc")
    document["status"] = {"phase": "Promoted", "currentStep": 2, "currentWeight": 100, "samples": 230}
    sd = ShadowDeployment.model_validate(document)
    time = dt.datetime(2026, 12, 1, 7, 30, tzinfo=dt.UTC)
    message = "Step 3 of 3 (50% shadow) passed: promoted; the router answers every request from trade-signal-v2."
    envelopes = [
        cloudevent(Announcement.of(sd, sequence=n, time=time, index=0, event_type="Normal", reason=reason,
                                   message=message if reason == "Promoted" else f"{reason} at step {n}."))
        for n, reason in ((1, "AnalysisStarted"), (4, "Promoted"))
    ]  # fmt: skip
    receiver = Receiver().start()
    try:
        with httpx.Client(timeout=5.0) as client:
            answers = [client.post(receiver.url, headers=e.headers, content=e.body).status_code for e in envelopes]
            assert answers == [202, 202]
            assert [e.reason for e in receiver.take()] == ["AnalysisStarted", "Promoted"]
            again = client.post(receiver.url, headers=envelopes[1].headers, content=envelopes[1].body)
            assert again.status_code == 202 and receiver.take() == []  # a redelivery is dropped
            refused = client.post(receiver.url, headers={"Content-Type": "application/json"}, content=b"{}")
            assert refused.status_code == 400 and len(receiver.refused) == 1
            assert client.post(receiver.url.replace("/events", "/other"), content=b"{}").status_code == 404
    finally:
        receiver.stop()
    _, promoted = receiver.events
    assert promoted.id == "0f6c1d2e-aaaa-bbbb-cccc-123456789abc.t4.0"
    expected = f"notification io.shadowgate.rollout.Promoted: Promoted at step 3/3 (100%): {message}"
    assert promoted.line(width=200) == expected
    assert promoted.line() == expected[:109] + "…" and len(promoted.line()) == 110
