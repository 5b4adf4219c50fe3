"""The reference org of case 6 (read tiers), served by the simulator in a process of its own on
a *virtual clock* that the benchmark advances over HTTP (`/_bench/advance`).

`ReferenceOrg` is the simulator with the issue's org: `window_calls` final calls in the 72 h
settle window, about 1 % of them open (a webhook endpoint that is down, retried by CallingBox's
schedule; a reservation not settled), live traffic at the window's own rate, and the truth of
every sample the exporter must show (`/_bench/expected`). `OrgServer` starts it and drives it.
`python -m benchmarks.reference_org --serve --calls N` is that process.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import random
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.utils import floatToGoString

from benchmarks.procs import Child
from exporter.catalogue import DEFAULT_BUCKETS, MILLI_CENTS_PER_DOLLAR
from exporter.simulator import Simulator, format_ts, ledger
from exporter.simulator.faults import _dumps
from exporter.simulator.lifecycle import WEBHOOK_ATTEMPTS, WEBHOOK_FIRST_RETRY

WINDOW = 72 * 3600.0  # settle_window, default
WARMUP = 1800.0  # live traffic runs this long before the first poll: the hot window holds live calls
MARGIN = 60.0  # the oldest history call lies this far inside the window at the first poll
OPEN_EVERY = 100  # every 100th history call's webhook endpoint is down: retried by the schedule ...
RETRIED_AT = 25  # ... (i % OPEN_EVERY == RETRIED_AT), most still pending, ~1 % of the window with ...
DELIVER_EVERY = 3  # ... (one in three is delivered at a later attempt, the others fail all 8) ...
RESERVED_EVERY = 200  # ... every 200th call, whose reservation is not settled (i % 200 == 50):
SETTLE_EVERY = 3  # one in three of those settles late ...
RESOLVE_SPAN = (60.0, 2340.0)  # ... at a time in here (seconds from the start); no history change after it
STEP = 0.25  # virtual seconds per simulator step
_HISTORY_TAG = 0x7B1E_5000_0000_0000  # marks the ids of history calls; the low 48 bits hold the index
_HOOK = "https://hooks.brightsmile.example/callingbox"


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
        argv = [sys.executable, "-m", "benchmarks.reference_org", "--serve", "--calls", str(window_calls)]
        super().__init__([*argv, "--seed", str(seed)], log_dir / f"{name}.log")
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
