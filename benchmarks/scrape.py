"""Case 3, scrape latency: p50 and p99 of GET /metrics from 4 concurrent clients, against an
idle exporter and against one that polls back to back (each poll reading every call of a
large window from the replay server and saving the state file), beside the naive peer.

The exporter and the peer run as processes of their own, so the scrapers in this process
share no GIL with them. Each client waits THINK seconds between scrapes. The idle exporter
(polled once, tracking the whole window) also gives case 4 its RSS per tracked call.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp

from benchmarks.common import LOOKBACK, Facts, Row, Sizes, percentile, ratio, verdict
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
    with _exporter("exporter-idle", api, log_dir, interval=3600) as idle:
        idle.wait("/-/ready", timeout=900)
        facts["idle_memory"] = idle.memory()  # tracking the whole window, after a poll and a save
        facts["idle_tracked"] = sample(
            http_get(idle.url + "/metrics")[1], "callingbox_exporter_tracked_calls", 'org="default"'
        )
        idle_latencies = asyncio.run(scrape(idle.url + "/metrics", count=sizes.idle_scrapes))
    with _exporter("exporter-busy", api, log_dir, interval=0.05) as busy:
        busy.wait("/-/healthy", timeout=60)
        started = time.monotonic()
        busy_latencies = asyncio.run(scrape(busy.url + "/metrics", until=polls_at_least(OURS_POLLS, sizes.busy_polls)))
        elapsed = time.monotonic() - started
        polls = busy.polls()
    facts["busy_polls"] = len(polls)
    facts["busy_poll_share"] = min(1.0, sum(p.get("duration_s", 0) for p in polls) / elapsed)
    return {"idle": idle_latencies, "busy": busy_latencies}


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
    busy = f"busy ({f['busy_polls']} polls of {n:,} calls + state save, {f['busy_poll_share']:.0%} of the time)"
    for phase, what in (("idle", "idle (polled once)"), ("busy", busy)):
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
    growth = ms(ours["busy"], 99) / ms(ours["idle"], 99)
    rows.append(
        Row(
            CASE,
            "exporter: p99 busy ÷ p99 idle",
            growth,
            "x",
            vs_naive=ratio(growth, ms(naive["busy"], 99) / ms(naive["idle"], 99)),
            goal=f"<= {GOAL:.1f}x",
            verdict=verdict(growth <= GOAL),
        )
    )
    for phase in ("idle", "busy"):
        rows.append(
            Row(CASE, f"naive peer: p99 {phase}, {len(naive[phase])} scrapes", ms(naive[phase], 99), "ms", vs_naive=1.0)
        )
    return rows
