"""The counting core of one target, by plain calls: no event loop, no HTTP, no clock.

Raw call objects (as the API's JSON decodes) go through `Tally`: a list read, a refresh by id,
a spot-check. Each path counts an event once, a malformed record once however often it comes
back, an audit mismatch once, and the health summary says what the ledger holds.
"""

from __future__ import annotations

import logging
import random

from exporter.audit import Audit
from exporter.health import Status, summarise
from exporter.ledger import Ledger
from exporter.plan import Plan
from exporter.settings import Settings
from exporter.store import Store
from exporter.tally import INVALID_MEMORY, ReadResult, Tally
from helpers import call_object, is_final

NOW = 1_700_000_000.0
WINDOW, OVERLAP, GIVE_UP = 3600.0, 120.0, 7 * 86400.0
ENDED, CREATED = "callingbox_calls_ended_total", "callingbox_calls_created_total"
INVALID = "callingbox_exporter_invalid_records_total"


def settings(audit_interval: float = 0.0, settle_window: float = WINDOW, **more) -> Settings:
    return Settings(settle_window, OVERLAP, GIVE_UP, audit_interval=audit_interval, **more)


def tally(baseline: float = NOW - 3000, audit_interval: float = 0.0, **more) -> Tally:
    return Tally(settings(audit_interval, **more), Ledger(baseline), Store(), now=NOW)


def audit_due(t: Tally, now: float) -> Audit | None:
    return t.schedule.due(now, t.ledger.baseline)


def call(id: str, status: str, created: float, updated: float, **fields) -> dict:
    """A call object as `GET /v1/calls` decodes it into plain JSON values: with a webhook and a
    schema (the subjects of its outcomes), and once ended, its hangup cause."""
    terminal = is_final(status)
    return (
        call_object(
            id,
            status,
            created,
            updated,
            reservation_status="released" if terminal else "reserved",
            hangup_cause="normal_clearing" if terminal else None,
            webhook_url="https://hooks.example/cb",
            returns={"confirmed": "boolean"},
        )
        | fields
    )


def read_all(t: Tally, now: float, objects: list, plan: Plan | None = None) -> ReadResult:
    """A complete list read of `objects` as `plan` says (without one: the settle window, no audit)."""
    read = t.list_read(now, plan)
    for obj in objects:
        if not read.take(obj):
            break
    result = read.result()
    t.settle_read(result)
    return result


def counted(t: Tally, name: str) -> int:
    return sum(t.store.counters[name].values())


def test_a_list_read_counts_each_call_once_and_stops_at_the_settle_window():
    t = tally()
    listed = [
        call("c", "completed", NOW - 30, NOW - 5),
        call("b", "ringing", NOW - 60, NOW - 50),
        call("a", "completed", NOW - 100, NOW - 90),
        call("old", "completed", NOW - WINDOW - 1, NOW - 10),
    ]
    first = read_all(t, NOW, listed)
    assert (first.records, first.examined) == (4, 3), "the call past the window ends the read"
    assert (counted(t, CREATED), counted(t, ENDED)) == (3, 2)
    assert t.ledger.watermark == NOW - 5 and "old" not in t.ledger.calls

    second = read_all(t, NOW + 15, listed)
    assert second.events == 0 and (counted(t, CREATED), counted(t, ENDED)) == (3, 2), "a re-read counts nothing"
    assert second.examined == 3, "the same versions, still within the overlap: looked at again"
    t.ledger.complete_poll(NOW + 200)  # newer updates have been read since: these have settled
    assert read_all(t, NOW + 215, listed).examined == 0


def test_only_news_is_examined_however_old_the_call_or_late_the_commit():
    t = tally()
    read_all(t, NOW, [call("new", "ringing", NOW - 10, NOW - 1), call("old", "completed", NOW - 900, NOW - 800)])
    # "old" changes with an updated_at older than everything read since: a late commit, deep down.
    again = read_all(
        t,
        NOW + 15,
        [
            call("new", "ringing", NOW - 10, NOW - 1),
            call("old", "completed", NOW - 900, NOW - 700, webhook_status="delivered"),
        ],
    )
    assert again.examined == 2, "the changed call, and the unchanged one still within the overlap"
    assert t.store.counters["callingbox_webhook_deliveries_total"][("delivered",)] == 1


def test_an_ordinary_poll_reads_down_to_the_oldest_call_in_flight_and_asks_older_open_calls_by_id():
    t = tally(baseline=NOW - 86400, settle_window=6 * 3600.0, hot_window=1800.0)
    old_open = [
        call(f"o{i}", "completed", NOW - 3 * 3600 - i, NOW - 3 * 3600 + 60, webhook_status="pending") for i in range(3)
    ]
    history = [call(f"h{i}", "completed", NOW - 2 * 3600 - i * 10, NOW - 2 * 3600) for i in range(200)]
    first = t.plan(NOW, {}, batch=10)
    assert first.full, "the first poll reads the whole settle window"
    in_flight = [call("hot", "ringing", NOW - 60, NOW - 50), call("long", "in_progress", NOW - 900, NOW - 800)]
    read_all(t, NOW, in_flight + history + old_open, first)

    plan = t.plan(NOW + 15, {}, batch=10)
    assert not plan.full and plan.horizon == NOW - 900, "as deep as the long call, not the 30 min hot window"
    assert sorted(plan.by_id) == ["o0", "o1", "o2"], "200 calls in between cost more than 3 requests"
    assert plan.open_calls == {"list": 2, "by_id": 3}
    assert t.plan(NOW + 30, {f"o{i}": NOW + 15 for i in range(3)}, batch=10).by_id == [], "not due again yet"
    # Quiet for 3 h, past any attempt the webhook schedule allows: asked every tenth of that.
    assert t.plan(NOW + 1200, {f"o{i}": NOW + 15 for i in range(3)}, batch=10).by_id, "due within 3 h / 10"


def test_the_read_goes_deeper_where_that_costs_less_than_asking_by_id():
    t = tally(baseline=NOW - 86400, settle_window=6 * 3600.0, hot_window=1800.0)
    open_calls = [call(f"o{i}", "completed", NOW - 2000 - i, NOW - 1990, webhook_status="pending") for i in range(5)]
    first = t.plan(NOW, {}, batch=10)
    read_all(t, NOW, [call("hot", "ringing", NOW - 60, NOW - 50)] + open_calls, first)
    plan = t.plan(NOW + 15, {}, batch=10)
    assert plan.by_id == [] and plan.horizon == NOW - 2004, "five calls just past the hot window: read them"
    assert plan.open_calls == {"list": 6, "by_id": 0}


def test_a_malformed_record_is_counted_once_whichever_path_reads_it():
    t = tally()
    broken = call("x", "", NOW - 30, NOW - 20)
    read_all(t, NOW, [broken])
    read_all(t, NOW + 15, [broken])
    assert t.decode(broken) is None  # the by-id path: same memory
    assert {k: v for k, v in t.store.counters[INVALID].items() if v} == {("unknown_status",): 1}
    assert "x" not in t.ledger.calls


def test_the_malformed_record_memory_is_bounded_and_forgets_the_oldest():
    t = tally()
    for i in range(INVALID_MEMORY + 1):
        t.decode({"id": f"m{i}", "status": "on_hold"})
    assert len(t._invalid_seen) == INVALID_MEMORY
    t.decode({"id": "m0", "status": "on_hold"})  # forgotten, so counted again
    assert counted(t, INVALID) == INVALID_MEMORY + 2


def test_a_refresh_by_id_takes_the_same_path_and_counts_once():
    t = tally()
    read_all(t, NOW, [call("a", "in_progress", NOW - 300, NOW - 290)])
    for _ in range(3):
        record = t.decode(call("a", "completed", NOW - 300, NOW - 10))
        t.count(record, NOW)
    assert counted(t, ENDED) == 1 and t.ledger.calls["a"].status == "completed"


def test_a_vanished_call_is_forgotten_and_counted_once():
    t = tally()
    read_all(t, NOW, [call("a", "ringing", NOW - 300, NOW - 290)])
    assert t.vanished("a") and not t.vanished("a")
    assert t.store.counters["callingbox_exporter_vanished_calls_total"][()] == 1


def test_stragglers_are_tracked_calls_past_the_window_not_final_and_not_given_up():
    t = tally(baseline=NOW - 10 * 86400)
    read_all(
        t,
        NOW - 5000,
        [
            call("open", "completed", NOW - 5000, NOW - 4990, webhook_status="pending"),
            call("done", "completed", NOW - 5001, NOW - 4990),
        ],
    )
    assert t.plan(NOW, {}, batch=10).by_id == ["open"], "a full read cannot list it: asked by id"
    assert t.plan(NOW + GIVE_UP, {}, batch=10).by_id == [], "given up once older than straggler_give_up"


def test_an_audit_is_due_an_interval_after_the_start_and_its_mismatches_count_once():
    t = tally(baseline=NOW - 10 * WINDOW, audit_interval=600.0)
    assert audit_due(t, NOW) is None
    later = NOW + 600
    created = later - WINDOW + 10  # inside the oldest interval of the window
    read_all(t, later - 1000, [call("a", "completed", created, created + 5)])
    audit = audit_due(t, later)
    assert audit is not None and audit.covers(created)
    # failed now, updated_at not bumped: a silent rewrite
    read = read_all(t, later, [call("a", "failed", created, created + 5)], Plan(later - WINDOW, True, [], {}, audit))
    t.conclude_audit(read.audit, later)
    assert audit_due(t, later) is None and t.schedule.next_audit == later + 600
    again = Audit(float("-inf"), float("inf"), t.ledger.baseline)  # the same lie found again, by id
    t.spot_check(again, "a", call("a", "failed", created, created + 5))
    t.report(again, "spot_check")
    assert t.store.counters["callingbox_exporter_audit_mismatches_total"][("status",)] == 1
    checked = t.store.counters["callingbox_exporter_audit_calls_checked_total"]
    assert (checked[("window",)], checked[("spot_check",)]) == (1, 1)
    assert t.schedule.last_audit == later


def test_a_spot_check_finds_a_silent_rewrite_and_leaves_a_404_to_the_next_read():
    t = tally()
    listed = [call("a", "completed", NOW - 30, NOW - 20), call("b", "completed", NOW - 40, NOW - 30)]
    read_all(t, NOW, listed)
    candidates = [call_id for part in t.spot_candidates(slice_size=1) for call_id in part]
    assert sorted(candidates) == ["a", "b"]
    audit = Audit(float("-inf"), float("inf"), t.ledger.baseline)
    t.spot_check(audit, "a", call("a", "busy", NOW - 30, NOW - 20))
    t.spot_check(audit, "b", None)  # by-id reads may lag the list: proves nothing alone
    t.report(audit, "spot_check")
    mismatches = t.store.counters["callingbox_exporter_audit_mismatches_total"]
    assert (mismatches[("status",)], mismatches[("extra",)]) == (1, 0)
    read_all(t, NOW + 15, listed[:1])  # the next read covers b and lacks it: gone
    assert "b" not in t.ledger.calls and t.store.counters["callingbox_exporter_vanished_calls_total"][()] == 1


CHECKED, MISMATCHES = "callingbox_exporter_audit_calls_checked_total", "callingbox_exporter_audit_mismatches_total"
SKIPPED = "callingbox_exporter_audit_skipped_seconds_total"


def poll(t: Tally, now: float, listed: list, fails: bool = False) -> tuple[Audit | None, float]:
    """One poll as the poller runs it: plan, the list read down to the plan's horizon with its
    audit (none when the read `fails`), then the sweep. Returns (audit concluded, read horizon)."""
    plan = t.plan(now, {}, batch=10)
    audit = None
    if not fails:
        audit = read_all(t, now, listed, plan).audit
        if audit is not None:
            t.conclude_audit(audit, now)
    if plan.full:
        for _ in t.prune(now):
            pass
    t.sweep(now, everything=False)
    return audit, plan.horizon


def history(start: float, end: float, every: float) -> list[tuple[float, dict]]:
    """Final calls created every `every` seconds from `start` to `end`: (created_at, call object)."""
    return [
        (start + i * every, call(f"h{i}", "completed", start + i * every, start + i * every + 5))
        for i in range(int((end - start) / every))
    ]


def listed_at(calls: list[tuple[float, dict]], now: float) -> list[dict]:
    """GET /v1/calls at `now`: the calls created (and updated) by then, newest first."""
    return [obj for created, obj in reversed(calls) if created + 5 <= now]


def test_late_audits_tile_the_timeline_and_read_back_to_where_the_last_window_ended():
    """However late the poll that carries an audit (drift, a failed read, a long back-off), each
    window starts where the last one ended, and its read reaches back there: every call once."""
    t = tally(baseline=NOW - 10 * WINDOW, audit_interval=600.0)
    calls = history(NOW - WINDOW, NOW + 4 * WINDOW, 20.0)
    rng = random.Random(18)
    now, windows, late, first_audit = NOW, [], 0, None
    while now < NOW + 5 * WINDOW:
        due = audit_due(t, now)
        fails = due is not None and rng.random() < 0.2  # an audit poll whose read fails: tried again
        audit, horizon = poll(t, now, listed_at(calls, now), fails)
        if due is not None and not fails:
            assert horizon <= audit.start, "the read reaches the start of the window"
            late += audit.start < now - WINDOW
            windows.append((audit.start, audit.end))
            first_audit = first_audit or now
        now += 60 + rng.uniform(0, 20) + (400 if rng.random() < 0.03 else 0)
    assert late >= 5, "most audits came late"
    assert all(end == start for (_, end), (start, _) in zip(windows, windows[1:])), "no gap, no overlap"
    first, last = windows[0][0], windows[-1][1]
    assert first == first_audit - WINDOW, "the first window starts at the settle window of its poll"
    assert t.store.counters[CHECKED][("window",)] == sum(first <= c < last for c, _ in calls)
    assert sum(t.store.counters[MISMATCHES].values()) == 0, "the calls read back to are still in the ledger"
    assert t.store.counters[SKIPPED][()] == 0 and t.schedule.audited_until == last


def test_a_restored_audit_schedule_starts_the_next_window_where_the_last_one_ended():
    t = tally(baseline=NOW - 10 * WINDOW, audit_interval=600.0)
    calls = history(NOW - WINDOW, NOW + WINDOW, 20.0)
    for now in (NOW, NOW + 610.5, NOW + 1250.25):
        poll(t, now, listed_at(calls, now))
    saved = t.schedule.state()
    assert saved == {
        "audited_until": NOW + 1250.25 - WINDOW + 600,
        "read_at": NOW + 1250.25,
        "last_audit": NOW + 1250.25,
    }

    again = Tally(settings(600.0), t.ledger, t.store, now=NOW + 1300)  # a restart: a new tally over the restored state
    again.schedule.resume(saved)
    assert again.schedule.next_audit == t.schedule.next_audit == NOW + 1850.25
    assert audit_due(again, NOW + 1850) is None
    audit, horizon = poll(again, NOW + 1900, listed_at(calls, NOW + 1900))
    assert audit.start == saved["audited_until"] and horizon == audit.start < NOW + 1900 - WINDOW


def test_a_reload_carries_the_audit_schedule_over():
    t = tally(baseline=NOW - 10 * WINDOW, audit_interval=600.0)
    calls = history(NOW - WINDOW, NOW + WINDOW, 20.0)
    for now in (NOW, NOW + 610.5):
        poll(t, now, listed_at(calls, now))
    reloaded = tally(baseline=NOW - 10 * WINDOW, audit_interval=600.0)
    reloaded.adopt(t, (), (), True, {}, 50)
    assert reloaded.schedule.state() == t.schedule.state() and reloaded.schedule.next_audit == t.schedule.next_audit
    assert audit_due(reloaded, NOW + 1300).start == t.schedule.audited_until


def test_after_reads_stopped_longer_than_the_settle_window_the_audit_skips_to_it_and_says_so(caplog):
    """Calls created while nothing was read were never counted: auditing them would report each
    as missing. The window starts at the settle window; the span skipped is counted and logged once."""
    t = tally(baseline=NOW - 10 * WINDOW, audit_interval=600.0)
    calls = history(NOW - WINDOW, NOW + 4 * WINDOW, 20.0)
    poll(t, NOW + 600, listed_at(calls, NOW + 600))
    until = t.schedule.audited_until
    down = NOW + 600 + WINDOW + 900  # the exporter was down (or every read failed) for longer than the window
    with caplog.at_level(logging.WARNING, logger="exporter.tally"):
        audit, horizon = poll(t, down, listed_at(calls, down))
        # This read is the first to list the calls past the settle window: none can be missing
        # yet, so the window is empty, and the next one audits them.
        assert audit.start == audit.end == horizon == down - WINDOW
        later, _ = poll(t, down + 700, listed_at(calls, down + 700))
    assert (later.start, later.end) == (down - WINDOW, down + 700 - WINDOW + 600) and later.checked == 65
    assert t.store.counters[SKIPPED][()] == down - WINDOW - until
    skipped = [r for r in caplog.records if r.getMessage() == "audit skipped calls never to be audited"]
    assert [(r.__dict__["from"], r.to) for r in skipped] == [(until, down - WINDOW)]
    assert sum(t.store.counters[MISMATCHES].values()) == 0


def test_an_audit_backlog_is_read_back_at_most_two_settle_windows():
    """Audits that stalled while reads went on (an idle org answering 304) resume without reading
    days of history: what lies past two settle windows is skipped."""
    t = tally(baseline=NOW - 10 * WINDOW, audit_interval=600.0)
    calls = history(NOW - WINDOW, NOW + 6 * WINDOW, 60.0)
    poll(t, NOW + 600, listed_at(calls, NOW + 600))
    until = t.schedule.audited_until
    for now in range(int(NOW + 660), int(NOW + 5 * WINDOW), 600):
        read_all(t, now, listed_at(calls, now))  # reads without the audit (a 304 concludes none)
    now = NOW + 5 * WINDOW
    assert t.plan(now, {}, batch=10).horizon == now - 2 * WINDOW == audit_due(t, now).start
    assert t.schedule.keep_from(now) == now - 2 * WINDOW > until
    poll(t, now, listed_at(calls, now))
    assert t.store.counters[SKIPPED][()] == now - 2 * WINDOW - until


def test_the_health_summary_holds_the_status_and_what_the_ledger_says():
    t = tally()
    read_all(
        t,
        NOW,
        [
            call("r", "ringing", NOW - 30, NOW - 20),
            call("w", "completed", NOW - 60, NOW - 50, webhook_status="pending"),
        ],
    )
    status = Status(up=True, ready=True, last_success=NOW)
    health = summarise(t, t.sweep(NOW), status)
    status.up = False  # the published health is a copy: later changes do not reach it
    assert health.status.up and health.tracked == 2 and health.watermark == NOW - 20
    assert health.active == {("outbound", "ringing"): 1} and health.webhooks_pending == 1
