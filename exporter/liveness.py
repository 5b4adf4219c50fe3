"""Whether a poll loop is alive: what /-/healthy answers, so Kubernetes restarts a wedged pod.

Every wait of a poll loop is bounded, and the loop says so on its `Heartbeat` as a step: a
request by its deadline (deadline.py), a Retry-After or the wait for the next poll by its length,
a state save or a ledger prune by the ledger's size. A step still open at twice its bound plus
MARGIN, or nothing open for longer than MARGIN in the middle of a poll (an await that is no
step), means the loop is wedged: a bug, a hung disk; no API can cause it, as each request ends
by its deadline however the API answers. A slow but moving read is not wedged: its bound is its
deadline, sized from the bytes it is expected to carry. Waiting for room in the API budget is a
step without a bound (a Retry-After from the API may hold a key for an hour), so an outage, a
429 or a revoked key never fails the probe: they show as `callingbox_up 0`.

A loop that is alive also leaves the event loop to the scrapes it shares it with: long work on
the loop (a large list read) goes a small piece at a time, and `Turns` gives the loop a turn
once a step has run for TURN seconds, so a scrape never waits behind more than about that.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

MARGIN = 60.0  # seconds of slack on every bound: scheduling, CPU work between steps, a busy machine
# A pass over the ledger (a state save, a prune) may take this long per tracked call, besides
# MARGIN: 20 times what the first save of 100 000 calls took (453 ms, BENCHMARKS.md).
SECONDS_PER_CALL = 100e-6
# Seconds of work on the event loop before a poll loop gives it a turn: a scrape takes a few
# turns of the loop, so each adds at most about this to its latency.
TURN = 0.0005
# A turn is a timer of next to no delay, not sleep(0): asyncio runs the timers that are due after
# the I/O callbacks of the same loop iteration, so a scrape whose request has just arrived is
# served before the poll goes on, not after one more piece of its work.
AFTER_IO = 1e-6


def ledger_work(calls: int) -> float:
    """The bound of a step whose work grows with the ledger (a save, a prune)."""
    return MARGIN + calls * SECONDS_PER_CALL


class Step(NamedTuple):
    what: str
    since: float
    seconds: float | None  # None: bounded by the API, not by the exporter (the API budget)


class Heartbeat:
    """One poll loop's open steps, each with its bound; `overdue` says whether the loop is wedged."""

    def __init__(self, clock=time.monotonic, margin: float = MARGIN):
        self.clock, self.margin = clock, margin
        self._open: dict[int, Step] = {}
        self._ids = itertools.count()
        self._idle_since: float | None = None  # the last step ended then (None: no step yet)

    @contextmanager
    def step(self, what: str, seconds: float | None) -> Iterator[None]:
        """`with heartbeat.step("list read", 30.0): ...`: `what` ends within `seconds` (None: no bound)."""
        key = next(self._ids)
        self._open[key] = Step(what, self.clock(), seconds)
        try:
            yield
        finally:
            del self._open[key]
            if not self._open:
                self._idle_since = self.clock()

    def overdue(self) -> str | None:
        """Why the loop counts as wedged, in a few words, or None while it is alive."""
        now = self.clock()
        for step in list(self._open.values()):
            if step.seconds is None:
                continue
            limit = 2 * step.seconds + self.margin
            if now - step.since > limit:
                return f"{step.what} running for {now - step.since:.0f}s, past its limit of {limit:.0f}s"
        if not self._open and self._idle_since is not None and now - self._idle_since > self.margin:
            return f"no step running for {now - self._idle_since:.0f}s, past its limit of {self.margin:.0f}s"
        return None


class Turns:
    """A time budget per event-loop step: `await turns.give()` between small pieces of work gives
    the loop a turn once `budget` seconds have run since the last one, and returns at once before.
    `given` counts the turns given (tests count them)."""

    def __init__(self, budget: float = TURN, clock=time.perf_counter):
        self.budget, self.clock = budget, clock
        self.since = clock()  # when the caller last got the loop back from a turn it gave
        self.given = 0

    async def give(self) -> None:
        if self.clock() - self.since >= self.budget:
            await asyncio.sleep(AFTER_IO)
            self.given += 1
            self.since = self.clock()
