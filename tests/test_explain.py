"""`callingbox-exporter explain CALL_ID`: one call as the API shows it, and what the exporter counted.

The story: an operator sees a number move and asks about one call. The command shows the call
as `GET /v1/calls/{id}` returns it, without phone numbers, prompt or context, and reads the
exporter's state file (never writing it) to say which counters that call moved and which of its
events fell before the baseline. An id the API does not know exits 1. The key never shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
import yaml

from exporter import state
from exporter.accounting import CallState
from exporter.config import Target
from exporter.explain import PHONE, Held, api_lines, explain, read_state, redact, tracked_lines, ts, untracked_lines
from exporter.ledger import Ledger
from exporter.records import decode_record
from exporter.simulator import Simulator, format_ts, serve_in_thread
from exporter.store import Store
from helpers import ROOT, wait_until

KEY = "sk_test_explain_0123456789"
T0 = 1_800_000_000.0  # a call's created_at in the unit tests
DAY = 86400.0


# ---- pure formatting -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "+14155550142",
        "call +1 415 555 0142 back",
        "(415) 555-0142",
        "415.555.0142",
        "tel:+442071838750",
        "numbers +14155550142 and +13125550117",
    ],
)
def test_phone_numbers_are_withheld_wherever_they_appear(text):
    shown = redact(text)
    assert PHONE in shown
    assert not any(sum(c.isdigit() for c in word) >= 7 for word in shown.split(PHONE))


@pytest.mark.parametrize(
    "text",
    [
        "2026-10-01T05:31:56.000Z",
        "123e4567-e89b-12d3-a456-426614174000",
        "12345678-1234-1234-1234-123456789012",
        "acc_12345678",
        "order #123456",
        "2026-10-01",
        "HTTP 503",
        "campaign reminders-q4",
    ],
)
def test_timestamps_ids_and_short_numbers_are_kept(text):
    assert redact(text) == text


def api_object(**fields) -> dict:
    call = {
        "id": "c-1",
        "to_number": "+14155550100",
        "from_number": "+14155550199",
        "status": "completed",
        "direction": "outbound",
        "prompt": "You are Maya. Call Ana Torres.",
        "context": {"customer_name": "Ana"},
        "webhook_url": "https://hooks.example/cb?token=s3cret",
        "webhook_status": "delivered",
        "created_at": format_ts(T0),
        "updated_at": format_ts(T0 + 100),
        "ended_at": format_ts(T0 + 90),
        "reservation_status": "settled",
        "billing_amount_milli_cents": 18000,
        "result_status": "completed",
        "result": {"notes": "call me on 415 555 0142\nthanks", "callback": 14155550142, "score": 5},
        "metadata": {"campaign": "winback"},
        "error_message": None,
    }
    call.update(fields)
    return call


def test_the_api_part_shows_one_field_a_line_without_private_fields():
    lines = api_lines(api_object())
    text = "\n".join(lines)
    for private in ("+14155550100", "+14155550199", "Maya", "Ana", "s3cret", "token", "555 0142", "14155550142"):
        assert private not in text
    for key in ("to_number", "from_number", "prompt", "context"):
        assert not any(line.startswith(f"{key}:") or line.startswith(f"{key}.") for line in lines)
    assert "status: completed" in lines and "metadata.campaign: winback" in lines
    assert "webhook_url: https://hooks.example/… (path withheld)" in lines
    assert "result.score: 5" in lines and f"result.callback: {PHONE}" in lines
    assert "billing_amount_milli_cents: 18000" in lines, "amounts are not mistaken for phone numbers"
    assert lines[-1].startswith("withheld: to_number, from_number, prompt, context")
    assert all(": " in line for line in lines), "a newline in a value does not start a line of its own"


def ledger_with(call: CallState | None, baseline: float, watermark: float | None = None) -> Ledger:
    return Ledger(baseline, watermark, {"c-1": call} if call else {})


def record_of(**fields):
    return decode_record(api_object(**fields))


def test_a_tracked_call_after_the_baseline_shows_every_counter_it_moved():
    call = CallState(
        "outbound", "completed", T0, T0 + 100, billed=True, webhook="delivered", result="completed", amount=18000
    )
    ledger = ledger_with(call, baseline=T0 - 60)
    lines = tracked_lines(call, ledger, record_of(), T0 + 200, Target())
    assert f'created {ts(T0)}: counted in callingbox_calls_created_total{{direction="outbound"}}' in lines
    assert (
        'ended as completed: counted in callingbox_calls_ended_total{direction="outbound",status="completed"}'
        " (with its hangup, error and duration series)"
    ) in lines
    assert (
        'billed 18000 milli-cents ($0.18): counted in callingbox_billed_amount_dollars_total{direction="outbound"}'
    ) in lines
    assert (
        'webhook delivered (last outcome seen): counted in callingbox_webhook_deliveries_total{status="delivered"}'
    ) in lines
    assert (
        'extraction completed (last outcome seen): counted in callingbox_result_extractions_total{status="completed"}'
    ) in lines
    assert lines[-1].startswith("final: yes")


def test_events_before_the_baseline_are_said_not_counted_and_unknowable_ones_are_said_so():
    call = CallState("outbound", "completed", T0, T0 + 100, billed=True, webhook="delivered", amount=18000)
    before = tracked_lines(call, ledger_with(call, baseline=T0 + 500), record_of(), T0 + 600, Target())
    assert all(
        "not counted: at or before the baseline" in line
        for line in before
        if line.startswith(("created", "ended", "billed", "webhook delivered"))
    )
    across = tracked_lines(call, ledger_with(call, baseline=T0 + 95), record_of(), T0 + 600, Target())
    assert any(line.startswith("created") and "not counted" in line for line in across)
    assert any(line.startswith("ended") and "not counted" in line for line in across), "ended_at T0+90 < baseline"
    # Money belongs to the end (SPEC §3): not counted with it, however late it settled.
    assert any(line.startswith("billed") and "not counted" in line for line in across)


def test_a_straggler_says_when_it_will_be_given_up_and_news_from_the_api_is_flagged():
    call = CallState(
        "outbound", "completed", T0, T0 + 100, billed=True, webhook="pending", webhook_pending_since=T0 + 95
    )
    lines = tracked_lines(
        call, ledger_with(call, T0 - 60), record_of(updated_at=format_ts(T0 + 4 * DAY)), T0 + 4 * DAY, Target()
    )
    assert "webhook: pending, not counted until it is delivered or failed" in lines
    assert f"webhook pending since: {ts(T0 + 95)}" in lines
    assert "final: no, still expected to change" in lines
    assert (
        f"straggler: yes, past the settle window; refreshed by id each poll until final, given up at {ts(T0 + 7 * DAY)}"
    ) in lines
    assert lines[-1].startswith(f"news: the API's version (updated_at {ts(T0 + 4 * DAY)}) is newer")


def test_a_call_missing_from_the_ledger_is_told_apart_old_new_or_unknown():
    ledger = ledger_with(None, baseline=T0 - DAY, watermark=T0 + 10)
    old = untracked_lines(record_of(), ledger, T0 + 4 * DAY, Target())
    assert old[0].startswith("ledger: not tracked: created before the settle window")
    assert old[1] == (
        f"created {ts(T0)}: counted; its later events were counted while it was tracked,"
        " if they happened after the baseline"
    )
    assert untracked_lines(record_of(created_at=format_ts(T0 + 20)), ledger, T0 + 30, Target()) == [
        "ledger: unknown: not read yet (created after the exporter's last poll)"
    ]
    assert untracked_lines(record_of(), ledger, T0 + 30, Target())[0].startswith(
        "ledger: unknown: inside the settle window but not tracked"
    )
    assert untracked_lines(None, ledger, T0 + 30, Target()) == [
        "ledger: unknown (not in the ledger, and the API does not know it either)"
    ]


def test_without_a_state_file_the_answer_says_so():
    text = explain("c-1", Target(), api_object(), None, Held(None, None, "none: target default has no state_file"))
    assert text.endswith("exporter state:\nnone: target default has no state_file\n")


def test_the_state_is_read_as_it_is_an_unmigrated_json_file_too_and_a_bad_one_is_reported(tmp_path):
    ledger = ledger_with(CallState("outbound", "ringing", T0, T0 + 5), T0 - 60)
    old = tmp_path / "old.json"
    old.write_bytes(state.encode_v1("default", ledger, Store()))
    held = read_state(Target(state_file=str(old)))
    assert held.source == str(old) and held.ledger.calls == ledger.calls
    assert not (tmp_path / "old.json.v1.json").exists(), "explain never migrates: it only reads"
    bad = tmp_path / "bad.db"
    damaged = b"SQLite format 3\x00" + b"\xff" * 600
    bad.write_bytes(damaged)
    held = read_state(Target(state_file=str(bad)))
    assert held.ledger is None and held.source.startswith(f"unreadable: {bad}: unreadable state database")
    assert bad.read_bytes() == damaged and sorted(p.name for p in tmp_path.iterdir()) == ["bad.db", "old.json"]


# ---- the real command against the simulator and a real exporter's state file ---------------


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def list_calls(url: str) -> list[dict]:
    request = urllib.request.Request(url + "/v1/calls", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """A quiet simulator, and the state files of two real exporter runs: lookback 1h and 0s.

    Shared by the tests of this module, which only read it: `explain` never writes.
    """
    tmp_path = tmp_path_factory.mktemp("explain")
    sim = Simulator(seed=41, rate=200, max_calls=40, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    with serve_in_thread(sim) as url:
        wait_until(sim.all_final, 60, message="simulator calls final")
        configs = {}
        for name, lookback in (("counted", "1h"), ("history", "0s")):
            path = tmp_path / f"{name}.yml"
            path.write_text(
                yaml.safe_dump(
                    {"api_url": url, "initial_lookback": lookback, "state_file": str(tmp_path / f"{name}.json")}
                )
            )
            run = cli("--config.file", str(path), "--once", env={"CALLINGBOX_API_KEY": KEY})
            assert run.returncode == 0, run.stderr
            configs[name] = path
        yield sim, url, configs, tmp_path


def test_explain_shows_the_call_and_the_counters_it_moved_without_key_or_phone_numbers(counted):
    sim, url, configs, tmp_path = counted
    calls = list_calls(url)
    call = next(
        c
        for c in calls
        if c["status"] == "completed" and c["webhook_status"] == "delivered" and c["result_status"] == "completed"
    )
    state_file = tmp_path / "counted.json"
    before = (state_file.read_bytes(), state_file.stat().st_mtime_ns)

    run = cli("--config.file", str(configs["counted"]), "explain", call["id"], env={"CALLINGBOX_API_KEY": KEY})

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    d = call["direction"]
    assert f"id: {call['id']}" in lines and "status: completed" in lines and f"direction: {d}" in lines
    assert "ledger: tracked" in lines
    expected = [
        f"created {call['created_at'][:-1]}",
        f'ended as completed: counted in callingbox_calls_ended_total{{direction="{d}",status="completed"}}',
        f"billed {call['billing_amount_milli_cents']} milli-cents",
        'webhook delivered (last outcome seen): counted in callingbox_webhook_deliveries_total{status="delivered"}',
        'extraction completed (last outcome seen): counted in callingbox_result_extractions_total{status="completed"}',
    ]
    for start in expected:
        found = [line for line in lines if line.startswith(start)]
        assert found and ": counted in" in found[0], (start, run.stdout)
    assert (state_file.read_bytes(), state_file.stat().st_mtime_ns) == before, "the state file is only read"
    assert_private_data_absent(run.stdout + run.stderr, calls)


def test_explain_says_which_events_fell_before_the_baseline(counted):
    sim, url, configs, _ = counted
    call = next(c for c in list_calls(url) if c["status"] == "completed")
    run = cli("--config.file", str(configs["history"]), "explain", call["id"], env={"CALLINGBOX_API_KEY": KEY})
    assert run.returncode == 0, run.stderr
    created = next(line for line in run.stdout.splitlines() if line.startswith("created "))
    ended = next(line for line in run.stdout.splitlines() if line.startswith("ended as completed"))
    assert "not counted: at or before the baseline" in created and "not counted" in ended


def test_explain_of_an_id_the_api_does_not_know_says_so_and_exits_1(counted):
    sim, url, configs, _ = counted
    run = cli(
        "--config.file",
        str(configs["counted"]),
        "explain",
        "00000000-0000-4000-8000-000000000000",
        env={"CALLINGBOX_API_KEY": KEY},
    )
    assert run.returncode == 1
    assert "not found: the API does not know this call id (404)" in run.stdout.splitlines()
    assert "ledger: unknown (not in the ledger, and the API does not know it either)" in run.stdout.splitlines()
    assert_private_data_absent(run.stdout + run.stderr, list_calls(url))


def test_explain_needs_a_target_when_there_are_several_and_keeps_help_working(counted, tmp_path):
    sim, url, configs, shared = counted
    call = list_calls(url)[0]
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    path = tmp_path / "two.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "api_url": url,
                "api_key_file": str(key_file),
                "targets": [
                    {"name": "acme", "state_file": str(shared / "counted.json")},
                    {"name": "globex", "state_file": str(tmp_path / "globex.json")},
                ],
            }
        )
    )
    env = {}

    several = cli("--config.file", str(path), "explain", call["id"], env=env)
    assert several.returncode == 2
    assert several.stderr.strip() == (
        "callingbox-exporter: config error: target: several targets (acme, globex): choose one with --target"
    )
    chosen = cli("--config.file", str(path), "explain", call["id"], "--target", "acme", env=env)
    assert chosen.returncode == 0 and "target: acme" in chosen.stdout and "ledger: tracked" in chosen.stdout
    fresh = cli("--config.file", str(path), "explain", call["id"], "--target", "globex", env=env)
    assert fresh.returncode == 0 and "does not exist yet (no poll saved)" in fresh.stdout
    assert cli("--config.file", str(path), "explain", env=env).returncode == 2
    help_ = cli("--help")
    assert help_.returncode == 0 and "explain" in help_.stdout and "CALL_ID" in help_.stdout


def assert_private_data_absent(output: str, calls: list[dict]) -> None:
    assert KEY not in output
    numbers = {c[k] for c in calls for k in ("to_number", "from_number") if c.get(k)}
    assert numbers, "the simulator made phone numbers"
    for number in numbers:
        assert number not in output and number.lstrip("+") not in output, number
