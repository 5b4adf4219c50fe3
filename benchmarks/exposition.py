"""Case 5, exposition: what a /metrics scrape costs at the most series the label caps allow (50
hangup_cause and 50 error_code values plus none and other, every direction × status, every
histogram bucket and exemplar filled), for one org and for ten.

The reference is prometheus-client rendering the whole registry live (`registry_for`, text and
OpenMetrics), beside the naive peer's prometheus-client metrics holding the same label sets.
The exporter serves pages rendered at publish (exposition.py): a scrape of them is timed over
real HTTP on 127.0.0.1 against the aiohttp app, with and without gzip, and so is the CPU a
publish pays when an org's call families changed.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from benchmarks.common import Facts, Row, Sizes, median, ratio, verdict
from benchmarks.naive_peer import NaiveMetrics, NaivePeer
from exporter import __version__
from exporter.accounting import Billed, Created, Ended, ExtractionOutcome, WebhookOutcome
from exporter.catalogue import ACTIVE_STATUSES, DELAY_BUCKETS, DIRECTIONS, DURATION_BUCKETS, TERMINAL_STATUSES
from exporter.cli import registry_for
from exporter.exposition import Exposition, stale_families
from exporter.health import Health, Snapshot, Status
from exporter.store import Store
from exporter.web import make_app

CASE = "5 exposition"
GOAL_MS = 20.0
SCRAPES_PER_RENDER = 4  # served scrapes are cheap: more of them per figure


def _values(prefix: str, cap: int) -> list[str | None]:
    """`cap` distinct values, then one for `none` and one past the cap (`other`)."""
    return [f"{prefix}_{i:02d}" for i in range(cap)] + [None, f"{prefix}_past_the_cap"]


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{round(seconds % 1 * 1000):03d}Z"


def calls(cap: int = 50) -> list[dict]:
    """Terminal call records spanning every label combination and every histogram bucket."""
    causes, codes = _values("cause", cap), _values("error", cap)
    durations, delays = [*DURATION_BUCKETS, 7200], [*DELAY_BUCKETS, 90]
    records, i = [], 0
    for direction in DIRECTIONS:
        for status in TERMINAL_STATUSES:
            for j, cause in enumerate(causes):
                i += 1
                setup, answer = delays[i % len(delays)], delays[(i // len(delays)) % len(delays)]
                created = 1_700_000_000 + 100 * i
                records.append(
                    {
                        "id": f"call-{i:05d}",
                        "status": status,
                        "direction": direction,
                        "hangup_cause": cause,
                        "error_code": codes[j] or "",
                        "duration_seconds": durations[i % len(durations)],
                        "billed_duration_seconds": durations[(i + 5) % len(durations)],
                        "billing_amount_milli_cents": 9000 * (i % 7),
                        "reservation_status": "settled",
                        "webhook_status": ("delivered", "failed")[i % 2],
                        "result_status": ("completed", "failed")[i % 2],
                        "created_at": _stamp(created),
                        "started_at": _stamp(created + setup),
                        "answered_at": _stamp(created + setup + answer),
                        "setup_delay": setup,
                        "answer_delay": answer,
                    }
                )
    return records


def _events(record: dict) -> list:
    d, s, call = record["direction"], record["status"], record["id"]
    return [
        Created(d),
        Ended(
            d,
            s,
            record["hangup_cause"],
            record["error_code"],
            record["duration_seconds"],
            record["answer_delay"],
            record["setup_delay"],
            call,
        ),
        Billed(d, record["billed_duration_seconds"], record["billing_amount_milli_cents"], call),
        WebhookOutcome(record["webhook_status"]),
        ExtractionOutcome(record["result_status"]),
    ]


def exporter_store(records: list[dict], now: float) -> Store:
    store = Store()
    for record in records:
        store.count(_events(record), now)
    for code in ("200", "429", "503", "error"):
        store.inc("callingbox_exporter_api_requests_total", (code,))
    for reason in ("not_object", "missing_field", "bad_type", "bad_timestamp", "unknown_status"):
        store.inc("callingbox_exporter_invalid_records_total", (reason,))
    for seconds in (0.04, 0.3, 2, 20, 200):
        store.observe("callingbox_exporter_poll_duration_seconds", (), seconds)
    return store


def health(now: float) -> Health:
    return Health(
        Status(up=True, last_success=now),
        watermark=now,
        tracked=100_000,
        stragglers=3,
        active={(d, s): 5 for d in DIRECTIONS for s in ACTIVE_STATUSES},
        webhooks_pending=10,
        webhook_pending_oldest=now - 3600,
    )


async def exporter_pages(orgs: int, records: list[dict]) -> Exposition:
    """The exporter's collector with `orgs` orgs published, each with every series at the caps."""
    now = time.time()
    store, collector = exporter_store(records, now), Exposition(__version__)
    for org in range(orgs):
        await collector.publish(f"org-{org:02d}", Snapshot(store.copy(), health(now)))
    return collector


def naive_registry(orgs: int, records: list[dict]) -> CollectorRegistry:
    registry = CollectorRegistry()
    metrics = NaiveMetrics(registry)
    for org in range(orgs):
        NaivePeer(f"org-{org:02d}", metrics).count(records)
    return registry


def _render_ms(render, registries: list[CollectorRegistry], times: int) -> list[tuple[float, int]]:
    """Median render time (ms) and samples rendered, per registry; renders alternate between them."""
    timings: list[list[float]] = [[] for _ in registries]
    texts = [b""] * len(registries)
    for _ in range(times):
        for i, registry in enumerate(registries):
            started = time.perf_counter()
            texts[i] = render(registry)
            timings[i].append(time.perf_counter() - started)
    return [
        (median(t) * 1000, sum(1 for line in text.splitlines() if line and not line.startswith(b"#")))
        for t, text in zip(timings, texts)
    ]


def _samples(body: bytes, openmetrics: bool) -> dict:
    """What a scraper reads, but what moves between two renders: process_*, python_* and the
    pending webhook's age, which follows the clock."""
    parse = parse_openmetrics if openmetrics else parse_text
    moving = ("process_", "python_", "callingbox_webhook_pending_oldest_age_seconds")
    return {
        (s.name, tuple(sorted(s.labels.items()))): (s.value, s.exemplar)
        for family in parse(body.decode())
        if not family.name.startswith(moving)
        for s in family.samples
    }


async def _scrapes_ms(url: str, openmetrics: bool, gzip: bool, times: int) -> tuple[float, int, bytes]:
    """Median time (ms) of a scrape, one at a time over loopback; the body as sent, and decoded."""
    headers = {"Accept-Encoding": "gzip" if gzip else "identity", **({"Accept": OPENMETRICS} if openmetrics else {})}
    timings, body, sent = [], b"", 0
    async with aiohttp.ClientSession() as session:
        for _ in range(times):
            started = time.perf_counter()
            async with session.get(url, headers=headers, auto_decompress=False) as response:
                raw = await response.read()
            timings.append(time.perf_counter() - started)
            sent = len(raw)
        async with session.get(url, headers=headers) as response:  # decoded by aiohttp, for the facts
            body = await response.read()
    return median(timings) * 1000, sent, body


async def _publish_cpu_ms(collector: Exposition, records: list[dict], times: int) -> tuple[float, int]:
    """Median CPU (ms, the worker thread's gzip included) of a publish of org-00 whose call
    families changed since its last one; and how many families it rendered again."""
    now, org = time.time(), "org-00"
    before = collector.snapshots[org]
    after = Snapshot(before.store.copy(), before.health)
    after.store.count(_events({**records[0], "id": "one-more-call"}), now)
    timings = []
    for i in range(times):
        snapshot = (after, before)[i % 2]
        started = time.process_time()
        await collector.publish(org, snapshot)
        timings.append(time.process_time() - started)
    return median(timings) * 1000, len(stale_families(before, after, relabelled=False))


async def _served(orgs: int, records: list[dict], sizes: Sizes, facts: Facts) -> tuple[list[Row], Exposition]:
    collector = await exporter_pages(orgs, records)
    registry = registry_for(collector, collector.runtime)
    runner = web.AppRunner(make_app(collector, registry, __version__))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/metrics"
    rows, plural = [], "s" * (orgs > 1)
    try:
        for label, openmetrics in (("text", False), ("OpenMetrics", True)):
            live = (generate_openmetrics if openmetrics else generate_latest)(registry)
            for gzip in (False, True):
                ms, sent, body = await _scrapes_ms(url, openmetrics, gzip, sizes.renders * SCRAPES_PER_RENDER)
                coding = "gzip" if gzip else "identity"
                facts[CASE][f"served {label} {orgs} {coding}"] = {
                    "bytes_sent": sent,
                    "same_samples_as_live": _samples(body, openmetrics) == _samples(live, openmetrics),
                }
                goal = orgs == 10
                rows.append(
                    Row(
                        CASE,
                        f"exporter: served scrape {label}, {orgs} org{plural}, {coding} over HTTP "
                        f"({sent / 1000:,.0f} kB sent)",
                        ms,
                        "ms",
                        goal=f"<= {GOAL_MS:.0f} ms" if goal else "",
                        verdict=verdict(ms <= GOAL_MS if goal else None),
                    )
                )
        cpu_ms, families = await _publish_cpu_ms(collector, records, sizes.renders)
        facts[CASE][f"publish {orgs}"] = {"families_rendered": families}
        rows.append(
            Row(
                CASE,
                f"exporter: publish CPU, an org's call families changed, {orgs} org{plural} "
                f"({families} families rendered, pages joined and gzipped)",
                cpu_ms,
                "ms",
            )
        )
    finally:
        await runner.cleanup()
    return rows, collector


def run(sizes: Sizes, facts: Facts) -> list[Row]:
    records, rows = calls(), []
    for orgs in (1, 10):
        served, collector = asyncio.run(_served(orgs, records, sizes, facts))
        ours, naive = registry_for(collector, collector.runtime), naive_registry(orgs, records)
        for label, render in (("text", generate_latest), ("OpenMetrics", generate_openmetrics)):
            (ms, samples), (naive_ms, naive_samples) = _render_ms(render, [ours, naive], sizes.renders)
            facts[CASE][f"{label} {orgs}"] = {"samples": samples, "naive_samples": naive_samples}
            rows.append(
                Row(
                    CASE,
                    f"reference: live render {label}, {orgs} org{'s' * (orgs > 1)} ({samples:,} samples; "
                    f"naive peer {naive_samples:,})",
                    ms,
                    "ms",
                    vs_naive=ratio(ms, naive_ms),
                )
            )
        rows += served
    return rows
