"""Rows on local disk until the database has them: an append-only write-ahead file and a read offset.

Every row the router records comes through here (`Recorder` appends what it was given every flush
interval), so a process killed with SIGKILL (an OOM kill, a node drain that ran out of time) loses at most
the rows of the last interval, whether or not the database was reachable. The file holds records, each a
batch of rows in the order they were recorded: ``<length:u32><crc32:u32><rows:u32>`` then the rows, pickled.
The offset of the first row not yet in the database is kept in a side file, replaced atomically after
every committed batch, so a router that restarts replays from where it stopped. A batch committed just
before a crash but not yet marked is replayed once more, which the writer's ``ON CONFLICT DO NOTHING``
turns into a no-op: each row lands exactly once.

Why pickle: a row is a tuple of str, int, float, bool and None, and pickling one costs about half a
microsecond against ten for JSON (floats dominate), on the loop that answers requests. Loading is
restricted to those types (`_PlainRows` refuses every global), so a spool file cannot run code; the CRC
tells a record torn by a crash (or damaged on disk) from a whole one, and recovery cuts the file there.

`sync` (fdatasync) is the group commit: the recorder calls it in a thread at most once a second, and only
while rows wait here for the database, so a healthy router does no disk flushes at all; rows written but
not yet synced survive a killed process (they are in the page cache), not a crashed kernel.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = tuple[Any, ...]

_HEADER = struct.Struct("<III")
"""Payload length, CRC-32 of the payload, rows in it."""


class _PlainRows(pickle.Unpickler):
    """Unpickles lists and tuples of str, int, float, bool and None only: nothing that needs a global."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a spool record may only hold plain rows, not {module}.{name}")


def _load(payload: bytes) -> list[Row]:
    rows: list[Row] = _PlainRows(io.BytesIO(payload)).load()
    return rows


class Spool:
    """One table's rows on disk in `directory`: ``<name>.wal`` and ``<name>.offset``."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.wal"
        self.offset_path = directory / f"{name}.offset"
        self._fd: int | None = None
        self._offset = 0
        """Where the first record not yet in the database starts."""
        self._size = 0
        """Where the next record goes: the end of the last whole one."""
        self.rows = 0
        """Rows on disk not yet in the database."""
        legacy = self._take_jsonl(directory / f"{name}.jsonl")
        self._recover()
        if legacy:
            self.append(legacy)

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def size(self) -> int:
        return self._size

    @property
    def bytes(self) -> int:
        """Bytes not yet in the database."""
        return self._size - self._offset

    def _recover(self) -> None:
        """Pick up what a previous run left; cut the file at a torn or damaged record (a crash mid-write)."""
        if not self.path.exists():
            self.offset_path.unlink(missing_ok=True)
            return
        data = self.path.read_bytes()
        try:
            offset = int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            offset = 0
        position, rows = 0, 0
        while position + _HEADER.size <= len(data):
            length, crc, count = _HEADER.unpack_from(data, position)
            end = position + _HEADER.size + length
            if end > len(data) or zlib.crc32(data[position + _HEADER.size : end]) != crc:
                break
            if position >= offset:
                rows += count
            position = end
        if position < len(data):
            with self.path.open("r+b") as spool:
                spool.truncate(position)
        self._size = position
        self._offset = offset if offset <= position else position
        self.rows = rows
        if self.rows == 0:
            self.clear()

    def _take_jsonl(self, legacy: Path) -> list[Row]:
        """Rows a router of an earlier version left as JSON lines (``<name>.jsonl``, its offset in the same
        side file), to be taken over in order; a torn last line is dropped."""
        if not legacy.exists():
            return []
        data = legacy.read_bytes()
        try:
            start = int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            start = 0
        lines = data[start : data.rfind(b"\n") + 1].split(b"\n")
        rows = [tuple(json.loads(line)) for line in lines if line.strip()]
        legacy.unlink()
        self.offset_path.unlink(missing_ok=True)
        return rows

    def append(self, rows: Sequence[Row]) -> int:
        """Write `rows` as one record; returns where it ends. The rows outlive this process from here on."""
        payload = pickle.dumps(list(rows), protocol=5)
        record = _HEADER.pack(len(payload), zlib.crc32(payload), len(rows)) + payload
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            os.ftruncate(self._fd, self._size)  # no torn record for the next append to follow
            raise
        self._size += len(record)
        self.rows += len(rows)
        return self._size

    def sync(self) -> None:
        """fdatasync: what was appended survives a crash of the machine too. Safe to call from a thread."""
        if self._fd is not None:
            os.fdatasync(self._fd)

    def read(self, limit: int, until: int | None = None) -> tuple[list[Row], int]:
        """Whole records from the oldest uncommitted one on, until at least `limit` rows or position `until`;
        returns the rows and the position after them (for `commit`)."""
        rows: list[Row] = []
        position = self._offset
        stop = self._size if until is None else min(until, self._size)
        if position >= stop:
            return rows, position
        with self.path.open("rb") as spool:
            spool.seek(position)
            while position < stop and len(rows) < limit:
                length, crc, _ = _HEADER.unpack(spool.read(_HEADER.size))
                payload = spool.read(length)
                if zlib.crc32(payload) != crc:
                    raise OSError(f"{self.path}: damaged record at byte {position}")
                rows += _load(payload)
                position += _HEADER.size + length
        return rows, position

    def commit(self, position: int, count: int) -> None:
        """The rows before `position` are in the database: never replay them."""
        self._offset = position
        self.rows -= count
        temporary = self.offset_path.with_suffix(".offset.tmp")
        temporary.write_text(str(position))
        os.replace(temporary, self.offset_path)

    def clear(self) -> None:
        """Everything is in the database: start an empty file (the recorder does this between batches)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)
        self.offset_path.unlink(missing_ok=True)
        self._offset = self._size = self.rows = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
