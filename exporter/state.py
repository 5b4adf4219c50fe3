"""Durable state of one target in a SQLite file: store, ledger and watermark, written a poll at a time.

One transaction per save (WAL, synchronous=FULL): a crash at any instant leaves the last committed
poll, and `save` returns only once the poll is on disk, so the poller publishes after it (persist,
then publish). A save writes only the calls and series changed since the one before (the rows:
tables.py; building, installing and opening the file: statefile.py). The JSON file of earlier
releases (format 1, read by migrate.py) is migrated at open; any other file is refused with one
line, never replaced: starting afresh at a new baseline is the operator's call.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sqlite3
import threading
from typing import NamedTuple

from . import migrate, statefile, tables
from .ledger import Ledger
from .migrate import encode_v1  # noqa: F401  (re-exported: tests and the persistence benchmark write format 1 with it)
from .statefile import (
    AFRESH,
    APPLICATION_ID,  # noqa: F401  (re-exported: the tests check the file's application id)
    StateError,
    refuse,
    unreadable,
)
from .store import Store
from .tables import SCHEMA_VERSION  # noqa: F401  (re-exported: the tests check the file's schema)

# Meta rows written only when their text changed: label values' last uses (rounded to the minute)
# and the series held unseen, most saves the same.
UNLESS_CHANGED = ("label_use", "births")

log = logging.getLogger(__name__)


class Restored(NamedTuple):
    ledger: Ledger
    store: Store
    reset_histograms: list[str]  # histograms whose buckets changed: they restart at zero
    extra: dict  # what the caller saved beside the state (`save(extra=...)`)
    saved_at: float | None


class StateDB:
    """One target's state database. Remembers the ledger and store it last saved, so the next
    save writes only their changes; any other ledger or store is written whole."""

    def __init__(self, path: str, org: str):
        self.path, self.org = path, org
        self.connection: sqlite3.Connection | None = None  # none until the first save creates the file
        self._lock = threading.Lock()  # saves run in worker threads
        self._saved: tuple[Ledger | None, Store | None] = (None, None)
        self._meta: dict[str, str] = {}  # UNLESS_CHANGED rows as last committed
        self._closed = False

    @classmethod
    def open(
        cls, path: str, org: str, buckets=None, label_limit: int = 50, extra_labels: tuple[str, ...] = ()
    ) -> tuple[StateDB, Restored | None]:
        """The database at `path` and what it holds; None when there is no file yet (created at
        the first save). A JSON state file is migrated first. Raises StateError."""
        db = cls(path, org)
        found = statefile.kind(path)
        if found is None:
            return db, None
        if found == "json":
            _migrate(path, org)
        db.connection = statefile.connect(path)
        try:
            restored, ledger_as_saved, store_as_saved = _restore(
                db.connection, path, buckets, label_limit, extra_labels
            )
        except BaseException:
            db.close()
            raise
        # A restore that re-keyed labels or reset buckets differs from the file: that part is written whole.
        db._saved = (restored.ledger if ledger_as_saved else None, restored.store if store_as_saved else None)
        db._meta = dict(
            db.connection.execute(
                f"SELECT key, value FROM meta WHERE key IN ({', '.join('?' * len(UNLESS_CHANGED))})", UNLESS_CHANGED
            )
        )
        for name in restored.reset_histograms:
            log.warning(
                "histogram buckets changed, histogram restarts from zero", extra={"org": org, "histogram": name}
            )
        return db, restored

    def save(
        self, ledger: Ledger, store: Store, extra: dict[str, object] | None = None, adding: tables.Adding = None
    ) -> None:
        """Write what changed since the last save in one transaction, on disk when this returns.

        `extra` (JSON values) is saved beside the state and comes back in `Restored.extra`.
        `adding` are counts written on top of the store's that the store itself does not hold yet:
        a poll's own outcome, which only this save decides (the caller counts it once this returns
        or fails). If the save fails, the changes it took stay marked, so the next save writes them.
        """
        with self._lock:
            if self._closed:
                raise StateError(f"{self.path}: the state database is closed")
            calls, series = ledger.take_changed(), store.take_changed()
            try:
                with _no_cyclic_gc():
                    if self.connection is None:
                        self._create(ledger, store, extra, adding)
                    else:
                        self._write(ledger, store, calls, series, extra, adding)
            except BaseException:
                ledger.changed.update(calls)
                store.changed.update(series)
                raise
            self._saved = (ledger, store)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self.connection is not None:
                self.connection.close()  # the last connection checkpoints the WAL into the file
                self.connection = None

    def _create(self, ledger: Ledger, store: Store, extra: dict | None, adding: tables.Adding) -> None:
        """The first save: the file appears complete (built beside it, then renamed), never half made."""
        building = self.path + ".new"
        meta = statefile.build(building, self.org, ledger, store, extra, adding)
        statefile.install(building, self.path)
        self._meta = {key: text for key, text in meta if key in UNLESS_CHANGED}
        self.connection = statefile.connect(self.path)

    def _write(
        self,
        ledger: Ledger,
        store: Store,
        calls: set[str],
        series: set[tuple],
        extra: dict | None,
        adding: tables.Adding,
    ) -> None:
        db = self.connection
        saved_ledger, saved_store = self._saved
        db.execute("BEGIN IMMEDIATE")
        try:
            if ledger is saved_ledger:
                tables.write_calls(db, ledger, calls)
            else:
                tables.replace_calls(db, ledger)
            if store is saved_store:
                tables.write_series(db, store, series, adding)
            else:
                tables.replace_store(db, store, adding)
            meta = [
                (key, text)
                for key, text in tables.meta_rows(self.org, ledger, store, extra)
                if key not in UNLESS_CHANGED or self._meta.get(key) != text
            ]
            db.executemany(tables.UPSERT_META, meta)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._meta.update((key, text) for key, text in meta if key in UNLESS_CHANGED)


_gc_pause = threading.Lock()
_gc_pausing = [0, False]  # saves pausing the cyclic GC now, whether it was enabled before the first


@contextlib.contextmanager
def _no_cyclic_gc():
    """The cyclic GC paused while a save runs: a whole write makes a tuple per call, which the
    GC would otherwise walk, in the saving thread holding the GIL, a pause of tens of ms per
    100 000 calls against the event loop. Rows are freed by their reference count either way;
    garbage cycles made meanwhile wait for the next collection after it. Saves of several orgs
    may overlap in their threads: the last one to finish resumes it, if it was enabled before."""
    with _gc_pause:
        if not _gc_pausing[0]:
            _gc_pausing[1] = gc.isenabled()
            gc.disable()
        _gc_pausing[0] += 1
    try:
        yield
    finally:
        with _gc_pause:
            _gc_pausing[0] -= 1
            if not _gc_pausing[0] and _gc_pausing[1]:
                gc.enable()


def _restore(
    db: sqlite3.Connection, path: str, buckets, label_limit: int, extra_labels: tuple[str, ...]
) -> tuple[Restored, bool, bool]:
    """What the database holds, under today's config; and whether ledger and store are as saved."""
    try:
        problem = db.execute("PRAGMA quick_check").fetchone()[0]
        if problem != "ok":
            raise unreadable(path, "damaged state database", problem)
        meta = tables.read_meta(db)
        if "baseline" not in meta:
            raise unreadable(path, "incomplete state database", "no baseline")
        ledger, store, reset, *as_saved = tables.load(db, meta, buckets, label_limit, extra_labels)
    except sqlite3.Error as error:
        raise statefile.failed(path, error)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise unreadable(path, "state database with unreadable content", error)
    extra = {key[len(tables.EXTRA) :]: value for key, value in meta.items() if key.startswith(tables.EXTRA)}
    return Restored(ledger, store, reset, extra, meta.get("saved_at")), *as_saved


def read(path: str, buckets=None, label_limit: int = 50, extra_labels: tuple[str, ...] = ()) -> Restored | None:
    """The saved state, read only (`explain`): nothing is written, moved or migrated. None: no file."""
    found = statefile.kind(path)
    if found is None:
        return None
    if found == "json":
        with open(path, "rb") as handle:
            return _restore_v1(path, handle.read(), buckets, label_limit, extra_labels)
    db = statefile.connect(path, read_only=True)
    try:
        return _restore(db, path, buckets, label_limit, extra_labels)[0]
    finally:
        db.close()


# ---- format 1: the JSON file of earlier releases, read by migrate.py -----------------------


def _migrate(path: str, org: str) -> None:
    """Turn the JSON file at `path` into a database, as saved (the restore applies today's config).

    The database is built at `.migrating`, the JSON kept as `.v1.json` (for a rollback), then the
    database renamed over `path`: a crash at any instant leaves the JSON (migrated again at the
    next start) or the complete database.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    restored = _restore_v1(path, data, as_saved=True)
    building, kept = path + ".migrating", path + ".v1.json"
    try:
        statefile.build(building, org, restored.ledger, restored.store, None)
        migrate.write_atomically(kept, data)
        statefile.install(building, path)
    except (OSError, sqlite3.Error) as error:
        raise refuse(
            path,
            f"a JSON state that cannot be migrated ({error})",
            "check the permissions of its directory, where the database is built beside it",
        )
    log.info(
        "state file migrated from JSON to SQLite",
        extra={"org": org, "path": path, "tracked_calls": len(restored.ledger.calls), "old_file": kept},
    )


def _restore_v1(
    path: str,
    data: bytes,
    buckets=None,
    label_limit: int = 50,
    extra_labels: tuple[str, ...] = (),
    as_saved: bool = False,
) -> Restored:
    """What the JSON file holds, under the config given or, `as_saved`, its own buckets and labels."""
    try:
        document = migrate.document_v1(data)
        if as_saved:
            buckets, extra_labels = migrate.as_saved_v1(document)
        ledger = migrate.ledger_v1(document, tuple(extra_labels))
        store, reset = Store.from_json(document["store"], buckets, label_limit, extra_labels)
    except migrate.UnknownVersion as error:
        raise refuse(
            path,
            f"a JSON state of unknown format version {error.version!r}",
            f"run the version that wrote it, or {AFRESH}",
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise unreadable(path, "unreadable JSON state", error)
    return Restored(ledger, store, reset, {}, document.get("saved_at"))
