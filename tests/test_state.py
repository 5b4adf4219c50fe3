"""The state database: a ledger and a store survive save and open, a save writes only what
changed, the JSON file of format 1 is migrated, and a file that cannot be used is refused."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import sqlite3
import threading

import pytest

from exporter import tables
from exporter.accounting import ANSWER, DURATION, ERROR, SETUP, CallState
from exporter.ledger import Ledger
from exporter.migrate import encode_v1
from exporter.records import Record
from exporter.state import APPLICATION_ID, SCHEMA_VERSION, StateDB, StateError, read
from exporter.store import Store
from helpers import call_record, settled

BASELINE = 1_700_000_000.0
META_ROWS = 6  # org, saved_at, baseline, watermark, extra_labels, today


def record(id, status, updated_at, **fields) -> Record:
    return call_record(**{"id": id, "status": status, "created_at": BASELINE + 10, "updated_at": updated_at, **fields})


def ended(id, at: float, **fields) -> Record:
    return record(id, "completed", at, started_at=at - 70, answered_at=at - 66, **settled(at - 5, 60), **fields)


def accounted(buckets=None) -> tuple[Ledger, Store]:
    """A ledger and store after a few calls: active, completed with a pending webhook, failed."""
    ledger, store = Ledger(BASELINE, watermark=BASELINE + 500.5), Store(buckets, label_limit=2)
    pending = settled(BASELINE + 75, 60, webhook_status="pending")
    for r in (
        record("a", "ringing", BASELINE + 20, started_at=BASELINE + 19),
        record("b", "completed", BASELINE + 80, started_at=BASELINE + 12, answered_at=BASELINE + 15.5, **pending),
        record(
            "c",
            "failed",
            BASELINE + 11,
            direction="inbound",
            ended_at=BASELINE + 11,
            error_code="e1",
            hangup_cause="x",
            reservation_status="reserved",
        ),
        record("d", "failed", BASELINE + 12, ended_at=BASELINE + 12, error_code="e2", hangup_cause="y"),
        record("e", "failed", BASELINE + 13, ended_at=BASELINE + 13, error_code="e3", hangup_cause="z"),
    ):
        store.count(ledger.account(r), BASELINE + 600)
    return ledger, store


def many(n: int) -> tuple[Ledger, Store]:
    """`n` calls ended and settled, created a second apart."""
    ledger, store = Ledger(BASELINE), Store()
    for i in range(n):
        store.count(ledger.account(ended(f"call-{i:05d}", BASELINE + 100 + i, created_at=BASELINE + i + 1)))
    return ledger, store


def assert_same(restored, ledger: Ledger, store: Store, v1: bool = False):
    """`v1`: restored from the JSON format, which kept no end details per call (they read as none
    pending: a terminal call of that format waits for nothing)."""
    assert (restored.ledger.baseline, restored.ledger.watermark) == (ledger.baseline, ledger.watermark)
    calls = ledger.calls
    if v1:
        calls = {call_id: dataclasses.replace(s, ended=None, todo=0, deviations=0) for call_id, s in calls.items()}
    assert restored.ledger.calls == calls
    assert restored.store.counters == store.counters
    assert restored.store.histograms == store.histograms
    assert restored.store.seen == store.seen
    assert (restored.store.today_day, restored.store.today) == (store.today_day, store.today)
    assert restored.reset_histograms == []


def saved(path, ledger: Ledger, store: Store, org: str = "default", **extra) -> None:
    db, _ = StateDB.open(str(path), org)
    db.save(ledger, store, extra or None)
    db.close()


def reopen(path, **config):
    db, restored = StateDB.open(str(path), "default", **{"label_limit": 2, **config})
    db.close()
    return restored


@contextlib.contextmanager
def raw(path, read_only: bool = False):
    """A plain connection to the file, committed and closed at the end (a test's own hand on it)."""
    db = sqlite3.connect(f"file:{path}?mode={'ro' if read_only else 'rw'}", uri=True)
    try:
        with db:
            yield db
    finally:
        db.close()


def rows(path, table: str) -> list[tuple]:
    with raw(path, read_only=True) as db:
        return db.execute(f"SELECT * FROM {table}").fetchall()


# ---- round trip ------------------------------------------------------------------------------


def test_save_then_open_restores_ledger_store_and_extra(tmp_path):
    ledger, store = accounted()
    saved(tmp_path / "state.db", ledger, store, audited_until=BASELINE + 42.5, note={"k": [1, 2]})
    restored = reopen(tmp_path / "state.db")
    assert_same(restored, ledger, store)
    assert restored.extra == {"audited_until": BASELINE + 42.5, "note": {"k": [1, 2]}}
    assert restored.saved_at is not None


def test_restored_call_state_keeps_every_field(tmp_path):
    ledger, store = accounted()
    saved(tmp_path / "state.db", ledger, store)
    restored = reopen(tmp_path / "state.db")
    assert restored.ledger.calls["b"] == CallState(
        direction="outbound",
        status="completed",
        created_at=BASELINE + 10,
        updated_at=BASELINE + 80,
        billed=True,
        webhook="pending",
        result="completed",
        webhook_pending_since=BASELINE + 75,
        amount=1550,
        ended=BASELINE + 75,
        todo=ERROR,  # ended with all its details but an error code, which may still come
    )
    assert restored.ledger.calls["c"] == CallState(
        "inbound",
        "failed",
        BASELINE + 10,
        BASELINE + 11,
        False,
        ended=BASELINE + 11,
        todo=DURATION | ANSWER | SETUP,
        deviations=0,
    )
    assert restored.ledger.calls["b"].billed is True


def test_restored_ledger_counts_nothing_twice(tmp_path):
    ledger, store = accounted()
    saved(tmp_path / "state.db", ledger, store)
    again = record(
        "b",
        "completed",
        BASELINE + 80,
        ended_at=BASELINE + 75,
        reservation_status="settled",
        webhook_status="pending",
        result_status="completed",
    )
    assert reopen(tmp_path / "state.db").ledger.account(again) == []


def test_a_missing_file_opens_empty_and_appears_whole_at_the_first_save(tmp_path):
    path = tmp_path / "state.db"
    db, restored = StateDB.open(str(path), "default")
    assert restored is None and os.listdir(tmp_path) == [], "nothing is created before there is a state to save"
    ledger, store = accounted()
    db.save(ledger, store)
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".new")]
    with raw(path, read_only=True) as plain:
        assert plain.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert plain.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    meta = {key: json.loads(value) for key, value in rows(path, "meta")}
    assert (meta["org"], meta["baseline"], meta["watermark"]) == ("default", BASELINE, BASELINE + 500.5)
    db.close()


# ---- incremental saves -----------------------------------------------------------------------


def test_an_ordinary_save_writes_only_the_changed_calls_and_series(tmp_path):
    ledger, store = many(1000)
    db, _ = StateDB.open(str(tmp_path / "state.db"), "default")
    db.save(ledger, store)
    store.count(ledger.account(ended("call-00007", BASELINE + 5000, created_at=BASELINE + 8)))  # a newer version
    store.count(ledger.account(record("new", "ringing", BASELINE + 5001)))
    changed_series = len(store.changed)
    assert ledger.changed == {"call-00007", "new"} and 0 < changed_series < 10
    before = db.connection.total_changes
    statements: list[str] = []
    db.connection.set_trace_callback(statements.append)

    db.save(ledger, store)

    assert db.connection.total_changes - before == 2 + changed_series + META_ROWS
    call_writes = [s for s in statements if "INTO calls" in s]
    assert len(call_writes) == 2 and not [s for s in statements if "DELETE" in s]
    assert ledger.changed == set() and store.changed == set()
    db.close()
    assert_same(reopen(tmp_path / "state.db", label_limit=50), ledger, store)


def test_the_series_a_new_campaign_starts_at_zero_are_saved_with_it(tmp_path):
    """Known series start at 0 (so the first failure shows in increase()): after a restart too."""
    ledger, store = Ledger(BASELINE), Store(extra_labels=("campaign",))
    db, _ = StateDB.open(str(tmp_path / "state.db"), "default", extra_labels=("campaign",))
    db.save(ledger, store)
    store.count(ledger.account(record("a", "ringing", BASELINE + 20, extra=("spring",))))
    assert ("callingbox_calls_ended_total", ("outbound", "failed", "spring")) in store.changed
    db.save(ledger, store)
    db.close()
    restored = reopen(tmp_path / "state.db", extra_labels=("campaign",))
    assert restored.store.counters["callingbox_calls_ended_total"][("outbound", "failed", "spring")] == 0
    assert restored.store.counters == store.counters


def test_a_save_with_nothing_changed_writes_the_meta_rows_alone(tmp_path):
    ledger, store = many(50)
    db, _ = StateDB.open(str(tmp_path / "state.db"), "default")
    db.save(ledger, store)
    before = db.connection.total_changes
    db.save(ledger, store)
    assert db.connection.total_changes - before == META_ROWS
    db.close()


def test_last_uses_of_label_values_are_rewritten_only_when_they_change(tmp_path):
    """They are rounded up to the minute (visibility.LabelUse): most saves leave the row as it is."""
    ledger, store = Ledger(BASELINE), Store()
    store.configure_visibility(0.0, 7 * 86400.0)
    minute = BASELINE // 60 * 60 + 6000
    db, _ = StateDB.open(str(tmp_path / "state.db"), "default")
    db.save(ledger, store)
    writes = []
    for i, now in enumerate((minute + 1, minute + 30, minute + 59, minute + 61)):
        store.count(ledger.account(ended(f"call-{i}", BASELINE + 100 + i, created_at=BASELINE + i)), now)
        rows, before = 1 + len(store.changed) + META_ROWS, db.connection.total_changes  # the call, its series, meta
        db.save(ledger, store)
        writes.append(db.connection.total_changes - before - rows)
    assert writes[0] == 1 and writes[1:] == [0, 0, 1], "the row once for the minute, then once for the next"
    db.close()
    uses = reopen(tmp_path / "state.db").store.label_use.to_json()
    assert uses == {"hangup_cause": {"normal_clearing": minute + 120}}


def publish(store: Store, now: float, read_at: float | None = None) -> Store:
    """A poll's end as the poller does it: release what a scrape has read, then the published copy."""
    store.births.release(now, read_at)
    return store.published(now)


def test_label_use_and_series_held_unseen_survive_a_restart(tmp_path):
    ledger, store = Ledger(BASELINE), Store()
    store.configure_visibility(60.0, 3600.0)
    now = BASELINE // 60 * 60 + 6000
    publish(store, now)
    old = record("a", "failed", BASELINE + 100, ended_at=BASELINE + 99, hangup_cause="old_cause")
    store.count(ledger.account(old), now)
    publish(store, now + 1)
    publish(store, now + 61, now + 1)  # read and released: Prometheus has seen old_cause at 1
    new = record("b", "failed", BASELINE + 200, ended_at=BASELINE + 199, hangup_cause="new_cause")
    store.count(ledger.account(new), now + 3000)
    saved(tmp_path / "state.db", ledger, store)  # a crash: new_cause counted, never published

    restored = reopen(tmp_path / "state.db", label_limit=50).store
    restored.configure_visibility(60.0, 3600.0)
    view = publish(restored, now + 3700)
    hangups = view.counters["callingbox_call_hangups_total"]
    assert ("outbound", "failed", "old_cause") not in hangups, "idle for longer than label_idle: still idle"
    assert hangups[("outbound", "failed", "new_cause")] == 0, "held again at its birth value"
    assert restored.counters["callingbox_call_hangups_total"][("outbound", "failed", "new_cause")] == 1


def test_the_first_save_after_a_restore_is_incremental(tmp_path):
    ledger, store = many(300)
    saved(tmp_path / "state.db", ledger, store)
    db, restored = StateDB.open(str(tmp_path / "state.db"), "default")
    restored.store.take_changed()  # a restored store counts its series as changed (cheap); the ledger does not
    restored.ledger.account(record("new", "ringing", BASELINE + 9000))
    before = db.connection.total_changes
    db.save(restored.ledger, restored.store)
    assert db.connection.total_changes - before == 1 + META_ROWS
    db.close()


def test_forgotten_and_swept_calls_are_deleted_from_the_database(tmp_path):
    ledger, store = accounted()
    store.count(ledger.account(ended("old", BASELINE + 100, created_at=BASELINE + 1)))
    saved(tmp_path / "state.db", ledger, store)
    db, restored = StateDB.open(str(tmp_path / "state.db"), "default", label_limit=2)
    ledger, store = restored.ledger, restored.store
    assert ledger.forget("a")
    ledger.sweep(now=BASELINE + 1.5 + 3600, settle_window=3600)  # "old" is final and past the window
    assert "old" not in ledger.calls and ledger.changed == {"a", "old"}
    db.save(ledger, store)
    db.close()
    assert {row[0] for row in rows(tmp_path / "state.db", "calls")} == set(ledger.calls) == {"b", "c", "d", "e"}


def test_a_failed_save_keeps_its_changes_for_the_next(tmp_path):
    path = tmp_path / "state.db"
    ledger, store = accounted()
    db, _ = StateDB.open(str(path), "default")
    db.save(ledger, store)
    store.count(ledger.account(ended("f", BASELINE + 700)))
    ledger.forget("a")
    db.connection.execute("PRAGMA query_only=1")  # the disk refuses writes

    with pytest.raises(sqlite3.OperationalError):
        db.save(ledger, store)

    assert {"f", "a"} <= ledger.changed and ("callingbox_calls_ended_total", ("outbound", "completed")) in store.changed
    on_disk = read(str(path))
    assert "f" not in on_disk.ledger.calls and "a" in on_disk.ledger.calls, "nothing of the failed save was committed"
    db.connection.execute("PRAGMA query_only=0")
    db.save(ledger, store)
    db.close()
    assert_same(reopen(path), ledger, store)


def test_a_save_writes_the_counts_it_adds_and_leaves_the_store_to_count_them(tmp_path):
    """A poll's own outcome rides on its save (`adding`): on disk when the save succeeds, not
    before, and never in the store until the poller counts it (SelfMetrics.poll)."""
    polls = "callingbox_exporter_polls_total"
    path = tmp_path / "state.db"
    ledger, store = accounted()
    db, _ = StateDB.open(str(path), "default")
    for _save in ("the first, which builds the file whole", "an incremental one"):
        before = store.counters[polls][("success",)]
        db.save(ledger, store, adding={(polls, ("success",)): 1})
        assert store.counters[polls][("success",)] == before, "the store counts it itself, after the save"
        assert read(str(path)).store.counters[polls][("success",)] == before + 1
        store.inc(polls, ("success",))  # what the poller does once the save returned

    db.connection.execute("PRAGMA query_only=1")  # the disk refuses writes
    with pytest.raises(sqlite3.OperationalError):
        db.save(ledger, store, adding={(polls, ("success",)): 1})
    saved = read(str(path)).store.counters[polls]
    assert saved[("success",)] == store.counters[polls][("success",)], "a failed save added nothing"
    db.connection.execute("PRAGMA query_only=0")
    db.close()


def test_a_closed_database_refuses_to_save_and_keeps_the_changes(tmp_path):
    ledger, store = accounted()
    db, _ = StateDB.open(str(tmp_path / "state.db"), "default")
    db.save(ledger, store)
    db.close()
    ledger.account(record("g", "ringing", BASELINE + 800))
    with pytest.raises(StateError):
        db.save(ledger, store)
    assert "g" in ledger.changed


def test_another_ledger_or_store_object_is_written_whole(tmp_path):
    """A reload that rebuilt the store, a new poller: not the objects the database follows."""
    ledger, store = accounted()
    db, _ = StateDB.open(str(tmp_path / "state.db"), "default")
    db.save(ledger, store)
    other_ledger = Ledger(
        BASELINE, BASELINE + 900.0, {"z": CallState("outbound", "ringing", BASELINE + 5, BASELINE + 6)}
    )
    other_store = Store(label_limit=2)
    other_store.inc("callingbox_calls_created_total", ("inbound",), 7)
    other_store.take_changed()
    assert other_ledger.changed == set(), "nothing marks the calls: only the object swap says they are new"
    db.save(other_ledger, other_store)
    db.close()
    assert_same(reopen(tmp_path / "state.db"), other_ledger, other_store)
    assert [row[0] for row in rows(tmp_path / "state.db", "calls")] == ["z"]


def test_labels_re_keyed_in_place_are_saved_again(tmp_path):
    """Tally.adopt re-keys every call's metadata values on a reload and marks them all."""
    ledger, store = many(20)
    db, _ = StateDB.open(str(tmp_path / "state.db"), "default")
    db.save(ledger, store)
    ledger.touch_all()
    before = db.connection.total_changes
    db.save(ledger, store)
    assert db.connection.total_changes - before == 20 + META_ROWS
    db.close()


# ---- config changes across a restart -----------------------------------------------------------


def test_metadata_label_values_of_tracked_calls_survive_and_follow_a_config_change(tmp_path):
    path = tmp_path / "state.db"
    ledger, store = Ledger(BASELINE), Store(extra_labels=("campaign", "tier"))
    store.count(ledger.account(record("a", "ringing", BASELINE + 20, extra=("spring", "gold"))))
    store.count(ledger.account(record("b", "ringing", BASELINE + 21, extra=("autumn", None))))
    saved(path, ledger, store)

    same = reopen(path, extra_labels=("campaign", "tier"))
    assert same.ledger.calls == ledger.calls
    assert same.store.counters == store.counters
    assert same.ledger.calls["a"].extra == ("spring", "gold")

    moved = reopen(path, extra_labels=("tier", "region"))  # campaign dropped, region added
    assert moved.ledger.calls["a"].extra == ("gold", None)
    assert moved.store.counters["callingbox_calls_created_total"][("outbound", "gold", "none")] == 1
    assert reopen(path).ledger.calls["b"].extra == ()  # labels turned off


def test_a_save_after_a_label_change_rewrites_the_state_in_the_new_labels(tmp_path):
    path = tmp_path / "state.db"
    ledger, store = Ledger(BASELINE), Store(extra_labels=("campaign",))
    store.count(ledger.account(record("a", "ringing", BASELINE + 20, extra=("spring",))))
    saved(path, ledger, store)
    db, moved = StateDB.open(str(path), "default", extra_labels=("tier",))
    db.save(moved.ledger, moved.store)  # neither object is the file's any more: written whole
    db.close()
    again = reopen(path, extra_labels=("tier",))
    assert again.ledger.calls["a"].extra == (None,)
    assert again.store.counters["callingbox_calls_created_total"] == {("outbound", "none"): 1, ("inbound", "none"): 0}


def test_a_state_without_metadata_reads_into_a_config_with_metadata_labels(tmp_path):
    ledger, store = accounted()
    saved(tmp_path / "state.db", ledger, store)
    restored = reopen(tmp_path / "state.db", extra_labels=("campaign",))
    assert restored.ledger.calls["a"].extra == (None,)
    assert restored.store.counters["callingbox_calls_ended_total"][("outbound", "failed", "none")] == 2


def test_a_state_from_before_the_ended_rename_keeps_its_terminal_counts(tmp_path):
    """`callingbox_calls_total` became `callingbox_calls_ended_total`: a saved count must not
    restart at zero, which Prometheus would read as a counter reset."""
    path = tmp_path / "state.db"
    ledger, store = accounted()
    saved(path, ledger, store)
    with raw(path) as plain:
        plain.execute(
            "UPDATE counters SET family = 'callingbox_calls_total' WHERE family = 'callingbox_calls_ended_total'"
        )
    restored = reopen(path)
    assert restored.store.counters["callingbox_calls_ended_total"] == store.counters["callingbox_calls_ended_total"]
    assert restored.store.counters["callingbox_calls_ended_total"][("outbound", "failed")] == 2  # d and e


def test_an_audit_count_saved_before_the_method_label_carries_on_as_window(tmp_path):
    """`callingbox_exporter_audit_calls_checked_total` gained `method` (window, spot_check): the
    count a state holds under no label goes on as `window`, not from zero (a counter reset), and
    the old row leaves the file, so the next start does not restore it over the new one."""
    path = tmp_path / "state.db"
    ledger, store = accounted()
    saved(path, ledger, store)
    checked = "callingbox_exporter_audit_calls_checked_total"
    with raw(path) as plain:  # the file as the release before the label wrote it
        plain.execute("DELETE FROM counters WHERE family = ?", (checked,))
        plain.execute("INSERT INTO counters VALUES (?, '[]', 1234)", (checked,))
    db, restored = StateDB.open(str(path), "default", label_limit=2)
    assert restored.store.counters[checked] == {("window",): 1234, ("spot_check",): 0}
    restored.store.inc(checked, ("window",), 6)
    db.save(restored.ledger, restored.store)
    db.close()
    assert sorted(r[1:] for r in rows(path, "counters") if r[0] == checked) == [
        ('["spot_check"]', 0),
        ('["window"]', 1240),
    ]
    assert reopen(path).store.counters[checked] == {("window",): 1240, ("spot_check",): 0}


def test_a_json_state_with_the_label_less_audit_count_is_migrated_as_window(tmp_path):
    path = tmp_path / "state.json"
    ledger, store = accounted()
    document = json.loads(encode_v1("default", ledger, store))
    document["store"]["counters"]["callingbox_exporter_audit_calls_checked_total"] = [[77]]
    path.write_text(json.dumps(document))
    counters = reopen(path).store.counters["callingbox_exporter_audit_calls_checked_total"]
    assert counters == {("window",): 77, ("spot_check",): 0}


def test_changed_buckets_reset_that_histogram_and_the_file_follows(tmp_path, caplog):
    path = tmp_path / "state.db"
    ledger, store = accounted()
    saved(path, ledger, store)
    custom = {"callingbox_call_duration_seconds": (30.0, 90.0)}
    with caplog.at_level(logging.WARNING, logger="exporter.state"):
        db, restored = StateDB.open(str(path), "default", buckets=custom, label_limit=2)
    assert restored.reset_histograms == ["callingbox_call_duration_seconds"]
    assert "histogram buckets changed, histogram restarts from zero" in caplog.text
    assert restored.store.histograms["callingbox_call_duration_seconds"][("outbound", "completed")] == [0, 0, 0, 0.0]
    assert (
        restored.store.histograms["callingbox_call_answer_delay_seconds"]
        == store.histograms["callingbox_call_answer_delay_seconds"]
    ), "the others keep their counts"
    db.save(restored.ledger, restored.store)
    db.close()
    again = reopen(path, buckets=custom)
    assert again.reset_histograms == [] and again.store.histograms == restored.store.histograms


# ---- migration from the JSON file (format 1) ---------------------------------------------------


def test_a_json_state_file_is_migrated_with_everything_intact(tmp_path, caplog):
    path = tmp_path / "state.json"
    custom = {"callingbox_call_duration_seconds": (30.0, 90.0)}
    ledger, store = accounted(custom)
    store.count(ledger.account(ended("f", BASELINE + 700)), BASELINE + 700)
    data = encode_v1("default", ledger, store)
    path.write_bytes(data)

    with caplog.at_level(logging.INFO, logger="exporter.state"):
        db, restored = StateDB.open(str(path), "default", buckets=custom, label_limit=2)

    assert_same(restored, ledger, store, v1=True)
    assert path.read_bytes().startswith(b"SQLite format 3\x00")
    assert (tmp_path / "state.json.v1.json").read_bytes() == data, "the JSON is kept for a rollback"
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(("-wal", "-shm"))) == [
        "state.json",
        "state.json.v1.json",
    ]
    migrated = [r for r in caplog.records if r.getMessage() == "state file migrated from JSON to SQLite"]
    assert len(migrated) == 1 and migrated[0].old_file == str(path) + ".v1.json" and migrated[0].tracked_calls == 6
    store.count(restored.ledger.account(record("g", "ringing", BASELINE + 800)))  # and it carries on
    db.save(restored.ledger, restored.store)
    db.close()
    assert "g" in reopen(path, buckets=custom).ledger.calls


def test_a_json_state_from_before_the_ended_rename_is_migrated_with_its_terminal_counts(tmp_path):
    path = tmp_path / "state.json"
    ledger, store = accounted()
    document = json.loads(encode_v1("default", ledger, store))
    counters = document["store"]["counters"]
    counters["callingbox_calls_total"] = counters.pop("callingbox_calls_ended_total")
    path.write_text(json.dumps(document))
    restored = reopen(path)
    assert restored.store.counters["callingbox_calls_ended_total"] == store.counters["callingbox_calls_ended_total"]


def test_a_json_state_with_metadata_labels_is_migrated_and_then_follows_the_config(tmp_path):
    path = tmp_path / "state.json"
    ledger, store = Ledger(BASELINE), Store(extra_labels=("campaign", "tier"))
    store.count(ledger.account(record("a", "ringing", BASELINE + 20, extra=("spring", "gold"))))
    path.write_bytes(encode_v1("default", ledger, store))
    moved = reopen(path, extra_labels=("tier",))
    assert moved.ledger.calls["a"].extra == ("gold",)
    assert moved.store.counters["callingbox_calls_created_total"][("outbound", "gold")] == 1
    assert reopen(path, extra_labels=("campaign", "tier")).ledger.calls["a"].extra == ("spring", "gold"), (
        "migrated as saved: the labels it had are still in the file"
    )


def test_a_crash_mid_migration_is_migrated_again_at_the_next_start(tmp_path):
    path = tmp_path / "state.json"
    ledger, store = accounted()
    data = encode_v1("default", ledger, store)
    path.write_bytes(data)
    # The last start died while building the database: half a file, its journal, a copy of the JSON.
    (tmp_path / "state.json.migrating").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    (tmp_path / "state.json.migrating-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + b"\x01" * 50)
    (tmp_path / "state.json.v1.json").write_bytes(data[: len(data) // 2])
    assert_same(reopen(path), ledger, store, v1=True)
    assert (tmp_path / "state.json.v1.json").read_bytes() == data
    assert not [n for n in os.listdir(tmp_path) if ".migrating" in n]
    assert_same(reopen(path), ledger, store, v1=True)  # and opens as a database from now on


def test_read_only_reading_neither_migrates_nor_changes_a_file(tmp_path):
    json_path, db_path = tmp_path / "old.json", tmp_path / "state.db"
    ledger, store = accounted()
    json_path.write_bytes(encode_v1("default", ledger, store))
    saved(db_path, ledger, store)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (json_path, db_path)}
    assert_same(read(str(json_path), label_limit=2), ledger, store, v1=True)
    assert_same(read(str(db_path), label_limit=2), ledger, store)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (json_path, db_path)} == before
    assert not (tmp_path / "old.json.v1.json").exists()
    assert read(str(tmp_path / "missing.db")) is None


# ---- refusals ------------------------------------------------------------------------------


def _newer(path):
    saved(path, *accounted())
    with raw(path) as plain:
        plain.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")


def _truncated(path):
    ledger, store = many(2000)
    saved(path, ledger, store)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign(path):
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute("INSERT INTO notes VALUES ('not ours')")
    db.close()


def _damaged(path):
    saved(path, *many(500))
    data = bytearray(path.read_bytes())
    data[4096 * 2 : 4096 * 4] = os.urandom(4096 * 2)  # pages past the header: the tables themselves
    path.write_bytes(bytes(data))


REFUSED = {
    "newer_version": (
        _newer,
        "written by a newer callingbox-exporter (state schema 4, this version reads 3)",
        "run that version or a newer one, or restore a backup",
    ),
    "truncated": (_truncated, "state database", "move the file away to start afresh"),
    "damaged": (_damaged, "state database", "move the file away to start afresh"),
    "foreign_sqlite": (_foreign, "a SQLite database of another application", "point state_file elsewhere"),
    "sqlite_header_then_garbage": (
        lambda p: p.write_bytes(b"SQLite format 3\x00" + os.urandom(5000)),
        "unreadable state database",
        "move the file away to start afresh",
    ),
    "garbage": (lambda p: p.write_bytes(b"\x00\x01garbage" * 10), "not a state file", "restore a backup"),
    "empty": (lambda p: p.write_bytes(b""), "an empty file", "counters restart at zero"),
    "json_unknown_version": (
        lambda p: p.write_text('{"version": 99, "baseline": 1, "watermark": null, "store": {}, "calls": {}}'),
        "a JSON state of unknown format version 99",
        "run the version that wrote it",
    ),
    "json_torn": (
        lambda p: p.write_text('{"version": 1, "org": "default", "baseline": 1'),
        "unreadable JSON state",
        "move the file away",
    ),
    "json_short_call": (
        lambda p: p.write_text(
            '{"version": 1, "baseline": 1, "watermark": null, "calls": {"a": [1]},'
            ' "store": {"counters": {}, "histograms": {}}}'
        ),
        "unreadable JSON state",
        "move the file away",
    ),
    "json_histogram_not_mapping": (
        lambda p: p.write_text(
            '{"version": 1, "baseline": 1, "watermark": null, "calls": {},'
            ' "store": {"counters": {}, "histograms": {"callingbox_call_duration_seconds": []}}}'
        ),
        "unreadable JSON state",
        "move the file away",
    ),
    "json_counters_not_mapping": (
        lambda p: p.write_text(
            '{"version": 1, "baseline": 1, "watermark": null, "calls": {}, "store": {"counters": [], "histograms": {}}}'
        ),
        "unreadable JSON state",
        "move the file away",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_file_that_cannot_be_used_is_refused_in_one_line_and_left_as_it_is(tmp_path, case):
    make, problem, todo = REFUSED[case]
    path = tmp_path / "state.db"
    make(path)
    for name in os.listdir(tmp_path):  # what a clean shutdown leaves: the file alone
        if name != "state.db":
            os.remove(tmp_path / name)
    content = path.read_bytes()

    with pytest.raises(StateError) as refused:
        StateDB.open(str(path), "default")

    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert problem in message and todo in message, message
    assert path.read_bytes() == content, "a refused file is never changed, moved or replaced"
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".v1.json", ".migrating", ".new"))]
    with pytest.raises(StateError):
        read(str(path))


# ---- schema 2 → 3 ------------------------------------------------------------------------------


def test_a_schema_2_database_is_upgraded_in_place_and_its_calls_wait_for_nothing(tmp_path):
    """Schema 2 kept no end details per call: its terminal calls read as ended with nothing left to
    count, so an upgrade never counts a detail twice; read-only readers (explain) read it as it is."""
    path = tmp_path / "state.db"
    ledger, store = accounted()
    saved(path, ledger, store)
    with raw(path) as plain:  # the file as schema 2 wrote it
        for column in ("ended", "todo", "deviations"):
            plain.execute(f"ALTER TABLE calls DROP COLUMN {column}")
        plain.execute("PRAGMA user_version=2")
    assert_same(read(str(path), label_limit=2), ledger, store, v1=True)
    with raw(path, read_only=True) as plain:
        assert plain.execute("PRAGMA user_version").fetchone()[0] == 2, "a read-only reader changes nothing"
    restored = reopen(path)
    assert_same(restored, ledger, store, v1=True)
    with raw(path, read_only=True) as plain:
        assert plain.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert {row[1] for row in plain.execute("PRAGMA table_info(calls)")} >= {"ended", "todo", "deviations"}
    assert not restored.ledger.calls["b"].todo and restored.ledger.calls["b"].final is False  # its webhook pends


def test_a_save_pauses_the_cyclic_gc_while_it_writes_and_leaves_it_as_it_found_it(tmp_path, monkeypatch):
    """A whole write makes a row per call: the GC walking them in the saving thread would hold
    the GIL against the event loop. It is paused for the write, and resumed after, a failed one too."""
    during: list[bool] = []
    write_calls, replace_calls = tables.write_calls, tables.replace_calls
    monkeypatch.setattr(tables, "replace_calls", lambda *a: (during.append(gc.isenabled()), replace_calls(*a)))
    monkeypatch.setattr(tables, "write_calls", lambda *a: (during.append(gc.isenabled()), write_calls(*a)))
    path = tmp_path / "state.db"
    ledger, store = accounted()
    db, _ = StateDB.open(str(path), "default")
    try:
        assert gc.isenabled()
        db.save(ledger, store)  # whole
        store.count(ledger.account(ended("f", BASELINE + 700)))
        db.save(ledger, store)  # its changes
        assert during == [False, False] and gc.isenabled()
        db.connection.execute("PRAGMA query_only=1")
        with pytest.raises(sqlite3.OperationalError):
            db.save(ledger, store)
        assert gc.isenabled()
        gc.disable()  # paused by someone else: a save leaves it paused
        db.connection.execute("PRAGMA query_only=0")
        db.save(ledger, store)
        assert not gc.isenabled()
    finally:
        gc.enable()
        db.close()


def test_overlapping_saves_of_two_orgs_resume_the_gc_only_when_both_are_done(tmp_path, monkeypatch):
    """Each org saves in a thread of its own: the save that finishes first must not resume the
    GC under the other one's write, whichever of them paused it."""
    writing = {org: threading.Event() for org in "ab"}
    release = {org: threading.Event() for org in "ab"}
    write_calls = tables.write_calls

    def held_write(*a):  # each org's write goes on until the test releases it
        org = threading.current_thread().name
        writing[org].set()
        release[org].wait(10)
        return write_calls(*a)

    dbs = {org: StateDB.open(str(tmp_path / f"{org}.db"), org)[0] for org in "ab"}
    states = {org: accounted() for org in "ab"}
    threads = []
    try:
        for org in "ab":
            dbs[org].save(*states[org])  # whole
            ledger, store = states[org]
            store.count(ledger.account(ended("f", BASELINE + 700)))
        monkeypatch.setattr(tables, "write_calls", held_write)
        for org in "ab":  # a starts, then b starts while a writes
            threads.append(threading.Thread(target=dbs[org].save, args=states[org], name=org))
            threads[-1].start()
            assert writing[org].wait(10)
        release["a"].set()  # a ends first, while b still writes
        threads[0].join(10)
        assert not gc.isenabled(), "b is still writing"
        release["b"].set()
        threads[1].join(10)
        assert gc.isenabled()
    finally:
        for event in release.values():
            event.set()
        for thread in threads:
            thread.join(10)
        gc.enable()
        for db in dbs.values():
            db.close()
