"""The backfill's replay (replay.py, spill.py): one record as it is now, turned into the versions a
live exporter would have read, fed in event time through the counting gate.

The reference is the core itself: the same final records counted directly by a `Tally` must give
the very same counters and histograms as their replay, series by series.
"""

from __future__ import annotations

import pytest

from exporter.ledger import Ledger
from exporter.records import Record, decode_record
from exporter.replay import CREATED, ENDED, LATEST, Grid, Replay, Version, as_of, versions
from exporter.settings import Settings
from exporter.simulator import format_ts
from exporter.spill import Spill
from exporter.store import Store
from exporter.tally import Tally
from helpers import call_object, call_record, settled

SINCE = 1_700_000_000.0  # the baseline of every replay here
HOUR, DAY = 3600.0, 86400.0
UNTIL = SINCE + 6 * HOUR
WINDOW, OVERLAP, GIVE_UP = HOUR, 120.0, 7 * DAY
KEYS = ("campaign",)
HOOK, SCHEMA = "https://hooks.example/cb", {"confirmed": "boolean"}
CREATED_TOTAL, ENDED_TOTAL = "callingbox_calls_created_total", "callingbox_calls_ended_total"
WEBHOOKS, HANGUPS = "callingbox_webhook_deliveries_total", "callingbox_call_hangups_total"


def settings() -> Settings:
    return Settings(WINDOW, OVERLAP, GIVE_UP, metadata_keys=KEYS)


def store() -> Store:
    return Store(extra_labels=("campaign",))


def record(id: str, status: str, created: float, updated: float, **fields) -> Record:
    """A call as the API lists it now, decoded as a live read decodes it (with its deviations)."""
    fields = {"webhook_url": HOOK, "returns": SCHEMA, **fields}
    for name in ("ended_at", "started_at", "answered_at"):
        if isinstance(fields.get(name), float):
            fields[name] = format_ts(fields[name])
    decoded = decode_record(call_object(id, status, created, updated, **fields), KEYS)
    assert isinstance(decoded, Record), decoded
    return decoded


def done(ended: float, seconds: int, **changes) -> dict:
    """The end of a completed call, as a final record carries it: started, answered, billed, delivered."""
    return settled(ended, seconds, started_at=ended - seconds - 4.0, answered_at=ended - seconds, **changes)


def direct(records: list[Record], at: float) -> Tally:
    """The core's own count: each final record once at `at`, then the hangups overdue by then."""
    tally = Tally(settings(), Ledger(baseline=SINCE), store(), SINCE)
    for r in records:
        tally.count(r, at)
    tally.expire(at)
    return tally


def in_time_order(records: list[Record]) -> list[tuple[Version, Record]]:
    return sorted(((v, r) for r in records for v in versions(r)), key=lambda pair: pair[0].at)


def replayed(records: list[Record], until: float = UNTIL, sample=None, step: float = 300.0) -> Replay:
    replay = Replay(settings(), store(), SINCE, until)
    replay.run(in_time_order(records), Grid(SINCE, until, step).times(), sample or (lambda at, s: None))
    return replay


def series_differences(a: Store, b: Store) -> list[str]:
    """Every counter or histogram series where the two stores differ (empty: the same)."""
    problems = []
    for kind in ("counters", "histograms"):
        left, right = getattr(a, kind), getattr(b, kind)
        for name in sorted(left.keys() | right.keys()):
            one, other = left.get(name, {}), right.get(name, {})
            for labels in sorted(one.keys() | other.keys()):
                if one.get(labels) != other.get(labels):
                    problems.append(f"{name}{labels}: {one.get(labels)} != {other.get(labels)}")
    return problems


def total(s: Store, name: str, **match: str) -> float:
    """The sum of one counter family over the series whose leading labels match `match` in order."""
    return sum(v for labels, v in s.counters.get(name, {}).items() if all(x in labels for x in match.values()))


# ---- versions: one record, the versions a live exporter would have read --------------------


class TestVersions:
    def test_a_terminal_call_is_created_ended_and_updated_each_at_its_own_time(self):
        r = call_record(id="a", status="completed", created_at=100.0, ended_at=160.0, updated_at=400.0)
        expected = [Version(100.0, CREATED, False), Version(160.0, ENDED, False), Version(400.0, LATEST, True)]
        assert versions(r) == expected

    def test_without_ended_at_the_end_is_dated_by_the_last_update(self):
        r = call_record(id="a", status="failed", created_at=100.0, ended_at=None, updated_at=400.0)
        assert versions(r) == [Version(100.0, CREATED, False), Version(400.0, LATEST, True)]

    def test_an_end_before_the_creation_is_read_with_the_creation(self):
        r = call_record(id="a", status="completed", created_at=100.0, ended_at=90.0, updated_at=400.0)
        assert versions(r) == [Version(100.0, ENDED, False), Version(400.0, LATEST, True)]

    def test_an_update_before_the_end_dates_the_end(self):
        r = call_record(id="a", status="completed", created_at=100.0, ended_at=500.0, updated_at=400.0)
        assert versions(r) == [Version(100.0, CREATED, False), Version(400.0, LATEST, True)]

    def test_an_update_before_the_creation_is_one_version(self):
        r = call_record(id="a", status="completed", created_at=100.0, ended_at=100.0, updated_at=50.0)
        assert versions(r) == [Version(100.0, LATEST, True)]

    def test_equal_instants_are_one_version(self):
        r = call_record(id="a", status="busy", created_at=100.0, ended_at=100.0, updated_at=100.0)
        assert versions(r) == [Version(100.0, LATEST, True)]

    def test_an_end_at_the_last_update_is_the_last_version(self):
        r = call_record(id="a", status="completed", created_at=100.0, ended_at=400.0, updated_at=400.0)
        assert versions(r) == [Version(100.0, CREATED, False), Version(400.0, LATEST, True)]

    def test_an_active_call_has_no_end(self):
        r = call_record(id="a", status="in_progress", created_at=100.0, updated_at=130.0)
        assert versions(r) == [Version(100.0, CREATED, False), Version(130.0, LATEST, True)]

    def test_an_undocumented_status_with_ended_at_ends(self):
        r = call_record(id="a", status="voicemail", created_at=100.0, ended_at=160.0, updated_at=400.0)
        assert [v.kind for v in versions(r)] == [CREATED, ENDED, LATEST]

    def test_an_undocumented_status_without_ended_at_is_active(self):
        r = call_record(id="a", status="screening", created_at=100.0, updated_at=400.0)
        assert [v.kind for v in versions(r)] == [CREATED, LATEST]


class TestAsOf:
    def test_the_creation_is_a_queued_call_with_nothing_of_its_end(self):
        r = record("a", "completed", SINCE + 10, SINCE + 900, **done(SINCE + 200, 60, error_code="E1"))
        first = as_of(r, versions(r)[0])
        assert (first.status, first.updated_at, first.created_at) == ("queued", SINCE + 10, SINCE + 10)
        assert first.ended_at is first.duration_seconds is first.billing_amount_milli_cents is None
        assert first.hangup_cause is first.error_code is first.webhook_status is first.result_status is None

    def test_the_end_carries_its_details_and_billing_with_the_outcomes_pending(self):
        r = record("a", "completed", SINCE + 10, SINCE + 900, **done(SINCE + 200, 60, error_code="E1"))
        end = as_of(r, versions(r)[1])
        assert end.updated_at == SINCE + 200
        assert (end.status, end.duration_seconds, end.billing_amount_milli_cents) == ("completed", 60, 1550)
        assert (end.hangup_cause, end.error_code) == ("normal_clearing", "E1")
        assert (end.webhook_status, end.result_status) == ("pending", "pending")

    def test_the_last_version_is_the_record_as_listed(self):
        r = record("a", "completed", SINCE + 10, SINCE + 900, **done(SINCE + 200, 60))
        assert as_of(r, versions(r)[-1]) == r


# ---- the replay counts what the core counts ---------------------------------------------------


def varied() -> list[Record]:
    """Final calls of every kind, all their events between the baseline and the cut-off."""
    t = SINCE + 600
    return [
        record("completed", "completed", t, t + 700, metadata={"campaign": "spring"}, **done(t + 120, 100)),
        record(
            "no-cause",
            "no_answer",
            t + 10,
            t + 400,
            ended_at=t + 40,
            reservation_status="released",
            webhook_status="failed",
            result_status="failed",
        ),
        record("busy", "busy", t + 20, t + 90, **done(t + 30, 0, hangup_cause="user_busy", error_code="E_BUSY")),
        record("canceled", "canceled", t + 30, t + 35, webhook_url=None, reservation_status="released"),
        record(
            "failed-pending",
            "failed",
            t + 40,
            t + 300,
            ended_at=t + 50,
            error_code="SIP_503",
            hangup_cause="network_error",
            reservation_status="released",
            webhook_status="pending",
        ),
        record(  # billing settled two hours after the end, with its amount
            "late-settled", "completed", t + 50, t + 2 * HOUR, **done(t + 200, 130, billing_amount_milli_cents=3100)
        ),
        record(  # still reserved: its billing waits, in both counts
            "reserved",
            "completed",
            t + 60,
            t + 500,
            **done(t + 260, 170, reservation_status="reserved", billing_amount_milli_cents=None),
        ),
        record("no-subject", "completed", t + 70, t + 900, webhook_url=None, **done(t + 300, 200)),
        record("voicemail", "voicemail", t + 80, t + 600, ended_at=t + 150, hangup_cause="machine"),
        record("screening", "screening", t + 90, t + 95),
        record(
            "inbound",
            "completed",
            t + 100,
            t + 1000,
            direction="inbound",
            metadata={"campaign": "autumn"},
            **done(t + 400, 250),
        ),
        record(
            "extracted",
            "completed",
            t + 110,
            t + 3 * HOUR,
            webhook_url=None,
            **done(t + 500, 300, webhook_status=None, result_status="completed"),
        ),
        record("ringing", "ringing", t + 4 * HOUR, t + 4 * HOUR + 5),
    ]


def straddling() -> list[Record]:
    """Calls created before the baseline whose later events lie after it."""
    return [
        record("before-end-after", "completed", SINCE - 300, SINCE + 400, **done(SINCE + 200, 60)),
        record("just-before", "no_answer", SINCE - 10, SINCE + 4000, ended_at=SINCE + 5, webhook_status="delivered"),
        record(  # ended before the baseline, its webhook delivered after: only the delivery counts
            "ended-before", "completed", SINCE - 100, SINCE + 100, **done(SINCE - 50, 20)
        ),
        record("at-baseline", "busy", SINCE, SINCE + 60, **done(SINCE, 0, hangup_cause="user_busy")),
    ]


def test_the_replay_counts_what_the_core_counts_series_by_series():
    records = varied()
    replay = replayed(records)
    reference = direct(records, UNTIL)
    assert not series_differences(replay.tally.store, reference.store)
    # The set is varied enough to show: the missing cause counted `none`, both webhook outcomes,
    # the two kinds of billing, the undocumented status, the deviation of the outcome without subject.
    s = reference.store
    assert s.counters[HANGUPS][("outbound", "no_answer", "none", "none")] == 1
    assert s.counters[WEBHOOKS][("delivered", "spring")] == 1
    assert s.counters[WEBHOOKS][("failed", "none")] == 1
    # outbound without a campaign: busy, no-subject and extracted, then late-settled
    assert s.counters["callingbox_billed_amount_dollars_total"][("outbound", "none")] == 1550 * 3 + 3100
    assert s.counters[ENDED_TOTAL][("outbound", "voicemail", "none")] == 1
    assert s.counters["callingbox_exporter_contract_deviations_total"][("outcome_without_subject",)] == 1
    assert total(s, CREATED_TOTAL) == len(records)
    assert replay.skipped == 0


def test_the_replay_read_from_the_spill_counts_the_same(tmp_path):
    records = varied() + straddling()
    spill = Spill(str(tmp_path / "spill.sqlite"))
    try:
        for r in reversed(records):  # the list comes newest first
            spill.add(r)
        feed = list(spill.ordered())
    finally:
        spill.close()
    assert [v.at for v, _ in feed] == sorted(v.at for v, _ in feed)
    assert sorted((v, r) for v, r in feed) == sorted(in_time_order(records))
    replay = Replay(settings(), store(), SINCE, UNTIL)
    replay.run(feed, Grid(SINCE, UNTIL, 300.0).times(), lambda at, s: None)
    assert not series_differences(replay.tally.store, direct(records, UNTIL).store)
    assert not (tmp_path / "spill.sqlite").exists()


def test_calls_straddling_the_baseline_count_only_their_events_after_it():
    records = straddling()
    replay = replayed(records)
    reference = direct(records, UNTIL)
    assert not series_differences(replay.tally.store, reference.store)
    s = replay.tally.store
    assert total(s, CREATED_TOTAL) == 0  # all created at or before the baseline
    assert total(s, ENDED_TOTAL) == 2  # ended after it: completed and no_answer
    assert total(s, WEBHOOKS, status="delivered") == 4  # every delivery lies after it


# ---- event time -------------------------------------------------------------------------------


def test_each_event_moves_its_series_at_the_first_step_at_or_after_its_time():
    t1, t2, t3 = SINCE + 1000, SINCE + 2 * HOUR + 7, SINCE + 5 * HOUR  # in different steps
    r = record("a", "completed", t1, t3, **done(t2, 60))
    seen: list[tuple[float, int, int, int]] = []

    def sample(at: float, s: Store) -> None:
        seen.append(
            (
                at,
                s.counters[CREATED_TOTAL].get(("outbound", "none"), 0),
                s.counters[ENDED_TOTAL][("outbound", "completed", "none")],
                s.counters[WEBHOOKS][("delivered", "none")],
            )
        )

    replayed([r], sample=sample)
    assert [at for at, *_ in seen] == list(Grid(SINCE, UNTIL, 300.0).times())
    for at, created, ended, delivered in seen:
        assert (created, ended, delivered) == (int(at >= t1), int(at >= t2), int(at >= t3)), at


# ---- the cut-off ------------------------------------------------------------------------------


def test_what_lies_after_the_cut_off_is_left_to_the_live_exporter_and_counted_once():
    cut = SINCE + 3 * HOUR
    later = UNTIL + HOUR  # the live exporter's first poll
    records = [
        record("before", "completed", SINCE + 100, SINCE + 900, **done(SINCE + 300, 60)),
        record("ends-after", "completed", cut - 600, cut + 900, **done(cut + 300, 90)),
        record("delivered-after", "completed", cut - 900, cut + 1200, **done(cut - 600, 30)),
        record("no-cause-after", "no_answer", cut - 100, cut + 50, ended_at=cut - 2),
        record("created-after", "busy", cut + 10, cut + 70, **done(cut + 20, 0, hangup_cause="user_busy")),
    ]
    replay = replayed(records, until=cut)
    tally = replay.tally
    # ends-after: its end and update; delivered-after, no-cause-after: their update; created-after: all three
    assert replay.skipped == 2 + 1 + 1 + 3
    s = tally.store
    assert total(s, CREATED_TOTAL) == 4
    assert total(s, ENDED_TOTAL) == 3  # before, delivered-after, no-cause-after
    assert total(s, WEBHOOKS, status="delivered") == 1  # before
    assert total(s, HANGUPS) == 2  # no-cause-after's end lies within end_grace of the cut-off, still open
    assert (tally.ledger.baseline, tally.ledger.watermark) == (cut, cut)

    for r in records:  # as a live poll after the cut-off reads them
        tally.count(r, later)
    tally.expire(later)
    assert not series_differences(s, direct(records, later).store)
    for r in records:  # a second read of the same records counts nothing
        assert tally.count(r, later + 60) == 0


# ---- the sweep --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subjects",
    [
        {},  # its webhook replayed by hand eight days after the call: pending from its end on
        # without outcomes, final at its end, which comes later than the settle window after its creation
        {"webhook_url": None, "returns": None, "webhook_status": None, "result_status": None},
    ],
    ids=["webhook-replayed", "final-at-its-end"],
)
def test_a_call_updated_weeks_after_its_creation_counts_its_creation_and_end_once(subjects):
    until = SINCE + 20 * DAY
    replayed_by_hand = record(
        "replayed", "completed", SINCE + HOUR, SINCE + HOUR + 8 * DAY, **done(SINCE + 3 * HOUR, 45, **subjects)
    )
    replay = replayed([replayed_by_hand], until=until, step=HOUR)
    s = replay.tally.store
    assert total(s, CREATED_TOTAL) == 1
    assert total(s, ENDED_TOTAL) == 1
    assert total(s, HANGUPS) == 1
    assert not series_differences(s, direct([replayed_by_hand], until).store)


def test_final_calls_leave_the_ledger_past_the_settle_window_and_open_ones_stay_until_given_up():
    until = SINCE + 10 * DAY
    finals = [
        record(f"final-{i}", "completed", SINCE + i * 1800, SINCE + i * 1800 + 300, **done(SINCE + i * 1800 + 200, 60))
        for i in range(400)
    ]
    open_recent = record("open-recent", "in_progress", until - 2 * DAY, until - 2 * DAY + 30)
    open_old = record("open-old", "ringing", SINCE + 600, SINCE + 610)  # older than straggler_give_up at the end
    sizes: list[tuple[float, int, float]] = []
    replay = Replay(settings(), store(), SINCE, until)

    def sample(at: float, s: Store) -> None:
        ledger = replay.tally.ledger
        finals_tracked = [c.created_at for i, c in ledger.calls.items() if i.startswith("final-")]
        sizes.append((at, len(ledger.calls), min(finals_tracked, default=at)))

    replay.run(in_time_order([*finals, open_recent, open_old]), Grid(SINCE, until, HOUR).times(), sample)
    # Every final call was counted, and at every step the ledger held only those created within
    # the settle window and the time between two sweeps.
    assert total(replay.tally.store, ENDED_TOTAL) == len(finals)
    for at, size, oldest in sizes:
        assert oldest >= at - WINDOW - 2 * HOUR, (at, oldest)
        assert size <= (WINDOW + 2 * HOUR) / 1800 + 3, (at, size)
    ledger = replay.tally.ledger
    assert "open-recent" in ledger.calls
    assert "open-old" not in ledger.calls
    assert all(c.created_at >= until - WINDOW for i, c in ledger.calls.items() if i.startswith("final-"))
