"""Crashes: the exporter is killed with SIGKILL while calls flow, at random moments and the
moment a save starts writing its state database.

With a state file of thousands of tracked calls, no counter ever decreases between consecutive
scrapes (across restarts too: persist, then publish), every restart restores, and once the
simulator is quiet the totals are exact.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from test_e2e_exact import KEY, _config, settle_and_compare

from helpers import differences, live_simulator, log_records, wait_until

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


def _kill_during_a_save(exporter, wal: Path, deadline: float) -> bool:
    """SIGKILL the exporter the moment its WAL is written (a save under way); False if none came."""
    last = _stamp(wal)
    while time.monotonic() < deadline:
        if _stamp(wal) != last:
            exporter.kill(signal.SIGKILL)
            return True
    return False


def _stamp(path: Path) -> tuple | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_size, info.st_mtime_ns


def _torn(wal: Path) -> bool:
    """Whether the WAL ends in frames of a transaction that never committed: a save cut short.

    WAL format (sqlite.org/fileformat2.html#walformat): a 32-byte header with the page size and two
    salts, then frames of a 24-byte header and a page; a commit frame carries the database size.
    Frames of the current WAL repeat the header's salts.
    """
    data = wal.read_bytes() if wal.exists() else b""
    if len(data) < 32:
        return False
    page, salts = int.from_bytes(data[8:12], "big"), data[16:24]
    committed, offset = True, 32
    while offset + 24 <= len(data) and data[offset + 8 : offset + 16] == salts:
        committed = int.from_bytes(data[offset + 4 : offset + 8], "big") != 0
        offset += 24 + page
    return not committed


def test_kill_9_during_saves_and_at_random_moments_keeps_a_large_ledger_exact_and_monotonic(stack, tmp_path):
    # Thousands of tracked calls: 4000 settled ones in the window (10 min to 4.5 h old) plus live
    # traffic. No webhook replays: one that starts and ends while the exporter is down is
    # invisible to any reader of the API, yet the simulator's truth would count it.
    history = 4000
    sim, url = live_simulator(stack, KEY, seed=11, rate=60, max_calls=1500, history=history, history_age=600.0)
    state_file = tmp_path / "state.db"
    # The baseline precedes all history, so every event counts and the truth is simulator.truth(0).
    exporter = stack.exporter(
        _config(url, state_file=str(state_file), initial_lookback="6h"), env={"CALLINGBOX_API_KEY": KEY}
    )
    wal = Path(f"{state_file}-wal")
    rng = random.Random(5)
    watch = MonotonicWatch()
    kills = {"during a save": 0, "at random": 0, "cut a save short": 0}

    for round_ in range(14):
        exporter.start()
        if round_ == 0:
            wait_until(exporter.ready, 30, message="the first poll saved")  # from here on, every start restores
        _scrape_for(exporter, rng.uniform(0.3, 1.5), watch)
        if round_ % 2 and _kill_during_a_save(exporter, wal, time.monotonic() + 5):
            kills["during a save"] += 1
        else:
            exporter.kill(signal.SIGKILL)
            kills["at random"] += 1
        kills["cut a save short"] += _torn(wal)
        if round_ == 4:
            time.sleep(4)  # left down for a while: calls start and finish unseen

    exporter.start()
    restored = exporter.scrape()
    watch.check(restored)
    created = sum(v for (n, _), v in restored.items() if n == "callingbox_calls_created_total")
    assert created >= history, "restored values are served at once"
    _scrape_for(exporter, 1.0, watch)
    assert settle_and_compare(sim, exporter) == []
    watch.check(exporter.scrape())
    assert watch.violations == []
    assert watch.scrapes > 50
    assert kills["during a save"] >= 5, kills
    restores = [r for r in log_records(exporter.log()) if r["msg"] == "state restored"]
    assert len(restores) == 14, "every start after the first restored its state, none was refused"
    assert min(int(r["tracked_calls"]) for r in restores) >= history, "a large ledger each time"


def test_restart_resumes_counters_without_reset_and_counts_downtime_once(stack, tmp_path):
    sim, url = stack.simulator(seed=12, rate=100, max_calls=400, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    exporter = stack.exporter(_config(url, state_file=str(tmp_path / "state.db")), env={"CALLINGBOX_API_KEY": KEY})
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
