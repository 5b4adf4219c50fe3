"""Accounting events → a store's counters and histograms: `Store.count`, and a list read's counting.

`count_each` (Store.count) counts a few events one by one: a refresh by id, a replay's version,
an expiry. A `Counting` counts events into one store at one `now`. What an event moves depends on its labels
only: the label values it is exported with (capped, `none`, `other`), the series they name, each
noted as changed for the next save and, while Prometheus has not read it, given its birth value
(`Births.touch`). A Counting works that out once per kind of event (a `Plan`: the series found)
and then only adds each event's numbers. A list read counts all its calls through one Counting,
so the lookups run once per kind of event in a read instead of once per event: a first poll of
100 000 calls has a few hundred kinds. Histogram buckets and today's totals move at once; counter
increments are summed per series and each series' exemplar is the latest call's, both written to
the store by `flush`, which must run before anything reads or saves the store (a list read runs it
when it ends, however it ends). After a flush the store is exactly what `count_each` gives (bar the
order in which new exemplar keys were added); tests/test_counting.py holds them to that.

A plan holds while nothing but counting changes the store's bookkeeping: the plans are flushed and
start afresh when a save has taken the changed series (`Store.take_changed`) or the time of label
use moves (`LabelUse.at`); one whose labels had a value folded into `other` is not kept (each fold
counts); and a read ends before the publish that may hide a series (visibility.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import NamedTuple

from .accounting import Billed, Created, Deviation, Ended, Event, ExtractionOutcome, WebhookOutcome

CREATED = "callingbox_calls_created_total"
ENDED = "callingbox_calls_ended_total"
HANGUPS = "callingbox_call_hangups_total"
ERRORS = "callingbox_call_errors_total"
DURATION = "callingbox_call_duration_seconds"
ANSWER = "callingbox_call_answer_delay_seconds"
SETUP = "callingbox_call_setup_delay_seconds"
BILLED = "callingbox_call_billed_duration_seconds"
DOLLARS = "callingbox_billed_amount_dollars_total"
WEBHOOKS = "callingbox_webhook_deliveries_total"
EXTRACTIONS = "callingbox_result_extractions_total"
DEVIATIONS = "callingbox_exporter_contract_deviations_total"


# A series a plan moves, a plain list (the fastest to update). A counter's: [family dict, labels,
# exemplar key, the sum not added yet, the latest (call, amount, now)]; a histogram's, whose buckets
# move at once: [buckets, labels, family, bounds, the latest (call, value, now) per bucket].
Target = list


class Plan(NamedTuple):
    """What one kind of event moves: counters by 1 or by the event's amount, histograms by its
    values (in the order of `values`), and the key of today's totals it adds to."""

    counters: tuple[Target, ...] = ()
    histograms: tuple[Target | None, ...] = ()  # None: the event has no such value
    today: str | None = None


NONE: dict = {}  # no plans yet
SIMPLE = frozenset({Created, WebhookOutcome, ExtractionOutcome, Deviation})  # events with nothing per call


def kind_of(event: Event) -> tuple:
    """What a plan depends on: every field of the event but its call and its numbers."""
    kind = type(event)
    if kind is Ended:
        return (
            event.direction,
            event.status,
            event.hangup_cause,
            event.error_code,
            event.extra,
            event.hangup,
            event.transition,
            event.duration is None,
            event.answer_delay is None,
            event.setup_delay is None,
        )
    if kind is Billed:
        return (event.direction, event.extra, event.billed_seconds is None)
    return event  # SIMPLE: nothing per call


def count_each(store, events: Iterable[Event], now: float | None = None) -> None:
    """`Store.count`: a few events counted one by one, with no plans to set up (a refresh by id, a
    replay's version, an expiry); a list read's many go through a `Counting`, to the same store."""
    if now is not None and now != store.label_use.now:
        store.label_use.at(now)  # label values counted now are in use now
    with_extra = bool(store.extra_labels)
    today = store.today_of(now)

    def add(name: str, labels: tuple[str, ...], amount: int, call: str | None) -> None:
        store.inc(name, labels, amount)
        if call and now is not None:
            store.exemplars[name, labels, -1] = (call, amount, now)

    def hist(name: str, labels: tuple[str, ...], value: float, call: str) -> None:
        index = store.observe(name, labels, value)
        if call and now is not None:
            store.exemplars[name, labels, index] = (call, value, now)

    for event in events:
        kind = type(event)
        if kind is Deviation:  # about the API, not a call series: no metadata labels
            add(DEVIATIONS, (event.kind,), 1, None)
            continue
        x = store.capped_extra(event.extra) if with_extra else ()
        if kind is Created:
            d = event.direction
            add(CREATED, (d,) + x, 1, None)
            if with_extra and (d, x) not in store.zeroed:
                store.zero_series(d, x)  # a new campaign: its terminal series at 0
            if today is not None:
                today["created"] = today.get("created", 0) + 1
        elif kind is Ended:
            d, s, call = event.direction, store.status(event.status), event.call_id
            if event.transition:
                add(ENDED, (d, s) + x, 1, call)
                if today is not None:
                    today[s] = today.get(s, 0) + 1
            if event.hangup:
                add(HANGUPS, (d, s, store.capped("hangup_cause", event.hangup_cause)) + x, 1, call)
            if event.error_code is not None:
                add(ERRORS, (d, store.capped("error_code", event.error_code)) + x, 1, call)
            if event.duration is not None:
                hist(DURATION, (d, s) + x, event.duration, call)
            if event.answer_delay is not None:
                hist(ANSWER, (d,) + x, event.answer_delay, call)
            if event.setup_delay is not None:
                hist(SETUP, (d,) + x, event.setup_delay, call)
        elif kind is Billed:
            d, call = event.direction, event.call_id
            add(DOLLARS, (d,) + x, event.milli_cents, call)
            if event.billed_seconds is not None:
                hist(BILLED, (d,) + x, event.billed_seconds, call)
            if today is not None:
                today["milli_cents"] = today.get("milli_cents", 0) + event.milli_cents
        elif kind is WebhookOutcome:
            add(WEBHOOKS, (event.status,) + x, 1, None)
        elif kind is ExtractionOutcome:
            add(EXTRACTIONS, (event.status,) + x, 1, None)


class Counting:
    """Events counted into one store (a Store) at one `now`; without `now`, no exemplars and no
    today's totals. See the module's docstring for what it keeps and how long that holds."""

    def __init__(self, store, now: float | None = None):
        self.store, self.now = store, now
        self.changed = store.changed  # the set the planned series were added to
        self.stamp = store.label_use.stamp
        self.plans: dict[type, dict[tuple, Plan]] = {}  # kind of event → its plans
        self.today: dict[str, int] | None = None  # the store's totals of today (Store.today_of)
        self.targets: dict[tuple[str, tuple[str, ...]], Target] = {}  # (family, labels) → its target, shared by plans

    def count(self, events: Iterable[Event]) -> None:
        """Add the events to the counters; with `now`, also to today's totals and the exemplars."""
        store, now, plans = self.store, self.now, self.plans
        if now is not None and now != store.label_use.now:
            store.label_use.at(now)  # label values counted now are in use now
        if store.changed is not self.changed or store.label_use.stamp != self.stamp:
            self.flush()
            for kept in plans.values():  # a save took the changed series, or label uses are due again
                kept.clear()
            self.targets.clear()
            self.changed, self.stamp = store.changed, store.label_use.stamp
        today = self.today
        if today is not store.today:  # the first count, or a count at another time began another day
            today = self.today = store.today_of(now)
        for event in events:
            kind = type(event)
            if kind in SIMPLE:  # moves counters by 1, without an exemplar
                plan = plans.get(kind, NONE).get(event) or self._plan(event, event)
                for target in plan.counters:
                    target[3] += 1
                if plan.today is not None and today is not None:
                    today[plan.today] = today.get(plan.today, 0) + 1
                continue
            key = kind_of(event)
            plan = plans.get(kind, NONE).get(key) or self._plan(event, key)
            call = event.call_id if now is not None else None  # the exemplars' call
            if kind is Ended:
                amount, values = 1, (event.duration, event.answer_delay, event.setup_delay)
            else:
                amount, values = event.milli_cents, (event.billed_seconds,)
            for target in plan.counters:
                target[3] += amount
                if call:
                    target[4] = (call, amount, now)
            for target, value in zip(plan.histograms, values):
                if target is not None:
                    counts = target[0]
                    index = bisect_left(target[3], value)
                    counts[index] += 1
                    counts[-1] += value
                    if call:
                        target[4][index] = (call, value, now)
            if plan.today is not None and today is not None:
                today[plan.today] = today.get(plan.today, 0) + amount

    def flush(self) -> None:
        """Write the summed counter increments and the latest exemplars into the store."""
        store = self.store
        changed, exemplars = store.changed, store.exemplars
        for target in self.targets.values():
            if type(target[4]) is list:  # a histogram's: its buckets moved already, its exemplars wait
                latest = target[4]
                for index, exemplar in enumerate(latest):
                    if exemplar is not None:
                        exemplars[target[2], target[1], index] = exemplar
                        latest[index] = None
            elif target[3] or target[4] is not None:
                series, labels = target[0], target[1]
                series[labels] += target[3]
                changed.add((target[2][0], labels))
                if target[4] is not None:
                    exemplars[target[2]] = target[4]
                target[3], target[4] = 0, None

    def _plan(self, event: Event, key: tuple) -> Plan:
        """Label the event (caps counted as they fold), find or start its series (noted as changed,
        touched while unseen); kept for the events of its kind unless a value folded."""
        store = self.store
        folds = store.folds
        kind = type(event)
        if kind is Deviation:  # about the API, not a call series: no metadata labels
            plan = Plan((self._counter(DEVIATIONS, (event.kind,)),))
        else:
            x = store.capped_extra(event.extra) if store.extra_labels else ()
            plan = self._call_plan(event, kind, x)
        if store.folds == folds:
            self.plans.setdefault(kind, {})[key] = plan
        return plan

    def _call_plan(self, event: Event, kind: type, x: tuple[str, ...]) -> Plan:
        store, counter, histogram = self.store, self._counter, self._histogram
        if kind is Ended:
            d, s = event.direction, store.status(event.status)
            counters = []
            if event.transition:
                counters.append(counter(ENDED, (d, s) + x))
            if event.hangup:
                counters.append(counter(HANGUPS, (d, s, store.capped("hangup_cause", event.hangup_cause)) + x))
            if event.error_code is not None:
                counters.append(counter(ERRORS, (d, store.capped("error_code", event.error_code)) + x))
            histograms = (
                None if event.duration is None else histogram(DURATION, (d, s) + x),
                None if event.answer_delay is None else histogram(ANSWER, (d,) + x),
                None if event.setup_delay is None else histogram(SETUP, (d,) + x),
            )
            return Plan(tuple(counters), histograms, s if event.transition else None)
        if kind is Created:
            plan = Plan((counter(CREATED, (event.direction,) + x),), (), "created")
            if store.extra_labels and (event.direction, x) not in store.zeroed:
                store.zero_series(event.direction, x)  # a new campaign: its terminal series at 0
            return plan
        if kind is Billed:
            d = event.direction
            billed = None if event.billed_seconds is None else histogram(BILLED, (d,) + x)
            return Plan((counter(DOLLARS, (d,) + x),), (billed,), "milli_cents")
        if kind is WebhookOutcome:
            return Plan((counter(WEBHOOKS, (event.status,) + x),))
        if kind is ExtractionOutcome:
            return Plan((counter(EXTRACTIONS, (event.status,) + x),))
        return Plan()  # not an accounting event: it counts nothing

    def _counter(self, name: str, labels: tuple[str, ...]) -> Target:
        """A counter series about to move: noted as changed, touched while unseen (born at zero)."""
        target = self.targets.get((name, labels))
        if target is not None:
            return target
        store = self.store
        series = store.counters.get(name)
        if series is None:  # a family with no series yet
            series = store.counters[name] = {}
        value = series.get(labels, 0)
        births = store.births
        if births.hold and labels not in births.visible.get(name, ()):
            births.touch(name, labels, value)
        series[labels] = value
        store.changed.add((name, labels))
        target = self.targets[name, labels] = [series, labels, (name, labels, -1), 0, None]
        return target

    def _histogram(self, name: str, labels: tuple[str, ...]) -> Target:
        """A histogram series about to move, noted and touched as `_counter` does."""
        target = self.targets.get((name, labels))
        if target is not None:
            return target
        store = self.store
        series = store.histograms.setdefault(name, {})
        counts = series.get(labels)
        if counts is None:
            counts = series[labels] = store.empty_histogram(name)
        births = store.births
        if births.hold and labels not in births.visible.get(name, ()):
            births.touch(name, labels, counts)
        store.changed.add((name, labels))
        bounds = store.buckets[name]
        target = self.targets[name, labels] = [counts, labels, name, bounds, [None] * (len(bounds) + 1)]
        return target
