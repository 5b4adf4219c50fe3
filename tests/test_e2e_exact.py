"""Whole system: the exporter process against the simulator over loopback HTTP.

The story: a few thousand calls of mixed outcomes flow (late commits, webhook replays,
billing settling after the end); once the simulator is quiet, every counter and histogram
on /metrics equals the simulator's ground truth exactly, and stays so.
"""

from __future__ import annotations

import json
import re
import urllib.request

from helpers import differences, http_get, live_simulator, parse_metrics, wait_until

KEY = "sk_test_e2e_0123456789"


def _config(url: str, **extra) -> dict:
    return {"api_url": url, "poll_interval": "0.3s", "overlap": "10s", "initial_lookback": "1h", **extra}


def _polls(exporter, result: str = "success") -> float:
    return exporter.scrape().get(("callingbox_exporter_polls_total", (("org", "default"), ("result", result))), 0)


def _failed(exporter) -> float:
    return _polls(exporter, "error")


def settle_and_compare(sim, exporter, timeout: float = 90) -> list[str]:
    """Wait until the simulator is quiet and the exporter has read it, then diff with truth."""
    wait_until(sim.all_final, timeout, message="simulator calls final")
    truth = sim.truth(0)
    try:
        wait_until(lambda: not differences(exporter.scrape(), truth), 30, message="exporter caught up with truth")
    except AssertionError:
        return differences(exporter.scrape(), truth)
    polls = _polls(exporter)
    wait_until(lambda: _polls(exporter) >= polls + 3, 20, message="three more polls")
    return differences(exporter.scrape(), truth)


def test_counts_equal_simulator_truth_for_thousands_of_mixed_calls(stack):
    sim, url = live_simulator(stack, KEY, seed=7, rate=300, max_calls=3000, replay_share=0.05, late_commit=0.5)
    # A hand replay of a final call's webhook is found by a full read (README, "Read only what
    # can have changed"), not by the ordinary read, which reaches only `overlap` (10 s) before
    # the newest update once every call is final. Here each outcome of a replay lasts at least
    # 5 s (lifecycle.REPLAY_VISIBLE): full reads every 2 s see each one.
    exporter = stack.exporter(_config(url, full_read_interval="2s"), env={"CALLINGBOX_API_KEY": KEY}).start()

    assert settle_and_compare(sim, exporter) == []

    samples = exporter.scrape()
    org = (("org", "default"),)
    created = sum(v for (n, _), v in samples.items() if n == "callingbox_calls_created_total")
    assert created == 3000
    ended = {labels: v for (n, labels), v in samples.items() if n == "callingbox_calls_ended_total"}
    assert sum(ended.values()) == 3000
    assert len({dict(labels)["status"] for labels, v in ended.items() if v > 0}) == 5, "every terminal status occurs"
    assert samples[("callingbox_webhook_deliveries_total", org + (("status", "failed"),))] > 0
    assert samples[("callingbox_up", org)] == 1
    assert samples[("callingbox_webhooks_pending", org)] == 0
    assert sum(v for (n, _), v in samples.items() if n == "callingbox_calls_active") == 0
    assert exporter.ready()


def test_metrics_endpoint_negotiates_openmetrics(stack):
    sim, url = stack.simulator(seed=1, rate=50, max_calls=20, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    exporter = stack.exporter(_config(url), env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(exporter.ready, 20, message="ready")

    request = urllib.request.Request(
        exporter.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read().decode()
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")
    assert "# TYPE callingbox_calls_ended counter" in body
    created = [line for line in body.splitlines() if re.match(r"^[a-z_]+_created[ {]", line)]
    assert created == [], "no _created samples unless they carry the original creation time"

    status, text = http_get(exporter.url + "/metrics")
    assert status == 200 and "# TYPE callingbox_calls_ended_total counter" in text
    assert parse_metrics(text)[("callingbox_exporter_build_info", (("version", "0.1.0"),))] == 1


def test_landing_page_and_readiness(stack):
    """/-/ready is 503 while the first poll runs and 200 once it has finished, failed or not
    (SPEC §2): an outage shows as callingbox_up 0, never as an unready pod."""
    sim, url = stack.simulator(seed=2, rate=50, max_calls=30, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    sim.inject("timeout", count=1, delay=60)  # the first poll waits request_timeout (5 s) for an answer, then fails
    sim.inject("status", count=4, code=503)  # backoff 0.3 + 0.6 + 1.2 + 2.4 + 4.8 s before the first success
    exporter = stack.exporter(_config(url, request_timeout="5s"), env={"CALLINGBOX_API_KEY": KEY}).start()

    status, text = http_get(exporter.url + "/-/ready")
    polls = _polls(exporter) + _failed(exporter)  # read after the probe: none had finished when it answered
    assert (status, polls) == (503, 0), f"not ready while the first poll runs: {status} {text!r} after {polls} polls"
    assert "first poll" in text and http_get(exporter.url + "/-/healthy")[0] == 200

    wait_until(exporter.ready, 20, message="ready once the first poll has finished")
    samples = exporter.scrape()
    up = samples[("callingbox_up", (("org", "default"),))]
    assert (up, _polls(exporter)) == (0, 0) and _failed(exporter) >= 1, "ready after a failed first poll, up 0"
    assert "request failed" in http_get(exporter.url + "/")[1], "the landing page shows the error"

    wait_until(
        lambda: exporter.scrape()[("callingbox_up", (("org", "default"),))] == 1,
        30,
        message="up after the API recovers",
    )
    status, page = http_get(exporter.url + "/")
    assert status == 200 and exporter.ready()
    for needle in ("0.1.0", "default", "up", "/metrics", "/-/ready", "last poll"):
        assert needle in page


def test_metadata_labels_split_the_counts_exactly_by_campaign(stack):
    """`metadata_labels: {campaign: campaign}`: each campaign's counts equal the API's own calls."""
    sim, url = stack.simulator(
        seed=17, rate=200, max_calls=800, time_scale=300, webhook_retry_base=0.05, late_commit=0.3, api_key=KEY
    )
    exporter = stack.exporter(
        _config(url, metadata_labels={"campaign": "campaign"}), env={"CALLINGBOX_API_KEY": KEY}
    ).start()
    wait_until(sim.all_final, 90, message="simulator calls final")
    request = urllib.request.Request(url + "/v1/calls", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        calls = json.loads(response.read())
    expected: dict[tuple[str, str, str], int] = {}
    for c in calls:
        key = (c["direction"], c["status"], c["metadata"]["campaign"])
        expected[key] = expected.get(key, 0) + 1

    def counted() -> dict[tuple[str, str, str], float]:
        found = {}
        for (name, labels), value in exporter.scrape().items():
            labels = dict(labels)
            if name == "callingbox_calls_ended_total" and value:
                found[(labels["direction"], labels["status"], labels["campaign"])] = value
        return found

    wait_until(lambda: counted() == expected, 30, message=f"per-campaign counts equal the API's calls ({expected})")
    samples = exporter.scrape()
    campaigns = {c["metadata"]["campaign"] for c in calls}
    created: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name == "callingbox_calls_created_total":
            created[dict(labels)["campaign"]] = created.get(dict(labels)["campaign"], 0) + value
    assert {k for k, v in created.items() if v} == campaigns
    assert sum(created.values()) == len(calls)
    # every call family carries the label; the exporter's own families do not
    for name, labels in samples:
        if name.startswith("callingbox_call") or name.startswith(
            ("callingbox_webhook_deliveries", "callingbox_result")
        ):
            assert "campaign" in dict(labels), name
        if name.startswith("callingbox_exporter_"):
            assert "campaign" not in dict(labels), name
