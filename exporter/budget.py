"""The API budget: how many requests per minute one API key may make, and when it must wait.

Every target polling with the same key shares one `Budget`, so adding targets, Prometheus
replicas scraping more often or a burst of refreshes never raises the load on the key above its
ceiling. A 429's `Retry-After` holds every request on that key until it has passed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque

WINDOW = 60.0


class Budget:
    """At most `per_minute` requests in any 60 s, and none before a `Retry-After` has passed."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute, self.clock = per_minute, clock
        self._sent: deque[float] = deque()  # when the requests of the last minute were let through
        self._hold_until = 0.0
        self._lock = asyncio.Lock()

    def wait_needed(self) -> float:
        """Seconds until the next request may go (0: now)."""
        now = self.clock()
        while self._sent and self._sent[0] <= now - WINDOW:
            self._sent.popleft()
        wait = self._hold_until - now
        if len(self._sent) >= self.per_minute:
            wait = max(wait, self._sent[0] + WINDOW - now)
        return max(0.0, wait)

    async def acquire(self) -> None:
        """Wait for room in the budget, then take it; callers queue in arrival order."""
        async with self._lock:
            while (wait := self.wait_needed()) > 0:
                await asyncio.sleep(wait)
            self._sent.append(self.clock())

    def hold(self, seconds: float) -> None:
        """The API said Retry-After: nothing on this key before `seconds` from now."""
        self._hold_until = max(self._hold_until, self.clock() + seconds)


class Budgets:
    """One Budget per API key (by digest: the key itself is not kept here)."""

    def __init__(self) -> None:
        self._by_key: dict[str, Budget] = {}

    def for_key(self, key: str | None, per_minute: int) -> Budget:
        digest = hashlib.sha256((key or "").encode()).hexdigest()
        budget = self._by_key.get(digest)
        if budget is None:
            budget = self._by_key[digest] = Budget(per_minute)
        budget.per_minute = min(budget.per_minute, per_minute)  # targets sharing a key: the lowest ceiling
        return budget
