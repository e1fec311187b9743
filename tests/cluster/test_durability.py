"""The operator killed (SIGKILL) at random moments while it carries out transitions: no transition's
Event or history row is lost, none is doubled. (test_reconciler.py kills it in-process between every two
calls; this kills the real process wherever the moment falls.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import pytest

from shadowgate_operator.migrate import migrate_dsn
from tests.cluster.conftest import ApplyShadow, StartOperator
from tests.conftest import Kubectl
from tests.support.operator import events_for, eventually, example, rows, shadow, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.database]

EVENTS = "SELECT event, details FROM deployment_events WHERE namespace = $1 AND deployment = $2 ORDER BY time"
# Each step is one transition: (what to do, the Event it must leave, what status shows once it is done).
STEPS = [
    ("promote", "Promoted", "Promoted"),
    ("retry", "AnalysisRestarted", "Progressing"),
    ("abort", "RolledBack", "RolledBack"),
    ("retry", "AnalysisRestarted", "Progressing"),
    ("pause", "Paused", "Paused"),
    ("resume", "Resumed", "Progressing"),
    ("promote", "Promoted", "Promoted"),
    ("retry", "AnalysisRestarted", "Progressing"),
    ("abort", "RolledBack", "RolledBack"),
    ("retry", "AnalysisRestarted", "Progressing"),
    ("promote", "Promoted", "Promoted"),
    ("retry", "AnalysisRestarted", "Progressing"),
    ("abort", "RolledBack", "RolledBack"),
]


@pytest.mark.timeout(900)
def test_killed_at_random_moments_no_event_or_row_is_lost_or_doubled(
    kubectl: Kubectl, namespace: str, dsn: str, start_operator: StartOperator, apply_shadow: ApplyShadow
) -> None:
    asyncio.run(migrate_dsn(dsn))
    name = "durable"
    chance = random.Random()
    operator = start_operator("--namespace", namespace)
    apply_shadow(namespace, example(name))
    wait_phase(kubectl, namespace, name, "Progressing", timeout=60)
    kills = 0
    for index, (verb, _, phase) in enumerate(STEPS):
        if verb in ("pause", "resume"):
            patch = json.dumps({"spec": {"paused": verb == "pause"}})
            kubectl("patch", "shadowdeployment", name, "-n", namespace, "--type=merge", "-p", patch)
        else:
            value = f"{verb}:{index}"
            kubectl(
                "annotate", "--overwrite", "shadowdeployment", name, "-n", namespace, f"shadowgate.io/action={value}"
            )
        # Somewhere between before the operator noticed and after it finished: status written, Events
        # half posted, rows not yet written, ...
        time.sleep(chance.uniform(0.0, 0.6))
        operator.stop(kill=True)
        kills += 1
        operator = start_operator("--namespace", namespace)
        wait_phase(kubectl, namespace, name, phase, timeout=60)
        expected = 1 + index + 1
        sequence = eventually(
            lambda: (shadow(kubectl, namespace, name)["status"].get("lastTransition") or {}).get("sequence"),
            30,
            "a transition in status",
        )
        assert sequence == expected, (index, sequence)

    wanted = ["AnalysisStarted", *(event for _, event, _ in STEPS)]
    found: list[str] = []
    with contextlib.suppress(AssertionError):  # compared below, for a readable difference
        eventually(
            lambda: (found.__setitem__(slice(None), [e["reason"] for e in events_for(kubectl, namespace, name)])
                     or found == wanted),
            30,
            "exactly the Events of the transitions",
        )  # fmt: skip
    assert found == wanted
    sequences = [
        int(e["metadata"]["annotations"]["shadowgate.io/transition"]) for e in events_for(kubectl, namespace, name)
    ]
    assert sequences == list(range(1, len(wanted) + 1))
    history = eventually(
        lambda: (found := rows(dsn, EVENTS, namespace, name)) and len(found) >= len(wanted) and found,
        30,
        "every history row",
    )
    assert [row["event"] for row in history] == wanted
    assert [json.loads(row["details"])["sequence"] for row in history] == list(range(1, len(wanted) + 1))
    assert kills == len(STEPS)
