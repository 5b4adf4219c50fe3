"""Case 1, ingest: calls per second of a first poll (all new, full accounting) and a second one
(nothing changed: the incremental path), in memory on one response's bytes and over loopback
HTTP, beside the parse limit (msgspec on the same bytes) and the naive peer.

The HTTP rows poll the `replay` server, which serves captured bytes from its own process, so
they measure the client; they include the poller's sweep and snapshot publish. Standalone:
`python benchmarks/ingest.py [CALLS]` prints just this case.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `exporter` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from prometheus_client import CollectorRegistry

from benchmarks import parse_limit
from benchmarks.common import LOOKBACK, Facts, PollReport, Row, Sizes, median, ratio, verdict
from benchmarks.naive_peer import NaiveMetrics, NaivePeer
from benchmarks.procs import ApiServer, http_get
from exporter.api import CHUNK_BYTES
from exporter.config import Target
from exporter.jsonstream import ArrayStream
from exporter.ledger import Ledger
from exporter.metrics import Collector
from exporter.poller import Poller
from exporter.settings import Settings
from exporter.store import Store
from exporter.tally import Tally

CASE = "1 ingest"
GOAL = 0.5  # of the parse limit's calls/s
OVERLAP = Target.overlap


def exporter_decode_account(body: bytes, tally: Tally, now: float) -> dict:
    """The exporter's work on one response already in memory: the poller's list read without HTTP.

    Stream-decode in CHUNK_BYTES pieces and hand each element to the target's tally, as
    `Poller._read` does (an audit riding on the read is left out); returns what the read counted.
    """
    read = tally.list_read(now)
    stream = ArrayStream(read.fields)
    for offset in range(0, len(body), CHUNK_BYTES):
        if not all(map(read.take, stream.feed(body[offset : offset + CHUNK_BYTES]))):
            break
    else:
        all(map(read.take, stream.finish() or ()))
    result = read.result(len(body))
    tally.settle_read(result)
    return result.stats


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _in_memory_round(body: bytes, timings: dict[str, list[float]]) -> dict:
    """Parse limit, naive peer and exporter, one after the other on the same bytes."""
    if parse_limit.available():
        timings["parse"].append(_timed(lambda: parse_limit.decode(body)))
    peer = NaivePeer("default", NaiveMetrics(CollectorRegistry()))
    timings["naive first memory"].append(_timed(lambda: peer.ingest(body)))
    timings["naive second memory"].append(_timed(lambda: peer.ingest(body)))
    now, stats = time.time(), []
    tally = Tally(Settings(LOOKBACK, OVERLAP, Target.straggler_give_up), Ledger(baseline=now - LOOKBACK), Store())
    for poll in ("first", "second"):
        timings[f"{poll} memory"].append(_timed(lambda: stats.append(exporter_decode_account(body, tally, now))))
    return {"tracked": len(tally.ledger.calls), "first": stats[0], "second": stats[1]}


async def _exporter_http_round(url: str, timings: dict[str, list[float]]) -> list[dict]:
    """A fresh poller's first and second poll; returns what the poller reported of each."""
    reports = []
    with PollReport() as report:
        async with aiohttp.ClientSession() as session:
            # Every poll reads the whole window (full_read_interval 0s): the skip path over all of it.
            target = Target(api_url=url, settle_window=LOOKBACK, initial_lookback=LOOKBACK, full_read_interval=0.0)
            poller = Poller(target, Collector("bench"), session)
            await poller.restore()
            for poll in ("first", "second"):
                started = time.perf_counter()
                ok, _ = await poller.poll()
                timings[f"{poll} http"].append(time.perf_counter() - started)
                if not ok:
                    raise RuntimeError(f"poll failed: {poller.status.last_error}")
                reports.append(dict(report.last, tracked=len(poller.ledger.calls)))
    return reports


def _measure(url: str, body: bytes, rounds: int) -> tuple[dict[str, float], dict, list[dict]]:
    """Every figure once per round, interleaved, so a noisy neighbour hits all alike; medians."""
    timings: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        memory = _in_memory_round(body, timings)
        http = asyncio.run(_exporter_http_round(url, timings))
        peer = NaivePeer("default", NaiveMetrics(CollectorRegistry()))
        for poll in ("first", "second"):
            timings[f"naive {poll} http"].append(_timed(lambda peer=peer: peer.poll(url)))
    return {key: median(values) for key, values in timings.items()}, memory, http


def _overlap_calls(body: bytes) -> int:
    """Records a second poll must re-examine: updated within `overlap` of the newest update."""
    updated = [datetime.fromisoformat(c["updated_at"]).timestamp() for c in json.loads(body)]
    return sum(u >= max(updated) - OVERLAP for u in updated)


def run(api: ApiServer, sizes: Sizes, facts: Facts) -> list[Row]:
    status, body = http_get(api.url + "/v1/calls", timeout=300)
    assert status == 200, status
    n = sizes.ingest_calls
    t, memory, http = _measure(api.url, body, sizes.repeats)
    facts[CASE].update(
        calls=n,
        body_bytes=len(body),
        bytes_per_call=len(body) / n,
        overlap_calls=_overlap_calls(body),
        tracked_memory=memory["tracked"],
        examined_first_memory=memory["first"]["examined"],
        examined_second_memory=memory["second"]["examined"],
        tracked_http=http[0]["tracked"],
        records_http=http[0]["records"],
        examined_first_http=http[0]["examined"],
        examined_second_http=http[1]["examined"],
        bytes_read_http=http[0]["bytes"],
    )
    parse = t.get("parse")
    parse_cps = n / parse if parse else None
    mb = len(body) / 1e6

    def cps(seconds: float) -> float:
        return n / seconds

    rows = [
        Row(
            CASE,
            f"parse limit: msgspec decode, in memory ({n:,} calls of {len(body) / n:,.0f} B: {mb:.0f} MB)",
            parse_cps,
            "calls/s",
            1.0 if parse_cps else None,
        )
    ]
    if parse_cps is None:
        rows[0].figure = "parse limit: n/a (msgspec not installed: pip install .[bench])"
    polls = (("first", "first poll (all new)"), ("second", "second poll (unchanged)"))
    ways = (("memory", "in memory"), ("http", "HTTP"))
    for poll, label in polls:
        for way, where in ways:
            seconds = t[f"naive {poll} {way}"]
            rows.append(
                Row(CASE, f"naive peer: {label}, {where}", cps(seconds), "calls/s", ratio(cps(seconds), parse_cps), 1.0)
            )
    for poll, label in polls:
        for way, where in ways:
            seconds, peer = t[f"{poll} {way}"], t[f"naive {poll} {way}"]
            vs_parse = ratio(cps(seconds), parse_cps)
            rows.append(
                Row(
                    CASE,
                    f"exporter: {label}, {where}",
                    cps(seconds),
                    "calls/s",
                    vs_parse,
                    ratio(cps(seconds), cps(peer)),
                    f">= {GOAL:.2f}x parse",
                    verdict(None if vs_parse is None else vs_parse >= GOAL),
                )
            )
    examined = http[1]["examined"]
    rows.append(
        Row(
            CASE,
            f"exporter: records examined on the second poll (overlap {OVERLAP:.0f} s holds "
            f"{facts[CASE]['overlap_calls']})",
            examined,
            "calls",
            goal="= overlap",
            verdict=verdict(examined == facts[CASE]["overlap_calls"]),
        )
    )
    return rows


def main() -> None:
    from benchmarks.common import FULL
    from benchmarks.report import table

    calls = int(sys.argv[1]) if len(sys.argv) > 1 else FULL.ingest_calls
    sizes = Sizes(**{**FULL.__dict__, "name": "ingest only", "ingest_calls": calls})
    facts = Facts()
    with tempfile.TemporaryDirectory(prefix="callingbox-bench-") as tmp, ApiServer("replay", calls, Path(tmp)) as api:
        print(table(run(api, sizes, facts)))
    print(json.dumps(facts[CASE], indent=1))


if __name__ == "__main__":
    main()
