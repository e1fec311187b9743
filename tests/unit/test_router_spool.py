"""The spool keeps rows in order across appends, partial replays and restarts, survives a torn or damaged
write, takes over an earlier version's JSON-lines spool, and loads nothing but plain rows."""

from __future__ import annotations

import json
import pickle
import struct
import zlib
from pathlib import Path

import pytest

from shadowgate_router.spool import Spool


def rows(start: int, count: int) -> list[tuple[object, ...]]:
    return [
        (1_700_000_000_000_000 + n, "ns", "dep", f"r{n}", None, 0.1 * n, n % 2 == 0, 2**40 + n)
        for n in range(start, start + count)
    ]


def test_rows_come_back_in_order_and_exactly_as_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "predictions")
    spool.append(rows(0, 5))
    end = spool.append(rows(5, 5))
    assert spool.rows == 10 and end == spool.size
    first, position = spool.read(4)
    assert first == rows(0, 5), "whole records: a read stops after the record that reaches the limit"
    spool.commit(position, len(first))
    rest, position = spool.read(100)
    assert rest == rows(5, 5)
    spool.commit(position, len(rest))
    assert spool.rows == 0 and spool.bytes == 0
    spool.clear()
    assert not spool.path.exists(), "an emptied spool leaves no file behind"


def test_a_read_stops_where_asked(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "outcomes")
    middle = spool.append(rows(0, 3))
    spool.append(rows(3, 3))
    assert spool.read(100, until=middle) == (rows(0, 3), middle)


def test_a_restart_resumes_after_the_last_committed_row(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "outcomes")
    for start in range(0, 10, 2):
        spool.append(rows(start, 2))
    batch, position = spool.read(3)
    spool.commit(position, len(batch))
    spool.close()
    reopened = Spool(tmp_path, "outcomes")
    assert reopened.rows == 6
    assert reopened.read(100)[0] == rows(4, 6)


def test_a_row_read_but_not_committed_is_replayed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "outcomes")
    spool.append(rows(0, 3))
    spool.read(2)  # written to the database, then the process died before commit
    assert Spool(tmp_path, "outcomes").read(100)[0] == rows(0, 3)


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_torn_or_damaged_last_record_is_cut_on_recovery(tmp_path: Path, damage: str) -> None:
    spool = Spool(tmp_path, "predictions")
    whole = spool.append(rows(0, 2))
    spool.append(rows(2, 2))
    spool.close()
    data = bytearray(spool.path.read_bytes())
    if damage == "torn":
        del data[-7:]  # the process died mid-write
    else:
        data[-3] ^= 0xFF  # a bit went bad on disk
    spool.path.write_bytes(bytes(data))
    recovered = Spool(tmp_path, "predictions")
    assert recovered.rows == 2 and recovered.size == whole
    assert recovered.read(100)[0] == rows(0, 2)
    recovered.append(rows(4, 1))
    assert recovered.read(100)[0] == rows(0, 2) + rows(4, 1)


def test_appending_while_replaying_keeps_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "predictions")
    spool.append(rows(0, 2))
    spool.append(rows(2, 2))
    batch, position = spool.read(2)
    spool.append(rows(4, 2))
    spool.commit(position, len(batch))
    assert spool.read(100)[0] == rows(2, 4)


def test_an_earlier_json_lines_spool_is_taken_over(tmp_path: Path) -> None:
    legacy = tmp_path / "outcomes.jsonl"
    legacy.write_text("".join(json.dumps(row) + "\n" for row in rows(0, 5)))
    first_two = len("".join(json.dumps(row) + "\n" for row in rows(0, 2)))
    (tmp_path / "outcomes.offset").write_text(str(first_two))  # two already in the database
    spool = Spool(tmp_path, "outcomes")
    assert spool.read(100)[0] == rows(2, 3)
    assert not legacy.exists()


def test_only_plain_rows_are_loaded(tmp_path: Path) -> None:
    payload = pickle.dumps([(1, Path("/etc"))])  # needs a global to load: refused
    record = struct.pack("<III", len(payload), zlib.crc32(payload), 1) + payload
    (tmp_path / "outcomes.wal").write_bytes(record)
    with pytest.raises(pickle.UnpicklingError, match="only hold plain rows"):
        Spool(tmp_path, "outcomes").read(10)
