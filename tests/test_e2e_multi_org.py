"""Several organizations in one process, each polled on its own.

The story: three orgs, each with its own simulator, key file and interval. One of them goes
through 500s, then a revoked key (401), then an API that takes 8 s to answer. Meanwhile the two
others keep polling on time (their last success never gets old) and, at the end, all three
organizations' numbers equal their simulators' truth exactly, the troubled one included.
"""

from __future__ import annotations

import time

from conftest import assert_orgs_exact, wait_until

KEYS = {"alpha": "sk_test_alpha_0123456789", "bravo": "sk_test_bravo_0123456789",
        "flaky": "sk_test_flaky_0123456789"}
HEALTHY = ("alpha", "bravo")


def _value(samples, name: str, org: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"org": org, **labels}.items()))), 0)


def test_one_org_failing_in_every_way_never_delays_or_corrupts_the_others(stack, tmp_path):
    sims, targets = {}, []
    for seed, (org, key) in enumerate(KEYS.items(), start=31):
        sim, url = stack.simulator(seed=seed, rate=30, max_calls=600, time_scale=300, webhook_retry_base=0.05,
                                   api_key=key)
        key_file = tmp_path / f"{org}.key"
        key_file.write_text(key + "\n")
        sims[org] = sim
        targets.append({"name": org, "api_url": url, "api_key_file": str(key_file),
                        "state_file": str(tmp_path / f"{org}.state.json")})
    targets[1]["poll_interval"] = "0.4s"  # each target its own interval
    exporter = stack.exporter({"poll_interval": "0.3s", "overlap": "10s", "initial_lookback": "1h",
                               "request_timeout": "12s", "targets": targets}).start()
    wait_until(exporter.ready, 30, message="all three orgs polled once")

    staleness: dict[str, float] = {org: 0.0 for org in HEALTHY}

    def watch(seconds: float, until=None) -> None:
        """Scrape for a while; record how old the healthy orgs' last success ever got."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples, now = exporter.scrape(), time.time()
            for org in HEALTHY:
                last = _value(samples, "callingbox_exporter_last_success_timestamp_seconds", org)
                staleness[org] = max(staleness[org], now - last)
            if until is not None and until(samples):
                return
            time.sleep(0.2)

    flaky = sims["flaky"]
    # 1. Server errors.
    flaky.inject("status", count=4, code=500)
    watch(15, until=lambda s: _value(s, "callingbox_exporter_api_requests_total", "flaky", code="500") >= 4
          and _value(s, "callingbox_up", "flaky") == 1)
    assert _value(exporter.scrape(), "callingbox_exporter_api_requests_total", "flaky", code="500") == 4
    # 2. The key is revoked, then given back.
    flaky.api_key = "sk_test_revoked_key_000000"
    watch(15, until=lambda s: _value(s, "callingbox_exporter_api_requests_total", "flaky", code="401") >= 2)
    assert _value(exporter.scrape(), "callingbox_up", "flaky") == 0
    flaky.api_key = KEYS["flaky"]
    watch(20, until=lambda s: _value(s, "callingbox_up", "flaky") == 1)
    # 3. A slow API: the next list request stalls 8 s before answering.
    flaky.inject("timeout", count=1, delay=8.0)
    slow_started = time.monotonic()
    watch(9)
    assert time.monotonic() - slow_started >= 8
    watch(15, until=lambda s: _value(s, "callingbox_up", "flaky") == 1)

    samples = exporter.scrape()
    assert _value(samples, "callingbox_up", "flaky") == 1, exporter.log()[-2000:]
    for org in HEALTHY:
        assert _value(samples, "callingbox_exporter_polls_total", org, result="error") == 0, org
        # polls every 0.3-0.4 s: a second or two of age at worst on this shared machine, never the 8 s stall
        assert staleness[org] < 4.0, f"{org}'s last success got {staleness[org]:.1f}s old while flaky was troubled"

    assert_orgs_exact(exporter, sims)
