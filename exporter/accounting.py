"""Pure accounting: per-call state + a record → the events to count (SPEC §3, §4).

`advance` is every counting rule for one call: what a new version of it means, given what was
already counted. No I/O and no clock: the baseline is passed in, so every rule is testable with
plain values. The ledger (ledger.py) holds one `CallState` per tracked call and feeds it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .catalogue import (
    CONTRACT_DEVIATIONS,
    DEVIATION_BITS,
    EXTRACTIONS,
    LATE_END_DETAIL,
    OUTCOMES,
    SETTLED_WITHOUT_AMOUNT,
)
from .records import Record, is_terminal

# `extra` on every event: the call's metadata label values (config `metadata_labels`), fixed at
# the call's first sighting so all of one call's counts land in the same series.


class Created(NamedTuple):
    direction: str
    extra: tuple = ()


class Ended(NamedTuple):
    """A terminal transition (`transition`) and the end details known with it, or details that
    came in a later version of an ended call. `hangup`: the hangup counts here, with
    `hangup_cause` (None: `none`); the other details count when they are not None."""

    direction: str
    status: str
    hangup_cause: str | None
    error_code: str | None
    duration: int | None
    answer_delay: float | None
    setup_delay: float | None
    call_id: str
    extra: tuple = ()
    hangup: bool = True
    transition: bool = True


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


class Deviation(NamedTuple):
    """The API did something its docs leave open (SPEC §1), first seen for a call."""

    kind: str


Event = Created | Ended | Billed | WebhookOutcome | ExtractionOutcome | Deviation

# `advance` builds its events with every field given, straight as tuples: a NamedTuple's own
# constructor is a Python function, three times slower, and this runs for every call read.
_event = tuple.__new__

# End details a call whose end counted still waits for: bits of CallState.todo. Each counts once,
# from the first terminal version that carries it (SPEC §4 "End details").
CAUSE, ERROR, DURATION, ANSWER, SETUP = 1, 2, 4, 8, 16
ALL_DETAILS = CAUSE | ERROR | DURATION | ANSWER | SETUP
SETTLED_OUTCOMES = (None, *OUTCOMES)  # webhook states that hold nothing open
SETTLED_RESULTS = (None, *EXTRACTIONS)
_LATE, _NO_AMOUNT = DEVIATION_BITS[LATE_END_DETAIL], DEVIATION_BITS[SETTLED_WITHOUT_AMOUNT]


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
    ended: float | None = None  # when its terminal transition happened (ended_at, else updated_at)
    todo: int = 0  # end details not counted yet (CAUSE, ...): only a call whose end counted has any
    deviations: int = 0  # DEVIATION_BITS of the kinds already counted for this call

    @property
    def active(self) -> bool:
        """Not ended yet: a status outside the docs is active until the call has an end (SPEC §4)."""
        return not is_terminal(self.status, self.ended)

    @property
    def final(self) -> bool:
        """Nothing about this call is still expected to change (bar a manual webhook replay)."""
        return (  # the ledger asks this of every call it places or prunes: cheapest tests first
            self.billed
            and not self.todo & CAUSE
            and self.webhook in SETTLED_OUTCOMES
            and self.result in SETTLED_RESULTS
            and is_terminal(self.status, self.ended)
        )

    @property
    def settled_but_cause(self) -> bool:
        """Only the hangup cause is still open: `end_grace` after its end, it counts as `none`."""
        return not self.active and self.billed and self.webhook in SETTLED_OUTCOMES and self.result in SETTLED_RESULTS


def _interval(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return end - start


def _end_details(state: CallState, record: Record, transition: bool) -> Ended | None:
    """The end details of `record` that `state` still waits for, as one event (None: none new)."""
    todo = left = state.todo
    cause = error = duration = answer = setup = None
    if todo & CAUSE and record.hangup_cause is not None:
        cause, left = record.hangup_cause, left & ~CAUSE
    if todo & ERROR and record.error_code is not None:
        error, left = record.error_code, left & ~ERROR
    if todo & DURATION and record.duration_seconds is not None:
        duration, left = record.duration_seconds, left & ~DURATION
    if todo & ANSWER:
        answer = _interval(record.started_at, record.answered_at)
        if answer is not None:
            left &= ~ANSWER
    if todo & SETUP:
        setup = _interval(record.created_at, record.started_at)
        if setup is not None:
            left &= ~SETUP
    if not transition and left == todo:
        return None
    state.todo = left
    return _event(
        Ended,
        (
            record.direction,
            state.status,
            cause,
            error,
            duration,
            answer,
            setup,
            record.id,
            state.extra,
            cause is not None,
            transition,
        ),
    )


def no_cause(call_id: str, state: CallState) -> Ended:
    """The hangup of a call that never told its cause: `none` (SPEC §4, after `end_grace`)."""
    state.todo &= ~CAUSE
    return Ended(
        state.direction, state.status, None, None, None, None, None, call_id, state.extra, hangup=True, transition=False
    )


def deviations(state: CallState, found: int) -> list[Event]:
    """The kinds in `found` not counted for this call yet, each once."""
    new = found & ~state.deviations
    if not new:
        return []
    state.deviations |= new
    return [Deviation(kind) for kind in CONTRACT_DEVIATIONS if DEVIATION_BITS[kind] & new]


def advance(state: CallState | None, record: Record, baseline: float) -> tuple[CallState, list[Event]]:
    """Move a call's state to `record` and return the events that move counters.

    An event dated at or before `baseline` changes the state but is not counted: that is how
    the first start avoids counting history while still tracking calls whose later events count.
    `state` is updated in place when given.

    Versions may share one `updated_at` (whole-second timestamps): such a tie may be an older
    version read after a newer one, so within a tie a state only moves forward (active to
    terminal, none to pending to an outcome), never back; each change counts once.
    """
    events: list[Event] = []
    tie = False
    if state is None:
        state = CallState(record.direction, record.status, record.created_at, record.updated_at, extra=record.extra)
        if record.created_at > baseline:
            events.append(_event(Created, (record.direction, state.extra)))
        was_active = True
    else:
        if record.updated_at < state.updated_at:
            return state, events  # an older version than one already seen: a lagging read
        tie = record.updated_at == state.updated_at
        state.updated_at = record.updated_at
        was_active = state.active
    counted_after = record.updated_at > baseline
    found = record.deviations

    if was_active:
        state.status = record.status
        if is_terminal(record.status, record.ended_at):  # record.terminal, inline: it runs for every call
            state.ended = ended = record.ended_at if record.ended_at is not None else record.updated_at
            if ended <= baseline:
                # Billing belongs to the terminal transition (SPEC §3): an end before the baseline
                # is history, and so is its money, however late it settles or the record changes.
                state.billed = True
                if record.reservation_status != "reserved":
                    state.amount = record.billing_amount_milli_cents
            else:
                state.todo = ALL_DETAILS
                events.append(_end_details(state, record, transition=True))
    elif state.todo:
        late = _end_details(state, record, transition=False)
        if late is not None:
            events.append(late)
            found |= _LATE

    # Billing settles once: the first time the call is seen terminal and no longer `reserved`,
    # with its amount when `settled`. Only a call whose end counted gets here unbilled.
    if not state.billed and not state.active and record.reservation_status != "reserved":
        amount = record.billing_amount_milli_cents
        if amount is None and record.reservation_status == "settled":
            found |= _NO_AMOUNT  # the amount follows in a later version: wait for it
        else:
            state.billed, state.amount = True, amount or 0
            billed = (record.direction, record.billed_duration_seconds, amount or 0, record.id, state.extra)
            events.append(_event(Billed, billed))

    webhook = record.webhook_status
    if webhook != state.webhook and not (tie and _backwards(state.webhook, webhook)):
        if webhook in OUTCOMES and counted_after:
            events.append(_event(WebhookOutcome, (webhook, state.extra)))
        if webhook == "pending":
            # A first delivery is pending from the call's end; a manual replay from its own update.
            first = state.webhook is None and record.ended_at is not None
            state.webhook_pending_since = record.ended_at if first else record.updated_at
        else:
            state.webhook_pending_since = None
        state.webhook = webhook

    result = record.result_status
    if result != state.result and not (tie and _backwards(state.result, result)):
        if result in EXTRACTIONS and counted_after:
            events.append(_event(ExtractionOutcome, (result, state.extra)))
        state.result = result

    if found:
        events.extend(deviations(state, found))
    return state, events


def _backwards(old: str | None, new: str | None) -> bool:
    """Within one `updated_at`, whether an outcome field moves anywhere but forward (none →
    pending → an outcome): then the record may be an older version, and the move is ignored."""
    return old is not None and (new is None or new == "pending" or old not in (None, "pending"))
