"""The simulated clock: the one task that steps every call to `now` (player.py) each tick, and
`freeze()` / `thaw()`, which stop it and start it again. A mixin of `Simulator` (app.py), whose
`_now()` reads the time: wall time, or the frozen instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .call import _Call

log = logging.getLogger(__name__)

TICK = 0.025  # lifecycle wake-up period, wall seconds


class Clock:
    """Ticks the calls forward, or holds them still. Besides the state below it calls
    `Player._advance` and `Simulator._now`."""

    _lock: threading.Lock
    _calls: dict[str, _Call]
    _heap: list[tuple[float, int, str]]
    _held: dict[str, list]
    _next_arrival: float
    _frozen: float | None
    _advance: Any
    _now: Any

    def freeze(self) -> float:
        """Stop the simulated clock: no arrivals, no steps, and every read answers as at this
        instant, byte for byte, however long it lasts. Returns the instant. What a test does
        meanwhile (a POST, `replay`, `insert_past`) still happens, dated at this instant; faults
        (injected ones, a lagging by-id replica) are not the clock's and still answer."""
        with self._lock:
            if self._frozen is None:
                now = self._now()
                self._advance(now)  # what is due by now happens now, not at thaw
                self._frozen = now
            return self._frozen

    def thaw(self) -> float:
        """Start the clock again where it stopped. Time spent frozen did not happen for the calls:
        their planned steps, hidden versions and the next arrival move later by it (as `release`
        does for a held call), so no event is dated inside the freeze. Returns its length."""
        with self._lock:
            if self._frozen is None:
                return 0.0
            since, self._frozen = self._frozen, None
            delay = self._now() - since
            self._shift(since, delay)
            return delay

    def _shift(self, since: float, delay: float) -> None:
        """Move everything still to come after `since` later by `delay`."""
        for call in self._calls.values():
            for step in call.steps:
                step.due += delay
            if call.versions[-1][0] > since:  # a late commit not yet visible stays hidden as long
                call.versions[:] = [(v + delay if v > since else v, record) for v, record in call.versions]
        for held in self._held.values():
            held[0] += delay  # release() counts the hold from here, not across the freeze
        # Every key moves by the same amount, so the heap stays in heap order.
        self._heap[:] = [(due + delay, seq, call_id) for due, seq, call_id in self._heap]
        self._next_arrival += delay

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        with self._lock:
            self._next_arrival = self._now()
        task = asyncio.create_task(self._run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        # One task drives every call from a heap of due steps, so thousands of live calls
        # cost one wake-up per tick, not a task each.
        while True:
            try:
                with self._lock:
                    if self._frozen is None:
                        self._advance(self._now())
            except Exception:
                log.exception("simulator step failed")
            await asyncio.sleep(TICK)
