"""Rows waiting on local disk while the database is away: an append-only file and a read offset.

The spool only ever holds rows older than those still in memory (the recorder moves its oldest rows
here when memory is full), so replaying the spool first and memory second writes rows in the order they
were recorded. Each row is one JSON line; the offset of the first row not yet in the database is kept in
a side file, replaced atomically after every committed batch, so a router that restarts replays from
where it stopped. A batch that was committed just before a crash but not yet marked is replayed once
more, which the writer's ``ON CONFLICT DO NOTHING`` turns into a no-op: each row lands exactly once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = tuple[Any, ...]


class Spool:
    """One table's spool in `directory`: ``<name>.jsonl`` and ``<name>.offset``."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}.jsonl"
        self.offset_path = directory / f"{name}.offset"
        self._offset = 0
        self._size = 0
        self.rows = 0
        self._recover()

    def _recover(self) -> None:
        """Pick up what a previous run left; drop a torn last line (a crash mid-write)."""
        if not self.path.exists():
            self.offset_path.unlink(missing_ok=True)
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            with self.path.open("r+b") as spool:
                spool.truncate(complete)
        self._size = complete
        try:
            self._offset = min(int(self.offset_path.read_text().strip() or 0), complete)
        except (FileNotFoundError, ValueError):
            self._offset = 0
        self.rows = data.count(b"\n", self._offset, complete)
        if self.rows == 0:
            self._clear()

    @property
    def bytes(self) -> int:
        """Bytes not yet in the database."""
        return self._size - self._offset

    def append(self, rows: Sequence[Row]) -> None:
        if not rows:
            return
        data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode()
        with self.path.open("ab") as spool:
            spool.write(data)
        self._size += len(data)
        self.rows += len(rows)

    def read(self, limit: int) -> tuple[list[Row], int]:
        """Up to `limit` rows from the oldest one on, and the position after them (for `commit`)."""
        rows: list[Row] = []
        position = self._offset
        if not self.rows:
            return rows, position
        with self.path.open("rb") as spool:
            spool.seek(self._offset)
            for line in spool:
                if len(rows) >= limit or not line.endswith(b"\n"):
                    break
                rows.append(tuple(json.loads(line)))
                position += len(line)
        return rows, position

    def commit(self, position: int, count: int) -> None:
        """The rows before `position` are in the database: never replay them."""
        self._offset = position
        self.rows -= count
        if self._offset >= self._size:
            self._clear()
            return
        temporary = self.offset_path.with_suffix(".offset.tmp")
        temporary.write_text(str(position))
        os.replace(temporary, self.offset_path)

    def _clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.offset_path.unlink(missing_ok=True)
        self._offset = self._size = self.rows = 0
