"""The accounting core, table-driven: each row is a history of records and the counts it must produce.

A row's history is fed, in order, through one `Ledger.account` and the events are summed in a
`store.Store`. `POLL` marks the end of a complete poll (the watermark advances to the newest
`updated_at` read so far), and records are gated by `Ledger.is_news` as a list read gates them.
The expectation lists every counter series that is not zero and every histogram series that
observed something, so a row fails on a missing count and on an extra one alike.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

from exporter.accounting import CallState
from exporter.ledger import Ledger
from exporter.records import Record
from exporter.store import Store
from helpers import call_record

BASELINE = 1_700_000_000.0
C = BASELINE + 100.0  # the default created_at: after the baseline, so creation counts
OVERLAP = 120.0
POLL = object()  # history marker: the poll that read the records before it completed

OUT, IN = "outbound", "inbound"
CREATED = "callingbox_calls_created_total"
CALLS = "callingbox_calls_ended_total"
HANGUPS = "callingbox_call_hangups_total"
ERRORS = "callingbox_call_errors_total"
WEBHOOKS = "callingbox_webhook_deliveries_total"
EXTRACTIONS = "callingbox_result_extractions_total"
MONEY = "callingbox_billed_amount_dollars_total"  # held in milli-cents in the store
DURATION = "callingbox_call_duration_seconds"
ANSWER = "callingbox_call_answer_delay_seconds"
SETUP = "callingbox_call_setup_delay_seconds"
BILLED = "callingbox_call_billed_duration_seconds"


def rec(id: str, status: str, updated_at: float, **fields) -> Record:
    """A full Record: outbound, created at `C`, every optional field null unless given."""
    return call_record(**{"id": id, "status": status, "created_at": C, "updated_at": updated_at, **fields})


# A call answered after 5.5 s of ringing, 2 s after creation, that talked for 61 s, settled.
DONE = dict(
    started_at=C + 2,
    answered_at=C + 7.5,
    ended_at=C + 69,
    duration_seconds=61,
    billed_duration_seconds=62,
    billing_amount_milli_cents=1550,
    reservation_status="settled",
    hangup_cause="normal_clearing",
)
DONE_COUNTERS = {
    (CREATED, (OUT,)): 1,
    (CALLS, (OUT, "completed")): 1,
    (HANGUPS, (OUT, "completed", "normal_clearing")): 1,
    (MONEY, (OUT,)): 1550,
}
DONE_HISTOGRAMS = {
    (DURATION, (OUT, "completed")): (1, 61),
    (ANSWER, (OUT,)): (1, 5.5),
    (SETUP, (OUT,)): (1, 2.0),
    (BILLED, (OUT,)): (1, 62),
}


def done(id: str, updated_at: float, **fields) -> Record:
    return rec(id, "completed", updated_at, **{**DONE, **fields})


class Row(NamedTuple):
    name: str
    baseline: float
    history: list
    counters: dict  # (family, labels) → value, every non-zero counter series
    histograms: dict  # (family, labels) → (count, sum), every series that observed something


ROWS = [
    Row(
        "completed_after_every_active_status",
        BASELINE,
        [
            rec("a", "queued", C),
            rec("a", "initiated", C + 1),
            rec("a", "ringing", C + 3, started_at=C + 2),
            rec("a", "in_progress", C + 8, started_at=C + 2, answered_at=C + 7.5),
            done("a", C + 70),
        ],
        DONE_COUNTERS,
        DONE_HISTOGRAMS,
    ),
    Row(
        "no_answer_with_billing_released",
        BASELINE,
        [
            rec("b", "queued", C),
            rec("b", "ringing", C + 4, started_at=C + 1),
            rec(
                "b",
                "no_answer",
                C + 40,
                started_at=C + 1,
                ended_at=C + 31,
                duration_seconds=30,
                hangup_cause="no_answer",
                reservation_status="released",
                billed_duration_seconds=0,
                billing_amount_milli_cents=0,
            ),
        ],
        {(CREATED, (OUT,)): 1, (CALLS, (OUT, "no_answer")): 1, (HANGUPS, (OUT, "no_answer", "no_answer")): 1},
        {(DURATION, (OUT, "no_answer")): (1, 30), (SETUP, (OUT,)): (1, 1.0), (BILLED, (OUT,)): (1, 0)},
    ),
    Row(
        "busy_inbound",
        BASELINE,
        [
            rec("c", "queued", C, direction=IN),
            rec(
                "c",
                "busy",
                C + 5,
                direction=IN,
                started_at=C + 1.5,
                ended_at=C + 4,
                duration_seconds=0,
                hangup_cause="user_busy",
                reservation_status="released",
                billed_duration_seconds=0,
                billing_amount_milli_cents=0,
            ),
        ],
        {(CREATED, (IN,)): 1, (CALLS, (IN, "busy")): 1, (HANGUPS, (IN, "busy", "user_busy")): 1},
        {(DURATION, (IN, "busy")): (1, 0), (SETUP, (IN,)): (1, 1.5), (BILLED, (IN,)): (1, 0)},
    ),
    Row(
        "failed_with_error_code",
        BASELINE,
        [
            rec("d", "queued", C),
            rec("d", "failed", C + 2, ended_at=C + 2, error_code="invalid_number", reservation_status="released"),
        ],
        {
            (CREATED, (OUT,)): 1,
            (CALLS, (OUT, "failed")): 1,
            (HANGUPS, (OUT, "failed", "none")): 1,
            (ERRORS, (OUT, "invalid_number")): 1,
        },
        {},
    ),
    Row(
        "canceled_while_queued",
        BASELINE,
        [
            rec("e", "queued", C),
            rec("e", "canceled", C + 9, ended_at=C + 9, hangup_cause="", reservation_status="released"),
        ],
        {(CREATED, (OUT,)): 1, (CALLS, (OUT, "canceled")): 1, (HANGUPS, (OUT, "canceled", "none")): 1},
        {},
    ),
    Row("first_seen_already_terminal", BASELINE, [done("a", C + 70)], DONE_COUNTERS, DONE_HISTOGRAMS),
    Row(
        "same_record_seen_in_consecutive_polls",
        BASELINE,
        [rec("a", "queued", C), POLL, done("a", C + 70), POLL, done("a", C + 70), POLL, done("a", C + 70), POLL],
        DONE_COUNTERS,
        DONE_HISTOGRAMS,
    ),
    Row(
        "duplicates_in_one_poll",
        BASELINE,
        [rec("a", "queued", C), rec("a", "queued", C), done("a", C + 70), done("a", C + 70), POLL],
        DONE_COUNTERS,
        DONE_HISTOGRAMS,
    ),
    Row(
        # Were the older versions applied, `pending` then `delivered` would count the webhook twice
        # and `in_progress` then `completed` would end the call twice.
        "older_version_after_newer_counts_nothing",
        BASELINE,
        [
            done("a", C + 90, webhook_status="delivered"),
            done("a", C + 80, webhook_status="pending"),
            rec("a", "in_progress", C + 8, started_at=C + 2, answered_at=C + 7.5),
            done("a", C + 90, webhook_status="delivered"),
        ],
        {**DONE_COUNTERS, (WEBHOOKS, ("delivered",)): 1},
        DONE_HISTOGRAMS,
    ),
    Row(
        # `a` completes at C+70 but the API commits it late: the first poll already read `z`
        # (updated C+100), so the watermark is past it; the overlap re-examines it.
        "late_update_inside_overlap_counts_once",
        BASELINE,
        [
            rec("a", "ringing", C + 3, started_at=C + 2),
            rec("z", "queued", C + 100, created_at=C + 100),
            POLL,
            done("a", C + 70),
            rec("z", "queued", C + 100, created_at=C + 100),
            POLL,
            done("a", C + 70),
            POLL,
        ],
        {**DONE_COUNTERS, (CREATED, (OUT,)): 2},
        DONE_HISTOGRAMS,
    ),
    Row(
        "billing_reserved_at_end_counts_once_when_settled",
        BASELINE,
        [
            done(
                "a",
                C + 70,
                reservation_status="reserved",
                billed_duration_seconds=None,
                billing_amount_milli_cents=None,
            ),
            done(
                "a",
                C + 75,
                reservation_status="reserved",
                billed_duration_seconds=None,
                billing_amount_milli_cents=None,
            ),
            done("a", C + 200, billing_amount_milli_cents=123_457),
            done("a", C + 200, billing_amount_milli_cents=123_457),
            done("a", C + 300, billing_amount_milli_cents=123_457, webhook_status="delivered"),
        ],
        {**DONE_COUNTERS, (MONEY, (OUT,)): 123_457, (WEBHOOKS, ("delivered",)): 1},
        DONE_HISTOGRAMS,
    ),
    Row(
        # 0.1 + 0.2 + 0.00001 dollars: exact only as integer milli-cents.
        "money_sums_exactly_in_milli_cents",
        BASELINE,
        [
            done("a", C + 70, billing_amount_milli_cents=10_000),
            done("b", C + 70, billing_amount_milli_cents=20_000),
            done("c", C + 70, billing_amount_milli_cents=1),
        ],
        {
            (CREATED, (OUT,)): 3,
            (CALLS, (OUT, "completed")): 3,
            (HANGUPS, (OUT, "completed", "normal_clearing")): 3,
            (MONEY, (OUT,)): 30_001,
        },
        {
            (DURATION, (OUT, "completed")): (3, 183),
            (ANSWER, (OUT,)): (3, 16.5),
            (SETUP, (OUT,)): (3, 6.0),
            (BILLED, (OUT,)): (3, 186),
        },
    ),
    Row(
        "null_reservation_status_bills_at_first_terminal_sighting",
        BASELINE,
        [
            rec("g", "completed", C + 50, billed_duration_seconds=42, billing_amount_milli_cents=700),
            rec("g", "completed", C + 60, billed_duration_seconds=43, billing_amount_milli_cents=900),
        ],
        {
            (CREATED, (OUT,)): 1,
            (CALLS, (OUT, "completed")): 1,
            (HANGUPS, (OUT, "completed", "none")): 1,
            (MONEY, (OUT,)): 700,
        },
        {(BILLED, (OUT,)): (1, 42)},
    ),
    Row(
        "webhook_pending_then_delivered",
        BASELINE,
        [done("a", C + 70, webhook_status="pending"), done("a", C + 75, webhook_status="delivered")],
        {**DONE_COUNTERS, (WEBHOOKS, ("delivered",)): 1},
        DONE_HISTOGRAMS,
    ),
    Row(
        "webhook_failed_then_replayed_and_delivered",
        BASELINE,
        [
            done("a", C + 70, webhook_status="pending"),
            done("a", C + 150_000, webhook_status="failed"),
            done("a", C + 150_000, webhook_status="failed"),
            done("a", C + 200_000, webhook_status="pending"),
            done("a", C + 200_001, webhook_status="delivered"),
        ],
        {**DONE_COUNTERS, (WEBHOOKS, ("failed",)): 1, (WEBHOOKS, ("delivered",)): 1},
        DONE_HISTOGRAMS,
    ),
    Row(
        "webhook_delivered_then_replayed_and_delivered_again",
        BASELINE,
        [
            done("a", C + 70, webhook_status="delivered"),
            done("a", C + 500, webhook_status="pending"),
            done("a", C + 501, webhook_status="delivered"),
            done("a", C + 501, webhook_status="delivered"),
        ],
        {**DONE_COUNTERS, (WEBHOOKS, ("delivered",)): 2},
        DONE_HISTOGRAMS,
    ),
    Row(
        "extraction_pending_then_completed",
        BASELINE,
        [
            done("a", C + 70, result_status="pending"),
            done("a", C + 72, result_status="completed"),
            done("a", C + 72, result_status="completed"),
        ],
        {**DONE_COUNTERS, (EXTRACTIONS, ("completed",)): 1},
        DONE_HISTOGRAMS,
    ),
    Row(
        "extraction_pending_then_failed",
        BASELINE,
        [done("a", C + 70, result_status="pending"), done("a", C + 72, result_status="failed")],
        {**DONE_COUNTERS, (EXTRACTIONS, ("failed",)): 1},
        DONE_HISTOGRAMS,
    ),
    Row(
        "history_before_baseline_counts_nothing",
        BASELINE,
        [
            done(
                "h",
                BASELINE - 90,
                created_at=BASELINE - 500,
                started_at=BASELINE - 498,
                answered_at=BASELINE - 490,
                ended_at=BASELINE - 100,
                webhook_status="delivered",
                result_status="completed",
            )
        ],
        {},
        {},
    ),
    Row(
        "created_before_baseline_and_ended_after_counts_only_the_end",
        BASELINE,
        [
            rec(
                "i",
                "in_progress",
                BASELINE - 10,
                created_at=BASELINE - 60,
                started_at=BASELINE - 58,
                answered_at=BASELINE - 50,
            ),
            done(
                "i",
                BASELINE + 30,
                created_at=BASELINE - 60,
                started_at=BASELINE - 58,
                answered_at=BASELINE - 50,
                ended_at=BASELINE + 29,
                duration_seconds=79,
                billed_duration_seconds=79,
                billing_amount_milli_cents=2000,
            ),
        ],
        {(CALLS, (OUT, "completed")): 1, (HANGUPS, (OUT, "completed", "normal_clearing")): 1, (MONEY, (OUT,)): 2000},
        {
            (DURATION, (OUT, "completed")): (1, 79),
            (ANSWER, (OUT,)): (1, 8.0),
            (SETUP, (OUT,)): (1, 2.0),
            (BILLED, (OUT,)): (1, 79),
        },
    ),
    Row(
        "created_exactly_at_baseline_is_not_counted",
        BASELINE,
        [
            rec("j", "queued", BASELINE, created_at=BASELINE),
            rec("j", "canceled", BASELINE + 5, created_at=BASELINE, ended_at=BASELINE + 5),
        ],
        {(CALLS, (OUT, "canceled")): 1, (HANGUPS, (OUT, "canceled", "none")): 1},
        {},
    ),
    Row(
        "ended_exactly_at_baseline_is_not_counted",
        BASELINE,
        [done("k", BASELINE, created_at=BASELINE - 100, started_at=None, answered_at=None, ended_at=BASELINE)],
        {},
        {},
    ),
    Row(
        "terminal_without_ended_at_after_baseline_is_dated_by_updated_at",
        BASELINE,
        [rec("l", "completed", BASELINE + 1, created_at=BASELINE - 100)],
        {(CALLS, (OUT, "completed")): 1, (HANGUPS, (OUT, "completed", "none")): 1},
        {},
    ),
    Row(
        "terminal_without_ended_at_at_baseline_is_dated_by_updated_at",
        BASELINE,
        [rec("l", "completed", BASELINE, created_at=BASELINE - 100)],
        {},
        {},
    ),
    Row(
        "webhook_and_extraction_outcomes_are_dated_by_updated_at",
        BASELINE,
        [
            # delivered after the baseline although the call ended long before: counted
            rec(
                "m",
                "completed",
                BASELINE + 10,
                created_at=BASELINE - 500,
                ended_at=BASELINE - 400,
                webhook_status="delivered",
            ),
            # failed before the baseline: not counted; its later manual replay is
            rec(
                "n",
                "completed",
                BASELINE - 5,
                created_at=BASELINE - 500,
                ended_at=BASELINE - 400,
                webhook_status="failed",
            ),
            rec(
                "n",
                "completed",
                BASELINE + 100,
                created_at=BASELINE - 500,
                ended_at=BASELINE - 400,
                webhook_status="pending",
            ),
            rec(
                "n",
                "completed",
                BASELINE + 101,
                created_at=BASELINE - 500,
                ended_at=BASELINE - 400,
                webhook_status="delivered",
            ),
            # extraction outcomes on either side of the baseline
            rec(
                "o",
                "completed",
                BASELINE,
                created_at=BASELINE - 500,
                ended_at=BASELINE - 400,
                result_status="completed",
            ),
            rec(
                "p",
                "completed",
                BASELINE + 1,
                created_at=BASELINE - 500,
                ended_at=BASELINE - 400,
                result_status="failed",
            ),
        ],
        {(WEBHOOKS, ("delivered",)): 2, (EXTRACTIONS, ("failed",)): 1},
        {},
    ),
    # Billing belongs to the terminal transition (SPEC §3): it counts exactly when that counts.
    Row(
        "ended_and_settled_before_baseline_then_webhook_after_counts_only_the_webhook",
        BASELINE,
        [
            done(
                "s",
                BASELINE + 20,
                created_at=BASELINE - 90,
                started_at=BASELINE - 88,
                answered_at=BASELINE - 80,
                ended_at=BASELINE - 10,
                webhook_status="delivered",
            ),
        ],
        {(WEBHOOKS, ("delivered",)): 1},
        {},
    ),
    Row(
        "ended_before_baseline_still_reserved_then_settled_after_counts_no_money",
        BASELINE,
        [
            done(
                "t",
                BASELINE - 5,
                created_at=BASELINE - 90,
                ended_at=BASELINE - 10,
                reservation_status="reserved",
                billed_duration_seconds=None,
                billing_amount_milli_cents=None,
            ),
            POLL,
            done("t", BASELINE + 40, created_at=BASELINE - 90, ended_at=BASELINE - 10),
            POLL,
        ],
        {},
        {},
    ),
    Row(
        "ended_after_baseline_settled_much_later_counts_the_money_once",
        BASELINE,
        [
            rec(
                "u",
                "in_progress",
                BASELINE - 5,
                created_at=BASELINE - 90,
                started_at=BASELINE - 88,
                answered_at=BASELINE - 80,
            ),
            POLL,
            done(
                "u",
                BASELINE + 10,
                created_at=BASELINE - 90,
                started_at=BASELINE - 88,
                answered_at=BASELINE - 80,
                ended_at=BASELINE + 9,
                reservation_status="reserved",
                billed_duration_seconds=None,
                billing_amount_milli_cents=None,
            ),
            POLL,
            done(
                "u",
                BASELINE + 86_400,
                created_at=BASELINE - 90,
                started_at=BASELINE - 88,
                answered_at=BASELINE - 80,
                ended_at=BASELINE + 9,
            ),
            POLL,
            done(
                "u",
                BASELINE + 86_400,
                created_at=BASELINE - 90,
                started_at=BASELINE - 88,
                answered_at=BASELINE - 80,
                ended_at=BASELINE + 9,
            ),
            POLL,
        ],
        {(CALLS, (OUT, "completed")): 1, (HANGUPS, (OUT, "completed", "normal_clearing")): 1, (MONEY, (OUT,)): 1550},
        {
            (DURATION, (OUT, "completed")): (1, 61),
            (ANSWER, (OUT,)): (1, 8.0),
            (SETUP, (OUT,)): (1, 2.0),
            (BILLED, (OUT,)): (1, 62),
        },
    ),
    Row(
        "delays_observed_only_when_both_timestamps_are_set",
        BASELINE,
        [
            rec("q", "completed", C + 30, answered_at=C + 5, ended_at=C + 30),  # no started_at: neither delay
            rec("r", "completed", C + 30, started_at=C + 2, ended_at=C + 30),  # never answered: setup only
        ],
        {(CREATED, (OUT,)): 2, (CALLS, (OUT, "completed")): 2, (HANGUPS, (OUT, "completed", "none")): 2},
        {(SETUP, (OUT,)): (1, 2.0)},
    ),
]


def replay(baseline: float, history: list, gated: bool = True) -> tuple[Ledger, Store]:
    ledger, store = Ledger(baseline), Store()
    newest = None
    for item in history:
        if item is POLL:
            ledger.complete_poll(newest)
            continue
        newest = item.updated_at if newest is None else max(newest, item.updated_at)
        if not gated or ledger.is_news(item.id, item.updated_at, OVERLAP):
            store.count(ledger.account(item))
    # The history is over and `end_grace` long past: a call that never told its cause counts `none`.
    store.count(ledger.overdue(float("inf"), 0.0))
    return ledger, store


def counted(store: Store) -> dict:
    return {
        (name, labels): value for name, series in store.counters.items() for labels, value in series.items() if value
    }


def observed(store: Store) -> dict:
    return {
        (name, labels): (sum(counts[:-1]), counts[-1])
        for name, series in store.histograms.items()
        for labels, counts in series.items()
        if sum(counts[:-1])
    }


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_history_counts_each_event_exactly_once(row: Row):
    _, store = replay(row.baseline, row.history)
    assert counted(store) == row.counters
    assert observed(store) == row.histograms


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_the_news_gate_loses_nothing(row: Row):
    """A read skips records that are not news before accounting them: the counts are the same as
    when every record is accounted."""
    _, gated = replay(row.baseline, row.history)
    _, every = replay(row.baseline, row.history, gated=False)
    assert (counted(gated), observed(gated)) == (counted(every), observed(every))


# --- Ledger.is_news and complete_poll -----------------------------------------------------------


def test_a_call_not_tracked_yet_is_news_whatever_its_age():
    ledger = Ledger(BASELINE, watermark=C + 1000)
    assert ledger.is_news("a", 0.0, OVERLAP) and ledger.is_news("a", C + 2000, OVERLAP)


def test_a_newer_version_is_news_and_an_older_one_never():
    ledger = Ledger(BASELINE, watermark=C + 10_000)
    ledger.account(rec("a", "ringing", C + 50))
    assert ledger.is_news("a", C + 50.5, OVERLAP), "newer, however far behind the watermark"
    assert not ledger.is_news("a", C + 10, OVERLAP)


def test_a_version_with_the_same_timestamp_is_news_only_within_the_overlap():
    """Two changes may share an `updated_at`; the second may be committed late."""
    ledger = Ledger(BASELINE)
    ledger.account(rec("a", "ringing", C + 50))
    assert ledger.is_news("a", C + 50, OVERLAP), "no watermark yet"
    ledger.complete_poll(C + 50 + OVERLAP)
    assert ledger.is_news("a", C + 50, OVERLAP), "at the edge of the overlap"
    ledger.complete_poll(C + 51 + OVERLAP)
    assert not ledger.is_news("a", C + 50, OVERLAP), "settled"


def test_complete_poll_without_records_sets_watermark_to_baseline():
    ledger = Ledger(BASELINE)
    ledger.complete_poll(None)
    assert ledger.watermark == BASELINE


def test_complete_poll_never_moves_watermark_backwards():
    ledger = Ledger(BASELINE)
    ledger.complete_poll(C + 50)
    assert ledger.watermark == C + 50
    ledger.complete_poll(C + 10)
    assert ledger.watermark == C + 50
    ledger.complete_poll(None)
    assert ledger.watermark == C + 50
    ledger.complete_poll(C + 60)
    assert ledger.watermark == C + 60


# --- Ledger.sweep ------------------------------------------------------------------------------

NOW = BASELINE + 1_000_000.0
WINDOW = 1000.0  # horizon NOW-1000
GIVE_UP = 2000.0  # give up stragglers created before NOW-2000


def ledger_of(*records: Record) -> Ledger:
    ledger = Ledger(BASELINE)
    for record in records:
        ledger.account(record)
    return ledger


def finished(id: str, created_at: float, **fields) -> Record:
    """A completed call, settled, its cause told, no webhook, no extraction: final unless fields say otherwise."""
    values = dict(
        created_at=created_at,
        ended_at=created_at + 60,
        reservation_status="settled",
        billing_amount_milli_cents=900,
        hangup_cause="normal_clearing",
    )
    values.update(fields)
    return rec(id, "completed", created_at + 61, **values)


def test_sweep_drops_final_calls_past_the_window_and_keeps_recent_ones():
    ledger = ledger_of(
        finished("old", NOW - 1500),
        finished("at_horizon", NOW - WINDOW),
        finished("recent", NOW - 10),
    )
    summary = ledger.sweep(NOW, WINDOW)
    assert set(ledger.calls) == {"at_horizon", "recent"}
    assert (summary.tracked, summary.stragglers, summary.given_up) == (2, 0, 0)


def test_sweep_keeps_calls_past_the_window_that_are_not_final_as_stragglers():
    ledger = ledger_of(
        finished("reserved", NOW - 1500, reservation_status="reserved"),
        finished("hook", NOW - 1500, webhook_status="pending"),
        finished("extraction", NOW - 1500, result_status="pending"),
        rec("ringing", "ringing", NOW - 1499, created_at=NOW - 1500),
        finished("final", NOW - 1500),
    )
    summary = ledger.sweep(NOW, WINDOW)
    assert set(ledger.calls) == {"reserved", "hook", "extraction", "ringing"}
    assert (summary.tracked, summary.stragglers, summary.given_up) == (4, 4, 0)


def test_sweep_gives_up_on_stragglers_past_the_give_up_age():
    ledger = ledger_of(
        finished("ancient", NOW - 2500, reservation_status="reserved"),
        finished("at_give_up", NOW - GIVE_UP, reservation_status="reserved"),
        finished("straggler", NOW - 1500, webhook_status="pending"),
    )
    summary = ledger.sweep(NOW, WINDOW, GIVE_UP)
    assert set(ledger.calls) == {"at_give_up", "straggler"}
    assert (summary.tracked, summary.stragglers, summary.given_up) == (2, 2, 1)
    # Given up once: a second sweep has nothing more to give up.
    assert ledger.sweep(NOW, WINDOW, GIVE_UP).given_up == 0


def test_sweep_keeps_stragglers_for_seven_days_by_default_and_never_gives_up_inside_the_window():
    ledger = ledger_of(
        finished("six_days", NOW - 6 * 86400, webhook_status="pending"),
        finished("eight_days", NOW - 8 * 86400, webhook_status="pending"),
    )
    assert ledger.sweep(NOW, WINDOW).given_up == 1 and set(ledger.calls) == {"six_days"}
    # A give-up age shorter than the window is read as the window: calls inside it are kept.
    assert ledger.sweep(NOW, 7 * 86400, give_up_after=1.0).given_up == 0 and set(ledger.calls) == {"six_days"}


def test_sweep_counts_active_calls_by_direction_and_status():
    ledger = ledger_of(
        rec("a", "in_progress", NOW - 5, created_at=NOW - 60),
        rec("b", "in_progress", NOW - 4, created_at=NOW - 50),
        rec("c", "queued", NOW - 3, created_at=NOW - 3),
        rec("d", "ringing", NOW - 2, created_at=NOW - 9, direction=IN),
        rec("e", "initiated", NOW - 1, created_at=NOW - 8, direction=IN),
        finished("f", NOW - 100),
        rec("g", "ringing", NOW - 20, created_at=NOW - 30),
        rec("g", "busy", NOW - 19, created_at=NOW - 30, ended_at=NOW - 19),
    )
    summary = ledger.sweep(NOW, WINDOW)
    assert summary.active == {
        (OUT, "in_progress"): 2,
        (OUT, "queued"): 1,
        (IN, "ringing"): 1,
        (IN, "initiated"): 1,
    }


def test_sweep_counts_pending_webhooks_and_the_oldest_pending_since():
    ledger = ledger_of(
        # a first delivery is pending from the call's end
        finished("first", NOW - 100, ended_at=NOW - 90, webhook_status="pending"),
        # a manual replay is pending from the update that moved it back to pending
        finished("replayed", NOW - 500, ended_at=NOW - 450, webhook_status="delivered"),
        rec(
            "replayed",
            "completed",
            NOW - 50,
            created_at=NOW - 500,
            ended_at=NOW - 450,
            reservation_status="settled",
            webhook_status="pending",
        ),
        finished("delivered", NOW - 700, ended_at=NOW - 650, webhook_status="delivered"),
    )
    summary = ledger.sweep(NOW, WINDOW)
    assert (summary.webhooks_pending, summary.webhook_pending_oldest) == (2, NOW - 90)
    assert ledger.calls["replayed"].webhook_pending_since == NOW - 50


def test_sweep_reports_no_pending_webhook_when_none_is_pending():
    ledger = ledger_of(finished("a", NOW - 100, webhook_status="delivered"), finished("b", NOW - 90))
    summary = ledger.sweep(NOW, WINDOW)
    assert (summary.webhooks_pending, summary.webhook_pending_oldest) == (0, None)


def test_sweep_forgets_pending_webhooks_of_calls_it_gives_up():
    ledger = ledger_of(finished("ancient", NOW - 2500, ended_at=NOW - 2400, webhook_status="pending"))
    summary = ledger.sweep(NOW, WINDOW, GIVE_UP)
    assert (summary.webhooks_pending, summary.webhook_pending_oldest, summary.given_up) == (0, None, 1)


def test_call_state_is_final_only_when_nothing_is_expected_to_change():
    settled = CallState(OUT, "completed", C, C + 70, billed=True)
    assert settled.final is True
    assert CallState(OUT, "in_progress", C, C + 70, billed=True).final is False
    assert CallState(OUT, "completed", C, C + 70, billed=False).final is False
    assert CallState(OUT, "completed", C, C + 70, billed=True, webhook="pending").final is False
    assert CallState(OUT, "completed", C, C + 70, billed=True, result="pending").final is False
    assert CallState(OUT, "completed", C, C + 70, billed=True, webhook="failed", result="completed").final is True


def test_the_ledger_keeps_its_open_calls_apart_and_an_ordinary_sweep_walks_only_those():
    ledger = Ledger(BASELINE)
    ledger.account(rec("open", "ringing", C + 5))
    ledger.account(done("final", C + 70))
    assert ledger.open == {"open"}
    late = C + 2 * 3600  # both calls are now past a one-hour window
    summary = ledger.sweep(late, 3600.0, everything=False)
    assert set(ledger.calls) == {"open", "final"}, "an ordinary sweep leaves final calls to the full one"
    assert (summary.stragglers, summary.active) == (1, {("outbound", "ringing"): 1})
    ledger.account(done("open", C + 7000))  # the straggler ends: it leaves at the next sweep
    ledger.sweep(late, 3600.0, everything=False)
    assert set(ledger.calls) == {"final"} and ledger.open == set()
    ledger.sweep(late, 3600.0)
    assert ledger.calls == {}


def test_the_ledger_marks_what_a_save_must_write_and_hands_it_over_once():
    """The state file writes only these calls: accounted, forgotten, dropped or given up."""
    ledger = Ledger(BASELINE, calls={"restored": CallState(OUT, "ringing", C, C + 1)})
    assert ledger.changed == set(), "calls given to a new ledger are as saved"
    ledger.account(rec("open", "ringing", C + 5))
    ledger.account(done("final", C + 70))
    ledger.forget("restored")
    assert ledger.forget("never tracked") is False
    assert ledger.take_changed() == {"open", "final", "restored"} and ledger.changed == set()
    late = C + 2 * 3600
    ledger.sweep(late, 3600.0)  # "final" is dropped
    ledger.sweep(late + 8 * 86400, 3600.0, give_up_after=86400.0)  # "open" is given up
    assert ledger.take_changed() == {"final", "open"} and ledger.calls == {}


def test_prune_walks_the_ledger_in_slices_and_drops_what_a_whole_sweep_drops():
    """The full read's sweep yields between slices (scrapes are served meanwhile) and ends with
    the same ledger, open set and changes as the one-go sweep."""

    def ledger_of(n: int) -> Ledger:
        ledger = Ledger(BASELINE)
        for i in range(n):
            created = BASELINE + i
            status = "ringing" if i % 3 == 0 else "completed"
            ledger.account(
                rec(
                    f"c{i}",
                    status,
                    created + 1,
                    created_at=created,
                    ended_at=None if i % 3 == 0 else created + 1,
                    reservation_status=None if i % 3 == 0 else "settled",
                    billing_amount_milli_cents=10,
                    hangup_cause=None if i % 3 == 0 else "normal_clearing",
                )
            )
        ledger.take_changed()
        return ledger

    sliced, whole = ledger_of(23), ledger_of(23)
    horizon = BASELINE + 12
    progress = list(sliced.prune(horizon, slice_size=5))
    assert progress == [5, 10, 15, 20, 23]  # one yield per slice, counting the calls walked
    whole.sweep(horizon + 3600.0, 3600.0)
    assert sliced.calls == whole.calls and sliced.open == whole.open
    assert sliced.take_changed() == whole.take_changed() == {f"c{i}" for i in range(12) if i % 3}
