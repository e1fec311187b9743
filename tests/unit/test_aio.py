"""shadowgate_common.aio: a worker loop that waits on an event stops when cancelled, whatever the timing."""

from __future__ import annotations

import asyncio

import pytest

from shadowgate_common.aio import wait_event


async def test_the_event_or_the_time_whichever_comes_first() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 60) is True


async def test_a_loop_cancelled_as_its_event_is_set_stops() -> None:
    """The deliverer's and the recorder's loops: cancelled in the same step as something wakes them (the
    case asyncio.wait_for loses on Python 3.11, gh-86296), the loop ends (at once or after one more round)
    rather than running forever."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await wait_event(event, 60)
            event.clear()

    for _ in range(50):
        task = asyncio.create_task(loop())
        await asyncio.sleep(0)  # the loop is waiting on the event
        event.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)  # with asyncio.wait_for in the loop: still running after 5 s
