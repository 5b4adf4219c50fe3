"""Case 2, history scaling: per-poll CPU, wall time and bytes read with the same calls in the
settle window and 10k versus 1M settled calls past it (the `live` simulator generates history
as it streams, so only what a client reads is ever made).

The poller runs in this process with a fixed clock, so the window holds exactly
`window_calls`: history call i is created 4 s × i (minus up to 3 s) before the newest, and the
horizon sits in the gap after call `window_calls - 1`. The naive peer reads the whole body in
a process of its own; its peak RSS is case 4's reference too.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from benchmarks.common import LOOKBACK, MB, Facts, PollReport, Row, Sizes, median, ratio, verdict
from benchmarks.procs import ApiServer, NaiveProcess
from exporter.api import CHUNK_BYTES
from exporter.config import Target
from exporter.metrics import Collector
from exporter.poller import Poller
from exporter.simulator import HISTORY_SPACING

CASE = "2 history"
GOAL = 1.2  # per-poll CPU, big history ÷ small history


def window_for(api: ApiServer, window_calls: int, now: float) -> float:
    """The settle window that holds exactly the newest `window_calls` history calls at `now`."""
    horizon = api.top - HISTORY_SPACING * window_calls + 0.5  # mid-gap between call n-1 and call n
    return now - horizon


async def _polls(api: ApiServer, window_calls: int, steady: int) -> list[dict]:
    """A fresh poller's first poll, then `steady` incremental ones: CPU, wall and what it read."""
    now = api.top + 5.0
    target = Target(api_url=api.url, settle_window=window_for(api, window_calls, now), initial_lookback=LOOKBACK)
    results = []
    with PollReport() as report:
        async with aiohttp.ClientSession() as session:
            poller = Poller(target, Collector("bench"), session, clock=lambda: now)
            await poller.restore()
            for _ in range(1 + steady):
                cpu, wall = time.process_time(), time.perf_counter()
                ok, _ = await poller.poll()
                if not ok:
                    raise RuntimeError(f"poll failed: {poller.status.last_error}")
                results.append(
                    {
                        "cpu_s": time.process_time() - cpu,
                        "wall_s": time.perf_counter() - wall,
                        **report.last,
                        "tracked": len(poller.ledger.calls),
                    }
                )
    return results


def naive_poll(api: ApiServer, log_dir: Path, name: str, timeout: float) -> dict:
    """One poll of the naive peer in its own process: wall, CPU, bytes, calls, peak RSS."""
    with NaiveProcess(name, log_dir, api.url, interval=0, polls=1, serve=False) as naive:
        return naive.line(timeout=timeout)


def run(small: ApiServer, big: ApiServer, sizes: Sizes, facts: Facts, log_dir: Path) -> list[Row]:
    n, old = sizes.window_calls, {"small": sizes.old_small, "big": sizes.old_big}
    firsts: dict[str, list[dict]] = {"small": [], "big": []}
    polls: dict[str, list[dict]] = {"small": [], "big": []}
    for _ in range(sizes.repeats):  # fresh pollers, small and big in turn, so noise hits both alike
        for size, api in (("small", small), ("big", big)):
            first, *steady = asyncio.run(_polls(api, n, sizes.steady_polls))
            firsts[size].append(first)
            polls[size] += steady
    naive = {
        "small": naive_poll(small, log_dir, "naive-history-small", 600),
        "big": naive_poll(big, log_dir, "naive-history-big", 1800),
    }
    f = facts[CASE]
    f.update(window_calls=n, old=old, naive={k: dict(v) for k, v in naive.items()})
    for size, steady_polls in polls.items():
        f[size] = {
            f"{key}_{kind}": [r[key] for r in results]
            for kind, results in (("first", firsts[size]), ("steady", steady_polls))
            for key in ("records", "examined", "bytes", "tracked", "cpu_s")
        }

    def first(size: str, key: str) -> float:
        return median([r[key] for r in firsts[size]])

    def steady(size: str, key: str) -> float:
        return median([r[key] for r in polls[size]])

    def label(size: str) -> str:
        return f"{n:,} in window + {old[size]:,} old"

    rows = []
    for kind, pick in (("first poll", first), ("steady poll", steady)):
        for size in ("small", "big"):
            vs_naive = ratio(pick(size, "cpu_s"), naive[size]["cpu_s"]) if kind == "first poll" else None
            rows.append(
                Row(CASE, f"exporter: {kind} CPU, {label(size)}", pick(size, "cpu_s") * 1000, "ms", vs_naive=vs_naive)
            )
        growth = pick("big", "cpu_s") / pick("small", "cpu_s")
        rows.append(
            Row(
                CASE,
                f"exporter: {kind} CPU, {old['big']:,} ÷ {old['small']:,} old",
                growth,
                "x",
                goal=f"<= {GOAL:.1f}x",
                verdict=verdict(growth <= GOAL),
            )
        )
    for size in ("small", "big"):
        rows.append(Row(CASE, f"exporter: steady poll wall, {label(size)}", steady(size, "wall_s") * 1000, "ms"))
    for size in ("small", "big"):
        rows.append(
            Row(
                CASE,
                f"exporter: bytes read per poll, {label(size)}",
                steady(size, "bytes") / MB,
                "MB",
                vs_naive=ratio(steady(size, "bytes"), naive[size]["bytes"]),
            )
        )
    small_bytes, big_bytes = max(f["small"]["bytes_steady"]), max(f["big"]["bytes_steady"])
    rows.append(
        Row(
            CASE,
            f"exporter: bytes read per poll, {old['big']:,} ÷ {old['small']:,} old",
            big_bytes / small_bytes,
            "x",
            goal="window-bounded: 1.00x",
            verdict=verdict(abs(big_bytes - small_bytes) <= CHUNK_BYTES),
        )
    )
    for size in ("small", "big"):
        rows.append(
            Row(
                CASE,
                f"naive peer: poll CPU, {label(size)} ({naive[size]['bytes'] / MB:,.0f} MB read)",
                naive[size]["cpu_s"] * 1000,
                "ms",
                vs_naive=1.0,
            )
        )
    rows.append(
        Row(
            CASE,
            f"naive peer: poll CPU, {old['big']:,} ÷ {old['small']:,} old",
            naive["big"]["cpu_s"] / naive["small"]["cpu_s"],
            "x",
        )
    )
    return rows
