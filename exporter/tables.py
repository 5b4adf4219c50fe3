"""The state database's tables: their schema, and a ledger and a store as rows and back.

state.py owns the file and its transactions and calls these inside them. A restore reads the
store's rows into the JSON document `Store.from_json` reads (document.py), so it applies the same
rules as any other restore: renamed families, added labels, re-keyed metadata labels, buckets.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping

from .accounting import CallState
from .catalogue import FAMILIES, added_labels, relabel
from .ledger import Ledger
from .store import Store

SCHEMA_VERSION = 3  # PRAGMA user_version; format 1 was the JSON file, 2 had no end details per call
SLICE = 2000  # rows built per executemany: the GIL is let go between slices, so scrapes go on meanwhile
EXTRA = "extra."  # meta keys of the values a caller saves beside the state (Restored.extra)
# Counts a save writes beyond the store's, which the store takes only once the save's outcome is
# known (StateDB.save): {(family, labels): amount}.
Adding = Mapping[tuple[str, tuple[str, ...]], int] | None

CALL_COLUMNS = (
    "id",
    "direction",
    "status",
    "created_at",
    "updated_at",
    "billed",
    "webhook",
    "result",
    "webhook_pending_since",
    "amount",
    "extra",
    "ended",
    "todo",
    "deviations",
)
# Schema 2 → 3: the columns a call gained, added in place (a terminal call of schema 2 waits for nothing).
UPGRADE_2 = (
    "ALTER TABLE calls ADD COLUMN ended REAL",
    "ALTER TABLE calls ADD COLUMN todo INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE calls ADD COLUMN deviations INTEGER NOT NULL DEFAULT 0",
)
SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    # A rowid table: rows lie in the order calls were first saved, so the calls a poll changes
    # (new ones, recent ones ending) share a few pages at the end instead of one random page each
    # (ids are random); only a new call's id lands in a random page, of the index (CALLS_INDEX).
    "CREATE TABLE calls (id TEXT NOT NULL, direction TEXT NOT NULL, status TEXT NOT NULL,"
    " created_at REAL NOT NULL, updated_at REAL NOT NULL, billed INTEGER NOT NULL, webhook TEXT, result TEXT,"
    " webhook_pending_since REAL, amount INTEGER, extra TEXT, ended REAL, todo INTEGER NOT NULL DEFAULT 0,"
    " deviations INTEGER NOT NULL DEFAULT 0)",
    # value has no type: an integer stays an integer, a float a float
    "CREATE TABLE counters (family TEXT NOT NULL, labels TEXT NOT NULL, value NOT NULL,"
    " PRIMARY KEY (family, labels)) WITHOUT ROWID",
    "CREATE TABLE histograms (family TEXT NOT NULL, labels TEXT NOT NULL, counts TEXT NOT NULL,"
    " PRIMARY KEY (family, labels)) WITHOUT ROWID",
    "CREATE TABLE buckets (family TEXT PRIMARY KEY, bounds TEXT NOT NULL) WITHOUT ROWID",
)
CALLS_INDEX = "CREATE UNIQUE INDEX calls_id ON calls (id)"
INSERT_CALL = f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) VALUES ({', '.join('?' * len(CALL_COLUMNS))})"
UPSERT_CALL = (
    INSERT_CALL + " ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in CALL_COLUMNS[1:])
)
UPSERT_COUNTER = (
    "INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (family, labels) DO UPDATE SET value = excluded.value"
)
UPSERT_HISTOGRAM = (
    "INSERT INTO histograms VALUES (?, ?, ?) ON CONFLICT (family, labels) DO UPDATE SET counts = excluded.counts"
)
UPSERT_META = "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"


def create(
    db: sqlite3.Connection, org: str, ledger: Ledger, store: Store, extra: dict | None, adding: Adding = None
) -> list[tuple[str, str]]:
    """The tables with the state written whole, in the caller's transaction; returns the meta rows."""
    for statement in SCHEMA:
        db.execute(statement)
    replace_calls(db, ledger)
    replace_store(db, store, adding)
    meta = meta_rows(org, ledger, store, extra)
    db.executemany(UPSERT_META, meta)
    return meta


# Labels are stored as this JSON text, the key of every upsert: it must stay the same text for
# the same labels (compact, ASCII-escaped) as long as the schema version does.
_text = json.JSONEncoder(separators=(",", ":")).encode


def _call_row(call_id: str, s: CallState) -> tuple:
    return (
        call_id,
        s.direction,
        s.status,
        s.created_at,
        s.updated_at,
        int(s.billed),
        s.webhook,
        s.result,
        s.webhook_pending_since,
        s.amount,
        _text(s.extra) if s.extra else None,
        s.ended,
        s.todo,
        s.deviations,
    )


def write_calls(db: sqlite3.Connection, ledger: Ledger, changed: set[str]) -> None:
    calls, ids = ledger.calls, list(changed)
    for i in range(0, len(ids), SLICE):
        rows, gone = [], []
        for call_id in ids[i : i + SLICE]:
            state = calls.get(call_id)
            if state is None:
                gone.append((call_id,))
            else:
                rows.append(_call_row(call_id, state))
        db.executemany(UPSERT_CALL, rows)
        db.executemany("DELETE FROM calls WHERE id = ?", gone)


def replace_calls(db: sqlite3.Connection, ledger: Ledger) -> None:
    # The index is built again at the end: one sort, where 100 000 inserts of random ids would
    # each dirty a random page (230 MB written for a 15 MB file, measured).
    db.execute("DROP INDEX IF EXISTS calls_id")
    db.execute("DELETE FROM calls")
    items = list(ledger.calls.items())  # one step: a reload's new poller may count meanwhile
    for i in range(0, len(items), SLICE):
        db.executemany(INSERT_CALL, [_call_row(call_id, state) for call_id, state in items[i : i + SLICE]])
    db.execute(CALLS_INDEX)


def write_series(db: sqlite3.Connection, store: Store, changed: set[tuple], adding: Adding = None) -> None:
    counters, histograms, gone = [], [], []
    adding = adding or {}
    for name, labels in changed | set(adding):
        key = _text(labels)
        value = store.counters.get(name, {}).get(labels)
        if (name, labels) in adding:
            value = (value or 0) + adding[name, labels]
        counts = store.histograms.get(name, {}).get(labels)
        if value is not None:
            counters.append((name, key, value))
        elif counts is not None:
            histograms.append((name, key, _text(counts)))
        else:
            gone.append((name, key))
    db.executemany(UPSERT_COUNTER, counters)
    db.executemany(UPSERT_HISTOGRAM, histograms)
    db.executemany("DELETE FROM counters WHERE family = ? AND labels = ?", gone)
    db.executemany("DELETE FROM histograms WHERE family = ? AND labels = ?", gone)


def replace_store(db: sqlite3.Connection, store: Store, adding: Adding = None) -> None:
    for table in ("counters", "histograms", "buckets"):
        db.execute(f"DELETE FROM {table}")
    counters = {
        (name, labels): value for name, series in list(store.counters.items()) for labels, value in list(series.items())
    }
    for key, amount in (adding or {}).items():
        counters[key] = counters.get(key, 0) + amount
    db.executemany(
        "INSERT INTO counters VALUES (?, ?, ?)",
        [(name, _text(labels), value) for (name, labels), value in counters.items()],
    )
    db.executemany(
        "INSERT INTO histograms VALUES (?, ?, ?)",
        [
            (name, _text(labels), _text(counts))
            for name, series in list(store.histograms.items())
            for labels, counts in list(series.items())
        ],
    )
    db.executemany(
        "INSERT INTO buckets VALUES (?, ?)",
        [(name, _text(list(bounds))) for name, bounds in store.buckets.items() if name in FAMILIES],
    )


def meta_rows(org: str, ledger: Ledger, store: Store, extra: dict | None) -> list[tuple[str, str]]:
    """The meta table's rows of a save: (key, JSON text)."""
    values = {
        "org": org,
        "saved_at": time.time(),
        "baseline": ledger.baseline,
        "watermark": ledger.watermark,
        "extra_labels": list(store.extra_labels),
        "today": {"day": store.today_day, "totals": dict(store.today)},
        # Rounded to the minute, so this row changes about once a minute, not at every save.
        "label_use": store.label_use.to_json(),
        "births": store.births.to_json(store),
    }
    values.update((EXTRA + key, value) for key, value in (extra or {}).items())
    return [(key, _text(value)) for key, value in values.items()]


def read_meta(db: sqlite3.Connection) -> dict:
    """The meta table: key → JSON value."""
    return {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM meta")}


def load(
    db: sqlite3.Connection, meta: dict, buckets, label_limit: int, extra_labels: tuple[str, ...]
) -> tuple[Ledger, Store, list[str], bool, bool]:
    """The ledger and store the rows hold, under today's config; the histograms reset (buckets
    changed); and whether the ledger and the store are as the rows hold them, so that the next save
    may write only their changes."""
    saved_extra = tuple(meta.get("extra_labels") or ())
    ledger = Ledger(meta["baseline"], meta.get("watermark"), _calls(db, saved_extra, tuple(extra_labels)))
    data = _store_document(db, meta, saved_extra)
    store, reset = Store.from_json(data, buckets, label_limit, extra_labels)
    same_labels = saved_extra == tuple(extra_labels)
    known = all(name in FAMILIES for kind in ("counters", "histograms") for name in data[kind])
    # A series saved before its family gained a label is restored under today's labels: the old
    # row must go, so the store is written whole (otherwise both would be restored next time).
    known = known and not any(
        added_labels(name, row[:-1]) is not None for name, rows in data["counters"].items() for row in rows
    )
    return ledger, store, reset, same_labels, same_labels and known and not reset


def _calls(db: sqlite3.Connection, saved_extra: tuple[str, ...], extra_labels: tuple[str, ...]) -> dict:
    """The ledger's calls, their metadata values re-keyed from the saved labels onto today's."""
    calls: dict[str, CallState] = {}
    extras: dict[str | None, tuple] = {}  # one tuple per distinct value set, shared as the ledger does
    present = {row[1] for row in db.execute("PRAGMA table_info(calls)")}  # schema 2, read only: fewer
    columns = [c if c in present else "NULL" if c == "ended" else "0" for c in CALL_COLUMNS]
    rows = db.execute(f"SELECT {', '.join(columns)} FROM calls")
    while batch := rows.fetchmany(SLICE):
        for (
            call_id,
            direction,
            status,
            created,
            updated,
            billed,
            webhook,
            result,
            since,
            amount,
            extra,
            ended,
            todo,
            found,
        ) in batch:
            state = calls[call_id] = CallState(
                direction,
                status,
                created,
                updated,
                bool(billed),
                webhook,
                result,
                since,
                amount,
                (),
                ended,
                todo,
                found,
            )
            if extra_labels:
                values = extras.get(extra)
                if values is None:
                    saved = tuple(json.loads(extra)) if extra else ()
                    values = extras[extra] = relabel(saved_extra, saved, extra_labels)
                state.extra = values
    return calls


def _store_document(db: sqlite3.Connection, meta: dict, saved_extra: tuple[str, ...]) -> dict:
    """The store as `Store.from_json` reads it, so a restore applies the same rules (labels, buckets)."""
    counters: dict[str, list] = {}
    for family, labels, value in db.execute("SELECT family, labels, value FROM counters"):
        counters.setdefault(family, []).append([*json.loads(labels), value])
    bounds = {family: json.loads(b) for family, b in db.execute("SELECT family, bounds FROM buckets")}
    histograms: dict[str, dict] = {}
    for family, labels, counts in db.execute("SELECT family, labels, counts FROM histograms"):
        saved = histograms.setdefault(family, {"buckets": bounds.get(family, []), "series": []})
        saved["series"].append([*json.loads(labels), *json.loads(counts)])
    return {
        "counters": counters,
        "histograms": histograms,
        "today": meta.get("today") or {},
        "extra_labels": list(saved_extra),
        "label_use": meta.get("label_use"),
        "births": meta.get("births"),
    }
