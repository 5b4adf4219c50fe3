"""The API budget on a real exporter: the load on a key is the exporter's choice, not the scrapers'.

Every request reaching the simulator is logged with its arrival time and answer, so the tests
read the load as the API sees it: two targets sharing a key never exceed its ceiling together;
nothing is sent on that key before a 429's Retry-After has passed; an unchanged list costs a
304; and a list read slower than the interval slows the polls down (and says so).
"""

from __future__ import annotations

import time

from helpers import differences, log_records, sample_value, wait_until

KEY, OTHER_KEY = "sk_test_budget_shared_0123456789", "sk_test_budget_other_0123456789"
STALL = 3.0  # seconds the slow list read of the last test takes


def _list_requests(sim) -> list[tuple[float, int]]:
    with sim._lock:
        return [(at, status) for at, path, status in sim.requests if path == "/v1/calls"]


def _polls_done(exporter) -> list[dict]:
    return [r for r in log_records(exporter.log()) if r["msg"] == "poll done"]


def _window_overflows(times: list[float], per_minute: int, slack: float = 1.0) -> list[str]:
    """Where more than `per_minute` of the sorted request `times` fall within one minute."""
    return [
        f"request {i + per_minute + 1} came {later - first:.2f}s after request {i + 1}"
        for i, (first, later) in enumerate(zip(times, times[per_minute:]))
        if later - first < 60 - slack
    ]


def test_targets_sharing_a_key_share_its_ceiling_and_wait_out_retry_after(stack, tmp_path):
    sim_a, url_a = stack.simulator(seed=71, rate=10, time_scale=300, api_key=KEY)
    sim_b, url_b = stack.simulator(seed=72, rate=10, time_scale=300, api_key=KEY)
    sim_c, url_c = stack.simulator(seed=73, rate=10, time_scale=300, api_key=OTHER_KEY)
    keys = {}
    for name, key in (("shared", KEY), ("other", OTHER_KEY)):
        keys[name] = tmp_path / f"{name}.key"
        keys[name].write_text(key + "\n")
    exporter = stack.exporter(
        {
            "poll_interval": "0.1s",
            "max_requests_per_minute": 20,
            "targets": [
                {"name": "a", "api_url": url_a, "api_key_file": str(keys["shared"])},
                {"name": "b", "api_url": url_b, "api_key_file": str(keys["shared"])},
                {"name": "c", "api_url": url_c, "api_key_file": str(keys["other"])},
            ],
        }
    ).start()
    wait_until(lambda: len(_list_requests(sim_c)) >= 20, 20, message="c uses its own budget to the full")
    wait_until(
        lambda: len(_list_requests(sim_a) + _list_requests(sim_b)) >= 20,
        20,
        message="a and b use their shared budget to the full",
    )
    # The scenario: polls every 0.1 s keep wanting to go (~600 a minute per target) while the
    # budgets are used up. Two seconds are twenty poll intervals in which nothing may be sent.
    time.sleep(2)
    shared = sorted(at for at, _ in _list_requests(sim_a) + _list_requests(sim_b))
    assert _list_requests(sim_a) and _list_requests(sim_b)  # both targets got their share
    # The key allows 20 a minute, together: any 21 requests on it span a minute. A request is
    # logged when it arrives, a little after the exporter let it go; hence the second of slack.
    assert _window_overflows(shared, 20) == [], f"{len(shared)} requests on the shared key"
    assert _window_overflows(sorted(at for at, _ in _list_requests(sim_c)), 20) == []  # its own budget
    samples = exporter.scrape()
    assert sample_value(samples, "callingbox_exporter_next_poll_timestamp_seconds", "a") > 0


def test_retry_after_is_honoured_and_an_unchanged_list_costs_a_304(stack):
    sim, url = stack.simulator(
        seed=74, rate=20, max_calls=200, time_scale=300, webhook_retry_base=0.05, api_key=KEY, conditional=True
    )
    exporter = stack.exporter(
        {"api_url": url, "poll_interval": "0.2s", "overlap": "10s", "initial_lookback": "1h"},
        env={"CALLINGBOX_API_KEY": KEY},
    ).start()
    wait_until(exporter.ready, 20, message="first poll")

    sim.inject("429", count=2, retry_after=2)
    wait_until(lambda: [s for _, s in _list_requests(sim)].count(429) == 2, 20, message="two 429s answered")
    wait_until(lambda: _list_requests(sim)[-1][1] == 200, 20, message="a request answered again")
    requests = _list_requests(sim)
    for (at, status), (next_at, _) in zip(requests, requests[1:]):
        if status == 429:
            assert next_at - at >= 2 - 0.05, f"retried {next_at - at:.2f}s after a 429 with Retry-After: 2"

    # Quiet: nothing changes, so the list is not sent again, and the counts are exact.
    wait_until(sim.all_final, 60, message="all calls final")
    truth = sim.truth(0)
    wait_until(
        lambda: not differences(exporter.scrape(), truth),
        20,
        message=f"exact with 304s: {differences(exporter.scrape(), truth)}",
    )
    answered = sample_value(exporter.scrape(), "callingbox_exporter_api_requests_total", code="304")
    wait_until(
        lambda: sample_value(exporter.scrape(), "callingbox_exporter_api_requests_total", code="304") >= answered + 5,
        20,
        message="unchanged list answered 304",
    )
    assert differences(exporter.scrape(), truth) == []  # 304s lose nothing
    sent = sim.stats["bytes_sent"]
    answered = sample_value(exporter.scrape(), "callingbox_exporter_api_requests_total", code="304")
    wait_until(
        lambda: sample_value(exporter.scrape(), "callingbox_exporter_api_requests_total", code="304") >= answered + 3,
        20,
        message="three more 304s",
    )
    assert sim.stats["bytes_sent"] == sent  # 304s carry no body
    assert sample_value(exporter.scrape(), "callingbox_up") == 1


def test_a_list_read_slower_than_the_interval_slows_the_polls(stack):
    sim, url = stack.simulator(seed=75, rate=10, time_scale=300, api_key=KEY)
    exporter = stack.exporter(
        {"api_url": url, "poll_interval": "0.5s", "request_timeout": "10s"}, env={"CALLINGBOX_API_KEY": KEY}
    ).start()
    wait_until(exporter.ready, 20, message="first poll")
    assert sample_value(exporter.scrape(), "callingbox_exporter_backoff_seconds") == 0
    polls_before = len(_polls_done(exporter))
    sim.inject("timeout", count=1, delay=STALL)  # the next list read takes 3 s
    samples = wait_until(
        lambda: (s := exporter.scrape()) and sample_value(s, "callingbox_exporter_backoff_seconds") and s,
        20,
        message="the slow read slowing the polls",
    )
    backoff = sample_value(samples, "callingbox_exporter_backoff_seconds")
    # The slow poll waits as long as its read took before the next: the read's length minus the interval.
    slow_poll = wait_until(
        lambda: next((r for r in _polls_done(exporter)[polls_before:] if float(r["duration_s"]) >= STALL), None),
        20,
        message="the slow poll's line",
    )
    assert STALL - 0.5 <= backoff <= float(slow_poll["duration_s"]) - 0.5 + 0.001, (backoff, slow_poll)
    # Its start (last success) to the next poll: the read, then as long again.
    started = sample_value(samples, "callingbox_exporter_last_success_timestamp_seconds")
    assert sample_value(samples, "callingbox_exporter_next_poll_timestamp_seconds") - started >= 2 * STALL
    # So the request after the slow one arrives at least 3 s reading + 3 s waiting later, not 0.5 s.
    slow = max(_list_requests(sim), key=lambda r: r[0])[0]  # logged once answered: the slow one is last
    after = wait_until(lambda: [at for at, _ in _list_requests(sim) if at > slow], 20, message="the next poll")
    assert after[0] - slow >= 2 * STALL - 0.05, after[0] - slow
    wait_until(
        lambda: sample_value(exporter.scrape(), "callingbox_exporter_backoff_seconds") == 0,
        20,
        message="back to the normal pace",
    )
