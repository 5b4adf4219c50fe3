"""The API budget on a fake clock: a hard ceiling per minute, Retry-After holds, shared by key."""

from __future__ import annotations

import asyncio

from exporter.budget import Budget, Budgets
from helpers import FixedClock


class FakeTime(FixedClock):
    """A clock that moves only when the code under test sleeps."""

    def __init__(self):
        super().__init__(1000.0)

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_requests(budget: Budget, clock: FakeTime, count: int, monkeypatch) -> list[float]:
    monkeypatch.setattr(asyncio, "sleep", clock.sleep)
    times = []

    async def go():
        for _ in range(count):
            await budget.acquire()
            times.append(clock.now)

    asyncio.run(go())
    return times


def test_no_sixty_seconds_ever_hold_more_than_the_ceiling(monkeypatch):
    clock = FakeTime()
    times = run_requests(Budget(10, clock), clock, 35, monkeypatch)
    assert len(times) == 35
    for i, start in enumerate(times):
        assert sum(start <= t < start + 60 for t in times[i:]) <= 10
    assert times[10] - times[0] == 60  # the eleventh waits for the first to leave the window


def test_retry_after_holds_every_request_until_it_has_passed(monkeypatch):
    clock = FakeTime()
    budget = Budget(100, clock)
    budget.hold(30)
    budget.hold(5)  # a shorter, later hold does not shorten the first
    times = run_requests(budget, clock, 2, monkeypatch)
    assert times[0] == 1030.0


def test_targets_with_one_key_share_one_budget_at_the_lowest_ceiling():
    budgets = Budgets()
    a, b = budgets.for_key("sk_same", 100), budgets.for_key("sk_same", 40)
    other = budgets.for_key("sk_other", 100)
    assert a is b and a.per_minute == 40
    assert other is not a and other.per_minute == 100
