"""Whole system: reads fetch only what can have changed, and every event still counts once.

Three stories against the simulator over loopback, each ending exact against its truth:
- a large window of old final calls under live traffic: after the first poll, list reads stop
  at the hot depth, far short of the window;
- calls that are still open when they fall past the hot read change while only hot reads run:
  they are refreshed by id (or by a deeper read) and counted once, before any full read;
- a hand replay of an old final call's webhook, which no open state predicts, is found by the
  next full read and counted once, across a `kill -9` between the tiers.
"""

from __future__ import annotations

import json
import signal

from helpers import differences, exporter_of, live_simulator, log_records, sample_value, saved_baseline, wait_until

KEY = "sk_test_read_tiers_0123456789"
# A one-hour window read two seconds deep, no full read or audit within a test: calls fall past the hot read.
SHORT_HOT_READ = {
    "poll_interval": "0.3s",
    "settle_window": "1h",
    "hot_window": "2s",
    "overlap": "1s",
    "full_read_interval": "1h",
    "audit_interval": "0s",
    "initial_lookback": "1h",
}
ORG = (("org", "default"),)


def _polls(exporter) -> list[dict]:
    return [r for r in log_records(exporter.log()) if r["msg"] == "poll done" and r["result"] == "success"]


def _exact(exporter, sim, baseline: float, timeout: float = 60) -> None:
    wait_until(sim.all_final, 120, message="simulator calls final")
    truth = sim.truth(baseline)
    try:
        wait_until(lambda: not differences(exporter.scrape(), truth), timeout, message="exporter equals truth")
    except AssertionError:
        raise AssertionError(differences(exporter.scrape(), truth)[:10])


def test_ordinary_polls_stop_at_the_hot_depth_of_a_large_window_and_stay_exact(stack, tmp_path):
    history = 3000  # old final calls, 10 min to 3.4 h old, every one inside the settle window
    sim, url = live_simulator(stack, KEY, seed=81, rate=20, max_calls=400, history=history, history_age=600.0)
    state_file = tmp_path / "state.db"
    # The baseline before all history: no outcome straddles it (the one first-start case the API
    # cannot date, see README), so the comparison is exact.
    tiers = {"settle_window": "4h", "hot_window": "5m", "initial_lookback": "5h"}
    exporter = exporter_of(stack, KEY, url, poll_interval="0.3s", state_file=str(state_file), **tiers).start()
    wait_until(lambda: len(_polls(exporter)) >= 10, 60, message="ten polls")
    _exact(exporter, sim, saved_baseline(state_file))

    polls = _polls(exporter)
    first, ordinary = polls[0], [p for p in polls[1:] if p["full"] == "False"]
    assert first["full"] == "True" and int(first["records"]) > history, "the first poll reads the whole window"
    assert ordinary and all(int(p["records"]) <= 400 + 1 for p in ordinary), (
        "each ordinary read stops at the first call past the hot depth: the live calls and one more"
    )
    listed = sample_value(exporter.scrape(), "callingbox_exporter_api_response_bytes_total", endpoint="list")
    assert listed > 0 and max(int(p["bytes"]) for p in ordinary) < int(first["bytes"]) / 5
    samples = exporter.scrape()
    assert sample_value(samples, "callingbox_exporter_read_depth_seconds") < 4 * 3600
    assert sample_value(samples, "callingbox_exporter_last_full_read_timestamp_seconds") > 0


def test_open_calls_past_the_hot_read_are_refreshed_by_id_and_counted_once_before_any_full_read(stack, tmp_path):
    sim, url = live_simulator(stack, KEY, seed=82, rate=20, max_calls=200)
    held = wait_until(
        lambda: (
            [r["id"] for r in _listed(sim, url) if r["status"] in ("ringing", "in_progress")][:5]
            if len(_listed(sim, url)) >= 20
            else None
        ),
        30,
        message="calls in flight to hold",
    )
    for call_id in held:
        sim.hold(call_id)  # open, and staying so while they fall past the hot read
    state_file = tmp_path / "state.db"
    exporter = exporter_of(stack, KEY, url, **SHORT_HOT_READ, open_refresh_interval="2s", state_file=str(state_file))
    exporter.start()
    wait_until(
        lambda: sample_value(exporter.scrape(), "callingbox_exporter_open_calls", path="by_id") >= len(held),
        30,
        message="the held calls past the hot read, kept up by id",
    )
    full_read = sample_value(exporter.scrape(), "callingbox_exporter_last_full_read_timestamp_seconds")
    by_id = sim.stats["by_id_requests"]
    for call_id in held:
        sim.release(call_id)
    _exact(exporter, sim, saved_baseline(state_file))

    assert sim.stats["by_id_requests"] > by_id, "the released calls were asked by id"
    samples = exporter.scrape()
    assert sample_value(samples, "callingbox_exporter_last_full_read_timestamp_seconds") == full_read, (
        "counted by the by-id path alone: no full read ran"
    )
    assert all(p["full"] == "False" for p in _polls(exporter)[1:])


def test_a_replay_of_an_old_final_call_is_counted_once_by_the_next_full_read_across_a_kill_9(stack, tmp_path):
    sim, url = live_simulator(stack, KEY, seed=83, rate=20, max_calls=100)
    state_file = tmp_path / "state.db"
    exporter = exporter_of(stack, KEY, url, **SHORT_HOT_READ, state_file=str(state_file)).start()
    wait_until(sim.all_final, 60, message="simulator calls final")
    # The oldest delivered call: far past the hot read (the list is newest first).
    delivered = [r["id"] for r in _listed(sim, url) if r["webhook_status"] == "delivered"][-1]
    _exact(exporter, sim, saved_baseline(state_file))  # every call final and counted
    before = sample_value(exporter.scrape(), "callingbox_webhook_deliveries_total", status="failed")

    sim.replay(delivered, outcome="failed", after=0.5)
    wait_until(sim.all_final, 30, message="the replay done")
    polls = len(_polls(exporter))
    wait_until(lambda: len(_polls(exporter)) >= polls + 3, 30, message="three hot reads after the replay")
    assert sample_value(exporter.scrape(), "callingbox_webhook_deliveries_total", status="failed") == before, (
        "a final call past the hot read is not read by ordinary polls"
    )

    exporter.kill(signal.SIGKILL)  # between the tiers: the replay not yet read
    exporter.start()
    wait_until(exporter.ready, 30, message="restarted and caught up")
    _exact(exporter, sim, saved_baseline(state_file))
    assert sample_value(exporter.scrape(), "callingbox_webhook_deliveries_total", status="failed") == before + 1
    records = log_records(exporter.log())
    restored = max(i for i, r in enumerate(records) if r["msg"] == "state restored")
    after = [r for r in records[restored:] if r["msg"] == "poll done"]
    assert after[0]["full"] == "True", "a restart's first read is a full read"


def _listed(sim, url: str) -> list[dict]:
    import urllib.request

    request = urllib.request.Request(url + "/v1/calls", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())
