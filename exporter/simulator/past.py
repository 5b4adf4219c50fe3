"""The simulated past: calls created at Poisson arrivals before the simulator started, played
through the ordinary machinery (`Player._create` / `_apply` / `_commit`) in event order, each
step applied at its own due time, so the list and the truth hold days of finished history.
A mixin of `Simulator` (app.py), which calls `_play_past` once, at construction.
"""

from __future__ import annotations

import heapq
import random
from typing import Any

from .call import _Call


class Past:
    """The fast-forward half of `Simulator`: unlike `Player._advance`, which applies whatever
    is due at one tick's `now` and catches up at most a second of arrivals, it jumps from event
    to event, so a step done ten days ago is stamped ten days ago."""

    _calls: dict[str, _Call]
    _heap: list[tuple[float, int, str]]
    _create: Any
    _apply: Any
    _schedule: Any

    def _play_past(self, start: float, end: float, rate: float, rng: random.Random) -> int:
        """Create calls at `rate` a second over [start, end), play every step due by `end`;
        steps due later stay in the heap for the live clock. Returns the number of calls."""
        created = 0
        t = start + rng.expovariate(rate) if rate > 0 else end
        while t < end:
            self._play_until(t, inclusive=False)
            self._create(t, rng=rng)
            created += 1
            t += rng.expovariate(rate)
        self._play_until(end, inclusive=True)
        for call in self._calls.values():
            call.visible(end)  # drop versions a late commit kept for a while: nobody reads them now
        return created

    def _play_until(self, until: float, inclusive: bool) -> None:
        """Apply, one at a time and in due order across calls, every planned step due before
        `until` (or at it, `inclusive`), each at its own due time."""
        heap, calls = self._heap, self._calls
        while heap and (heap[0][0] <= until if inclusive else heap[0][0] < until):
            call = calls[heapq.heappop(heap)[2]]
            step = call.steps.popleft()
            self._apply(call, step, step.due)
            self._schedule(call)
