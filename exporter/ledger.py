"""The ledger of one target: every tracked call's state, the baseline and the watermark.

It remembers, for every call still worth tracking, what has already been counted, so a record
seen twice (overlap re-reads, duplicates, restarts) counts nothing twice (accounting.advance
decides what a record means). Memory and the work of a poll follow the open calls: the ledger
keeps them apart, and drops final calls once list reads no longer show them. No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from .accounting import CAUSE, CallState, Event, advance, no_cause
from .catalogue import STRAGGLER_GIVE_UP
from .records import Record

PRUNE_SLICE = 1_000  # calls walked between two yields of Ledger.prune (0.5-0.7 ms under load)
EXTRA_INTERN_LIMIT = 10_000  # distinct metadata value tuples shared between calls before starting afresh


def give_up_age(settle_window: float, give_up_after: float) -> float:
    """How old a call that is not final may grow before it is given up: never less than the window."""
    return max(give_up_after, settle_window)


class Summary(NamedTuple):
    """Gauges derived from the ledger in one pass."""

    active: dict[tuple, int]  # (direction, status, *metadata label values) → calls
    webhooks_pending: int
    webhook_pending_oldest: float | None  # the earliest pending-since timestamp
    tracked: int
    stragglers: int
    given_up: int


class Ledger:
    """Every tracked call's state, the baseline and the `updated_at` watermark of one target."""

    def __init__(self, baseline: float, watermark: float | None = None, calls: dict[str, CallState] | None = None):
        self.baseline = baseline
        self.watermark = watermark
        self.calls: dict[str, CallState] = calls if calls is not None else {}
        # The calls not final yet: a poll's plan and summary walk these, not the whole ledger.
        self.open: set[str] = {call_id for call_id, state in self.calls.items() if not state.final}
        self._finished: list[str] = []  # calls that turned final since the last sweep
        self._extras: dict[tuple, tuple] = {}
        # Ended calls still without a hangup cause: `overdue` counts theirs as `none` after a grace.
        self.awaiting: set[str] = {call_id for call_id in self.open if self.calls[call_id].todo & CAUSE}
        # Calls accounted or dropped since the last save: the state file writes only these.
        self.changed: set[str] = set()

    def is_news(self, call_id: str, updated_at: float, overlap: float) -> bool:
        """Whether a record may hold news: a call not tracked yet, or a newer version of one.

        Every change bumps `updated_at` (SPEC §1), so an older version than the one accounted is
        stale, however deep or late the read that shows it. Two changes may share a timestamp,
        so one with the same `updated_at` is looked at again while it lies within `overlap` of
        the watermark, where a late-committed twin can still appear. The one rule of news: a list
        read asks it before building a Record (tally.ListRead.take) and again for a decoded one.
        """
        state = self.calls.get(call_id)
        if state is None or updated_at > state.updated_at:
            return True
        return updated_at == state.updated_at and (self.watermark is None or updated_at >= self.watermark - overlap)

    def account(self, record: Record) -> list[Event]:
        state, events = advance(self.calls.get(record.id), record, self.baseline)
        if state.extra:  # calls of one campaign share one tuple of label values
            if len(self._extras) > EXTRA_INTERN_LIMIT:
                self._extras.clear()
            state.extra = self._extras.setdefault(state.extra, state.extra)
        self.calls[record.id] = state
        self.changed.add(record.id)
        self._place(record.id, state)
        return events

    def _place(self, call_id: str, state: CallState) -> None:
        if state.final:
            if call_id in self.open:
                self.open.discard(call_id)
                self._finished.append(call_id)
        else:
            self.open.add(call_id)
        if state.todo & CAUSE:
            self.awaiting.add(call_id)
        else:
            self.awaiting.discard(call_id)

    def overdue(self, now: float, grace: float) -> list[Event]:
        """The hangups of ended calls that never told a cause: once nothing else about a call is
        open and `grace` has passed since its end, it counts `hangup_cause="none"` (SPEC §4)."""
        events: list[Event] = []
        for call_id in list(self.awaiting):
            state = self.calls.get(call_id)
            if state is None or not state.todo & CAUSE:
                self.awaiting.discard(call_id)
            elif state.settled_but_cause and state.ended is not None and now - state.ended >= grace:
                events.append(no_cause(call_id, state))
                self.changed.add(call_id)
                self._place(call_id, state)
        return events

    def forget(self, call_id: str) -> bool:
        """Stop tracking a call (the API no longer knows it); whether it was tracked."""
        self.open.discard(call_id)
        self.awaiting.discard(call_id)
        if self.calls.pop(call_id, None) is None:
            return False
        self.changed.add(call_id)
        return True

    def take_changed(self) -> set[str]:
        """The calls changed since the last call of this, for a save; what changes meanwhile is kept."""
        taken, self.changed = self.changed, set()
        return taken

    def touch_all(self) -> None:
        """Every call is to be saved again (their metadata labels were re-keyed in place)."""
        self.changed.update(self.calls)

    def complete_poll(self, newest_updated_at: float | None) -> None:
        """A full read succeeded: advance the watermark to the newest update it saw."""
        if newest_updated_at is None:
            newest_updated_at = self.baseline if self.watermark is None else self.watermark
        if self.watermark is None or newest_updated_at > self.watermark:
            self.watermark = newest_updated_at

    def prune(self, horizon: float, slice_size: int = PRUNE_SLICE) -> Iterator[int]:
        """Drop the final calls created before `horizon` and recount the open ones, walking the
        whole ledger a slice at a time: it yields after each slice (the calls walked so far), so
        the caller can let the event loop serve scrapes between slices. The caller owns the
        ledger meanwhile: nothing else may account or forget until the walk ends.
        """
        calls, ids, still_open = self.calls, list(self.calls), set()
        for start in range(0, len(ids), slice_size):
            for call_id in ids[start : start + slice_size]:
                state = calls[call_id]
                if not state.final:
                    still_open.add(call_id)
                elif state.created_at < horizon:
                    del calls[call_id]
                    self.changed.add(call_id)
            yield min(start + slice_size, len(ids))
        self.open = still_open

    def sweep(
        self,
        now: float,
        settle_window: float,
        give_up_after: float = STRAGGLER_GIVE_UP,
        everything: bool = True,
        keep_from: float | None = None,
    ) -> Summary:
        """Drop calls the ledger need not keep and summarise the open ones.

        A final call past the settle window is dropped: list reads no longer show it. Only an
        `everything` sweep walks the whole ledger for those (in one go; the poller runs `prune`
        in slices instead); the others walk the open calls alone, so their cost follows the live
        calls, not the window. A call past
        the window that is not final is a straggler: list reads cannot see it any more (the
        poller refreshes it by id), and once it is `give_up_after` old (never less than the
        window) it is given up rather than kept forever. A final call created at or after
        `keep_from` stays, past the window too: the self-audit has yet to read it.
        """
        horizon = now - settle_window
        dropped = horizon if keep_from is None else min(horizon, keep_from)  # final calls created before go
        give_up = now - give_up_age(settle_window, give_up_after)
        calls = self.calls
        if everything:
            for _ in self.prune(dropped):
                pass
        else:  # a straggler that has just become final leaves at once
            for call_id in self._finished:
                state = calls.get(call_id)
                if state is not None and state.final and state.created_at < dropped:
                    del calls[call_id]
                    self.changed.add(call_id)
        self._finished = []
        active: dict[tuple[str, str], int] = {}
        pending = stragglers = given_up = 0
        oldest: float | None = None
        for call_id in list(self.open):
            state = calls.get(call_id)
            if state is None or state.final:
                self.open.discard(call_id)
                continue
            if state.created_at < horizon:
                if state.created_at < give_up:
                    self.forget(call_id)
                    given_up += 1
                    continue
                stragglers += 1
            if state.active:
                key = (state.direction, state.status, *state.extra)
                active[key] = active.get(key, 0) + 1
            if state.webhook == "pending":
                pending += 1
                since = state.webhook_pending_since
                if since is not None and (oldest is None or since < oldest):
                    oldest = since
        return Summary(active, pending, oldest, len(calls), stragglers, given_up)

    def __iter__(self) -> Iterator[tuple[str, CallState]]:
        return iter(self.calls.items())
