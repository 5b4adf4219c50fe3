"""Ingest benchmark: one poller against the simulator, over loopback HTTP.

Prints a table: a first poll that accounts every call of a large body, a second poll that
skips them as unchanged, and, side by side on the same bytes, `json.loads` of the whole body
(the parse every naive exporter does) and the exporter's own decode+account without HTTP.
The simulator runs in this process, so the HTTP rows include its record generation. Run: `.venv/bin/python benchmarks/ingest.py [CALLS]`.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
import urllib.request

import aiohttp

from exporter.accounting import Ledger
from exporter.api import CHUNK_BYTES, ArrayStream
from exporter.config import Target
from exporter.metrics import Collector, Store
from exporter.poller import Poller
from exporter.records import Invalid, decode_record
from exporter.simulator import Simulator, serve_in_thread


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def polls(url: str) -> list[tuple[str, float, int, int]]:
    rows = []
    async with aiohttp.ClientSession() as session:
        target = Target(api_url=url, settle_window=3650 * 86400.0, initial_lookback=3650 * 86400.0, overlap=0.0)
        poller = Poller(target, Collector("bench"), session)
        await poller.restore()
        for label in ("first poll (all new)", "second poll (unchanged)"):
            started = time.perf_counter()
            ok, _ = await poller.poll()
            assert ok, poller.status.last_error
            rows.append((label, time.perf_counter() - started, poller.client.bytes_read, len(poller.ledger.calls)))
    return rows


def account_in_memory(body: bytes) -> tuple[float, int]:
    """The exporter's own work on the same bytes, without HTTP: stream decode, validate, account."""
    stream, ledger, store = ArrayStream(), Ledger(baseline=0.0), Store()
    started = time.perf_counter()
    for offset in range(0, len(body), CHUNK_BYTES):
        for obj in stream.feed(body[offset : offset + CHUNK_BYTES]):
            record = decode_record(obj)
            if type(record) is not Invalid:
                store.count(ledger.account(record))
    stream.finish()
    return time.perf_counter() - started, len(ledger.calls)


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    sim = Simulator(seed=1, rate=0.0, max_calls=0, history=calls)
    with serve_in_thread(sim) as url:
        rows = asyncio.run(polls(url))
        rss_after_polls = peak_rss_mib()
        started = time.perf_counter()
        with urllib.request.urlopen(url + "/v1/calls") as response:
            body = response.read()
        fetched = time.perf_counter() - started
    started = time.perf_counter()
    parsed = json.loads(body)
    parse = time.perf_counter() - started
    del parsed
    in_memory, tracked = account_in_memory(body)
    print(f"{calls} calls, {len(body) / 1e6:.1f} MB body, {len(body) / calls:.0f} B/call\n")
    print(f"{'case':32} {'seconds':>8} {'calls/s':>10} {'MB read':>8} {'tracked':>8} {'vs json.loads':>13}")
    for label, seconds, read, tracked in rows:
        print(f"{label:32} {seconds:8.2f} {calls / seconds:10.0f} {read / 1e6:8.1f} {tracked:8d} {parse / seconds:12.2f}x")
    print(f"{'fetch whole body (urllib)':32} {fetched:8.2f} {calls / fetched:10.0f} {len(body) / 1e6:8.1f}")
    print(f"{'json.loads(whole body)':32} {parse:8.2f} {calls / parse:10.0f} {len(body) / 1e6:8.1f}")
    print(f"{'decode+account in memory':32} {in_memory:8.2f} {calls / in_memory:10.0f} {len(body) / 1e6:8.1f} "
          f"{tracked:8d} {parse / in_memory:12.2f}x")
    print(f"\npeak RSS after the polls: {rss_after_polls:.0f} MiB (process, incl. the simulator thread)")


if __name__ == "__main__":
    main()
