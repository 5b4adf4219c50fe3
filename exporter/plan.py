"""The read plan: what the next poll reads (list depth, open calls by id, full reads; SPEC §4).

Pure: `ReadPlanner.plan` takes the ledger, the audit due and `now`, and returns a `Plan`; after a
complete list read, `learn` takes what it measured (the size of a call, how fast the list grows).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .audit import Audit
from .deadline import expected_list_bytes
from .ledger import Ledger, give_up_age
from .settings import Settings
from .waits import in_flight, turn

BYTES_PER_CALL = 1500.0  # a call object's size in a list read, until a read has measured it
REQUEST_BYTES = 500.0  # what a request by id costs beyond its body: headers both ways


class Plan(NamedTuple):
    """What one poll reads: the list down to `horizon` (the settle window when `full`), then the
    `by_id` calls by id; `audit`, the audit window that rides on the read, if one is due."""

    horizon: float
    full: bool
    by_id: list[str]
    open_calls: dict[str, int]  # refresh path → open calls
    audit: Audit | None = None


class ReadPlanner:
    """One target's read plan and what it learnt from the list reads so far."""

    def __init__(self, settings: Settings, now: float = 0.0):
        self.settings = settings
        self.next_full_read = now  # the first poll reads the whole settle window
        self.last_full_read: float | None = None
        self.bytes_per_call = BYTES_PER_CALL  # measured by each list read
        self.calls_per_second = 1.0  # how fast the list grows, in created_at: measured by each list read
        self.last_read: tuple[float, float] | None = None  # (horizon, time) of the last complete list read
        self.last_plan: Plan | None = None

    def plan(
        self,
        now: float,
        ledger: Ledger,
        audit: Audit | None,
        not_found: Iterable[float],
        last_refreshed: dict[str, float],
        batch: int,
    ) -> Plan:
        """How deep this poll reads the list, and which open calls past that depth it asks by id.

        A full read of the settle window comes first, then every `full_read_interval` (and with
        each `audit`). Otherwise the read reaches the oldest call in flight (at most `hot_window`
        deep), where new calls and their normal lifecycle show, and never less than back to the
        newest update already read, less the overlap (a restart after downtime reads what it
        missed). A call that answered 404 by id (`not_found`: their created_at) is settled by the
        next read that covers it. An open call
        older than the read is due by id when its turn comes, by what it waits for (waits.py);
        the read goes deeper instead where the calls in between cost fewer bytes than the requests
        would, or where more are due than `batch` a poll can ask within a refresh interval.
        """
        s = self.settings
        window, watermark = now - s.settle_window, ledger.watermark
        full = watermark is None or now >= self.next_full_read or audit is not None
        horizon = window if full else max(window, min(self._hot_depth(now, ledger), watermark - s.overlap))
        horizon = min(horizon, *not_found) if not_found else horizon
        if audit is not None:
            # The audit's window starts where the last one ended. The poll that carries it comes
            # after the interval has passed, so that start lies a little past the settle window:
            # the read reaches back to it (at most CATCH_UP windows, see AuditSchedule.due).
            horizon = min(horizon, audit.start)
        due, listed, past = self._due(now, ledger, horizon, last_refreshed)
        if due and not full:
            # Reading down to a call costs the calls created in between, at the rate the list grows.
            # By id, `batch` a poll serve a refresh interval's turns; a backlog beyond that is read.
            by_id_cost = self.bytes_per_call + REQUEST_BYTES
            capacity = batch * max(1.0, s.refresh_interval / s.poll_interval)
            reach = None
            for i, (created, _) in enumerate(due):
                if created < window:
                    break  # past the settle window: only by id
                between = (horizon - created) * self.calls_per_second
                if between * self.bytes_per_call <= (i + 1) * by_id_cost or len(due) - i - 1 >= capacity:
                    reach = i
            if reach is not None:
                horizon = due[reach][0]
                listed, past = listed + reach + 1, past - reach - 1
                due = due[reach + 1 :]
        # By id, the least recently asked first (then the oldest), so each gets its turn.
        asked = sorted(due, key=lambda d: (last_refreshed.get(d[1], float("-inf")), d[0]))
        return Plan(horizon, full, [call_id for _, call_id in asked[:batch]], {"list": listed, "by_id": past}, audit)

    def _hot_depth(self, now: float, ledger: Ledger) -> float:
        """How deep an ordinary read must go: to the oldest call in flight (waits.in_flight), whose
        next change can come any moment, and never deeper than `hot_window`."""
        calls, oldest = ledger.calls, now
        for call_id in ledger.open:
            state = calls.get(call_id)
            if state is not None and state.created_at < oldest and in_flight(state, now):
                oldest = state.created_at
        return max(now - self.settings.hot_window, oldest)

    def _due(
        self, now: float, ledger: Ledger, horizon: float, last_refreshed: dict[str, float]
    ) -> tuple[list[tuple[float, str]], int, int]:
        """(created_at, id) of the open calls past `horizon` whose turn has come, newest first; and
        how many open calls the read reaches, how many it does not (given up ones aside)."""
        s = self.settings
        give_up = now - give_up_age(s.settle_window, s.give_up_after)
        due: list[tuple[float, str]] = []
        listed = past = 0
        calls = ledger.calls
        for call_id in ledger.open:
            state = calls.get(call_id)
            if state is None:
                continue
            created = state.created_at
            if created >= horizon:
                listed += 1
                continue
            if created < give_up:
                continue
            past += 1
            # Its turn comes by what it waits for (waits.py), shortened by up to half by its id,
            # so calls asked together do not stay in step.
            spread = 0.5 + (hash(call_id) & 1023) / 2048
            if now >= turn(state, last_refreshed.get(call_id, float("-inf")), now, s, spread):
                due.append((created, call_id))
        due.sort(reverse=True)  # newest first: the cheapest to reach by reading deeper
        return due, listed, past

    def expected_bytes(self, now: float, horizon: float) -> float:
        """The body bytes of a list read down to `horizon`, as the last reads measured the list."""
        return expected_list_bytes(self.bytes_per_call, self.calls_per_second, now - horizon)

    def learn(self, plan: Plan, now: float, horizon: float, records: int, body_bytes: int) -> None:
        """A complete list read of `records` in `body_bytes`: the size of a call, how fast the list
        grows, and when the next full read is due."""
        if records:
            self.bytes_per_call = max(200.0, body_bytes / records)
            self.calls_per_second = records / max(1.0, now - horizon)
        if plan.full:
            self.last_full_read, self.next_full_read = now, now + self.settings.full_read_interval
        self.last_read, self.last_plan = (horizon, now), plan

    def carry(self, old: ReadPlanner) -> None:
        """Carry on from the plan of the same target before a reload: a reload is no reason for a full read."""
        last_full = old.last_full_read or old.next_full_read
        self.next_full_read = min(old.next_full_read, last_full + self.settings.full_read_interval)
        self.last_full_read, self.last_read, self.last_plan = old.last_full_read, old.last_read, old.last_plan
        self.bytes_per_call, self.calls_per_second = old.bytes_per_call, old.calls_per_second
