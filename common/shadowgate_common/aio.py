"""asyncio helpers the operator and the router share. It imports nothing of shadowgate_operator or
shadowgate_router (.importlinter)."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` have passed; True when it was set.

    For the loops that wake on an event or poll (a worker's ``while True``): not ``asyncio.wait_for``,
    which before Python 3.12 returns the event's result when a cancellation arrives as the event is set
    (CPython gh-86296), so a loop around it never ends and whoever awaits the cancelled task waits
    forever. ``asyncio.timeout`` tells its own expiry from a cancellation by someone else."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
