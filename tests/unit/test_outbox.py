"""History rows wait for a database that is away, bounded per ShadowDeployment, and none is lost on an error."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pytest

from shadowgate_operator.notify.messages import Outgoing
from shadowgate_operator.store import EventRow, MetricsRow, Rows

KEY = ("team-a", "pricer")


def event(n: int) -> EventRow:
    return EventRow(dt.datetime(2026, 1, 1, tzinfo=dt.UTC), *KEY, f"E{n}", "Progressing", 1, 5, f"message {n}")


def test_rows_wait_and_the_oldest_go_past_the_limit() -> None:
    rows = Rows(limit=3)
    rows.add(events=[event(1), event(2)])
    assert rows.waiting == 2
    rows.add(events=[event(3), event(4)])
    assert rows.waiting == 3
    assert [row.event for row in rows.events] == ["E2", "E3", "E4"]


async def test_a_failed_write_keeps_every_row_and_a_later_one_writes_them_once() -> None:
    rows = Rows()
    rows.add(events=[event(1)])
    written: list[str] = []

    async def away(events: Sequence[EventRow], metrics: Sequence[MetricsRow], notifications: Sequence[Outgoing]) -> int:
        raise OSError("connection refused")

    async def back(events: Sequence[EventRow], metrics: Sequence[MetricsRow], notifications: Sequence[Outgoing]) -> int:
        written.extend(row.event for row in events)
        return len(notifications)

    with pytest.raises(OSError):
        await rows.flush(away)
    rows.add(events=[event(2)])
    await rows.flush(back)
    await rows.flush(back)
    assert (written, rows.waiting) == (["E1", "E2"], 0)
