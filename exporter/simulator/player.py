"""Plays the simulated calls forward to a given `now`: new arrivals at `rate`, each call's due
steps from one heap, every change committed to the call and told to the truth (`truth.ledger`).
A mixin of `Simulator` (app.py), which owns the clock: nothing here reads the time.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from typing import Any

from .call import _Call, _Step
from .contract import Contract, StampOf
from .lifecycle import NOW, _new_record, format_ts
from .truth import _Event, ledger


class Player:
    """The stepping half of `Simulator`, mixed into it; the caller holds `_lock`. Besides the
    state below it calls `Lifecycles._plan` and `_hide` (a new call's future)."""

    seed: int
    rate: float
    max_calls: int | None
    inbound_share: float
    hangup_causes: list[str] | None
    campaigns: list[str] | None
    contract: Contract
    _rng: random.Random
    _calls: dict[str, _Call]
    _heap: list[tuple[float, int, str]]
    _seq: itertools.count
    _events: list[_Event]
    _paused: bool
    _held: dict[str, list]
    _created: int
    _next_arrival: float
    _plan: Any
    _hide: Any

    def _advance(self, now: float) -> None:
        if self.rate > 0:
            # A stalled loop catches up at most one second of arrivals, not a burst of hours.
            self._next_arrival = max(self._next_arrival, now - 1.0)
            while (
                not self._paused
                and self._next_arrival <= now
                and (self.max_calls is None or self._created < self.max_calls)
            ):
                self._create(now)
                self._created += 1
                self._next_arrival += self._rng.expovariate(self.rate)
        while self._heap and self._heap[0][0] <= now:
            call = self._calls.get(heapq.heappop(self._heap)[2])
            if call is None:
                continue  # deleted
            if call.id in self._held:
                self._held[call.id][1] = True  # release() schedules it again
                continue
            while call.steps and call.steps[0].due <= now:
                self._apply(call, call.steps.popleft(), now)
            self._schedule(call)

    def _create(self, now: float, overrides: dict | None = None, rng: random.Random | None = None) -> _Call:
        rng = rng or self._rng  # the past plays on its own generator (past.py)
        direction = "inbound" if rng.random() < self.inbound_share else "outbound"
        record = _new_record(rng, direction, format_ts(now), self.campaigns)
        record.update(overrides or {})
        self.contract.shape(record)
        steps = self.contract.vary(
            random.Random(f"{self.seed}:open:{record['id']}"),
            self._plan(rng, record, now),
            record,
            self.hangup_causes is not None,
        )
        call = _Call(record["id"], deque(sorted(steps)))
        self._commit(call, record, now + self._hide(rng), now)
        self._calls[call.id] = call
        self._schedule(call)
        return call

    def _apply(self, call: _Call, step: _Step, now: float) -> None:
        step.applied, stamp = now, self.contract.stamp(now)
        changes = {
            k: stamp if v is NOW else self.contract.stamp(v.step.applied) if isinstance(v, StampOf) else v
            for k, v in step.changes.items()
        }
        self._commit(call, {**call.latest, **changes, "updated_at": stamp}, now + step.hide, now)

    def _commit(self, call: _Call, record: dict, visible_at: float, now: float) -> None:
        # The plan knows whether a hangup cause is still to come (a late end detail).
        coming = any(step.changes.get("hangup_cause") is not None for step in call.steps)
        events, call.counted = ledger(call.latest if call.versions else None, record, call.counted, coming)
        self._events.extend(events)
        call.commit(record, visible_at, now)

    def _schedule(self, call: _Call) -> None:
        if call.steps:
            heapq.heappush(self._heap, (call.steps[0].due, next(self._seq), call.id))
        else:
            call.steps = ()  # final: an empty deque would cost 760 bytes a call, for good
