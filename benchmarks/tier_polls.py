"""Case 6's polls: the exporter polled in this process on the reference org's virtual clock
(benchmarks/reference_org.py), each poll's bytes, requests and CPU recorded, and every call
counter and histogram sample compared with the simulator's truth at the checks.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import LOOKBACK, PollReport, Sizes
from benchmarks.procs import CALL_COUNTERS, CALL_HISTOGRAMS
from benchmarks.reference_org import OrgServer
from exporter.config import Target
from exporter.metrics import Collector
from exporter.poller import Poller

QUIET_AT = 3240.0  # traffic stops, live calls freeze: nothing changes from here on
UNBUDGETED = 1_000_000_000  # requests per minute: the budget's clock is real time, ours is virtual


class TierReport(PollReport):
    FIELDS = (*PollReport.FIELDS, "full", "depth_s", "stragglers_refreshed", "stragglers_not_found", "straggler_errors")


COUNTERS = (*CALL_COUNTERS, "callingbox_billed_amount_dollars_total")
HISTOGRAMS = tuple(h + suffix for h in CALL_HISTOGRAMS for suffix in ("_count", "_sum", "_bucket"))
# Sums of float differences: the exporter and the truth add them in different orders (tests/conftest.py).
FLOAT_SUMS = ("callingbox_call_answer_delay_seconds_sum", "callingbox_call_setup_delay_seconds_sum")


def exposed(collector: Collector, org: str) -> dict[tuple, float]:
    """The org's samples as /metrics renders them, org label dropped."""
    registry = CollectorRegistry()
    registry.register(collector)
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = dict(s.labels)
            if labels.pop("org", None) == org:
                samples[(s.name, tuple(sorted(labels.items())))] = s.value
    return samples


def differences(samples: dict[tuple, float], expected: list[list]) -> list[str]:
    """Every call counter and histogram sample that differs from the truth (empty: exact)."""
    want = {(name, tuple(map(tuple, labels))): value for name, labels, value in expected}
    families = (*COUNTERS, *HISTOGRAMS)
    problems = []
    for key in sorted(set(want) | {k for k in samples if k[0] in families}):
        w, h = want.get(key, 0), samples.get(key, 0)
        off = abs(w - h) > 1e-6 * max(1.0, abs(w)) if key[0] in FLOAT_SUMS else w != h
        if off:
            problems.append(f"{key[0]}{dict(key[1])}: exporter {h} != truth {w}")
    return problems


def _counter(poller: Poller, name: str) -> dict:
    return poller.store.counters.get(name, {})


async def timeline(
    server: OrgServer, target: Target, polls: list[float], checks: tuple[float, ...], label: str, progress
) -> dict:
    """Poll at `polls` (seconds from the start) on the virtual clock; check exactness at `checks`."""
    virtual = [server.origin]
    results, exact = [], {}
    async with aiohttp.ClientSession() as session:
        poller = Poller(target, Collector("bench"), session, clock=lambda: virtual[0])
        await poller.restore()
        saved = poller._persist
        save_cpu = [0.0]

        async def persist(adding: dict | None = None) -> bool:  # the state save's CPU, inside the poll's
            cpu = time.process_time()
            try:
                return await saved(adding)
            finally:
                save_cpu[0] += time.process_time() - cpu

        poller._persist = persist
        with TierReport() as report:
            for t in sorted({*polls, QUIET_AT, *checks}):
                virtual[0] = (await server.post(session, "/_bench/advance", {"to": server.origin + t}))["now"]
                if t == QUIET_AT:
                    await server.post(session, "/_bench/quiesce")
                if t in polls:
                    byte_counts = _counter(poller, "callingbox_exporter_api_response_bytes_total")
                    before = (
                        byte_counts.get(("list",), 0),
                        byte_counts.get(("call",), 0),
                        sum(_counter(poller, "callingbox_exporter_api_requests_total").values()),
                    )
                    save_cpu[0] = 0.0
                    cpu, wall = time.process_time(), time.perf_counter()
                    ok, _ = await poller.poll()
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                    if not ok:
                        raise RuntimeError(f"{label}: poll at {t:.0f} s failed: {poller.status.last_error}")
                    byte_counts = _counter(poller, "callingbox_exporter_api_response_bytes_total")
                    after = (
                        byte_counts.get(("list",), 0),
                        byte_counts.get(("call",), 0),
                        sum(_counter(poller, "callingbox_exporter_api_requests_total").values()),
                    )
                    plan = poller.tally.planner.last_plan
                    results.append(
                        {
                            "t": t,
                            "full": bool(report.last.get("full")),
                            "cpu_s": cpu,
                            "save_cpu_s": save_cpu[0],
                            "wall_s": wall,
                            "list_bytes": after[0] - before[0],
                            "call_bytes": after[1] - before[1],
                            "requests": after[2] - before[2],
                            "records": report.last.get("records"),
                            "examined": report.last.get("examined"),
                            "events": report.last.get("events"),
                            "depth_s": report.last.get("depth_s"),
                            "tracked": len(poller.ledger.calls),
                            "open_listed": plan.open_calls.get("list", 0),
                            "open_by_id": plan.open_calls.get("by_id", 0),
                        }
                    )
                    if t % 900 == 0:
                        progress(f"case 6: {label}, {t / 60:.0f} min of the simulated hour")
                if t in checks:
                    expected = await server.get(session, f"/_bench/expected?after={poller.ledger.baseline!r}")
                    exact[t] = differences(exposed(poller.collector, target.name), expected["samples"])
        mismatches = sum(_counter(poller, "callingbox_exporter_audit_mismatches_total").values())
        server_stats = await server.get(session, "/_bench/stats")
    return {"polls": results, "differences": exact, "audit_mismatches": mismatches, "server": server_stats}


def run_one(
    name: str, sizes: Sizes, log_dir: Path, polls: list[float], checks: tuple[float, ...], progress, **settings
) -> dict:
    with OrgServer(f"org-{name}", log_dir, sizes.tier_calls) as server:
        # new_series_hold 0: the published counts are compared with the truth after each check poll
        target = Target(
            api_url=server.url,
            initial_lookback=LOOKBACK,
            state_file=str(log_dir / f"{name}.state.db"),
            max_requests_per_minute=UNBUDGETED,
            new_series_hold=0.0,
            **settings,
        )
        result = asyncio.run(timeline(server, target, polls, checks, name, progress))
        result["open_history"] = server.open
    return result
