"""Pure accounting: per-call state + a record → the events to count.

The ledger remembers, for every call still worth tracking, what has already been counted,
so a record seen twice (overlap re-reads, duplicates, restarts) counts nothing twice. No I/O
and no clock: `now` and the baseline are passed in, so every rule is testable with plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Union

from .catalogue import ACTIVE_STATUSES, EXTRACTIONS, OUTCOMES, STRAGGLER_GIVE_UP
from .records import Record

PRUNE_SLICE = 5_000  # calls walked between two yields of Ledger.prune (about a millisecond)
EXTRA_INTERN_LIMIT = 10_000  # distinct metadata value tuples shared between calls before starting afresh


# `extra` on every event: the call's metadata label values (config `metadata_labels`), fixed at
# the call's first sighting so all of one call's counts land in the same series.


class Created(NamedTuple):
    direction: str
    extra: tuple = ()


class Ended(NamedTuple):
    direction: str
    status: str
    hangup_cause: str | None
    error_code: str | None
    duration: int | None
    answer_delay: float | None
    setup_delay: float | None
    call_id: str
    extra: tuple = ()


class Billed(NamedTuple):
    direction: str
    billed_seconds: int | None
    milli_cents: int
    call_id: str | None = None
    extra: tuple = ()


class WebhookOutcome(NamedTuple):
    status: str
    extra: tuple = ()


class ExtractionOutcome(NamedTuple):
    status: str
    extra: tuple = ()


Event = Union[Created, Ended, Billed, WebhookOutcome, ExtractionOutcome]


@dataclass(slots=True)
class CallState:
    """What the exporter has seen and counted of one call."""

    direction: str
    status: str
    created_at: float
    updated_at: float
    billed: bool = False
    webhook: str | None = None
    result: str | None = None
    webhook_pending_since: float | None = None
    amount: int | None = None  # milli-cents billed, kept for the self-audit
    extra: tuple = ()  # metadata label values, as first seen

    @property
    def final(self) -> bool:
        """Nothing about this call is still expected to change (bar a manual webhook replay)."""
        return (
            self.status not in ACTIVE_STATUSES
            and self.billed
            and self.webhook != "pending"
            and self.result != "pending"
        )


def _interval(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return end - start


def advance(state: CallState | None, record: Record, baseline: float) -> tuple[CallState, list[Event]]:
    """Move a call's state to `record` and return the events that move counters.

    An event dated at or before `baseline` changes the state but is not counted: that is how
    the first start avoids counting history while still tracking calls whose later events count.
    `state` is updated in place when given.
    """
    events: list[Event] = []
    if state is None:
        state = CallState(record.direction, record.status, record.created_at, record.updated_at, extra=record.extra)
        if record.created_at > baseline:
            events.append(Created(record.direction, state.extra))
        was_active = True
    else:
        if record.updated_at < state.updated_at:
            return state, events  # an older version than one already seen: a lagging read
        state.updated_at = record.updated_at
        was_active = state.status in ACTIVE_STATUSES
    counted_after = record.updated_at > baseline

    if was_active:
        state.status = record.status
        if record.terminal:
            ended = record.ended_at if record.ended_at is not None else record.updated_at
            if ended <= baseline:
                # Billing belongs to the terminal transition (SPEC §3): an end before the baseline
                # is history, and so is its money, however late it settles or the record changes.
                state.billed = True
                if record.reservation_status != "reserved":
                    state.amount = record.billing_amount_milli_cents or 0
            else:
                events.append(
                    Ended(
                        record.direction,
                        record.status,
                        record.hangup_cause,
                        record.error_code,
                        record.duration_seconds,
                        _interval(record.started_at, record.answered_at),
                        _interval(record.created_at, record.started_at),
                        record.id,
                        state.extra,
                    )
                )

    # Billing settles once: the first time the call is seen terminal and no longer `reserved`.
    # Only a call whose end counted gets here unbilled, so its money counts too.
    if not state.billed and record.terminal and record.reservation_status != "reserved":
        state.billed, state.amount = True, record.billing_amount_milli_cents or 0
        events.append(
            Billed(record.direction, record.billed_duration_seconds, record.billing_amount_milli_cents or 0,
                   record.id, state.extra)
        )

    webhook = record.webhook_status
    if webhook != state.webhook:
        if webhook in OUTCOMES and counted_after:
            events.append(WebhookOutcome(webhook, state.extra))
        if webhook == "pending":
            # A first delivery is pending from the call's end; a manual replay from its own update.
            first = state.webhook is None and record.ended_at is not None
            state.webhook_pending_since = record.ended_at if first else record.updated_at
        else:
            state.webhook_pending_since = None
        state.webhook = webhook

    result = record.result_status
    if result != state.result:
        if result in EXTRACTIONS and counted_after:
            events.append(ExtractionOutcome(result, state.extra))
        state.result = result

    return state, events


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
        # Calls accounted or dropped since the last save: the state file writes only these.
        self.changed: set[str] = set()

    def is_news(self, call_id: str, updated_at: float, overlap: float) -> bool:
        """Whether a record may hold news: a call not tracked yet, or a newer version of one.

        Every change bumps `updated_at` (SPEC §1), so an older version than the one accounted is
        stale, however deep or late the read that shows it. Two changes may share a timestamp,
        so one with the same `updated_at` is looked at again while it lies within `overlap` of
        the watermark, where a late-committed twin can still appear.
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
        if state.final:
            if record.id in self.open:
                self.open.discard(record.id)
                self._finished.append(record.id)
        else:
            self.open.add(record.id)
        return events

    def forget(self, call_id: str) -> bool:
        """Stop tracking a call (the API no longer knows it); whether it was tracked."""
        self.open.discard(call_id)
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
            for call_id in ids[start:start + slice_size]:
                state = calls[call_id]
                if not state.final:
                    still_open.add(call_id)
                elif state.created_at < horizon:
                    del calls[call_id]
                    self.changed.add(call_id)
            yield min(start + slice_size, len(ids))
        self.open = still_open

    def sweep(self, now: float, settle_window: float, give_up_after: float = STRAGGLER_GIVE_UP,
              everything: bool = True, keep_from: float | None = None) -> Summary:
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
            if state.status in ACTIVE_STATUSES:
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
