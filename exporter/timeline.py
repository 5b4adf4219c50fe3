"""The backfill's series over time, as OpenMetrics text with timestamps: one file per UTC day.

`sample` is called at every step of a replay (replay.Replay) with the store as it stands then; it
keeps only what changed, and each finished day is written out whole: every series at every step,
family by family and series by series, as strict OpenMetrics wants (a file per day keeps memory
to a day's changes). The file ends with `# EOF`; `promtool tsdb create-blocks-from openmetrics`
turns it into TSDB blocks. Born at zero (SPEC §3): a series that appears at a step is written at
0 at the step before, so `increase()` sees its first events. Label values, `le` included, are
written as the live exposition writes them, so the backfilled series are the very same series.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from prometheus_client.utils import floatToGoString

from .catalogue import BILLED_DOLLARS, CALL_FAMILIES, FAMILIES, MILLI_CENTS_PER_DOLLAR
from .store import Store

# The families a backfill writes: those of calls, and of how they were counted. The exporter's own
# health (polls, requests, bytes, audit) has no past: it starts when the exporter does.
WRITTEN = CALL_FAMILIES | {"callingbox_exporter_label_overflow_total", "callingbox_exporter_contract_deviations_total"}
Key = tuple[str, tuple[str, ...]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in pairs)


class _Series:
    __slots__ = ("born", "points", "last")

    def __init__(self, born: int, zero: float | tuple):
        self.born = born  # the step it first appeared at
        self.points: list[tuple[int, float | tuple]] = []  # (step, value) of the steps not written yet
        self.last = zero  # its value before the first of `points`


class Timeline:
    """One target's series at each step, written to `directory` one UTC day per file."""

    def __init__(
        self, directory: str, org: str, labels: dict[str, str], store: Store, written: Callable[[str], None] = None
    ):
        self.directory, self.written = directory, written  # `written(path)`: a file is complete
        os.makedirs(directory, exist_ok=True)
        self.own = [("org", org), *labels.items()]  # the labels a scrape of the target attaches
        self.extra_labels, self.buckets = store.extra_labels, store.buckets
        self.times: list[float] = []  # the time of every step
        self.series: dict[Key, _Series] = {}
        self.written_from = 0  # the first step not written yet
        self.files: list[str] = []
        self.samples = 0

    def sample(self, at: float, store: Store) -> None:
        """Note the series as they stand at step time `at` (ascending)."""
        step = len(self.times)
        new_day = bool(self.times) and _day(at) != _day(self.times[-1])
        self.times.append(at)
        for name, labels in store.take_changed():
            if name not in WRITTEN:
                continue
            if FAMILIES[name].kind == "counter":
                value, zero = store.counters[name][labels], 0
            else:
                value = tuple(store.histograms[name][labels])
                zero = (0,) * len(value)
            series = self.series.get((name, labels))
            if series is None:
                series = self.series[name, labels] = _Series(step, zero)
            series.points.append((step, value))
        if new_day:  # the day before is complete, and the series born now get their 0 in it
            self._write(self.written_from, step, born_before=step)

    def close(self) -> list[str]:
        """Write the last day; returns every file written, oldest first."""
        if self.written_from < len(self.times):
            self._write(self.written_from, len(self.times), born_before=len(self.times))
        return self.files

    def _write(self, first: int, end: int, born_before: int) -> None:
        """Write steps [first, end) of every series born before step `born_before` (one born at
        `end` gets its 0 at `end - 1` here, the day it belongs to)."""
        times = {step: f"{self.times[step]:.3f}".rstrip("0").rstrip(".") for step in range(max(0, first - 1), end)}
        path = os.path.join(self.directory, time.strftime("%Y-%m-%d", time.gmtime(self.times[first])) + ".om")
        by_family: dict[str, list[tuple[tuple[str, ...], _Series]]] = {}
        for (name, labels), series in self.series.items():
            if series.born <= born_before:
                by_family.setdefault(name, []).append((labels, series))
        with open(path + ".part", "w", encoding="utf-8") as out:
            for name in sorted(by_family):
                family = FAMILIES[name]
                base = name[: -len("_total")] if family.kind == "counter" else name
                out.write(f"# TYPE {base} {family.kind}\n# HELP {base} {family.doc}\n")
                names = (*family.labels, *self.extra_labels)
                for labels, series in sorted(by_family[name]):
                    pairs = [*self.own, *zip(names, labels)]
                    lines = self._lines(name, family.kind, _labels(pairs), series, first, end, times)
                    out.writelines(lines)
            out.write("# EOF\n")
        os.replace(path + ".part", path)
        self.files.append(path)
        if self.written is not None:
            self.written(path)
        self.written_from = end

    def _lines(self, name: str, kind: str, labels: str, series: _Series, first: int, end: int, times: dict[int, str]):
        """The samples of one series at steps [first, end), from the step before its birth on;
        its points before `end` are let go."""
        start = max(first, series.born - 1) if series.born else first
        points, value, i = series.points, series.last, 0
        scale = MILLI_CENTS_PER_DOLLAR if name == BILLED_DOLLARS else 1
        if kind == "histogram":
            les = [*map(floatToGoString, self.buckets[name]), "+Inf"]
            prefixes = [f'{name}_bucket{{{labels},le="{le}"}} ' for le in les]
            count, total = f"{name}_count{{{labels}}} ", f"{name}_sum{{{labels}}} "
        else:
            prefix = f"{name}{{{labels}}} "
        for step in range(start, end):
            while i < len(points) and points[i][0] <= step:
                value = points[i][1]
                i += 1
            at = times[step]
            if kind == "counter":
                yield f"{prefix}{_number(value / scale if scale != 1 else value)} {at}\n"
                self.samples += 1
                continue
            running = 0
            for index, bucket in enumerate(prefixes):
                running += value[index]
                yield f"{bucket}{running} {at}\n"
            yield f"{count}{running} {at}\n{total}{_number(value[-1])} {at}\n"
            self.samples += len(prefixes) + 2
        series.last = value
        del points[:i]


def _number(value: float) -> str:
    return str(value) if type(value) is int else floatToGoString(value)


def _day(at: float) -> int:
    return int(at // 86400)
