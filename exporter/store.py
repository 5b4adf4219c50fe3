"""The aggregate store of one target: integer counters and histogram buckets, keyed by labels.

Plain dictionary arithmetic: accounting events go in, label caps are applied; the JSON document
it is saved as is document.py's. It also keeps, per series, the id of the latest call counted
(an exemplar, so a panel can link a spike to one real call) and today's totals for the
landing page. `published` is the copy a snapshot shows: series born at zero and label values
gone idle (visibility.py).
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterable, Iterator

from .accounting import Event
from .catalogue import (
    CAPPED_LABELS,
    DEFAULT_BUCKETS,
    EXTRACTIONS,
    FAMILIES,
    OUTCOMES,
    SECONDS_PER_DAY,
    STATUSES,
    TERMINAL_STATUSES,
    initial_series,
)
from .counting import Counting, count_each
from .document import document, restore
from .visibility import Births, LabelUse, published


def label_value(value: str | None) -> str:
    return value if value else "none"


class Store:
    """Counters and histograms of one target, keyed by label values (org excluded)."""

    def __init__(
        self,
        buckets: dict[str, tuple[float, ...]] | None = None,
        label_limit: int = 50,
        extra_labels: tuple[str, ...] = (),
    ):
        self.buckets = {**DEFAULT_BUCKETS, **(buckets or {})}
        self.label_limit = label_limit
        # Metadata label names, appended (in this order) to the labels of CALL_FAMILIES series.
        self.extra_labels = tuple(extra_labels)
        self.none_extra = ("none",) * len(self.extra_labels)
        self.zeroed: set[tuple] = set()  # (direction, extra) whose terminal series exist at 0
        self.counters: dict[str, dict[tuple[str, ...], int | float]] = {}
        # histogram series: per-bucket counts (not cumulative), then the +Inf overflow, then the sum
        self.histograms: dict[str, dict[tuple[str, ...], list[float]]] = {}
        # label → the values holding a place under its cap: those counted within label_use.idle
        self.seen: dict[str, set[str]] = {label: set() for label in (*CAPPED_LABELS, *self.extra_labels)}
        self.label_use = LabelUse()
        self.folds = 0  # values folded into `other` so far: a counting keeps no plan whose labels folded one
        self.births = Births()  # no hold until configure_visibility
        # (family, labels, bucket index or -1 for a counter) → (call_id, value, when counted)
        self.exemplars: dict[tuple[str, tuple[str, ...], int], tuple[str, float, float]] = {}
        # Counted since 00:00 UTC of day `today_day`: created, each terminal status, milli_cents.
        self.today_day: int | None = None
        self.today: dict[str, int] = {}
        for name, labels in initial_series(self.extra_labels):
            if FAMILIES[name].kind == "counter":
                self.counters.setdefault(name, {})[labels] = 0
            else:
                self.histograms.setdefault(name, {})[labels] = self.empty_histogram(name)
        # (family, labels) of the series changed since the last save: the state file writes only
        # these. A new store has never been saved, so all it holds counts as changed.
        self.changed: set[tuple[str, tuple[str, ...]]] = set(self.series())

    def empty_histogram(self, name: str) -> list[float]:
        return [0] * (len(self.buckets[name]) + 1) + [0.0]

    def series(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(family, labels) of every counter and histogram series held."""
        for families in (self.counters, self.histograms):
            for name, series in families.items():
                for labels in series:
                    yield name, labels

    def take_changed(self) -> set[tuple[str, tuple[str, ...]]]:
        """The series changed since the last call of this, for a save; what changes meanwhile is kept."""
        taken, self.changed = self.changed, set()
        return taken

    def inc(self, name: str, labels: tuple[str, ...], amount: int | float = 1) -> None:
        if name not in FAMILIES:  # a misspelt name would otherwise be a silent new series
            raise KeyError(f"unknown metric family {name!r}")
        self._add(name, labels, amount)

    def _add(self, name: str, labels: tuple[str, ...], amount: int | float) -> None:
        """`inc` of a known family: the hot path of `count`, whose names are its own."""
        series = self.counters.get(name)
        if series is None:  # a family with no series yet
            series = self.counters[name] = {}
        value = series.get(labels, 0)
        if self.births.hold and labels not in self.births.visible.get(name, ()):
            self.births.touch(name, labels, value)
        series[labels] = value + amount
        self.changed.add((name, labels))

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> int:
        """Count `value` in its bucket; returns the bucket's index (len(bounds) for +Inf)."""
        if name not in FAMILIES:
            raise KeyError(f"unknown metric family {name!r}")
        series = self.histograms.setdefault(name, {})
        counts = series.get(labels)
        if counts is None:
            counts = series[labels] = self.empty_histogram(name)
        if self.births.hold and labels not in self.births.visible.get(name, ()):
            self.births.touch(name, labels, counts)
        index = bisect.bisect_left(self.buckets[name], value)
        counts[index] += 1
        counts[-1] += value
        self.changed.add((name, labels))
        return index

    def capped(self, label: str, value: str | None) -> str:
        """The label value to export: `none` for null, `other` when the cap has no place for it."""
        value = label_value(value)
        if value in self.seen[label]:  # the common case: placed, and its use already noted at this time
            uses, stamp = self.label_use.last.get(label), self.label_use.stamp
            if uses is not None and stamp is not None and (uses.get(value) or 0.0) >= stamp:
                return value
        if self._placed(label, value):
            return value
        self.folds += 1
        self.inc("callingbox_exporter_label_overflow_total", (label,))
        return "other"

    def status(self, value: str, peek: bool = False) -> str:
        """A status as a label value: the documented ones as they are, others capped (SPEC §3);
        `peek`: for a gauge, without counting a fold."""
        if value in STATUSES:
            return value
        if peek:
            return value if self._placed("status", label_value(value)) else "other"
        return self.capped("status", value)

    def _placed(self, label: str, value: str) -> bool:
        """Whether `value` holds a place under the cap of `label`, or takes a free one (an idle
        value's, if need be); its use is noted."""
        if value == "none" or value == "other":
            return True
        seen = self.seen[label]
        if value not in seen:
            if len(seen) >= self.label_limit and self.label_use.now is not None:
                self.label_use.expire(self.seen, self.label_use.now)
            if len(seen) >= self.label_limit:
                return False
            seen.add(value)
            self.label_use.admit(label, value)
        self.label_use.use(label, value)
        return True

    def capped_extra(self, extra: tuple) -> tuple[str, ...]:
        """Metadata values as label values, each capped like hangup_cause."""
        if not self.extra_labels:
            return ()
        if len(extra) != len(self.extra_labels):  # a call first seen under another metadata_labels config
            extra = (*extra, *(None,) * len(self.extra_labels))[: len(self.extra_labels)]
        return tuple(self.capped(label, value) for label, value in zip(self.extra_labels, extra))

    def peek_extra(self, extra: tuple) -> tuple[str, ...]:
        """Like capped_extra, without counting a fold: for gauges, rendered again at every poll.
        A call in progress keeps its values in use."""
        values = map(label_value, (*extra, *(None,) * len(self.extra_labels)))
        return tuple(v if self._placed(label, v) else "other" for label, v in zip(self.extra_labels, values))

    def configure_visibility(self, hold: float, label_idle: float) -> None:
        """`new_series_hold` and `label_idle` of the target (a reload may change them)."""
        self.births.hold = hold
        self.label_use.configure(label_idle)

    def published(self, now: float) -> Store:
        """The copy a snapshot published at `now` shows (visibility.published)."""
        return published(self, now)

    def zero_series(self, direction: str, x: tuple[str, ...]) -> None:
        """A new campaign (metadata values) gets its terminal series at 0, as the first start does."""
        self.zeroed.add((direction, x))
        zeroed = [("callingbox_calls_ended_total", (direction, s, *x)) for s in TERMINAL_STATUSES]
        zeroed += [("callingbox_webhook_deliveries_total", (s, *x)) for s in OUTCOMES]
        zeroed += [("callingbox_result_extractions_total", (s, *x)) for s in EXTRACTIONS]
        for name, labels in zeroed:
            if labels not in self.counters[name]:
                self.counters[name][labels] = 0
                self.changed.add((name, labels))

    def count(self, events: Iterable[Event], now: float | None = None) -> None:
        """Add the events to the counters; with `now`, also to today's totals and the exemplars."""
        count_each(self, events, now)

    def counting(self, now: float | None) -> Counting:
        """A counting of many events at `now` (a list read's): each series' bookkeeping once, its counts
        summed until `Counting.flush` (counting.py)."""
        return Counting(self, now)

    def today_of(self, now: float | None) -> dict[str, int] | None:
        """Today's totals to add to (a new day starts afresh); None without `now`."""
        if now is None:
            return None
        day = int(now // SECONDS_PER_DAY)
        if day != self.today_day:
            self.today_day, self.today = day, {}
        return self.today

    def today_totals(self, now: float) -> dict[str, int]:
        """What was counted since 00:00 UTC: `created`, each terminal status, `milli_cents`."""
        return dict(self.today) if self.today_day == int(now // SECONDS_PER_DAY) else {}

    def copy(self) -> Store:
        clone = copy.copy(self)
        clone.counters = {name: dict(series) for name, series in self.counters.items()}
        clone.histograms = {name: {k: list(v) for k, v in series.items()} for name, series in self.histograms.items()}
        clone.seen = {label: set(values) for label, values in self.seen.items()}
        clone.exemplars = dict(self.exemplars)
        clone.today = dict(self.today)
        clone.changed = set()  # a snapshot is shown, never saved
        return clone

    def to_json(self) -> dict:
        """The store as the JSON document the state file keeps (document.py)."""
        return document(self)

    @classmethod
    def from_json(
        cls, data: dict, buckets=None, label_limit: int = 50, extra_labels: tuple[str, ...] = ()
    ) -> tuple[Store, list[str]]:
        """Restore a store under today's config; returns it and the histogram names whose buckets
        changed (reset). See document.restore."""
        store = cls(buckets, label_limit, extra_labels)
        return store, restore(store, data)
