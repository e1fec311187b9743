"""The operator's Outbox keeps rows for a database that is away, bounded per ShadowDeployment."""

from __future__ import annotations

import datetime as dt

from shadowgate_operator.store import EventRow, Outbox

KEY = ("team-a", "pricer")


def event(n: int) -> EventRow:
    return EventRow(dt.datetime(2026, 1, 1, tzinfo=dt.UTC), *KEY, f"E{n}", "Progressing", 1, 5, f"message {n}")


def test_rows_wait_per_deployment_and_the_oldest_go_past_the_limit() -> None:
    outbox = Outbox(limit=3)
    outbox.add(KEY, events=[event(1), event(2)])
    outbox.add(("team-b", "other"), events=[event(9)])
    assert (outbox.waiting(KEY), outbox.waiting(("team-b", "other"))) == (2, 1)
    outbox.add(KEY, events=[event(3), event(4)])
    assert outbox.waiting(KEY) == 3
    assert [row.event for row in outbox._events[KEY]] == ["E2", "E3", "E4"]
    outbox.forget(KEY)
    assert outbox.waiting(KEY) == 0
