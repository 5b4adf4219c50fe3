"""The naive peer: what a hand-written (or generic JSON) CallingBox exporter does on each poll.

GET the whole `/v1/calls` body, `json.loads` it, walk every call and update prometheus-client
Counters and Histograms with labels. Each poll is a recount keyed by call id: the peer keeps,
per call, what it already counted, so overlapping reads count nothing twice. No settle window,
no incremental skip, no label caps, the whole body in memory: the way most exporters are written.

As a process (`python -m benchmarks.naive_peer --api-url URL --listen 127.0.0.1:PORT`) it serves
its metrics with prometheus-client's threaded HTTP server and polls in the main thread; after
each poll it prints one JSON line: seconds of wall and CPU, bytes, calls, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

TERMINAL = frozenset({"completed", "no_answer", "busy", "canceled", "failed"})
DURATION_BUCKETS = (0, 5, 10, 20, 30, 60, 120, 180, 300, 600, 1200, 1800, 3600)
DELAY_BUCKETS = (0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 45, 60)


class NaiveMetrics:
    """The metric objects, shared by every org of one process (as module globals would be)."""

    def __init__(self, registry: CollectorRegistry):
        def counter(name, doc, *labels):
            return Counter(name, doc, ("org", *labels), registry=registry)

        def histogram(name, doc, buckets, *labels):
            return Histogram(name, doc, ("org", *labels), buckets=buckets, registry=registry)

        self.created = counter("callingbox_calls_created", "Calls first seen.", "direction")
        # not callingbox_calls: its _created sample would clash with callingbox_calls_created
        self.calls = counter("callingbox_calls_finished", "Calls first seen terminal.", "direction", "status")
        self.hangups = counter("callingbox_call_hangups", "By hangup cause.", "direction", "status", "hangup_cause")
        self.errors = counter("callingbox_call_errors", "By error code.", "direction", "error_code")
        self.webhooks = counter("callingbox_webhook_deliveries", "Webhook outcomes.", "status")
        self.extractions = counter("callingbox_result_extractions", "Extraction outcomes.", "status")
        self.billed = counter("callingbox_billed_amount_dollars", "Money billed.", "direction")
        self.duration = histogram(
            "callingbox_call_duration_seconds", "Duration.", DURATION_BUCKETS, "direction", "status"
        )
        self.answer = histogram("callingbox_call_answer_delay_seconds", "Answer delay.", DELAY_BUCKETS, "direction")
        self.setup = histogram("callingbox_call_setup_delay_seconds", "Setup delay.", DELAY_BUCKETS, "direction")
        self.billed_duration = histogram(
            "callingbox_call_billed_duration_seconds", "Billed duration.", DURATION_BUCKETS, "direction"
        )


def _seconds(value: str | None) -> float | None:
    return None if value is None else datetime.fromisoformat(value).timestamp()  # Python 3.11 reads the Z


def fetch(api_url: str) -> bytes:
    request = urllib.request.Request(api_url + "/v1/calls", headers={"Authorization": "Bearer sk_naive"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.read()


class NaivePeer:
    def __init__(self, org: str, metrics: NaiveMetrics):
        self.org, self.m = org, metrics
        self.seen: dict[str, tuple] = {}  # call id → (status, webhook_status, result_status, billed)

    def poll(self, api_url: str) -> dict:
        body = fetch(api_url)
        return {"bytes": len(body), "calls": self.ingest(body)}

    def ingest(self, body: bytes) -> int:
        calls = json.loads(body)
        self.count(calls)
        return len(calls)

    def count(self, calls: list[dict]) -> None:
        m, org, seen = self.m, self.org, self.seen
        for call in calls:
            call_id, status = call["id"], call["status"]
            direction = call.get("direction") or "none"
            before = seen.get(call_id)
            if before is None:
                m.created.labels(org, direction).inc()
                before = (None, None, None, False)
            was, webhook_was, result_was, billed = before
            terminal = status in TERMINAL
            if terminal and was not in TERMINAL:
                m.calls.labels(org, direction, status).inc()
                m.hangups.labels(org, direction, status, call.get("hangup_cause") or "none").inc()
                if call.get("error_code") is not None:
                    m.errors.labels(org, direction, call["error_code"] or "none").inc()
                if call.get("duration_seconds") is not None:
                    m.duration.labels(org, direction, status).observe(call["duration_seconds"])
                created, started, answered = map(
                    _seconds, (call.get("created_at"), call.get("started_at"), call.get("answered_at"))
                )
                if started is not None and answered is not None:
                    m.answer.labels(org, direction).observe(answered - started)
                if created is not None and started is not None:
                    m.setup.labels(org, direction).observe(started - created)
            if terminal and not billed and call.get("reservation_status") != "reserved":
                billed = True
                m.billed.labels(org, direction).inc((call.get("billing_amount_milli_cents") or 0) / 100_000)
                if call.get("billed_duration_seconds") is not None:
                    m.billed_duration.labels(org, direction).observe(call["billed_duration_seconds"])
            webhook, result = call.get("webhook_status"), call.get("result_status")
            if webhook != webhook_was and webhook in ("delivered", "failed"):
                m.webhooks.labels(org, webhook).inc()
            if result != result_was and result in ("completed", "failed"):
                m.extractions.labels(org, result).inc()
            seen[call_id] = (status, webhook, result, billed)


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="the naive peer exporter (benchmarks only)")
    p.add_argument("--api-url", required=True)
    p.add_argument("--listen", help="HOST:PORT to serve /metrics on")
    p.add_argument("--interval", type=float, default=15.0)
    p.add_argument("--polls", type=int, default=0, help="stop polling after this many (0: never)")
    args = p.parse_args(argv)
    registry = CollectorRegistry()
    peer = NaivePeer("default", NaiveMetrics(registry))
    polls = Counter("naive_peer_polls", "Polls completed.", registry=registry)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        start_http_server(int(port), addr=host, registry=registry)
    done = 0
    while not args.polls or done < args.polls:
        cpu, wall = time.process_time(), time.perf_counter()
        result = peer.poll(args.api_url)
        polls.inc()
        done += 1
        print(
            json.dumps(
                {
                    "poll": done,
                    "wall_s": time.perf_counter() - wall,
                    "cpu_s": time.process_time() - cpu,
                    "peak_rss": _peak_rss(),
                    **result,
                }
            ),
            flush=True,
        )
        if done != args.polls:
            time.sleep(args.interval)
    if args.listen:
        while True:  # keep serving until terminated
            time.sleep(3600)


if __name__ == "__main__":
    main()
