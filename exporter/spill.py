"""The backfill's sort on disk: the list comes newest first by creation, a replay needs every
version oldest first by event time, and neither fits in memory for a large organization.

Each record is written once (msgpack, in a SQLite table of the standard library), each of its
versions (replay.versions) as a row of an index on event time; `ordered` reads them back in
time order. Memory stays at SQLite's page cache whatever the history's size; the file lives in
the backfill's working directory and goes with it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator

import msgspec

from .records import Record
from .replay import Grid, Version, versions

BATCH = 20_000  # records buffered between two inserts
CACHE_KIB = 32 * 1024  # SQLite's page cache: the index is sorted in it


class Spill:
    """Records and their versions at `path` (created afresh, removed by `close`)."""

    def __init__(self, path: str, grid: Grid | None = None):
        self.path, self.grid = path, grid
        for stale in (path, path + "-journal"):
            if os.path.exists(stale):
                os.unlink(stale)
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KIB}", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE calls (n INTEGER PRIMARY KEY, record BLOB NOT NULL)")
        self.db.execute("CREATE TABLE versions (at REAL NOT NULL, n INTEGER NOT NULL, kind INTEGER, last INTEGER)")
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder(Record).decode
        self.records = 0
        self._calls: list[tuple[int, bytes]] = []
        self._versions: list[tuple[float, int, int, int]] = []

    def add(self, record: Record) -> None:
        n = self.records = self.records + 1
        self._calls.append((n, self.encode(record)))
        self._versions.extend((v.at, n, v.kind, v.last) for v in versions(record, self.grid))
        if len(self._calls) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        self.db.execute("BEGIN")  # one transaction a batch: the connection commits each statement otherwise
        self.db.executemany("INSERT INTO calls VALUES (?, ?)", self._calls)
        self.db.executemany("INSERT INTO versions VALUES (?, ?, ?, ?)", self._versions)
        self.db.execute("COMMIT")
        self._calls, self._versions = [], []

    def ordered(self) -> Iterator[tuple[Version, Record]]:
        """Every version with its record, oldest first (a call's own versions in their order)."""
        self._flush()
        self.db.execute("CREATE INDEX by_time ON versions (at, n, kind, last)")
        decode, record, current = self.decode, None, None
        rows = self.db.execute(
            "SELECT v.at, v.kind, v.last, v.n, c.record FROM versions v INDEXED BY by_time"
            " JOIN calls c ON c.n = v.n ORDER BY v.at, v.n, v.kind"
        )
        for at, kind, last, n, blob in rows:
            if n != current:
                record, current = decode(blob), n
            yield Version(at, kind, bool(last)), record

    def close(self) -> None:
        self.db.close()
        for path in (self.path, self.path + "-journal"):
            if os.path.exists(path):
                os.unlink(path)
