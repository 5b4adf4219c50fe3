"""Every series a published snapshot shows, defined once, and the Collector that renders them live.

The poller publishes immutable `Snapshot`s (a store copy and the health gauges); the Collector
holds them in one frozen `View`, replaced by reference at each publish. Each family is built one
target at a time from the catalogue's data (`family` + `add_target`): the live `collect` here
(--once, `name[]`, the reference in tests) and the pages rendered at publish (exposition.py)
share that one definition of every series.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector as _Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .catalogue import (
    ACTIVE,
    ACTIVE_STATUSES,
    BILLED_DOLLARS,
    BUILD_INFO,
    BUILD_INFO_DOC,
    CALL_FAMILIES,
    DIRECTIONS,
    EXEMPLAR_FAMILIES,
    FAMILIES,
    GAUGES,
    MILLI_CENTS_PER_DOLLAR,
    PENDING_AGE,
    PENDING_AGE_DOC,
    Gauge,
)
from .health import Health, Snapshot
from .store import Store

# Every family with an org label, in the order of the exposition; the pending age comes last
# because it alone is rendered at each scrape (exposition.py serves the rest as rendered bytes).
TARGET_FAMILIES = (*FAMILIES, *GAUGES, PENDING_AGE)
# Families whose label names include the metadata labels of all targets.
WITH_METADATA = CALL_FAMILIES | {ACTIVE}

_NO_ACTIVE_CALLS = {(d, s): 0 for d in DIRECTIONS for s in ACTIVE_STATUSES}


def metadata_labels(snapshots: Iterable[Snapshot]) -> tuple[str, ...]:
    """Metadata label names of all targets; a target without one exports it empty (= absent)."""
    return tuple(dict.fromkeys(label for snap in snapshots for label in snap.store.extra_labels))


def family(name: str, extra: tuple[str, ...] = ()) -> Metric:
    """Family `name` with no samples yet; `extra` is `metadata_labels` of all targets."""
    own = (*extra,) if name in WITH_METADATA else ()
    if name in FAMILIES:
        spec = FAMILIES[name]
        kind = CounterMetricFamily if spec.kind == "counter" else HistogramMetricFamily
        return kind(name, spec.doc, labels=("org", *spec.labels, *own))
    doc, labels = (PENDING_AGE_DOC, ()) if name == PENDING_AGE else (GAUGES[name].doc, GAUGES[name].labels)
    return GaugeMetricFamily(name, doc, labels=("org", *labels, *own))


def build_info(version: str) -> Metric:
    info = GaugeMetricFamily(BUILD_INFO, BUILD_INFO_DOC, labels=("version",))
    info.add_metric((version,), 1)
    return info


def _relabeling(own: tuple[str, ...], union: tuple[str, ...]):
    """Maps a target's metadata label values (in its own order) onto the union's order."""
    if own == union:
        return lambda values: values
    positions = [own.index(label) if label in own else None for label in union]
    return lambda values: tuple("" if i is None else values[i] for i in positions)


def _exemplar(kept: tuple[str, float, float], scale: int = 1) -> Exemplar:
    call_id, value, when = kept
    return Exemplar({"call_id": call_id}, value / scale if scale != 1 else value, when)


def add_target(metric: Metric, name: str, org: str, snapshot: Snapshot, extra: tuple[str, ...], now: float) -> None:
    """Add one target's samples to `metric`, made by `family(name, extra)`."""
    store, relabel = snapshot.store, _relabeling(snapshot.store.extra_labels, extra)
    if name in FAMILIES:
        _add_counts(metric, name, org, store, relabel if name in CALL_FAMILIES and extra else None)
    elif name == PENDING_AGE:
        oldest = snapshot.health.webhook_pending_oldest
        metric.add_metric((org,), 0.0 if oldest is None else max(0.0, now - oldest))
    elif name == ACTIVE:
        zeros = {(d, s, *store.none_extra): 0 for d, s in _NO_ACTIVE_CALLS}
        for (direction, status, *values), value in ({**zeros, **snapshot.health.active}).items():
            metric.add_metric((org, direction, status, *relabel(tuple(values))), value)
    else:
        for labels, value in gauge_samples(GAUGES[name], snapshot.health).items():
            metric.add_metric((org, *labels), value)


def gauge_samples(gauge: Gauge, health: Health) -> dict[tuple, float]:
    """The samples of a health gauge (not ACTIVE) as the catalogue describes them, by label values."""
    value = health
    for part in gauge.field.split("."):
        value = getattr(value, part)
    if gauge.values:
        return {(label,): value.get(label, 0) for label in gauge.values}
    if value is None:
        return {} if gauge.unset is None else {(): gauge.unset}
    return {(): int(value) if isinstance(value, bool) else value}


def _add_counts(metric: Metric, name: str, org: str, store: Store, relabel) -> None:
    width = len(FAMILIES[name].labels)

    def full(labels: tuple) -> tuple:
        return (org, *labels) if relabel is None else (org, *labels[:width], *relabel(labels[width:]))

    exemplars = store.exemplars if name in EXEMPLAR_FAMILIES else {}
    if FAMILIES[name].kind == "counter":
        scale = MILLI_CENTS_PER_DOLLAR if name == BILLED_DOLLARS else 1
        for labels, value in store.counters.get(name, {}).items():
            exemplar = exemplars.get((name, labels, -1))
            if exemplar is not None:
                exemplar = _exemplar(exemplar, scale)
            metric.add_metric(full(labels), value / scale if scale != 1 else value, exemplar=exemplar)
        return
    bounds = store.buckets[name]
    les = [*map(floatToGoString, bounds), "+Inf"]
    for labels, counts in store.histograms.get(name, {}).items():
        cumulative, running = [], 0
        for index, le in enumerate(les):
            running += counts[index]
            exemplar = exemplars.get((name, labels, index))
            cumulative.append((le, running) if exemplar is None else (le, running, _exemplar(exemplar)))
        metric.add_metric(full(labels), cumulative, sum_value=counts[-1])


@dataclass(frozen=True)
class View:
    """What every endpoint shows, as of one publish: each target's snapshot, read-only. The
    Collector replaces it whole, by reference, so a reader holds one state however long it takes."""

    snapshots: Mapping[str, Snapshot]  # a MappingProxyType that no one else holds the dict of

    @classmethod
    def of(cls, snapshots: Mapping[str, Snapshot]) -> View:
        return cls(MappingProxyType(dict(snapshots)))


class Collector(_Collector):
    """Holds the published `View` of every target and renders it at each collect."""

    def __init__(self, version: str, clock=time.time):
        self.version = version
        self.clock = clock
        self.view: View = View.of({})  # replaced, never changed: what the endpoints read, afresh per request
        self._read: Mapping[str, Snapshot] = {}  # the snapshots the last whole scrape served

    @property
    def snapshots(self) -> Mapping[str, Snapshot]:
        """The published snapshots of every target (read-only)."""
        return self.view.snapshots

    def snapshot(self, org: str) -> Snapshot | None:
        """The snapshot of `org` that the endpoints show; None before its first publish."""
        return self.view.snapshots.get(org)

    async def publish(self, org: str, snapshot: Snapshot) -> None:
        """A coroutine so that a subclass (exposition.Exposition) can render its pages here."""
        self.view = View.of({**self.view.snapshots, org: snapshot})  # scrapes see the old or the new whole

    def withdraw(self, org: str) -> None:
        """A target removed by a reload: its series leave the exposition."""
        if org in self.view.snapshots:
            self.view = replace(
                self.view,
                snapshots=MappingProxyType({name: snap for name, snap in self.view.snapshots.items() if name != org}),
            )

    def read(self, snapshots: Mapping[str, Snapshot]) -> None:
        """A scrape served the whole of `snapshots` (not a `name[]` part): new series it showed may
        move on once their hold has passed (born at zero, SPEC §3)."""
        self._read = snapshots

    def read_at(self, org: str) -> float | None:
        """When the snapshot of `org` that the last scrape served was published; None: none yet."""
        snapshot = self._read.get(org)
        return None if snapshot is None else snapshot.published_at

    def collect(self):
        snapshots = self.view.snapshots
        now = self.clock()
        extra = metadata_labels(snapshots.values())
        for name in TARGET_FAMILIES:
            if name == PENDING_AGE:
                yield build_info(self.version)
            metric = family(name, extra)
            for org, snap in snapshots.items():
                add_target(metric, name, org, snap, extra, now)
            yield metric
