"""`Simulator`: CallingBox in a box, served on loopback with `start()` / `stop()`. It owns the call
store and reads the time (`_now`); the mixins do the rest: plans in lifecycle.py, stepping in
player.py, the past in past.py, the ticking task and freeze / thaw in clock.py, HTTP in handlers.py.
Here: the settings, the control methods tests call from any thread and `truth()`.
`serve_in_thread` runs it for synchronous tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from .call import _Call, _Step
from .clock import Clock
from .contract import Contract
from .faults import FAULT_KINDS
from .handlers import Handlers
from .lifecycle import (
    HISTORY_LIFETIME,
    HISTORY_SPACING,
    OUTCOME_WEIGHTS,
    Lifecycles,
    _final_record,
    _outcome_table,
    _seconds,
    format_ts,
)
from .past import Past
from .player import Player
from .truth import END_DETAILS, Counted, Truth, _Event, ledger


class Simulator(Clock, Past, Player, Lifecycles, Handlers):
    """CallingBox in a box: calls with realistic lifecycles, faults on demand, and the truth."""

    def __init__(
        self,
        *,
        seed: int = 0,
        rate: float = 2.0,
        max_calls: int | None = None,
        time_scale: float = 1.0,
        inbound_share: float = 0.2,
        hangup_causes: list[str] | None = None,
        error_codes: list[str] | None = None,
        history: int = 0,
        history_age: float = 30 * 86400.0,
        history_spacing: float | None = None,  # seconds between history calls (HISTORY_SPACING)
        # Calls created over the `past` seconds before construction, `past_rate` a second (past.py);
        # `max_calls` and `rate` are the live calls'.
        past: float = 0.0,
        past_rate: float = 0.05,
        webhook_retry_base: float | None = None,
        replay_share: float = 0.0,
        late_commit: float = 0.0,
        api_key: str | None = None,
        chunk_size: int = 64 * 1024,
        outcome_weights: dict[str, float] | None = None,
        by_id_delay: float = 0.0,
        conditional: bool = False,
        # What the docs leave open (contract.py); None: off, or docs_open's share.
        docs_open: bool = False,
        late_end_details: float | None = None,
        late_detail_delay: float = 0.5,
        subjectless_outcomes: bool | None = None,
        undocumented_status: float | None = None,
        whole_seconds: bool | None = None,
        amount_lag: float | None = None,
        by_id_not_found: float | None = None,
        by_id_faults: float | None = None,
        campaigns: list[str] | None = None,
    ):
        if by_id_delay < 0:
            raise ValueError("by_id_delay must be >= 0")
        if time_scale <= 0 or rate < 0 or chunk_size < 1 or history < 0 or late_commit < 0:
            raise ValueError("time_scale and chunk_size must be positive; rate, history, late_commit >= 0")
        if not (0 <= inbound_share <= 1 and 0 <= replay_share <= 1):
            raise ValueError("inbound_share and replay_share must lie in [0, 1]")
        if past < 0 or past_rate < 0 or (history and past and past >= history_age):
            raise ValueError("past and past_rate must be >= 0, and the past newer than the history")
        self.seed, self.rate, self.max_calls, self.time_scale = seed, rate, max_calls, time_scale
        self.inbound_share, self.replay_share, self.late_commit = inbound_share, replay_share, late_commit
        self.hangup_causes, self.error_codes = hangup_causes or None, error_codes or None
        self.campaigns = campaigns or None  # metadata.campaign of new calls, drawn from these (tests may change it)
        self.history, self.webhook_retry_base, self.api_key = history, webhook_retry_base, api_key
        self.chunk_size = chunk_size
        self.by_id_delay = by_id_delay  # wall seconds GET /v1/calls/{id} takes, so concurrency shows
        self.conditional = conditional  # ETag on the list, 304 to a matching If-None-Match
        self.contract = Contract.resolve(
            docs_open,
            late_end_details=late_end_details,
            late_detail_delay=late_detail_delay,
            subjectless_outcomes=subjectless_outcomes,
            undocumented_status=undocumented_status,
            whole_seconds=whole_seconds,
            amount_lag=amount_lag,
            by_id_not_found=by_id_not_found,
            by_id_faults=by_id_faults,
        )
        self._by_id_rng = random.Random(f"{seed}:by_id")  # its own, so lag leaves the calls as they were
        self.requests: deque[tuple[float, str, int]] = deque(maxlen=100_000)  # (arrival, path, status), latest
        self._outcomes = _outcome_table(OUTCOME_WEIGHTS if outcome_weights is None else outcome_weights)
        self.stats = {
            "list_requests": 0,
            "bytes_sent": 0,
            "last_list_bytes": 0,
            "client_closed_early": 0,
            "by_id_requests": 0,
            "by_id_lagged": 0,
            "by_id_in_flight": 0,
            "by_id_max_in_flight": 0,
        }
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # tests drive inject/pause/truth from another thread
        self._calls: dict[str, _Call] = {}  # insertion order = created_at order
        self._heap: list[tuple[float, int, str]] = []  # (next step due, tie-break, call id)
        self._seq = itertools.count()
        self._events: list[_Event] = []  # append-only
        self._faults: deque[tuple[str, dict]] = deque()
        self._paused = False
        self._frozen: float | None = None  # the instant the clock stopped at (clock.py)
        self._held: dict[str, list] = {}  # call id → [held since, its heap entry was dropped]
        self._created = 0
        self._next_arrival = math.inf  # no arrivals before start() sets the first (clock.py)
        t0 = time.time()
        self._history_top = t0 - history_age  # history is fixed at construction
        self.history_spacing = HISTORY_SPACING if history_spacing is None else history_spacing
        # Played on its own generator, so live calls are the same with or without a past.
        self.past_calls = self._play_past(t0 - past, t0, past_rate, random.Random(f"{seed}:past")) if past else 0
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._guard])
        self.app.router.add_get("/v1/calls", self._list_calls)
        self.app.router.add_post("/v1/calls", self._create_call_http)
        self.app.router.add_get("/v1/calls/{call_id}", self._get_call)
        self.app.cleanup_ctx.append(self._lifecycle)

    # ---- control, from any thread -------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the API and run the call lifecycles; returns the base URL."""
        # A short shutdown_timeout: a stop must not wait for a client stuck in a "timeout" fault.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        return f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def pause(self) -> None:
        """Stop creating new calls; existing calls keep progressing."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._next_arrival = self._now()

    def set_outcome_weights(self, weights: dict[str, float]) -> None:
        """Change the mix of terminal outcomes for calls created from now on (e.g. a failure spike)."""
        table = _outcome_table(weights)
        with self._lock:
            self._outcomes = table

    def inject(self, kind: str, count: int = 1, **params: Any) -> None:
        """Make each of the next `count` list requests fail as `kind` (queued FIFO)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._faults.extend((kind, dict(params)) for _ in range(count))

    def delete(self, call_id: str) -> bool:
        """Remove a call: it leaves the list and answers 404 from then on."""
        with self._lock:
            self._held.pop(call_id, None)
            return self._calls.pop(call_id, None) is not None

    def hold(self, call_id: str) -> None:
        """Freeze one call as it is now: its planned steps wait for `release` (a straggler on demand)."""
        with self._lock:
            if call_id not in self._calls:
                raise KeyError(call_id)
            self._held.setdefault(call_id, [self._now(), False])

    def release(self, call_id: str) -> None:
        """Let a held call go on; its remaining steps keep their spacing, counted from now."""
        with self._lock:
            held_since, dropped = self._held.pop(call_id)
            call = self._calls[call_id]
            delay = self._now() - held_since
            for step in call.steps:
                step.due += delay
            if dropped:
                self._schedule(call)

    def replay(self, call_id: str, outcome: str = "delivered", after: float = 1.0) -> None:
        """An operator replays a call's webhook by hand now: `pending`, then `outcome` `after`
        seconds later, each change bumping `updated_at` and told to the truth."""
        with self._lock:
            call = self._calls[call_id]
            now = self._now()
            call.steps = deque(
                [
                    *call.steps,
                    _Step(now, {"webhook_status": "pending", "webhook_error": None}),
                    _Step(now + after, {"webhook_status": outcome}),
                ]
            )
            self._schedule(call)

    def tamper(self, call_id: str, **fields: Any) -> dict:
        """Change a call without bumping `updated_at`: an API that rewrites history silently.

        For the self-audit tests; the truth is not told (that is the point). Returns the record.
        """
        with self._lock:
            call = self._calls[call_id]
            visible_at, record = call.versions[-1]
            call.versions[-1] = (visible_at, {**record, **fields})
            return call.versions[-1][1]

    def insert_past(self, age: float, **fields: Any) -> str:
        """A final call that appears `age` seconds in the past, as if committed late and unannounced."""
        with self._lock:
            now = self._now()
            stamp = format_ts(now - age)
            record = {**_final_record(self._rng, stamp), **fields}
            record = self.contract.shape(record, extracted=True)
            # Unannounced: the truth is not told, and nothing of its end counts later.
            counted = Counted(record["ended_at"], record["status"], END_DETAILS)
            self._calls[record["id"]] = _Call(record["id"], deque(), [(now - age, record)], counted=counted)
            # the list is newest first by created_at: put the newcomer in its place
            self._calls = dict(sorted(self._calls.items(), key=lambda kv: _seconds(kv[1].versions[0][1]["created_at"])))
            return record["id"]

    def all_final(self) -> bool:
        """Creation is over and every call is final and visible as such."""
        with self._lock:
            now = self._now()
            creating = not self._paused and self.rate > 0 and (self.max_calls is None or self._created < self.max_calls)
            return not creating and all(call.final(now) for call in self._calls.values())

    def truth(self, after: float, until: float = math.inf) -> Truth:
        """Everything the exporter must have counted for events dated strictly after `after`
        (and at or before `until`: a day's, say)."""
        with self._lock:
            events = self._events[:]
        return Truth.after(itertools.chain(events, self._history_events(after)), after, until)

    def _now(self) -> float:
        """The simulated clock: wall time, or the instant `freeze()` stopped it at."""
        return time.time() if self._frozen is None else self._frozen

    # ---- history, as the list and the truth see it ---------------------------------------

    def _history_record(self, i: int) -> dict:
        return self.contract.shape(super()._history_record(i), extracted=True)

    def _history_events(self, after: float) -> Iterator[_Event]:
        for i in range(self.history):
            if self._history_top - i * self.history_spacing + HISTORY_LIFETIME <= after:
                return  # this and every older history call happened entirely before `after`
            yield from ledger(None, self._history_record(i))[0]


@contextlib.contextmanager
def serve_in_thread(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `sim` on its own event loop in a daemon thread; yields the base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="callingbox-simulator", daemon=True)
    thread.start()
    try:
        url = asyncio.run_coroutine_threadsafe(sim.start(host, port), loop).result(timeout=10)
        try:
            yield url
        finally:
            asyncio.run_coroutine_threadsafe(_shutdown(sim), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


async def _shutdown(sim: Simulator) -> None:
    await sim.stop()
    # Handlers of clients that already left are not the server's to wait for: end them, so
    # the loop closes without "Task was destroyed but it is pending".
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
