"""What Prometheus may see of a store: series born at zero, and label values gone idle (SPEC §3).

Above the store, which notes here what it counts; `published` makes the copy a snapshot shows.
`Births` knows which series Prometheus has read: any other is shown at its value before its
first increment (0 for a new series, the kept value for a returning one) until a scrape has read
it and `new_series_hold` has passed, so `increase()` sees its first events. `LabelUse` knows
when each capped label value was last counted, so the cap holds only the values active within
`label_idle`. Both are saved in the state file's meta table and come back with the store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .catalogue import CALL_FAMILIES, FAMILIES

Key = tuple[str, tuple[str, ...]]  # (family, labels without org)
GRAIN = 60.0  # last uses are rounded up to the minute: a value's saved time changes at most once a minute
NONE: frozenset = frozenset()


class LabelUse:
    """When each capped label value was last counted, rounded up to the grain."""

    def __init__(self, idle: float = 7 * 86400.0):
        self.idle = idle
        # label → value → last use; None: not known yet (a state saved without it), taken as the next expiry's now
        self.last: dict[str, dict[str, float | None]] = {}
        # label → value → when it went idle (gave up its place); -inf: idle when restored
        self.leaving: dict[str, dict[str, float]] = {}
        self.restored = False  # values found idle at the first expiry after a restore were already gone
        self.now: float | None = None  # the latest time the store was told
        self.stamp: float | None = None  # `now` rounded up to the grain: the use noted now
        self.next_expiry = float("-inf")  # no value can go idle before this

    def configure(self, idle: float) -> None:
        if idle != self.idle:
            self.idle, self.next_expiry = idle, float("-inf")

    def at(self, now: float) -> None:
        grain = min(GRAIN, self.idle / 10)  # a few seconds of label_idle (tests) still expire on time
        self.now, self.stamp = now, math.ceil(now / grain) * grain

    def use(self, label: str, value: str) -> None:
        uses = self.last.get(label)
        if uses is None:
            uses = self.last[label] = {}
        stamp = self.stamp
        if stamp is None:  # no time given yet: the next expiry takes its own
            uses.setdefault(value, None)
        elif (uses.get(value) or 0.0) < stamp:
            uses[value] = stamp

    def admit(self, label: str, value: str) -> None:
        """`value` takes a place (again): it is no longer leaving."""
        leaving = self.leaving.get(label)
        if leaving:
            leaving.pop(value, None)

    def expire(self, seen: dict[str, set[str]], now: float) -> None:
        """Take out of `seen` (the values holding a place) those not counted within `idle`."""
        if now < self.next_expiry:
            return
        self.at(now)
        horizon, soonest = now - self.idle, float("inf")
        gone_at, self.restored = float("-inf") if self.restored else now, False
        for label, values in seen.items():
            uses = self.last.setdefault(label, {})
            for value in list(values):
                last = uses.get(value)
                if last is None:
                    last = uses[value] = self.stamp
                if last < horizon:
                    values.discard(value)
                    self.leaving.setdefault(label, {})[value] = gone_at
                else:
                    soonest = min(soonest, last + self.idle)
        self.next_expiry = min(soonest, now + self.idle)  # a value taken after now is used after now

    def to_json(self) -> dict:
        return {label: dict(uses) for label, uses in self.last.items() if uses}

    def restore(self, saved: object, seen: dict[str, set[str]]) -> None:
        """The saved last uses of the values restored in `seen`; a value without one counts as used now."""
        saved, self.restored = saved if isinstance(saved, dict) else {}, True
        for label, values in seen.items():
            uses = saved.get(label) if isinstance(saved.get(label), dict) else {}
            self.last[label] = {v: _number(uses.get(v)) for v in values}


class Births:
    """Which series Prometheus has read, and what the others are shown at until it has."""

    def __init__(self, hold: float = 0.0):
        self.hold = hold  # 0: no hold, every series is shown at its true value at once
        self.visible: dict[str, set[tuple[str, ...]]] = {}  # family → labels shown at their true value
        self.values: dict[Key, int | float | list] = {}  # birth values of unseen series counted since
        self.born: dict[Key, float] = {}  # when each unseen series was first published
        self.hidden: set[Key] = set()  # the series left out of the last publish (label values gone idle)
        self.read_at: float | None = None  # when the snapshot that the last scrape served was published
        self.unread: dict[Key, float] = {}  # released series → when first shown moving, until a scrape reads it
        self._released: list[Key] = []  # released since the last publish

    def touch(self, name: str, labels: tuple[str, ...], value: int | float | list) -> None:
        """An unseen series is about to move: its value now is what it is shown at until released."""
        key = (name, labels)
        if key not in self.values:
            self.values[key] = list(value) if type(value) is list else value

    def hide(self, name: str, labels: tuple[str, ...]) -> None:
        """The series leaves /metrics: if it comes back, it is born again (its birth value, if any, kept)."""
        visible = self.visible.get(name)
        if visible is not None:
            visible.discard(labels)
        self.born.pop((name, labels), None)
        self.hidden.add((name, labels))

    def release(self, now: float, read_at: float | None) -> None:
        """Series a scrape has read (`read_at`: when the snapshot it served was published) and the
        hold has passed for are shown at their true value from the next publish. The poller runs
        this before the save, so the state never holds back a series already shown moving: a
        restart would show it going down, a counter reset."""
        visible, born, values = self.visible, self.born, self.values
        if read_at is not None:
            self.read_at = read_at
            self.unread = {key: shown for key, shown in self.unread.items() if not self.seen(shown, now)}
        released = [key for key, first in born.items() if self.seen(first, now)]
        for key in released:
            del born[key]
            if values.pop(key, None) is not None:
                self._released.append(key)
            visible.setdefault(key[0], set()).add(key[1])

    def seen(self, since: float, now: float) -> bool:
        """Whether what was published at `since` has been read, and long enough ago for every
        scraper to have read it too (the hold is longer than their scrape interval)."""
        read_at = self.read_at
        return since == float("-inf") or (read_at is not None and read_at >= since and now - since >= self.hold)

    def held(self, key: Key) -> bool:
        """Whether Prometheus may not have read all the series has counted: it must stay on /metrics."""
        return key in self.values or key in self.unread or key in self._released

    def show(self, store, now: float) -> None:
        """Show each unseen series of `store` (a copy about to be published) at its birth value,
        noting when it is first published; with no hold, every series is visible at once."""
        hold, visible, born, values = self.hold, self.visible, self.born, self.values
        self.unread.update((key, now) for key in self._released)
        self._released = []
        exemplars = store.exemplars
        for families in (store.counters, store.histograms):
            for name, series in families.items():
                for labels in series.keys() - visible.get(name, NONE):
                    key = (name, labels)
                    if hold <= 0:
                        values.pop(key, None)
                        born.pop(key, None)
                        visible.setdefault(name, set()).add(labels)
                        continue
                    born.setdefault(key, now)
                    value = values.get(key)
                    if value is not None:
                        series[labels] = list(value) if type(value) is list else value
                        for index in range(-1, len(value) if type(value) is list else 0):
                            exemplars.pop((name, labels, index), None)  # it names a call not shown yet

    def unseen(self, store) -> Iterable[tuple[Key, int | float | list]]:
        """The series of `store` not read yet (bar hidden ones), each with the value it is shown at."""
        for families in (store.counters, store.histograms):
            for name, series in families.items():
                for labels in series.keys() - self.visible.get(name, NONE):
                    key = (name, labels)
                    if key not in self.hidden:
                        yield key, self.values.get(key, series[labels])

    def to_json(self, store) -> list:
        """[family, labels, birth value] of each series to hold again after a restart. A hidden
        series with a birth value keeps it; with the hold off there is nothing to keep."""
        if self.hold <= 0:
            return []
        kept = dict(self.unseen(store))
        kept.update((key, value) for key, value in self.values.items() if key not in kept)
        return [[name, list(labels), value] for (name, labels), value in kept.items()]

    def restore(self, saved: object, store) -> None:
        """Hold again the series saved unseen (`to_json`), at their birth values; the store's other
        restored series are visible (`visible` is filled as they are loaded)."""
        for row in saved if isinstance(saved, list) else ():
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[1], list)):
                continue
            name, labels, value = row[0], tuple(row[1]), row[2]
            held = store.counters.get(name, store.histograms.get(name, {})).get(labels)
            fits = (_number(value) is not None and _number(held) is not None) or (
                type(value) is list and type(held) is list and len(value) == len(held)
            )
            if fits:
                self.visible.get(name, set()).discard(labels)
                self.values[name, labels] = value


def published(store, now: float):
    """The copy of `store` (a Store) that a snapshot published at `now` shows. The series of idle
    label values are left out; a series not read yet shows its birth value until it is released
    (`Births.release`: a scrape has read it and the hold has passed), then its true value."""
    store.label_use.expire(store.seen, now)
    clone = store.copy()
    births = store.births
    births.hidden = set()
    for label, leaving in store.label_use.leaving.items():
        # An idle value leaves once a scrape has read a snapshot published since it went idle,
        # and the hold has passed: those showed its last counts (bar held series, which stay
        # until their moving values are read so too).
        idle = {value for value, since in leaving.items() if births.seen(since, now)}
        if idle:
            _hide(store, clone, label, idle)
    births.show(clone, now)
    return clone


def _hide(store, clone, label: str, idle: set[str]) -> None:
    """Leave the series with an idle value of `label` out of `clone`, in every family that carries it."""
    if label in store.extra_labels:
        offset = store.extra_labels.index(label)
        carriers = [(name, len(FAMILIES[name].labels) + offset) for name in CALL_FAMILIES]
    else:
        carriers = [(name, spec.labels.index(label)) for name, spec in FAMILIES.items() if label in spec.labels]
    for name, position in carriers:
        series = (clone.counters if FAMILIES[name].kind == "counter" else clone.histograms).get(name, {})
        for labels in [labels for labels in series if labels[position] in idle]:
            if not store.births.held((name, labels)):
                del series[labels]
                store.births.hide(name, labels)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
