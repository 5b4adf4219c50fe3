"""Case 4, memory: the exporter process's peak RSS (VmHWM) while it polls a response of ~1.4 GB
of history past the settle window, and what it read of it; its RSS per tracked call.

The 1M-call history is the `live` simulator's (case 2's big one), generated as it streams; the
naive peer's peak on the same response comes from case 2. RSS per tracked call compares the
idle exporter of case 3 (the whole ingest window tracked, after a poll and a state save) with
an exporter that polled the same way and tracks nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import LOOKBACK, MB, Facts, Row, Sizes, ratio, verdict
from benchmarks.history import window_for
from benchmarks.procs import ApiServer, ExporterProcess, wait_until
from exporter.api import CHUNK_BYTES

CASE = "4 memory"
GOAL_MB = 100
STARTUP = 1.5  # seconds from launch to the first poll's read, roughly: where to put the window


def _poll_once(name: str, api: ApiServer, log_dir: Path, settle_window: float) -> dict:
    """Start an exporter, let it poll once (and save its state), read its memory and report."""
    sent_before = api.stats().get("bytes_sent", 0)
    with ExporterProcess(
        name,
        log_dir,
        api_url=api.url,
        poll_interval=3600,
        request_timeout=300,
        state_file=str(log_dir / f"{name}.state.db"),
        initial_lookback=LOOKBACK,
        settle_window=settle_window,
    ) as exporter:
        exporter.wait("/-/ready", timeout=900)
        # Ready comes with the published snapshot; the poll's log line once its pages are rendered.
        polls = wait_until(exporter.polls, 60, "the first poll's log line")
        result = {**exporter.memory(), **polls[-1]}
    # The server learns of the closed connection at its next write; then it books what it sent.
    try:
        sent = wait_until(lambda: api.stats().get("bytes_sent", 0) - sent_before, 30, "the server's byte count")
    except TimeoutError:
        sent = None
    return {**result, "server_sent": sent}


def run(small: ApiServer, big: ApiServer, sizes: Sizes, facts: Facts, log_dir: Path) -> list[Row]:
    f, history, scrape = facts[CASE], facts["2 history"], facts["3 scrape"]
    n = sizes.window_calls
    baseline = _poll_once("exporter-baseline", small, log_dir, settle_window=1.0)  # all history is older
    loaded = _poll_once("exporter-1gb", big, log_dir, window_for(big, n, time.time() + STARTUP))
    naive = history["naive"]
    per_call = naive["small"]["bytes"] / naive["small"]["calls"]
    body, window = naive["big"]["bytes"], n * per_call
    f.update(baseline=baseline, loaded=loaded, body_bytes=body, window_bytes=window)
    peak = loaded["VmHWM"] / MB
    rows = [
        Row(
            CASE,
            f"exporter: peak RSS polling a {body / 1e9:.1f} GB history ({n:,} in window + {sizes.old_big:,} old)",
            peak,
            "MB",
            vs_naive=ratio(loaded["VmHWM"], naive["big"]["peak_rss"]),
            goal=f"<= {GOAL_MB} MB",
            verdict=verdict(peak <= GOAL_MB),
        ),
        Row(
            CASE,
            f"exporter: bytes read of that response ({loaded.get('tracked', 0):,} calls tracked)",
            loaded["bytes"] / MB,
            "MB",
            vs_naive=ratio(loaded["bytes"], body),
            goal=f"window: {window / MB:.1f} MB",
            verdict=verdict(loaded["bytes"] <= window * 1.05 + 2 * CHUNK_BYTES),
        ),
    ]
    if loaded["server_sent"]:
        rows.append(
            Row(CASE, "simulator: bytes it sent before it saw the connection closed", loaded["server_sent"] / MB, "MB")
        )
    rows.append(
        Row(CASE, "exporter: RSS tracking nothing (after one poll and a state save)", baseline["VmRSS"] / MB, "MB")
    )
    if scrape.get("idle_memory") and scrape.get("idle_tracked"):
        tracked, idle = int(scrape["idle_tracked"]), scrape["idle_memory"]
        f["per_call"] = (idle["VmRSS"] - baseline["VmRSS"]) / tracked
        rows += [
            Row(CASE, f"exporter: RSS tracking {tracked:,} calls (case 3, idle)", idle["VmRSS"] / MB, "MB"),
            Row(CASE, "exporter: RSS per tracked call", f["per_call"], "B/call"),
            Row(
                CASE,
                f"exporter: peak RSS, {tracked:,} calls in window (first poll + state save)",
                idle["VmHWM"] / MB,
                "MB",
                vs_naive=ratio(idle["VmHWM"], scrape["naive_idle_poll"]["peak_rss"]),
            ),
        ]
    rows.append(
        Row(
            CASE,
            f"naive peer: peak RSS on the {body / 1e9:.1f} GB history",
            naive["big"]["peak_rss"] / MB,
            "MB",
            vs_naive=1.0,
        )
    )
    return rows
