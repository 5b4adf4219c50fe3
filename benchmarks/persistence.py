"""Case 7, state save: what one poll's save costs with 100 000 tracked calls, the SQLite store
(only what changed, one transaction) beside the whole-file JSON of earlier releases.

A ledger and a store are built by accounting synthetic records, as polls would: calls created
2.5 s apart over 69 h, the newest 500 still ringing. Then, in this process:
- the reference: the JSON document of format 1 encoded and written whole (write, fsync, rename),
  as every poll did before SQLite (`migrate.encode_v1`, `migrate.write_atomically`);
- SQLite: the first save (every call), then ordinary polls, each changing 100 calls (50 new
  ones ringing, the 50 oldest ringing ones ending and settling) before its save;
- the restore of that database.
CPU is `time.process_time` around a direct call: the exporter saves in a worker thread, here in
the main one, and process time counts every thread. Bytes are what the process wrote during the
save (`wchar` of /proc/self/io): the file, its WAL, the checkpoints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.common import MB, Facts, Row, Sizes, median, verdict
from exporter.ledger import Ledger
from exporter.migrate import encode_v1, write_atomically
from exporter.records import Record
from exporter.state import StateDB
from exporter.store import Store

CASE = "7 state save"
GOAL = 30  # the SQLite save of an ordinary poll costs at most 1/30 of the whole-file JSON save's CPU ...
GOAL_CALLS = 100_000  # ... with this many tracked calls
CHANGED = 100  # calls changed per ordinary poll: half new, half ending
OPEN = 500  # the newest calls still ringing
SPACING = 2.5  # seconds between calls: 100 000 calls span 69 h of a 72 h settle window
JSON_SAVES = 5
T0 = 1_800_000_000.0


def _id(i: int) -> str:
    return f"{i * 2654435761 % 2**32:08x}-7c1e-4a5b-9d2f-{i:012x}"  # uuid-shaped, random in id order like uuid4


def _ringing(i: int) -> Record:
    created = T0 + SPACING * i
    return Record(
        _id(i),
        "ringing",
        ("outbound", "inbound")[i % 5 == 0],
        created,
        created + 1,
        created + 1,
        None,
        None,
        None,
        None,
        None,
        "reserved",
        None,
        None,
        None,
        None,
    )


def _ended(i: int) -> Record:
    created = T0 + SPACING * i
    status = ("completed", "completed", "completed", "no_answer", "busy", "failed")[i % 6]
    answered = created + 4 if status == "completed" else None
    return Record(
        _id(i),
        status,
        ("outbound", "inbound")[i % 5 == 0],
        created,
        created + 95,
        created + 1,
        answered,
        created + 90,
        85 if answered else 0,
        85 if answered else 0,
        1700 + i % 900,
        "settled",
        "delivered",
        "completed",
        f"cause_{i % 12}",
        "e_busy" if status == "failed" else None,
    )


def _count(ledger: Ledger, store: Store, record: Record) -> None:
    store.count(ledger.account(record), record.updated_at)


def tracked(calls: int) -> tuple[Ledger, Store]:
    """`calls` tracked calls, the newest OPEN ringing, the others final."""
    ledger, store = Ledger(T0 - 1), Store()
    for i in range(calls):
        _count(ledger, store, _ringing(i) if i >= calls - OPEN else _ended(i))
    ledger.complete_poll(T0 + SPACING * calls)
    return ledger, store


def _written() -> int | None:
    """Bytes this process has handed to write() so far (None off Linux)."""
    try:
        with open("/proc/self/io") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("wchar:"))
    except (OSError, StopIteration):
        return None


def _measured(save) -> tuple[float, int | None]:
    """CPU seconds and bytes written of one call of `save`."""
    before, cpu = _written(), time.process_time()
    save()
    cpu, after = time.process_time() - cpu, _written()
    return cpu, None if before is None or after is None else after - before


def _json_saves(path: Path, ledger: Ledger, store: Store) -> tuple[float, int | None]:
    results = [
        _measured(lambda: write_atomically(str(path), encode_v1("bench", ledger, store))) for _ in range(JSON_SAVES)
    ]
    return median([cpu for cpu, _ in results]), results[-1][1]


def _ordinary_polls(db: StateDB, ledger: Ledger, store: Store, calls: int, polls: int) -> list[dict]:
    """Each poll: CHANGED calls change, then the save is measured."""
    results = []
    for k in range(polls):
        new = calls + k * (CHANGED // 2)
        for i in range(new, new + CHANGED // 2):
            _count(ledger, store, _ringing(i))
        for i in range(new - OPEN, new - OPEN + CHANGED // 2):
            _count(ledger, store, _ended(i))
        changed_calls, changed_series = len(ledger.changed), len(store.changed)
        rows = db.connection.total_changes
        cpu, written = _measured(lambda: db.save(ledger, store))
        results.append(
            {
                "cpu_s": cpu,
                "bytes": written,
                "changed_calls": changed_calls,
                "rows": db.connection.total_changes - rows,
                "series_rows": changed_series,
            }
        )
    return results


def run(sizes: Sizes, facts: Facts, log_dir: Path) -> list[Row]:
    n = sizes.state_calls
    ledger, store = tracked(n)
    json_cpu, json_bytes = _json_saves(log_dir / "state-v1.json", ledger, store)
    path = log_dir / "state.db"
    db = StateDB(str(path), "bench")
    first_cpu, first_bytes = _measured(lambda: db.save(ledger, store))
    polls = _ordinary_polls(db, ledger, store, n, sizes.state_saves)
    db.close()
    started, cpu = time.perf_counter(), time.process_time()
    db, restored = StateDB.open(str(path), "bench")
    restore_cpu, restore_wall = time.process_time() - cpu, time.perf_counter() - started
    db.close()
    exact = restored.ledger.calls == ledger.calls and restored.store.counters == store.counters

    cpu = median([p["cpu_s"] for p in polls])
    written = [p["bytes"] for p in polls if p["bytes"] is not None]
    ordinary_bytes = median(written) if written else None
    mean_bytes = sum(written) / len(written) if written else None
    facts[CASE].update(
        calls=n,
        changed_per_poll=CHANGED,
        json_bytes=os.path.getsize(log_dir / "state-v1.json"),
        polls=polls,
        restored_exactly=exact,
        db_bytes=os.path.getsize(path),
    )
    less = json_cpu / cpu if cpu else None
    cpu_goal = f">= {GOAL}x (<= 1/{GOAL}) at {GOAL_CALLS:,} calls"
    cpu_verdict = verdict(None if n < GOAL_CALLS else less is not None and less >= GOAL)
    restore = f"SQLite restore of {n:,} tracked calls: CPU (wall {restore_wall * 1000:,.0f} ms)"
    rows = [
        Row(CASE, f"JSON whole-file save (the reference), {n:,} tracked calls: CPU per save", json_cpu * 1000, "ms"),
        Row(CASE, "JSON whole-file save: bytes written per save", _mb(json_bytes), "MB"),
        Row(
            CASE,
            f"SQLite save of an ordinary poll ({CHANGED} calls changed): CPU per save (median of {len(polls)})",
            cpu * 1000,
            "ms",
        ),
        Row(
            CASE,
            f"SQLite save of an ordinary poll: bytes written per save, median (mean {_mb(mean_bytes) or 0:.2f} MB"
            " with the WAL checkpoints)",
            _mb(ordinary_bytes),
            "MB",
        ),
        # The goal is set at 100 000 calls: the JSON save grows with the calls, an ordinary one does not.
        Row(CASE, "JSON save ÷ SQLite ordinary save: CPU per save", less, "x", goal=cpu_goal, verdict=cpu_verdict),
        Row(
            CASE,
            "JSON save ÷ SQLite ordinary save: bytes written per save",
            json_bytes / ordinary_bytes if json_bytes and ordinary_bytes else None,
            "x",
        ),
        Row(CASE, f"SQLite first save (all {n:,} calls, the file built whole): CPU", first_cpu * 1000, "ms"),
        Row(CASE, "SQLite first save: bytes written", _mb(first_bytes), "MB"),
        Row(CASE, restore, restore_cpu * 1000, "ms", goal="exact", verdict=verdict(exact)),
    ]
    return rows


def _mb(size: int | float | None) -> float | None:
    return None if size is None else size / MB
