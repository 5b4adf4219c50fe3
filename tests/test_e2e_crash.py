"""Crashes: the exporter is killed with SIGKILL at random moments while calls flow.

With a state file, no counter ever decreases between consecutive scrapes (across restarts
too: persist, then publish), and once the simulator is quiet the totals are exact.
"""

from __future__ import annotations

import random
import signal
import time

from conftest import differences, wait_until
from test_e2e_exact import KEY, _config, settle_and_compare

MONOTONIC_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


class MonotonicWatch:
    """Remembers the last value of every callingbox counter sample and records any decrease."""

    def __init__(self):
        self.last: dict = {}
        self.violations: list[str] = []
        self.scrapes = 0

    def check(self, samples) -> None:
        self.scrapes += 1
        for key, value in samples.items():
            name = key[0]
            if not name.startswith("callingbox_") or not name.endswith(MONOTONIC_SUFFIXES):
                continue
            previous = self.last.get(key)
            if previous is not None and value < previous:
                self.violations.append(f"{key}: {previous} -> {value}")
            self.last[key] = value


def _scrape_for(exporter, seconds: float, watch: MonotonicWatch) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            watch.check(exporter.scrape())
        except OSError:
            pass
        time.sleep(0.05)


def test_kill_9_at_random_moments_keeps_counters_exact_and_monotonic(stack, tmp_path):
    # No webhook replays here: one that starts and ends while the exporter is down is invisible
    # to any reader of the API, yet the simulator's truth would count it.
    sim, url = stack.simulator(seed=11, rate=60, max_calls=1500, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    exporter = stack.exporter(_config(url, state_file=str(tmp_path / "state.json")), env={"CALLINGBOX_API_KEY": KEY})
    rng = random.Random(5)
    watch = MonotonicWatch()

    for round_ in range(6):
        exporter.start()
        _scrape_for(exporter, rng.uniform(0.4, 2.5), watch)
        exporter.kill(signal.SIGKILL)
        if round_ == 2:
            time.sleep(4)  # left down for a while: calls start and finish unseen

    exporter.start()
    restored = exporter.scrape()
    watch.check(restored)
    assert sum(v for (n, _), v in restored.items() if n == "callingbox_calls_created_total") > 0, \
        "restored values are served at once"
    _scrape_for(exporter, 1.0, watch)
    assert settle_and_compare(sim, exporter) == []
    watch.check(exporter.scrape())
    assert watch.violations == []
    assert watch.scrapes > 50
    assert "state restored" in exporter.log()


def test_restart_resumes_counters_without_reset_and_counts_downtime_once(stack, tmp_path):
    sim, url = stack.simulator(seed=12, rate=100, max_calls=400, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    exporter = stack.exporter(_config(url, state_file=str(tmp_path / "state.json")), env={"CALLINGBOX_API_KEY": KEY})
    exporter.start()
    wait_until(exporter.ready, 20, message="ready")
    before = exporter.scrape()
    exporter.kill(signal.SIGTERM)

    wait_until(sim.all_final, 60, message="calls finished while the exporter was down")
    exporter.start()
    after_restart = exporter.scrape()
    for key, value in before.items():
        if key[0].startswith("callingbox_calls_ended_total"):
            assert after_restart[key] >= value
    wait_until(exporter.ready, 20, message="ready after catch-up")
    assert differences(exporter.scrape(), sim.truth(0)) == []
