"""The spool keeps rows in order across appends, partial replays and restarts, and survives a torn write."""

from __future__ import annotations

from pathlib import Path

from shadowgate_router.spool import Spool


def rows(start: int, count: int) -> list[tuple[object, ...]]:
    return [(1_700_000_000_000_000 + n, "ns", "dep", f"r{n}", None, 0.1 * n, True) for n in range(start, start + count)]


def test_rows_come_back_in_order_and_exactly_as_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "predictions")
    spool.append(rows(0, 5))
    spool.append(rows(5, 5))
    assert spool.rows == 10
    first, position = spool.read(4)
    assert first == rows(0, 4)
    spool.commit(position, len(first))
    rest, position = spool.read(100)
    assert rest == rows(4, 6)
    spool.commit(position, len(rest))
    assert spool.rows == 0 and spool.bytes == 0
    assert not spool.path.exists(), "an emptied spool leaves no file behind"


def test_a_restart_resumes_after_the_last_committed_row(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "outcomes")
    spool.append(rows(0, 10))
    batch, position = spool.read(3)
    spool.commit(position, len(batch))
    reopened = Spool(tmp_path, "outcomes")
    assert reopened.rows == 7
    assert reopened.read(100)[0] == rows(3, 7)


def test_a_row_read_but_not_committed_is_replayed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "outcomes")
    spool.append(rows(0, 3))
    spool.read(2)  # written to the database, then the process died before commit
    assert Spool(tmp_path, "outcomes").read(100)[0] == rows(0, 3)


def test_a_torn_last_line_is_dropped_on_recovery(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "predictions")
    spool.append(rows(0, 2))
    with spool.path.open("ab") as file:
        file.write(b'[1700000000000009,"ns","de')  # the process died mid-write
    recovered = Spool(tmp_path, "predictions")
    assert recovered.rows == 2
    assert recovered.read(100)[0] == rows(0, 2)
    recovered.append(rows(2, 1))
    assert recovered.read(100)[0] == rows(0, 3)


def test_appending_while_replaying_keeps_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "predictions")
    spool.append(rows(0, 4))
    batch, position = spool.read(2)
    spool.append(rows(4, 2))
    spool.commit(position, len(batch))
    assert spool.read(100)[0] == rows(2, 4)
