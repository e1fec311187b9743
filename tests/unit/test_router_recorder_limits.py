"""The recorder's last resort: with the database unreachable and the spool at its disk budget, rows are
dropped and counted rather than filling the volume (which would get the pod evicted with everything on it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shadowgate_router.metrics import RouterMetrics
from shadowgate_router.recorder import OUTCOME_COLUMNS, Recorder, now_us

UNREACHABLE = "postgresql://nobody@127.0.0.1:9/none"  # the discard port: refused at once


async def test_memory_then_disk_then_counted_drops(tmp_path: Path) -> None:
    metrics = RouterMetrics()
    recorder = Recorder(
        "outcomes", OUTCOME_COLUMNS, UNREACHABLE, tmp_path, metrics,
        memory_rows=100, spill_rows=50, spool_max_bytes=4_000, flush_interval=0.01, connect_timeout=0.5,
    )  # fmt: skip
    recorder.start()
    start = now_us()
    for n in range(1_000):
        recorder.put((start + n, "ns", "dep", f"request-{n}", 1.0))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if (
            recorder.pending + metrics.rows_dropped.labels("outcomes")._value.get() == 1_000
            and len(recorder._memory) <= 100
        ):
            break
    dropped = metrics.rows_dropped.labels("outcomes")._value.get()
    assert len(recorder._memory) <= 100, "memory stays within its bound"
    assert 4_000 <= recorder.spool.bytes < 4_000 + 50 * 60, "the spool stops at its budget (plus one chunk)"
    assert dropped > 0 and recorder.pending + dropped == 1_000, "every row is either waiting or counted as dropped"
    assert metrics.database_errors.labels("outcomes")._value.get() > 0
    await recorder.close(0.2)
