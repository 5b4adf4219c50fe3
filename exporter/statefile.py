"""The state database as a file: built whole and installed atomically, or opened and checked as ours.

A file appears complete or not at all (built at a side path, fsynced, renamed, the directory
fsynced); an open refuses, with one line naming the path, what is wrong and what to do, anything
that is not a state database this version can read. state.py keeps what the file holds.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

from . import tables
from .ledger import Ledger
from .store import Store
from .tables import SCHEMA_VERSION

APPLICATION_ID = 0x43424558  # PRAGMA application_id, "CBEX": another application's SQLite file is not ours
SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_LIMIT = 4 * 1024 * 1024  # bytes the WAL keeps after a checkpoint
AFRESH = "move the file away to start afresh at a new baseline (counters restart at zero)"


class StateError(Exception):
    """A state file that cannot be used as it is. The message is one line: the path, what is
    wrong, what to do."""


def refuse(path: str, problem: str, todo: str) -> StateError:
    return StateError(" ".join(f"{path}: {problem}: {todo}".split()))


def unreadable(path: str, what: str, error: object) -> StateError:
    return refuse(path, f"{what} ({error})", f"restore a backup, or {AFRESH}")


def failed(path: str, error: sqlite3.Error) -> StateError:
    """SQLite's error at open: the file or its directory not accessible, else the file damaged."""
    if getattr(error, "sqlite_errorname", "") in ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM"):
        return refuse(
            path,
            f"cannot be opened ({error})",
            "check the permissions of the file and its directory (SQLite writes beside it)",
        )
    return unreadable(path, "unreadable state database", error)


def build(
    path: str, org: str, ledger: Ledger, store: Store, extra: dict | None, adding: tables.Adding = None
) -> list[tuple[str, str]]:
    """A complete database at `path`, the state written whole, closed and on disk (not yet
    installed); returns the meta rows written."""
    remove(path)
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=MEMORY")  # nothing to recover: an unfinished file is never installed
            db.execute("PRAGMA synchronous=OFF")  # the file is fsynced once, below
            db.execute("PRAGMA temp_store=MEMORY")  # see connect
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute("BEGIN")
            meta = tables.create(db, org, ledger, store, extra, adding)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
            db.execute("PRAGMA journal_mode=WAL")  # persistent: written into the file's header
        finally:
            db.close()
        fsync(path)
    except BaseException:
        remove(path)
        raise
    return meta


def install(built: str, path: str) -> None:
    """Put a built database in place: rename, then fsync the directory."""
    for stale in (path + "-wal", path + "-shm"):  # another file's WAL must never be replayed onto this one
        unlink(stale)
    os.replace(built, path)
    fsync(os.path.dirname(os.path.abspath(path)))


def remove(path: str) -> None:
    for name in (path, path + "-journal", path + "-wal", path + "-shm"):
        unlink(name)


def unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def kind(path: str) -> str | None:
    """What is at `path`: "sqlite", "json", or None when nothing; refuses anything else."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return None
    except OSError as error:
        raise refuse(path, f"cannot be read ({error.strerror})", "check the path and its permissions")
    if head == SQLITE_MAGIC:
        return "sqlite"
    if head.lstrip()[:1] == b"{":
        return "json"
    problem = "an empty file" if not head else "not a state file (neither SQLite nor JSON)"
    raise refuse(path, problem, f"restore a backup, or {AFRESH}")


def connect(path: str, read_only: bool = False) -> sqlite3.Connection:
    """A connection to our database at `path` (never created here); refuses anything else."""
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode={'ro' if read_only else 'rw'}"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as error:
        raise failed(path, error)
    try:
        application = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if application != APPLICATION_ID:
            raise refuse(
                path,
                "a SQLite database of another application, not a callingbox-exporter state",
                f"point state_file elsewhere, or {AFRESH}",
            )
        if version > SCHEMA_VERSION:
            raise refuse(
                path,
                f"written by a newer callingbox-exporter (state schema {version}, this version reads {SCHEMA_VERSION})",
                "run that version or a newer one, or restore a backup from before the upgrade",
            )
        if version == 2:
            if not read_only:  # one transaction: a crash leaves schema 2, upgraded again at the next start
                db.executescript(
                    "BEGIN IMMEDIATE; "
                    + "; ".join(tables.UPGRADE_2)
                    + f"; PRAGMA user_version={SCHEMA_VERSION}; COMMIT"
                )
        elif version != SCHEMA_VERSION:
            raise unreadable(path, "an unfinished state database", f"schema {version}")
        if not read_only:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk (the WAL fsynced) before save returns, because the poller
            # publishes right after it. NORMAL would survive a kill -9, not a power cut.
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")  # after a whole write, the WAL shrinks back
            # Building the id index sorts in memory: the container's root is read-only, with no /tmp.
            db.execute("PRAGMA temp_store=MEMORY")
    except sqlite3.Error as error:
        db.close()
        raise failed(path, error)
    except BaseException:
        db.close()
        raise
    return db
