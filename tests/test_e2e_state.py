"""Whole system: the state file at start and at reload, as an operator meets it.

A database written by a newer version, or a damaged one, stops the exporter with one line and
exit code 2 instead of counting from zero over it. The JSON state file of earlier releases is
migrated in place and its counters are served at once. A reload that adds a target whose state
is refused fails like a bad config, and the running targets go on untouched.
"""

from __future__ import annotations

import signal
import sqlite3
import time
import urllib.error
import urllib.request

import yaml

from exporter.ledger import Ledger
from exporter.records import Record
from exporter.state import SCHEMA_VERSION, StateDB, encode_v1
from exporter.store import Store
from helpers import wait_until

KEY = "sk_test_e2e_state_0123456789"
ORG = ("org", "default")


def _ended(i: int, now: float) -> Record:
    created = now - 3600 + 10 * i
    return Record(
        f"call-{i:04d}",
        ("completed", "failed", "no_answer")[i % 3],
        ("outbound", "inbound")[i % 4 == 0],
        created,
        created + 95,
        created + 1,
        created + 5,
        created + 90,
        85,
        85,
        1000 + i,
        "settled",
        "delivered",
        "completed",
        "normal_clearing",
        None,
    )


def _counted(calls: int) -> tuple[Ledger, Store]:
    """What an earlier release had counted: `calls` final calls of the last hour."""
    now = time.time()
    ledger, store = Ledger(now - 7200, watermark=now - 60), Store()
    for i in range(calls):
        store.count(ledger.account(_ended(i, now)), now)
    return ledger, store


def _refused_at_start(stack, state_file) -> tuple[int, list[str]]:
    """Start the exporter on `state_file` at the default log level; its exit code and output lines."""
    exporter = stack.exporter(
        {"api_url": "http://127.0.0.1:9/", "state_file": str(state_file)}, env={"CALLINGBOX_API_KEY": KEY}
    )
    exporter.start("--log.level", "info", wait_healthy=False)
    code = exporter.process.wait(timeout=30)
    return code, exporter.log().splitlines()


def test_a_database_from_a_newer_version_stops_the_start_with_one_line(stack, tmp_path):
    state_file = tmp_path / "state.db"
    db, _ = StateDB.open(str(state_file), "default")
    db.save(*_counted(3))
    db.close()
    plain = sqlite3.connect(state_file)
    plain.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    plain.close()
    content = state_file.read_bytes()

    code, lines = _refused_at_start(stack, state_file)

    assert code == 2
    assert lines == [
        f"callingbox-exporter: state error: {state_file}: written by a newer callingbox-exporter"
        f" (state schema {SCHEMA_VERSION + 1}, this version reads {SCHEMA_VERSION}): run that version"
        " or a newer one, or restore a backup from before the upgrade"
    ]
    assert state_file.read_bytes() == content


def test_a_damaged_database_stops_the_start_with_one_line_and_is_left_as_it_is(stack, tmp_path):
    state_file = tmp_path / "state.db"
    damaged = b"SQLite format 3\x00" + bytes(range(256)) * 40
    state_file.write_bytes(damaged)

    code, lines = _refused_at_start(stack, state_file)

    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"callingbox-exporter: state error: {state_file}: unreadable state database")
    assert lines[0].endswith(
        "restore a backup, or move the file away to start afresh at a new baseline (counters restart at zero)"
    )
    assert state_file.read_bytes() == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exporter.log", "exporter.yml", "state.db"]


def test_a_json_state_file_of_an_earlier_release_is_migrated_and_served_at_once(stack, tmp_path):
    sim, url = stack.simulator(seed=3, rate=10, max_calls=0, api_key=KEY)  # nothing new: only what was saved
    state_file = tmp_path / "default.json"
    ledger, store = _counted(60)
    old = encode_v1("default", ledger, store)
    state_file.write_bytes(old)

    exporter = stack.exporter(
        {"api_url": url, "state_file": str(state_file), "poll_interval": "0.3s"}, env={"CALLINGBOX_API_KEY": KEY}
    ).start()
    samples = exporter.scrape()

    for status in ("completed", "failed", "no_answer"):
        for direction in ("outbound", "inbound"):
            labels = tuple(sorted((ORG, ("direction", direction), ("status", status))))
            assert (
                samples[("callingbox_calls_ended_total", labels)]
                == store.counters["callingbox_calls_ended_total"][(direction, status)]
            )
    assert (
        samples[("callingbox_billed_amount_dollars_total", (("direction", "outbound"), ORG))]
        == store.counters["callingbox_billed_amount_dollars_total"][("outbound",)] / 100_000
    )
    assert samples[
        ("callingbox_call_duration_seconds_count", (("direction", "outbound"), ORG, ("status", "failed")))
    ] == store.histograms["callingbox_call_duration_seconds"][("outbound", "failed")][-2] + sum(
        store.histograms["callingbox_call_duration_seconds"][("outbound", "failed")][:-2]
    )
    assert state_file.read_bytes().startswith(b"SQLite format 3\x00")
    assert (tmp_path / "default.json.v1.json").read_bytes() == old
    assert 'msg="state file migrated from JSON to SQLite"' in exporter.log()
    wait_until(exporter.ready, 20, message="ready after its first poll")
    assert (
        exporter.scrape()[("callingbox_calls_created_total", (("direction", "outbound"), ORG))]
        == store.counters["callingbox_calls_created_total"][("outbound",)]
    )


def _post_reload(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url + "/-/reload", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_reload_adding_a_target_whose_state_is_refused_fails_and_changes_nothing(stack, tmp_path):
    sim, url = stack.simulator(seed=5, rate=50, max_calls=100, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY)
    a = {"name": "a", "api_url": url, "api_key_file": str(key_file), "state_file": str(tmp_path / "a.db")}
    bad = tmp_path / "b.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x07" * 3000)
    config = tmp_path / "exporter.yml"
    # new_series_hold 0s: the poll counts show at once (born at zero is not this story; see write_exporter_config)
    config.write_text(yaml.safe_dump({"poll_interval": "0.3s", "new_series_hold": "0s", "targets": [a]}))
    exporter = stack.exporter(None)
    exporter.config_path = config
    exporter.start()
    wait_until(exporter.ready, 20, message="a polled")

    config.write_text(
        yaml.safe_dump(
            {
                "poll_interval": "0.3s",
                "new_series_hold": "0s",
                "targets": [{**a, "poll_interval": "0.5s"}, {**a, "name": "b", "state_file": str(bad)}],
            }
        )
    )
    status, body = _post_reload(exporter.url)

    assert status == 500 and body.startswith(
        f"failed to reload config: targets[b].state_file: {bad}: unreadable state database"
    ), body
    assert "move the file away to start afresh" in body
    success = ("callingbox_exporter_polls_total", (("org", "a"), ("result", "success")))
    polls = exporter.scrape()[success]
    wait_until(lambda: exporter.scrape()[success] > polls + 3, 20, message="a still polling")
    assert not [key for key in exporter.scrape() if ("org", "b") in key[1]], "b never appeared"
    assert 'msg="config reloaded"' not in exporter.log(), "a was not replaced either"
    exporter.process.send_signal(signal.SIGHUP)  # the same refusal by signal: logged, the process goes on
    wait_until(
        lambda: exporter.log().count('msg="config not reloaded; the running one stays in force"') >= 2,
        20,
        message="the SIGHUP refusal logged",
    )
    assert exporter.process.poll() is None and exporter.ready()
    assert bad.read_bytes() == b"SQLite format 3\x00" + b"\x07" * 3000
