"""Case 6, read tiers: the API cost of an ordinary poll with the tiered defaults, beside today's
full-window read (the same exporter with `full_read_interval: 0s`), on one reference org.

The reference org (the issue): `tier_calls` calls in the 72 h settle window (150 000 in the
full run), about 1 % of them open past the hot read (webhooks retrying, late settlements), and
live traffic at the window's own rate. The simulator runs in a process of its own on a
*virtual clock* that this process advances 15 s per poll, so an hour of the org's life (241
polls, with the hourly full read and audit) takes a minute or two, and the exporter's read
plan sees the times it sees in production: ordinary reads down to the oldest call in flight (at
most 30 min), open calls by id by what they wait for (waits.py), a full read every hour.

- History: final calls evenly spread from the start of the clock back to just inside the
  window of the first poll (the simulator's history, its spacing set for the org's rate). Every
  100th has a webhook endpoint that is down: CallingBox retries it by its schedule (SPEC §1: 8
  attempts, each gap double the last, the last ~42 h after the first, ±20 %), each failed
  attempt a change of the call; one in three is delivered at a later attempt, the others fail
  for good at the 8th, so those older than the schedule are final. Every 200th has a
  reservation not settled; one in three of those settles during the first 39 min. A by-id
  refresh (or a full read) alone sees these changes. History calls answer by id too, and are
  serialised once, then sent from memory, so the API is never the slow side of a read. No
  history call changes after 39:00, one delay bound of a quiet call (20 min) before 59:45.
- Live: calls created at the window's rate with the simulator's own lifecycles (time_scale 1:
  talk, extraction, webhook retries for up to 42 h), for 30 min before the first poll (the hot
  window then holds live calls only) and through the hour.
- At 54:00 the traffic stops and every live call freezes (`QUIET_AT`). At 59:45, after
  ordinary polls only, every call counter and histogram sample must equal the simulator's truth
  (the tiers alone kept them exact); at 60:00 the hourly full read runs, and they must still.

Each configuration runs against its own simulator with the same seed, one after the other, so
the two ledgers never share a process (a full GC walks one of them only); the virtual clock
makes both simulators play the same calls at the same times. Both save a state file after each
poll, as deployed. `max_requests_per_minute` is lifted, because the budget counts real seconds
and the hour passes here in about a minute; the requests per simulated minute are reported.

A day is extrapolated from the hour (BENCHMARKS.md states the formula): 24 hourly polls as
measured at 60:00, plus 5 736 ordinary polls at the mean of the steady ones (15:00-59:45, past
the start's by-id backlog). `python -m benchmarks --cases 6` runs this case alone;
`python -m benchmarks.tiers --serve --calls N` is the simulator process it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import random
import statistics
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from benchmarks.common import LOOKBACK, MB, Facts, PollReport, Row, Sizes, median, verdict
from benchmarks.procs import CALL_COUNTERS, CALL_HISTOGRAMS, Child
from exporter.catalogue import DEFAULT_BUCKETS, MILLI_CENTS_PER_DOLLAR
from exporter.config import Target
from exporter.metrics import Collector
from exporter.poller import Poller
from exporter.simulator import Simulator, format_ts, ledger
from exporter.simulator.faults import _dumps
from exporter.simulator.lifecycle import WEBHOOK_ATTEMPTS, WEBHOOK_FIRST_RETRY

CASE = "6 read tiers"
GOAL_LIST, GOAL_DAY, GOAL_CPU = 100, 50, 20  # full-window read ÷ read tiers, at least
# Issue 26, for the reference org: by-id requests a minute and API GB a day, at most.
REFERENCE_CALLS, GOAL_BY_ID, GOAL_DAY_GB = 150_000, 100, 6.0
SPARSE_FULL_READS = 3 * 3600  # seconds between full reads (and audits) in the derived figure
GB = 1_000_000_000

WINDOW = 72 * 3600.0  # settle_window, default
POLL = 15.0  # poll_interval, default
HOUR = 3600.0  # full_read_interval and audit_interval, default
POLLS_PER_DAY = round(86400 / POLL)  # 5 760
FULL_READS_PER_DAY = round(86400 / HOUR)  # 24
WARMUP = 1800.0  # live traffic runs this long before the first poll: the hot window holds live calls
MARGIN = 60.0  # the oldest history call lies this far inside the window at the first poll
OPEN_EVERY = 100  # every 100th history call's webhook endpoint is down: retried by the schedule ...
RETRIED_AT = 25  # ... (i % OPEN_EVERY == RETRIED_AT), most still pending, ~1 % of the window with ...
DELIVER_EVERY = 3  # ... (one in three is delivered at a later attempt, the others fail all 8) ...
RESERVED_EVERY = 200  # ... every 200th call, whose reservation is not settled (i % 200 == 50):
SETTLE_EVERY = 3  # one in three of those settles late ...
RESOLVE_SPAN = (60.0, 2340.0)  # ... at a time in here (seconds from the start); no history change after it
QUIET_AT = 3240.0  # traffic stops, live calls freeze: nothing changes from here on
CHECK_AT = HOUR - POLL  # the last ordinary poll: counters must be exact (no full read since t = 0)
END = HOUR  # the hourly full read (and audit)
STEADY_FROM = 900.0  # ordinary polls from here are "steady": past the start's by-id backlog
STEP = 0.25  # virtual seconds per simulator step
TIERED_POLLS = [k * POLL for k in range(round(END / POLL) + 1)]  # 0:00, 0:15, ... 60:00
FULL_POLLS = [0.0, POLL, 2 * POLL, 3 * POLL, CHECK_AT, END]
FULL_MEASURED = (POLL, 2 * POLL, 3 * POLL)  # ordinary polls 15 s after the last one; 60:00 is the hourly one
UNBUDGETED = 1_000_000_000  # requests per minute: the budget's clock is real time, ours is virtual
_HISTORY_TAG = 0x7B1E_5000_0000_0000  # marks the ids of history calls; the low 48 bits hold the index
_HOOK = "https://hooks.brightsmile.example/callingbox"


# ---- the simulator process: the reference org on a virtual clock --------------------------


class VirtualTime:
    """Stands in for the `time` module inside the simulator: `time()` is what the benchmark says."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


def history_id(i: int) -> str:
    return str(uuid.UUID(int=(_HISTORY_TAG << 64) | i, version=4))


def history_index(call_id: str) -> int | None:
    try:
        i = uuid.UUID(call_id).int & 0xFFFF_FFFF_FFFF
    except ValueError:
        return None
    return i if history_id(i) == call_id else None


class _Expected:
    """Counters and histograms the truth's events add up to, as the exposition names its samples."""

    def __init__(self) -> None:
        self.counters: dict[tuple, int | float] = {}
        self.histograms: dict[tuple, list] = {}  # (name, labels) → [count, sum, per-bucket counts]

    def add(self, events, after: float) -> None:
        counters, histograms = self.counters, self.histograms
        for date, name, labels, value, observed in events:
            if date <= after:
                continue
            if not observed:
                counters[(name, labels)] = counters.get((name, labels), 0) + value
                continue
            bounds = DEFAULT_BUCKETS[name]
            h = histograms.get((name, labels))
            if h is None:
                h = histograms[(name, labels)] = [0, 0, [0] * (len(bounds) + 1)]
            h[0] += 1
            h[1] += value
            h[2][bisect.bisect_left(bounds, value)] += 1

    def copy(self) -> _Expected:
        other = _Expected()
        other.counters = dict(self.counters)
        other.histograms = {key: [h[0], h[1], list(h[2])] for key, h in self.histograms.items()}
        return other

    def samples(self) -> list[list]:
        out = []
        for (name, labels), value in self.counters.items():
            if name == "callingbox_billed_amount_milli_cents":
                out.append(["callingbox_billed_amount_dollars_total", labels, value / MILLI_CENTS_PER_DOLLAR])
            else:
                out.append([name, labels, value])
        for (name, labels), (count, total, buckets) in self.histograms.items():
            out += [[name + "_count", labels, count], [name + "_sum", labels, total]]
            running = 0
            for bound, n in zip((*map(float, DEFAULT_BUCKETS[name]), math.inf), buckets):
                running += n
                out.append([name + "_bucket", tuple(sorted((*labels, ("le", floatToGoString(bound))))), running])
        return out


class ReferenceOrg(Simulator):
    """The simulator with the reference org's history: dense, 1 % open, served by id too."""

    def __init__(self, clock: VirtualTime, window_calls: int, seed: int):
        # History from the start of the clock back to just inside the window the first poll reads,
        # then live calls at the same rate: the first poll sees ~`window_calls` calls, evenly spread.
        history = int((WINDOW - WARMUP - MARGIN) * window_calls / WINDOW)
        super().__init__(seed=seed, rate=window_calls / WINDOW, history=history, history_age=0.0)
        self.clock, self.zero, self.origin = clock, clock.now, clock.now + WARMUP  # origin: the first poll
        self.retried = range(RETRIED_AT, history, OPEN_EVERY)
        self.reserved = range(RESERVED_EVERY // 4, history, RESERVED_EVERY)
        self.open_indices = sorted((*self.retried, *self.reserved))
        self._open = set(self.open_indices)
        self._static: tuple[float, _Expected] | None = None  # the history's final calls, summed once
        self._bytes: list[bytes | None] = [None] * history  # final history calls as sent, once generated
        for path, handler in (("/_bench/advance", self._advance_route), ("/_bench/quiesce", self._quiesce_route)):
            self.app.router.add_post(path, handler)
        self.app.router.add_get("/_bench/expected", self._expected_route)
        self.app.router.add_get("/_bench/stats", self._stats_route)

    def resolves_at(self, j: int) -> float | None:
        """When reserved history call j settles (virtual time), or None: reserved all run."""
        if j % SETTLE_EVERY:
            return None
        low, high = RESOLVE_SPAN
        return self.origin + low + (high - low) * ((j * 0.6180339887498949) % 1.0)

    def attempts(self, j: int, ended: float) -> tuple[list[float], bool]:
        """Retried history call j's delivery attempts by CallingBox's schedule (SPEC §1: 8, each
        gap double the last from ~19.8 min, ±20 %), and whether the last one delivers."""
        rng = random.Random(f"attempts:{j}")
        delivered = j % DELIVER_EVERY == 0
        last = 2 + (j // DELIVER_EVERY) % (WEBHOOK_ATTEMPTS - 1) if delivered else WEBHOOK_ATTEMPTS
        times, t = [], ended + rng.uniform(0.3, 20)
        for k in range(1, last + 1):
            times.append(t)
            t += WEBHOOK_FIRST_RETRY * 2 ** (k - 1) * rng.uniform(0.8, 1.2)
        return times, delivered

    def _history_record(self, i: int) -> dict:
        record = super()._history_record(i)
        record["id"] = history_id(i)
        # History changes stop at the end of RESOLVE_SPAN, so that the check at 59:45 comes one
        # delay bound of a quiet call (waits.QUIET_CAP x open_refresh_interval, 20 min) after them.
        now = min(self.clock.now, self.origin + RESOLVE_SPAN[1])
        if i % OPEN_EVERY == RETRIED_AT:  # the webhook endpoint is down: retried by the schedule
            ended = datetime.fromisoformat(record["ended_at"]).timestamp()
            times, delivered = self.attempts(i // OPEN_EVERY, ended)
            done = [t for t in times if t <= now]
            record["webhook_url"] = record["webhook_url"] or _HOOK
            if len(done) == len(times):  # its last attempt has come
                record.update(
                    webhook_status="delivered" if delivered else "failed",
                    updated_at=format_ts(done[-1]),
                    webhook_error=None if delivered else f"giving up after {len(times)} attempts: HTTP 503",
                )
            else:
                record.update(webhook_status="pending", webhook_error=f"attempt {len(done)}/8 failed: HTTP 503")
                record["updated_at"] = format_ts(max(done[-1], ended)) if done else record["updated_at"]
        elif i % RESERVED_EVERY == RESERVED_EVERY // 4:
            when = self.resolves_at(i // RESERVED_EVERY)
            if when is not None and now >= when:  # a late settlement
                record.update(reservation_status="settled", updated_at=format_ts(when))
            else:
                record["reservation_status"] = "reserved"
        return record

    def _items(self, live: list[dict], kind: str | None, params: dict):
        """The list's elements; a final history call is serialised once, then sent from memory
        (as the `replay` server does for case 1), so the API is never the slow side of a read."""
        if kind is not None:
            yield from super()._items(live, kind, params)
            return
        for record in live:
            yield _dumps(record)
        cache = self._bytes
        for i in range(self.history):
            item = cache[i]
            if item is None:
                item = _dumps(self._history_record(i))
                if i not in self._open:
                    cache[i] = item
            yield item

    async def _get_call(self, request: web.Request) -> web.Response:
        i = history_index(request.match_info["call_id"])
        if i is None or i >= self.history:
            return await super()._get_call(request)
        with self._lock:
            self.stats["by_id_requests"] += 1
        return web.json_response(self._history_record(i))

    async def _advance_route(self, request: web.Request) -> web.Response:
        """Move the virtual clock to `to`, playing every call's lifecycle on the way."""
        target = round(((await request.json())["to"] - self.zero) / STEP)
        with self._lock:
            step = round((self.clock.now - self.zero) / STEP)
            while step < target:
                step += 1
                self.clock.now = self.zero + step * STEP
                self._advance(self.clock.now)
        return web.json_response({"now": self.clock.now})

    async def _quiesce_route(self, request: web.Request) -> web.Response:
        """No new calls, and every live call frozen as it is: nothing changes from now on."""
        self.pause()
        with self._lock:
            moving = [call_id for call_id, call in self._calls.items() if call.steps]
        for call_id in moving:
            self.hold(call_id)
        return web.json_response({"frozen": len(moving)})

    async def _expected_route(self, request: web.Request) -> web.Response:
        """Every sample the exporter must show for events dated after `after` (its baseline)."""
        after = float(request.query["after"])
        if self._static is None or self._static[0] != after:
            static, open_ = _Expected(), self._open
            for i in range(self.history):
                if i not in open_:
                    static.add(ledger(None, self._history_record(i), False)[0], after)
            self._static = (after, static)
        expected = self._static[1].copy()
        with self._lock:
            events = self._events[:]
        expected.add(events, after)
        for i in self.open_indices:
            expected.add(ledger(None, self._history_record(i), False)[0], after)
        return web.json_response({"samples": expected.samples()})

    async def _stats_route(self, request: web.Request) -> web.Response:
        with self._lock:
            return web.json_response({**self.stats, "calls": len(self._calls), "now": self.clock.now})


async def _serve(window_calls: int, seed: int) -> None:
    from exporter.simulator import app, handlers, lifecycle

    clock = VirtualTime(float(int(time.time())))
    app.time = handlers.time = clock  # the simulator's clock is ours to advance
    # The history spacing that puts `window_calls` calls in the window (the simulator's is 4 s).
    lifecycle.HISTORY_SPACING = app.HISTORY_SPACING = WINDOW / window_calls
    sim = ReferenceOrg(clock, window_calls, seed)
    url = await sim.start("127.0.0.1", 0)
    print(json.dumps({"url": url, "origin": sim.origin, "open": len(sim.open_indices)}), flush=True)
    await asyncio.Event().wait()  # until SIGTERM


class OrgServer(Child):
    """The reference org's simulator in its own process, driven over HTTP."""

    def __init__(self, name: str, log_dir: Path, window_calls: int, seed: int = 6):
        argv = [sys.executable, "-m", "benchmarks.tiers", "--serve", "--calls", str(window_calls), "--seed", str(seed)]
        super().__init__(argv, log_dir / f"{name}.log")
        try:
            hello = self.line(timeout=60)
        except Exception:
            self.stop()
            raise
        self.url, self.origin, self.open = hello["url"], hello["origin"], hello["open"]

    async def post(self, session: aiohttp.ClientSession, path: str, body: dict | None = None) -> dict:
        async with session.post(self.url + path, json=body or {}) as response:
            response.raise_for_status()
            return await response.json()

    async def get(self, session: aiohttp.ClientSession, path: str) -> dict:
        timeout = aiohttp.ClientTimeout(total=900)
        async with session.get(self.url + path, timeout=timeout) as response:
            response.raise_for_status()
            return await response.json()


# ---- the exporter, polled in this process on the same virtual clock ------------------------


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


def _run_one(
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


def _clock(t: float) -> str:
    return f"{int(t // 60)}:{int(t % 60):02d}"


def run(sizes: Sizes, facts: Facts, log_dir: Path, progress=lambda message: None) -> list[Row]:
    tiers = _run_one("tiers", sizes, log_dir, TIERED_POLLS, (CHECK_AT, END), progress)
    full = _run_one("full-window", sizes, log_dir, FULL_POLLS, (END,), progress, full_read_interval=0.0)

    def at(result: dict, t: float) -> dict:
        return next(p for p in result["polls"] if p["t"] == t)

    steady = [p for p in tiers["polls"] if not p["full"] and STEADY_FROM <= p["t"] <= CHECK_AT]
    measured = [p for p in full["polls"] if p["t"] in FULL_MEASURED]
    hourly = {"tiers": at(tiers, END), "full": at(full, END)}
    if not steady or not hourly["tiers"]["full"] or not all(p["full"] for p in full["polls"]):
        raise RuntimeError("case 6: the polls did not follow the expected tiers; see the facts")

    def per_day(ordinary: list[dict], hour: dict, key) -> float:
        """24 hourly polls (full read, audit, by id) + 5 736 ordinary ones at the measured mean."""
        value = key if callable(key) else (lambda p: p[key])
        return FULL_READS_PER_DAY * value(hour) + (POLLS_PER_DAY - FULL_READS_PER_DAY) * statistics.fmean(
            map(value, ordinary)
        )

    def api_bytes(p: dict) -> int:
        return p["list_bytes"] + p["call_bytes"]

    day = {"tiers": per_day(steady, hourly["tiers"], api_bytes), "full": per_day(measured, hourly["full"], api_bytes)}
    by_id = {
        "tiers": per_day(steady, hourly["tiers"], "call_bytes"),
        "full": per_day(measured, hourly["full"], "call_bytes"),
    }
    per_minute = {
        "tiers": per_day(steady, hourly["tiers"], "requests") / 1440,
        "full": per_day(measured, hourly["full"], "requests") / 1440,
    }
    listed = {"tiers": median([p["list_bytes"] for p in steady]), "full": median([p["list_bytes"] for p in measured])}
    cpu = {"tiers": median([p["cpu_s"] for p in steady]), "full": median([p["cpu_s"] for p in measured])}
    bare = {
        "tiers": median([p["cpu_s"] - p["save_cpu_s"] for p in steady]),
        "full": median([p["cpu_s"] - p["save_cpu_s"] for p in measured]),
    }
    open_by_id = median([p["open_by_id"] for p in steady])
    found = {
        "tiers_before_full_read": tiers["differences"][CHECK_AT],
        "tiers_after_full_read": tiers["differences"][END],
        "full_window": full["differences"][END],
    }

    f = facts[CASE]
    f.update(
        window_calls=sizes.tier_calls,
        open_history=tiers["open_history"],
        steady_polls=len(steady),
        day_bytes=day,
        by_id_bytes_per_day=by_id,
        requests_per_minute=per_minute,
        list_bytes=listed,
        cpu_s=cpu,
        cpu_s_without_save=bare,
        differences=found,
        audit_mismatches={"tiers": tiers["audit_mismatches"], "full": full["audit_mismatches"]},
        server={"tiers": tiers["server"], "full": full["server"]},
        tiers={key: [p[key] for p in tiers["polls"]] for key in tiers["polls"][0]},
        full={key: [p[key] for p in full["polls"]] for key in full["polls"][0]},
    )

    def times(figure: str, full_value: float, tiers_value: float, goal: int | None = None) -> Row:
        less = full_value / tiers_value if tiers_value else None
        return Row(
            CASE,
            f"full-window read ÷ read tiers: {figure}",
            less,
            "x",
            goal=f">= {goal}x" if goal else "",
            verdict=verdict(None if goal is None else less is not None and less >= goal),
        )

    ordinary = POLLS_PER_DAY - FULL_READS_PER_DAY
    rows = [
        Row(
            CASE,
            f"full-window read (full_read_interval 0s): list bytes per poll, {sizes.tier_calls:,} calls in the window",
            listed["full"] / MB,
            "MB",
        ),
        Row(
            CASE,
            f"read tiers (defaults): list bytes per ordinary poll (median of {len(steady)})",
            listed["tiers"] / MB,
            "MB",
        ),
        times("list bytes per ordinary poll", listed["full"], listed["tiers"], GOAL_LIST),
        Row(
            CASE,
            f"full-window read: API bytes per day ({POLLS_PER_DAY:,} full reads; list + by id)",
            day["full"] / GB,
            "GB",
        ),
        Row(
            CASE,
            f"read tiers: API bytes per day ({FULL_READS_PER_DAY} full reads + {ordinary:,} ordinary polls; "
            f"list + by id)",
            day["tiers"] / GB,
            "GB",
        ),
        times("API bytes per day", day["full"], day["tiers"], GOAL_DAY),
        Row(
            CASE,
            "read tiers: of which by id (open calls past the hot read, audit spot-checks)",
            by_id["tiers"] / GB,
            "GB",
        ),
        Row(CASE, "full-window read: CPU per poll (state save included)", cpu["full"] * 1000, "ms"),
        Row(CASE, "read tiers: CPU per ordinary poll (state save included)", cpu["tiers"] * 1000, "ms"),
        times("CPU per ordinary poll", cpu["full"], cpu["tiers"], GOAL_CPU),
        Row(CASE, "full-window read: CPU per poll, the state save left out", bare["full"] * 1000, "ms"),
        Row(CASE, "read tiers: CPU per ordinary poll, the state save left out", bare["tiers"] * 1000, "ms"),
        times("CPU per ordinary poll, the state save left out", bare["full"], bare["tiers"]),
        Row(CASE, "full-window read: API requests per minute", per_minute["full"], "req/min"),
        Row(
            CASE,
            f"read tiers: API requests per minute (4 list + by id; {open_by_id:,.0f} open calls past the hot read)",
            per_minute["tiers"],
            "req/min",
        ),
    ]
    # Issue 26's goals, for the reference org (150 000 calls in the window) and in proportion to it.
    scale = sizes.tier_calls / REFERENCE_CALLS
    by_id_per_minute = per_minute["tiers"] - POLLS_PER_DAY / 1440
    full_reads = 86400 // SPARSE_FULL_READS
    sparse = full_reads * api_bytes(hourly["tiers"]) + (POLLS_PER_DAY - full_reads) * statistics.fmean(
        map(api_bytes, steady)
    )
    rows += [
        Row(
            CASE,
            "read tiers: by-id requests per minute (open calls past the read, audit spot-checks)",
            by_id_per_minute,
            "req/min",
            goal=f"<= {GOAL_BY_ID * scale:,.0f}",
            verdict=verdict(by_id_per_minute <= GOAL_BY_ID * scale),
        ),
        Row(
            CASE,
            "read tiers: API bytes per day, against 2x the floor (the list read to the oldest call in flight)",
            day["tiers"] / GB,
            "GB",
            goal=f"<= {GOAL_DAY_GB * scale:.2f} GB",
            verdict=verdict(day["tiers"] / GB <= GOAL_DAY_GB * scale),
        ),
        Row(
            CASE,
            f"derived, not run: the same polls, full_read_interval and audit_interval "
            f"{SPARSE_FULL_READS // 3600} h ({86400 // SPARSE_FULL_READS} full reads a day)",
            sparse / GB,
            "GB",
            goal=f"<= {GOAL_DAY_GB * scale:.2f} GB",
            verdict=verdict(sparse / GB <= GOAL_DAY_GB * scale),
        ),
    ]
    for name, when, key in (
        ("read tiers", f"after ordinary polls only ({_clock(CHECK_AT)})", "tiers_before_full_read"),
        ("read tiers", f"after the hourly full read ({_clock(END)})", "tiers_after_full_read"),
        ("full-window read", f"at the end ({_clock(END)})", "full_window"),
    ):
        rows.append(
            Row(
                CASE,
                f"{name}: counter samples off the simulator's truth, {when}",
                len(found[key]),
                "samples",
                goal="= 0",
                verdict=verdict(not found[key]),
            )
        )
        for line in found[key][:10]:
            progress(f"case 6: {name}, {when}: {line}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the reference org's simulator on a virtual clock (case 6's server)")
    p.add_argument("--serve", action="store_true", required=True)
    p.add_argument("--calls", type=int, required=True, help="calls in the 72 h window")
    p.add_argument("--seed", type=int, default=6)
    args = p.parse_args(argv)
    asyncio.run(_serve(args.calls, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
