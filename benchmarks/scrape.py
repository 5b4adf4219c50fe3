"""Case 3, scrape latency: p50 and p99 of GET /metrics from 4 concurrent clients, against an
idle exporter and against one that polls back to back (its first poll reading every call of a
large window from the replay server and saving the state file), beside the naive peer.

The exporter and the peer run as processes of their own, so the scrapers in this process
share no GIL with them. Each client waits THINK seconds between scrapes. The idle exporter
(polled once, tracking the whole window) also gives case 4 its RSS per tracked call.

On a shared machine a p99 moves with whatever else runs, so the exporter is measured in
`Sizes.scrape_rounds` rounds: an idle phase (the idle exporter, scraped `idle_scrapes` times),
then at once a busy phase (a fresh exporter with a fresh state file, scraped until `busy_polls`
polls are done). Each round's ratio compares phases seconds apart, under the same load; the goal
is checked on the median of those ratios. The pooled percentiles (every scrape of every round)
and the ratio of those are shown beside it. The naive peer is measured once, for reference.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import aiohttp

from benchmarks.common import LOOKBACK, Facts, Row, Sizes, median, percentile, ratio, verdict
from benchmarks.procs import ApiServer, ExporterProcess, NaiveProcess, http_get, sample, wait_until

CASE = "3 scrape"
GOAL = 2.0  # busy p99 ÷ idle p99
CLIENTS = 4
THINK = 0.02
BUSY_DEADLINE = 600.0
OURS_POLLS = re.compile(rb'^callingbox_exporter_polls_total\{org="default",result="success"\} (\S+)$', re.MULTILINE)
NAIVE_POLLS = re.compile(rb"^naive_peer_polls_total (\S+)$", re.MULTILINE)


async def scrape(url: str, count: int | None = None, until=None, deadline: float = BUSY_DEADLINE) -> list[float]:
    """Latencies (s) of scrapes by CLIENTS concurrent clients, until `count` scrapes, `until(body)`
    holds, or `deadline` seconds pass."""
    latencies: list[float] = []
    stop_at = time.monotonic() + deadline
    done = False
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS), timeout=timeout) as session:

        async def client() -> None:
            nonlocal done
            while not done:
                started = time.perf_counter()
                async with session.get(url) as response:
                    body = await response.read()
                latencies.append(time.perf_counter() - started)
                if (count and len(latencies) >= count) or (until and until(body)) or time.monotonic() > stop_at:
                    done = True
                await asyncio.sleep(THINK)

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return latencies


def polls_at_least(pattern: re.Pattern, polls: int):
    def reached(body: bytes) -> bool:
        match = pattern.search(body)
        return match is not None and float(match.group(1)) >= polls

    return reached


def _exporter(name: str, api: ApiServer, log_dir: Path, interval: float) -> ExporterProcess:
    return ExporterProcess(
        name,
        log_dir,
        api_url=api.url,
        poll_interval=interval,
        request_timeout=300,
        state_file=str(log_dir / f"{name}.state.db"),
        initial_lookback=LOOKBACK,
        settle_window=LOOKBACK,
    )


def _ours(api: ApiServer, sizes: Sizes, log_dir: Path, facts: dict) -> dict:
    """Latencies of every round's idle and busy phase (pooled), and each round in `facts["rounds"]`."""
    pooled: dict[str, list[float]] = {"idle": [], "busy": []}
    facts["rounds"], polls_done, shares = [], [], []
    with _exporter("exporter-idle", api, log_dir, interval=3600) as idle:
        idle.wait("/-/ready", timeout=900)
        facts["idle_memory"] = idle.memory()  # tracking the whole window, after a poll and a save
        facts["idle_tracked"] = sample(
            http_get(idle.url + "/metrics")[1], "callingbox_exporter_tracked_calls", 'org="default"'
        )
        for turn in range(sizes.scrape_rounds):
            load = os.getloadavg()[0]
            idle_latencies = asyncio.run(scrape(idle.url + "/metrics", count=sizes.idle_scrapes))
            with _exporter(f"exporter-busy-{turn}", api, log_dir, interval=0.05) as busy:
                busy.wait("/-/healthy", timeout=60)
                started = time.monotonic()
                until = polls_at_least(OURS_POLLS, sizes.busy_polls)
                busy_latencies = asyncio.run(scrape(busy.url + "/metrics", until=until))
                elapsed = time.monotonic() - started
                polls = busy.polls()
            polls_done.append(len(polls))
            shares.append(min(1.0, sum(p.get("duration_s", 0) for p in polls) / elapsed))
            idle_p99, busy_p99 = percentile(idle_latencies, 99) * 1000, percentile(busy_latencies, 99) * 1000
            facts["rounds"].append(
                {
                    "idle_p99_ms": idle_p99,
                    "busy_p99_ms": busy_p99,
                    "ratio": busy_p99 / idle_p99,
                    "idle_scrapes": len(idle_latencies),
                    "busy_scrapes": len(busy_latencies),
                    "load_average_1m": load,
                }
            )
            pooled["idle"] += idle_latencies
            pooled["busy"] += busy_latencies
    facts["busy_polls"] = min(polls_done)
    facts["busy_poll_share"] = median(shares)
    return pooled


def _naive(api: ApiServer, sizes: Sizes, log_dir: Path, facts: dict) -> dict:
    with NaiveProcess("naive-idle", log_dir, api.url, interval=3600, polls=1) as idle:
        facts["naive_idle_poll"] = idle.line(timeout=900)
        idle_latencies = asyncio.run(scrape(idle.url + "/metrics", count=sizes.idle_scrapes))
    with NaiveProcess("naive-busy", log_dir, api.url, interval=0.05) as busy:
        wait_until(lambda: http_get(busy.url + "/metrics")[0] == 200, 60, "the naive peer's /metrics")
        busy_latencies = asyncio.run(scrape(busy.url + "/metrics", until=polls_at_least(NAIVE_POLLS, sizes.busy_polls)))
    return {"idle": idle_latencies, "busy": busy_latencies}


def run(api: ApiServer, sizes: Sizes, facts: Facts, log_dir: Path) -> list[Row]:
    f = facts[CASE]
    ours, naive = _ours(api, sizes, log_dir, f), _naive(api, sizes, log_dir, f)
    f.update(
        scrapes={
            "idle": len(ours["idle"]),
            "busy": len(ours["busy"]),
            "naive_idle": len(naive["idle"]),
            "naive_busy": len(naive["busy"]),
        }
    )
    n = sizes.ingest_calls

    def ms(latencies: list[float], p: float) -> float:
        return percentile(latencies, p) * 1000

    rows = []
    rounds = len(f["rounds"])
    busy = (
        f"busy ({f['busy_polls']} polls, the first of {n:,} calls + state save, {f['busy_poll_share']:.0%} of the time)"
    )
    for phase, what in (("idle", f"idle (polled once), {rounds} rounds"), ("busy", f"{busy}, {rounds} rounds")):
        for p in (50, 99):
            rows.append(
                Row(
                    CASE,
                    f"exporter: p{p} {what}, {len(ours[phase])} scrapes",
                    ms(ours[phase], p),
                    "ms",
                    vs_naive=ratio(ms(ours[phase], p), ms(naive[phase], p)),
                )
            )
    naive_growth = ms(naive["busy"], 99) / ms(naive["idle"], 99)
    ratios = [r["ratio"] for r in f["rounds"]]
    growth = median(ratios)
    each = ", ".join(f"{r:.2f}" for r in ratios)
    rows.append(
        Row(
            CASE,
            f"exporter: p99 busy ÷ p99 idle, median of {len(ratios)} rounds ({each})",
            growth,
            "x",
            vs_naive=ratio(growth, naive_growth),
            goal=f"<= {GOAL:.1f}x",
            verdict=verdict(growth <= GOAL),
        )
    )
    pooled = ms(ours["busy"], 99) / ms(ours["idle"], 99)
    rows.append(
        Row(
            CASE,
            "exporter: p99 busy ÷ p99 idle, every round's scrapes pooled",
            pooled,
            "x",
            vs_naive=ratio(pooled, naive_growth),
        )
    )
    for phase in ("idle", "busy"):
        rows.append(
            Row(CASE, f"naive peer: p99 {phase}, {len(naive[phase])} scrapes", ms(naive[phase], 99), "ms", vs_naive=1.0)
        )
    return rows
