"""Case 5, exposition: time to render /metrics (text and OpenMetrics, with prometheus-client as
the exporter serves it, through `registry_for`) at the most series the label caps allow: 50
hangup_cause and 50 error_code values plus none and other, every direction × status, every
histogram bucket and exemplar filled; for one org and for ten. Beside it, the naive peer's
prometheus-client metrics holding the same label sets.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from benchmarks.common import Facts, Row, Sizes, median, ratio, verdict
from benchmarks.naive_peer import NaiveMetrics, NaivePeer
from exporter import __version__
from exporter.accounting import Billed, Created, Ended, ExtractionOutcome, WebhookOutcome
from exporter.cli import registry_for
from exporter.catalogue import ACTIVE_STATUSES, DELAY_BUCKETS, DIRECTIONS, DURATION_BUCKETS, TERMINAL_STATUSES
from exporter.metrics import Collector, Snapshot
from exporter.store import Store
from exporter.tally import Health, Status


CASE = "5 exposition"
GOAL_MS = 20.0


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
                records.append({
                    "id": f"call-{i:05d}", "status": status, "direction": direction, "hangup_cause": cause,
                    "error_code": codes[j] or "", "duration_seconds": durations[i % len(durations)],
                    "billed_duration_seconds": durations[(i + 5) % len(durations)],
                    "billing_amount_milli_cents": 9000 * (i % 7), "reservation_status": "settled",
                    "webhook_status": ("delivered", "failed")[i % 2], "result_status": ("completed", "failed")[i % 2],
                    "created_at": _stamp(created), "started_at": _stamp(created + setup),
                    "answered_at": _stamp(created + setup + answer), "setup_delay": setup, "answer_delay": answer,
                })
    return records


def _events(record: dict) -> list:
    d, s, call = record["direction"], record["status"], record["id"]
    return [
        Created(d),
        Ended(d, s, record["hangup_cause"], record["error_code"], record["duration_seconds"], record["answer_delay"],
              record["setup_delay"], call),
        Billed(d, record["billed_duration_seconds"], record["billing_amount_milli_cents"], call),
        WebhookOutcome(record["webhook_status"]),
        ExtractionOutcome(record["result_status"]),
    ]


def exporter_registry(orgs: int, records: list[dict]) -> CollectorRegistry:
    now = time.time()
    store = Store()
    for record in records:
        store.count(_events(record), now)
    for code in ("200", "429", "503", "error"):
        store.inc("callingbox_exporter_api_requests_total", (code,))
    for reason in ("not_object", "missing_field", "bad_type", "bad_timestamp", "unknown_status"):
        store.inc("callingbox_exporter_invalid_records_total", (reason,))
    for seconds in (0.04, 0.3, 2, 20, 200):
        store.observe("callingbox_exporter_poll_duration_seconds", (), seconds)
    health = Health(Status(up=True, last_success=now), watermark=now, tracked=100_000, stragglers=3,
                    active={(d, s): 5 for d in DIRECTIONS for s in ACTIVE_STATUSES}, webhooks_pending=10,
                    webhook_pending_oldest=now - 3600)
    collector = Collector(__version__)
    for org in range(orgs):
        collector.publish(f"org-{org:02d}", Snapshot(store.copy(), health))
    return registry_for(collector)


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
    return [(median(t) * 1000, sum(1 for line in text.splitlines() if line and not line.startswith(b"#")))
            for t, text in zip(timings, texts)]


def run(sizes: Sizes, facts: Facts) -> list[Row]:
    records, rows = calls(), []
    for orgs in (1, 10):
        ours, naive = exporter_registry(orgs, records), naive_registry(orgs, records)
        for label, render in (("text", generate_latest), ("OpenMetrics", generate_openmetrics)):
            (ms, samples), (naive_ms, naive_samples) = _render_ms(render, [ours, naive], sizes.renders)
            facts[CASE][f"{label} {orgs}"] = {"samples": samples, "naive_samples": naive_samples}
            rows.append(Row(CASE, f"exporter: render {label}, {orgs} org{'s' * (orgs > 1)} ({samples:,} samples; "
                                  f"naive peer {naive_samples:,})", ms, "ms", vs_naive=ratio(ms, naive_ms),
                            goal=f"<= {GOAL_MS:.0f} ms", verdict=verdict(ms <= GOAL_MS)))
    return rows
