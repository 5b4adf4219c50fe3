"""counting.py: a list read's counting (plans per kind of event, counter sums flushed at the end)
and Store.count (count_each) give exactly the store that counting each call's events one by one gives.

The reference is the per-event counting as it was before plans (a copy, below), fed the same
events: the same records go through the same gate (decode, ledger), and only the counting differs.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random

import msgspec
import pytest

from exporter.accounting import Billed, Created, Deviation, Ended, ExtractionOutcome, WebhookOutcome
from exporter.catalogue import SECONDS_PER_DAY
from exporter.ledger import Ledger
from exporter.plan import Plan
from exporter.records import fields_type
from exporter.settings import Settings
from exporter.simulator import format_ts
from exporter.store import Store
from exporter.tally import Tally

NOW = 1_700_000_000.0
BASELINE = NOW - 3000.0
CAUSES = ("normal_clearing", "busy", "no_route", "rejected", "timeout", "", None)
CODES = (None, None, None, "E1", "E2", "E3", "E4", "")
STATUSES = ("queued", "ringing", "in_progress", "completed", "failed", "busy", "no_answer", "voicemail", "dialing")
CAMPAIGNS = ("spring", "summer", "autumn", "winter", None, "")


def reference_count(store: Store, events, now: float | None = None) -> None:
    """Store.count as it was before counting.py: each event on its own, through the store's helpers."""
    if now is not None and now != store.label_use.now:
        store.label_use.at(now)
    with_extra = bool(store.extra_labels)
    today = store.today_of(now)

    def add(name, labels, amount, call):
        store.inc(name, labels, amount)
        if call and now is not None:
            store.exemplars[name, labels, -1] = (call, amount, now)

    def hist(name, labels, value, call):
        index = store.observe(name, labels, value)
        if call and now is not None:
            store.exemplars[name, labels, index] = (call, value, now)

    for event in events:
        kind = type(event)
        if kind is Deviation:
            store.inc("callingbox_exporter_contract_deviations_total", (event.kind,))
            continue
        x = store.capped_extra(event.extra) if with_extra else ()
        if kind is Created:
            d = event.direction
            add("callingbox_calls_created_total", (d, *x), 1, None)
            if with_extra and (d, x) not in store.zeroed:
                store.zero_series(d, x)
            if today is not None:
                today["created"] = today.get("created", 0) + 1
        elif kind is Ended:
            d, s, call = event.direction, store.status(event.status), event.call_id
            if event.transition:
                add("callingbox_calls_ended_total", (d, s, *x), 1, call)
                if today is not None:
                    today[s] = today.get(s, 0) + 1
            if event.hangup:
                cause = store.capped("hangup_cause", event.hangup_cause)
                add("callingbox_call_hangups_total", (d, s, cause, *x), 1, call)
            if event.error_code is not None:
                code = store.capped("error_code", event.error_code)
                add("callingbox_call_errors_total", (d, code, *x), 1, call)
            if event.duration is not None:
                hist("callingbox_call_duration_seconds", (d, s, *x), event.duration, call)
            if event.answer_delay is not None:
                hist("callingbox_call_answer_delay_seconds", (d, *x), event.answer_delay, call)
            if event.setup_delay is not None:
                hist("callingbox_call_setup_delay_seconds", (d, *x), event.setup_delay, call)
        elif kind is Billed:
            d, call = event.direction, event.call_id
            add("callingbox_billed_amount_dollars_total", (d, *x), event.milli_cents, call)
            if event.billed_seconds is not None:
                hist("callingbox_call_billed_duration_seconds", (d, *x), event.billed_seconds, call)
            if today is not None:
                today["milli_cents"] = today.get("milli_cents", 0) + event.milli_cents
        elif kind is WebhookOutcome:
            store.inc("callingbox_webhook_deliveries_total", (event.status, *x))
        elif kind is ExtractionOutcome:
            store.inc("callingbox_result_extractions_total", (event.status, *x))


class ReferenceCounting:
    """Stands in for a list read's Counting: every call's events counted at once, one by one."""

    def __init__(self, store: Store, now: float):
        self.store, self.now = store, now

    def count(self, events) -> None:
        reference_count(self.store, events, self.now)

    def flush(self) -> None:
        pass


def state_of(t: Tally) -> dict:
    """Everything the counting may touch, to compare two tallies."""
    s = t.store
    return {
        "counters": s.counters,
        "histograms": s.histograms,
        "exemplars": s.exemplars,
        "changed": s.changed,
        "births": s.births.values,
        "seen": s.seen,
        "uses": s.label_use.last,
        "leaving": s.label_use.leaving,
        "today": (s.today_day, s.today),
        "folds": s.folds,
        "zeroed": s.zeroed,
        "calls": t.ledger.calls,
        "open": t.ledger.open,
    }


def random_calls(rng: random.Random, count: int, now: float) -> list[dict]:
    """Versions of a few dozen calls: new, updated, repeated, tied, late details, caps, bad ones."""
    objects = []
    for _ in range(count):
        n = rng.randrange(60)
        created = BASELINE + rng.choice((-500.0, 100.0, 200.0, 300.0)) + n
        updated = created + rng.choice((10.0, 20.0, 20.0, 40.0))
        status = rng.choice(STATUSES)
        terminal = status not in ("queued", "ringing", "in_progress", "dialing")
        started = created + rng.choice((1.0, 2.5)) if rng.random() < 0.8 else None
        obj = {
            "id": f"call-{n}",
            "status": status,
            "direction": rng.choice(("outbound", "inbound", "sideways", None)),
            "created_at": format_ts(created),
            "updated_at": format_ts(updated),
            "started_at": format_ts(started) if started else None,
            "answered_at": format_ts(started + 3.0) if started and rng.random() < 0.7 else None,
            "ended_at": format_ts(updated - rng.choice((0.0, 5.0, 3200.0))) if terminal else None,
            "duration_seconds": rng.choice((None, 0, 7, 65, 4000)) if terminal else None,
            "billed_duration_seconds": rng.choice((None, 60, 120)),
            "billing_amount_milli_cents": rng.choice((None, 0, 1550, 99_999)),
            "reservation_status": rng.choice(("reserved", "settled", "released", "odd", None)),
            "webhook_status": rng.choice((None, "pending", "delivered", "failed", "weird")),
            "webhook_url": rng.choice(("https://hooks.example/cb", "", None)),
            "result_status": rng.choice((None, "pending", "completed", "failed")),
            "returns": rng.choice(({"ok": "boolean"}, {}, None)),
            "hangup_cause": rng.choice(CAUSES) if terminal else None,
            "error_code": rng.choice(CODES) if terminal else None,
            "metadata": {"campaign": rng.choice(CAMPAIGNS), "tier": rng.choice(("gold", 3, None))},
        }
        if rng.random() < 0.05:
            obj["created_at"] = "yesterday"  # malformed: skipped and counted as invalid
        if rng.random() < 0.03:
            obj["duration_seconds"] = -4
        objects.append(obj)
    objects.sort(key=lambda o: o["created_at"], reverse=True)  # newest first, as the list is
    return objects


def decoded(objects: list[dict], metadata: bool) -> list:
    """As the API client hands them over: the fast struct where it decodes, the plain value otherwise."""
    decoder = msgspec.json.Decoder(fields_type(metadata))
    batch = []
    for obj in objects:
        try:
            batch.append(decoder.decode(json.dumps(obj).encode()))
        except msgspec.ValidationError:
            batch.append(obj)
    return batch


class EachCounting(ReferenceCounting):
    """Every call's events through `Store.count` (counting.count_each), as a refresh by id counts."""

    def count(self, events) -> None:
        self.store.count(events, self.now)


def tally_pair(hold: float, metadata: bool, label_limit: int) -> tuple[Tally, Tally]:
    keys = ("campaign", "tier") if metadata else ()
    settings = Settings(86400.0, 120.0, 7 * 86400.0, metadata_keys=keys)

    def one() -> Tally:
        store = Store(label_limit=label_limit, extra_labels=keys)
        store.configure_visibility(hold, 3600.0)
        return Tally(settings, Ledger(BASELINE), store, now=NOW)

    return one(), one()


def list_read(t: Tally, now: float, objects: list, reference: bool | type = False) -> None:
    read = t.list_read(now, Plan(now - 86400.0, True, [], {}))
    if reference:
        read.counting = (ReferenceCounting if reference is True else reference)(t.store, now)
    for obj in objects:
        if not read.take(obj):
            break
    t.settle_read(read.result())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("hold", "metadata", "label_limit"), [(0.0, False, 50), (60.0, False, 2), (60.0, True, 3)])
def test_a_read_counts_exactly_what_counting_each_call_at_once_gives(seed, hold, metadata, label_limit):
    rng = random.Random(seed)
    planned, reference = tally_pair(hold, metadata, label_limit)
    each = tally_pair(hold, metadata, label_limit)[0]
    if seed % 2:  # some series read by a scrape already: no birth value for them
        for store in (planned.store, reference.store, each.store):
            store.births.visible["callingbox_calls_ended_total"] = {("outbound", "completed")}
    for poll in range(4):
        now = NOW + 30.0 * poll + (3700.0 if poll == 3 else 0.0)  # the last after label values went idle
        objects = decoded(random_calls(rng, 150, now), metadata)
        for t, by_reference in ((planned, False), (reference, True), (each, EachCounting)):
            list_read(t, now, objects, by_reference)
        assert state_of(planned) == state_of(reference), f"poll {poll}"
        assert state_of(each) == state_of(reference), f"poll {poll}: Store.count"
        if poll == 1:  # a save between two reads: each read notes what it changes afresh
            assert planned.store.take_changed() == reference.store.take_changed() == each.store.take_changed()
            assert planned.ledger.take_changed() == reference.ledger.take_changed() == each.ledger.take_changed()


class Broken(Exception):
    pass


async def failing_body(batches: list[list]):
    for batch in batches:
        yield batch
    raise Broken("connection reset")


async def nothing() -> None:
    pass


@pytest.mark.parametrize("seed", range(3))
def test_a_read_that_fails_midway_keeps_exactly_what_it_counted_before(seed):
    rng = random.Random(100 + seed)
    planned, reference = tally_pair(60.0, False, 3)
    objects = decoded(random_calls(rng, 200, NOW), False)
    batches = [objects[i : i + 40] for i in range(0, 120, 40)]  # then the body breaks off
    read = planned.list_read(NOW, Plan(NOW - 86400.0, True, [], {}))
    with pytest.raises(Broken):
        asyncio.run(read.drain(failing_body(batches), nothing))
    list_read(reference, NOW, [obj for batch in batches for obj in batch], reference=True)
    for t in (planned, reference):
        t.ledger.watermark = None  # the failed read settled nothing; the reference's did
    assert state_of(planned) == state_of(reference)


def test_a_counting_across_a_save_notes_the_series_it_changes_after_it():
    store, mirror = Store(), Store()
    counting = store.counting(NOW)
    ended = Ended("outbound", "completed", "busy", None, 30, 1.5, 2.0, "a")
    again = ended._replace(call_id="b")
    counting.count([Created("outbound"), ended])
    reference_count(mirror, [Created("outbound"), ended], NOW)
    counting.flush()
    assert store.take_changed() == mirror.take_changed()
    counting.count([again, Billed("outbound", 60, 1550, "b")])
    reference_count(mirror, [again, Billed("outbound", 60, 1550, "b")], NOW)
    counting.flush()
    assert store.take_changed() == mirror.take_changed()
    assert (store.counters, store.histograms, store.exemplars) == (mirror.counters, mirror.histograms, mirror.exemplars)


def test_store_count_leaves_nothing_pending():
    store, mirror = Store(), Store()
    events = [Created("outbound"), Billed("inbound", None, 0, "z"), WebhookOutcome("delivered")]
    store.count(events, NOW)
    reference_count(mirror, events, NOW)
    assert (store.counters, store.exemplars, store.today) == (mirror.counters, mirror.exemplars, mirror.today)
    assert store.today_day == int(NOW // SECONDS_PER_DAY)


def test_a_folded_label_counts_its_overflow_every_time():
    store, mirror = Store(label_limit=1), Store(label_limit=1)
    events = [Ended("outbound", "completed", cause, None, None, None, None, f"c{i}") for i, cause in enumerate("abab")]
    counting = store.counting(NOW)
    for event in events:
        counting.count([event])
        reference_count(mirror, [event], NOW)
    counting.flush()
    overflow = "callingbox_exporter_label_overflow_total"
    assert store.counters[overflow][("hangup_cause",)] == 2 == mirror.counters[overflow][("hangup_cause",)]
    assert store.counters == mirror.counters and store.exemplars == mirror.exemplars
    assert bisect.bisect_left((1, 2), 1.5) == 1  # (the reference's bisect is the store's)
