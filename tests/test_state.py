"""The state file: a ledger and a store survive encode/decode and save/load, atomically."""

from __future__ import annotations

import json
import os

import pytest

from exporter.accounting import CallState, Ledger
from exporter.store import Store
from exporter.records import Record
from exporter.state import decode, encode, load, save, write_atomically

BASELINE = 1_700_000_000.0


def record(id, status, updated_at, **fields) -> Record:
    values = dict(
        id=id, status=status, direction="outbound", created_at=BASELINE + 10, updated_at=updated_at,
        started_at=None, answered_at=None, ended_at=None, duration_seconds=None, billed_duration_seconds=None,
        billing_amount_milli_cents=None, reservation_status=None, webhook_status=None, result_status=None,
        hangup_cause=None, error_code=None,
    )
    values.update(fields)
    return Record(**values)


def accounted() -> tuple[Ledger, Store]:
    """A ledger and store after a few calls: active, completed with a pending webhook, failed."""
    ledger, store = Ledger(BASELINE, watermark=BASELINE + 500.5), Store(label_limit=2)
    for r in (
        record("a", "ringing", BASELINE + 20, started_at=BASELINE + 19),
        record("b", "completed", BASELINE + 80, started_at=BASELINE + 12, answered_at=BASELINE + 15.5,
               ended_at=BASELINE + 75, duration_seconds=60, billed_duration_seconds=60,
               billing_amount_milli_cents=1550, reservation_status="settled", webhook_status="pending",
               result_status="completed", hangup_cause="normal_clearing"),
        record("c", "failed", BASELINE + 11, direction="inbound", ended_at=BASELINE + 11, error_code="e1",
               hangup_cause="x", reservation_status="reserved"),
        record("d", "failed", BASELINE + 12, ended_at=BASELINE + 12, error_code="e2", hangup_cause="y"),
        record("e", "failed", BASELINE + 13, ended_at=BASELINE + 13, error_code="e3", hangup_cause="z"),
    ):
        store.count(ledger.account(r))
    return ledger, store


def assert_same(restored, ledger: Ledger, store: Store):
    assert (restored.ledger.baseline, restored.ledger.watermark) == (ledger.baseline, ledger.watermark)
    assert restored.ledger.calls == ledger.calls
    assert restored.store.counters == store.counters
    assert restored.store.histograms == store.histograms
    assert restored.store.seen == store.seen
    assert restored.reset_histograms == []


def test_encode_then_decode_restores_ledger_and_store():
    ledger, store = accounted()
    assert_same(decode(encode("default", ledger, store), label_limit=2), ledger, store)


def test_decoded_call_state_keeps_every_field():
    ledger, store = accounted()
    restored = decode(encode("default", ledger, store), label_limit=2)
    assert restored.ledger.calls["b"] == CallState(
        direction="outbound", status="completed", created_at=BASELINE + 10, updated_at=BASELINE + 80,
        billed=True, webhook="pending", result="completed", webhook_pending_since=BASELINE + 75, amount=1550,
    )
    assert restored.ledger.calls["c"] == CallState("inbound", "failed", BASELINE + 10, BASELINE + 11, False)


def test_restored_ledger_counts_nothing_twice():
    ledger, store = accounted()
    restored = decode(encode("default", ledger, store), label_limit=2)
    again = record("b", "completed", BASELINE + 80, ended_at=BASELINE + 75, reservation_status="settled",
                   webhook_status="pending", result_status="completed")
    assert restored.ledger.account(again) == []


def test_save_then_load_restores_ledger_and_store(tmp_path):
    ledger, store = accounted()
    path = str(tmp_path / "state.json")
    save(path, "default", ledger, store)
    assert_same(load(path, "default", label_limit=2), ledger, store)
    assert os.listdir(tmp_path) == ["state.json"]


def test_load_of_a_missing_file_is_none(tmp_path):
    assert load(str(tmp_path / "state.json"), "default") is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content",
    [
        b"",  # an empty file
        b'{"version": 1, "org": "default", "baseline": 1',  # torn
        b"\x00\x00\x00\x00",
        b'{"version": 99, "baseline": 1, "watermark": null, "store": {}, "calls": {}}',  # from the future
        b'{"version": 1, "baseline": 1, "watermark": null, "calls": {}}',  # no store
        b'{"version": 1, "baseline": 1, "watermark": null, "calls": {"a": [1]}, "store": {"counters": {}, "histograms": {}}}',
        # valid JSON of the wrong shape
        b"[]",
        b"null",
        b'"state"',
        b'{"version": 1, "baseline": 1, "watermark": null, "calls": [], "store": {"counters": {}, "histograms": {}}}',
        b'{"version": 1, "baseline": 1, "watermark": null, "calls": {}, "store": {"counters": [], "histograms": {}}}',
    ],
    ids=["empty", "torn", "binary", "future_version", "no_store", "short_call", "array", "null", "string",
         "calls_not_mapping", "counters_not_mapping"],
)
def test_corrupt_file_is_moved_aside_and_none_returned(tmp_path, content):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    assert load(str(path), "default") is None
    assert not path.exists()
    aside = [name for name in os.listdir(tmp_path) if name.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    assert (tmp_path / aside[0]).read_bytes() == content


def test_write_atomically_replaces_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_atomically(str(path), b"old")
    write_atomically(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_crash_between_write_and_rename_leaves_the_old_state(tmp_path):
    ledger, store = accounted()
    path = tmp_path / "state.json"
    save(str(path), "default", ledger, store)
    # the next save died after writing its temporary file, before the rename
    newer_ledger, newer_store = accounted()
    newer_ledger.watermark = BASELINE + 9999
    (tmp_path / "state.json.tmp").write_bytes(encode("default", newer_ledger, newer_store)[:40])
    assert_same(load(str(path), "default", label_limit=2), ledger, store)


def test_save_after_a_crash_overwrites_the_stray_temporary(tmp_path):
    ledger, store = accounted()
    path = tmp_path / "state.json"
    (tmp_path / "state.json.tmp").write_bytes(b"half a state")
    save(str(path), "default", ledger, store)
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
    assert_same(load(str(path), "default", label_limit=2), ledger, store)


def test_state_file_records_org_and_format_version(tmp_path):
    ledger, store = accounted()
    document = json.loads(encode("acme", ledger, store))
    assert (document["version"], document["org"], document["baseline"], document["watermark"]) == (
        1, "acme", BASELINE, BASELINE + 500.5
    )


def test_metadata_label_values_of_tracked_calls_survive_and_follow_a_config_change():
    ledger, store = Ledger(BASELINE), Store(extra_labels=("campaign", "tier"))
    store.count(ledger.account(record("a", "ringing", BASELINE + 20, extra=("spring", "gold"))))
    store.count(ledger.account(record("b", "ringing", BASELINE + 21, extra=("autumn", None))))
    data = encode("default", ledger, store)

    same = decode(data, extra_labels=("campaign", "tier"))
    assert same.ledger.calls == ledger.calls
    assert same.store.counters == store.counters
    assert same.ledger.calls["a"].extra == ("spring", "gold")

    moved = decode(data, extra_labels=("tier", "region"))  # campaign dropped, region added
    assert moved.ledger.calls["a"].extra == ("gold", None)
    assert moved.store.counters["callingbox_calls_created_total"][("outbound", "gold", "none")] == 1
    assert decode(data).ledger.calls["b"].extra == ()  # labels turned off


def test_a_state_file_without_metadata_reads_into_a_config_with_metadata_labels():
    ledger, store = accounted()
    restored = decode(encode("default", ledger, store), label_limit=2, extra_labels=("campaign",))
    assert restored.ledger.calls["a"].extra == (None,)
    assert restored.store.counters["callingbox_calls_ended_total"][("outbound", "failed", "none")] == 2


def test_a_state_file_from_before_the_ended_rename_keeps_its_terminal_counts():
    """`callingbox_calls_total` became `callingbox_calls_ended_total`: a saved count must not
    restart at zero, which Prometheus would read as a counter reset."""
    ledger, store = accounted()
    document = json.loads(encode("default", ledger, store))
    counters = document["store"]["counters"]
    counters["callingbox_calls_total"] = counters.pop("callingbox_calls_ended_total")
    restored = decode(json.dumps(document).encode())
    assert restored.store.counters["callingbox_calls_ended_total"] == store.counters["callingbox_calls_ended_total"]
    assert restored.store.counters["callingbox_calls_ended_total"][("outbound", "failed")] == 2  # d and e
