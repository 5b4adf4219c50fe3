"""The API as its docs allow it to be (SPEC §1, "What the docs leave open"), all at once.

The simulator plays every behaviour the docs leave open (`docs_open`): end details one or two
versions after the terminal one, webhook and extraction outcomes without a webhook or schema,
a `voicemail` status and an active `dialing` one, whole-second timestamps, settled calls whose
amount comes later, by-id reads that answer 404, 429 or 503 for listed calls. Under live
traffic, list faults and a `kill -9`, every counter equals the truth the simulator derives from
SPEC §3/§4, nothing stays open once every call settled, and each deviation kind is counted.
"""

from __future__ import annotations

import signal

from test_e2e_exact import KEY, _config

from helpers import differences, live_simulator, wait_until

DEVIATIONS = "callingbox_exporter_contract_deviations_total"
KINDS = (
    "undocumented_value",
    "late_end_detail",
    "outcome_without_subject",
    "settled_without_amount",
    "by_id_not_found_but_listed",
)


def _gauge_total(samples, name: str) -> float:
    return sum(v for (n, labels), v in samples.items() if n == name and dict(labels).get("org") == "default")


def test_every_open_behaviour_at_once_under_faults_and_a_kill_is_counted_exactly(stack, tmp_path):
    # No webhook replays: one that starts and ends while the exporter is down is invisible to
    # any reader of the API (test_e2e_crash.py says the same); they have stories of their own.
    # Webhook retries over ~13 s: calls stay open past the hot read, so they are asked by id.
    # Undocumented statuses and by-id 404s: more than the default shares, so a run of 1 000
    # calls shows every kind many times.
    shares = {"late_commit": 0.3, "undocumented_status": 0.3, "by_id_not_found": 0.3}
    sim, url = live_simulator(stack, KEY, seed=22, rate=120, retry=0.1, max_calls=1000, docs_open=True, **shares)
    config = _config(
        url,
        state_file=str(tmp_path / "state.db"),
        end_grace="3s",
        # a short hot read: open calls past it are asked by id, where 404s happen
        overlap="1s",
        hot_window="1s",
        open_refresh_interval="1s",
        full_read_interval="20s",
    )
    exporter = stack.exporter(config, env={"CALLINGBOX_API_KEY": KEY}).start()

    def created() -> float:
        return _gauge_total(exporter.scrape(), "callingbox_calls_created_total")

    wait_until(lambda: created() >= 300, 60, message="calls flowing")
    sim.inject("status", count=2, code=503)
    sim.inject("truncate", count=1)
    wait_until(lambda: created() >= 600, 60, message="more calls, past the faults")
    exporter.kill(signal.SIGKILL)
    exporter.start()

    wait_until(sim.all_final, 120, message="every simulated call final")
    truth = sim.truth(0)
    try:
        wait_until(lambda: not differences(exporter.scrape(), truth), 60, message="exact against the truth")
    except AssertionError:
        raise AssertionError(f"differs from the truth: {differences(exporter.scrape(), truth)[:10]}") from None

    samples = exporter.scrape()
    assert _gauge_total(samples, "callingbox_calls_active") == 0, "an undocumented status holds nothing open"
    assert samples[("callingbox_webhooks_pending", (("org", "default"),))] == 0, (
        "a webhook status without a webhook_url holds nothing open"
    )
    ended = {
        dict(labels)["status"]: v for (n, labels), v in samples.items() if n == "callingbox_calls_ended_total" and v
    }
    assert ended.get("voicemail", 0) > 0, f"voicemail calls counted under their own status: {ended}"
    deviations = {dict(labels)["kind"]: v for (n, labels), v in samples.items() if n == DEVIATIONS}
    assert set(deviations) == set(KINDS)
    assert all(deviations[kind] > 0 for kind in KINDS), deviations
    assert samples[("callingbox_exporter_vanished_calls_total", (("org", "default"),))] == 0, (
        "a 404 by id for a listed call drops nothing"
    )
