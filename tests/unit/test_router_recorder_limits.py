"""The recorder's bounds with the database unreachable: every row goes to disk within a flush interval,
memory holds at most `memory_rows` of them, and with the spool at its disk budget rows are dropped and
counted rather than filling the volume (which would get the pod evicted with everything on it)."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shadowgate_router.metrics import RouterMetrics
from shadowgate_router.recorder import OUTCOME_COLUMNS, Recorder, now_us
from shadowgate_router.spool import Spool

UNREACHABLE = "postgresql://nobody@127.0.0.1:9/none"  # the discard port: refused at once


def recorder(tmp_path: Path, metrics: RouterMetrics, **options: int) -> Recorder:
    return Recorder(
        "outcomes", OUTCOME_COLUMNS, UNREACHABLE, tmp_path, metrics,
        spill_rows=50, flush_interval=0.01, connect_timeout=0.5, **options,
    )  # fmt: skip


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_every_row_reaches_disk_and_memory_stays_bounded(tmp_path: Path) -> None:
    metrics = RouterMetrics()
    writer = recorder(tmp_path, metrics, memory_rows=100)
    writer.start()
    start = now_us()
    for n in range(1_000):
        writer.put((start + n, "ns", "dep", f"request-{n}", 1.0))
    await wait_for(lambda: writer.spool.rows == 1_000, "the rows to reach disk")
    assert writer._cached <= 100, "memory keeps only the newest rows; the rest are read back from disk"
    assert Spool(tmp_path / ".." / tmp_path.name, "outcomes").rows == 1_000, "another reader sees them all"
    await writer.close(0.2)
    assert Spool(tmp_path, "outcomes").read(2_000)[0] == [
        (start + n, "ns", "dep", f"request-{n}", 1.0) for n in range(1_000)
    ]


async def test_memory_then_disk_then_counted_drops(tmp_path: Path) -> None:
    metrics = RouterMetrics()
    writer = recorder(tmp_path, metrics, memory_rows=100, spool_max_bytes=4_000)
    writer.start()
    start = now_us()
    for n in range(1_000):
        writer.put((start + n, "ns", "dep", f"request-{n}", 1.0))
    dropped = metrics.rows_dropped.labels("outcomes")
    await wait_for(lambda: writer.pending + dropped._value.get() == 1_000 and not writer._fresh, "the rows")
    assert 4_000 <= writer.spool.bytes < 4_000 + 50 * 60, "the spool stops at its budget (plus one record)"
    assert dropped._value.get() > 0 and writer.pending + dropped._value.get() == 1_000
    await wait_for(lambda: metrics.database_errors.labels("outcomes")._value.get() > 0, "a failed write")
    await writer.close(0.2)


async def test_a_disk_that_refuses_writes_loses_nothing_once_it_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RouterMetrics()
    writer = recorder(tmp_path, metrics, memory_rows=1_000)
    real_write = os.write
    full = True
    refused = 0

    def refusing(fd: int, data: bytes | memoryview) -> int:
        nonlocal refused
        if full:
            refused += 1
            real_write(fd, bytes(data)[:7])  # part of it, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    writer.start()
    start = now_us()
    for n in range(300):
        writer.put((start + n, "ns", "dep", f"request-{n}", 1.0))
    await wait_for(lambda: refused >= 2, "the journal to try twice")
    assert writer.spool.rows == 0 and len(writer._fresh) == 300, "kept in memory while the disk refuses"
    assert metrics.rows_dropped.labels("outcomes")._value.get() == 0
    full = False
    await wait_for(lambda: writer.spool.rows == 300, "the rows to reach disk once it takes them")
    await writer.close(0.2)
    assert Spool(tmp_path, "outcomes").read(1_000)[0] == [
        (start + n, "ns", "dep", f"request-{n}", 1.0) for n in range(300)
    ], "in order, and no torn record before them"
