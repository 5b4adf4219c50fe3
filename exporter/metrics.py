"""The metric families of one target's published snapshot, and the Collector that renders them live.

The poller publishes immutable `Snapshot`s (a store copy and the health gauges). Each family is
built one target at a time (`family` + `add_target`): the live `collect` here (--once, `name[]`,
the reference in tests) and the pages rendered at publish (exposition.py) share that one
definition of every series.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector as _Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .catalogue import (
    ACTIVE_STATUSES, CALL_FAMILIES, DIRECTIONS, EXEMPLAR_FAMILIES, FAMILIES, MILLI_CENTS_PER_DOLLAR, READ_PATHS,
)
from .store import Store
from .health import Health, Snapshot


ACTIVE = "callingbox_calls_active"
PENDING_AGE = "callingbox_webhook_pending_oldest_age_seconds"  # moves with the clock, not with a publish
BUILD_INFO = "callingbox_exporter_build_info"


def _or_zero(value: float | None) -> float:
    return value or 0


# The health gauges, in the order they are rendered: family → (help, labels without org, values by labels).
GAUGES: dict[str, tuple[str, tuple[str, ...], Callable[[Health], dict]]] = {
    ACTIVE: ("Calls now queued, initiated, ringing or in progress.", ("direction", "status"),
             lambda h: h.active),  # add_target adds the zeros and the metadata labels
    "callingbox_webhooks_pending": ("Tracked calls whose webhook delivery is pending.", (),
                                    lambda h: {(): h.webhooks_pending}),
    "callingbox_up": ("1 when the last poll of the CallingBox API succeeded.", (),
                      lambda h: {(): 1 if h.status.up else 0}),
    "callingbox_daily_budget_dollars": (  # for the alert that compares today's spend with it
        "The org's daily spend budget in US dollars (config daily_budget_dollars); only for targets that set it.",
        (), lambda h: {} if h.daily_budget_dollars is None else {(): h.daily_budget_dollars}),
    "callingbox_exporter_last_success_timestamp_seconds": ("When the last poll succeeded.", (),
                                                           lambda h: {(): _or_zero(h.status.last_success)}),
    "callingbox_exporter_watermark_timestamp_seconds": ("Newest updated_at processed.", (),
                                                        lambda h: {(): _or_zero(h.watermark)}),
    "callingbox_exporter_tracked_calls": ("Calls held in the per-call ledger.", (), lambda h: {(): h.tracked}),
    "callingbox_exporter_stragglers": ("Tracked calls past the settle window that are not final yet.", (),
                                       lambda h: {(): h.stragglers}),
    "callingbox_exporter_last_audit_timestamp_seconds": ("When the last self-audit completed.", (),
                                                         lambda h: {(): _or_zero(h.last_audit)}),
    "callingbox_exporter_audited_until_timestamp_seconds": (
        "Self-audit: created_at up to which every call has been audited, window after window (0 before the first).",
        (), lambda h: {(): _or_zero(h.audited_until)}),
    "callingbox_exporter_backoff_seconds": (
        "Seconds the next poll waits beyond poll_interval: failures back off, slow reads slow down.", (),
        lambda h: {(): h.status.backoff}),
    "callingbox_exporter_next_poll_timestamp_seconds": ("When the next poll of the API starts.", (),
                                                        lambda h: {(): _or_zero(h.status.next_poll)}),
    "callingbox_exporter_read_depth_seconds": (
        "How far back in created_at the last list read went: the settle window on a full read.", (),
        lambda h: {(): h.read_depth}),
    "callingbox_exporter_last_full_read_timestamp_seconds": ("When the list was last read down to the settle window.",
                                                             (), lambda h: {(): _or_zero(h.last_full_read)}),
    "callingbox_exporter_open_calls": (
        "Tracked calls not final yet, by how they are kept up to date: each list read, or by id.", ("path",),
        lambda h: {(path,): h.open_calls.get(path, 0) for path in READ_PATHS}),
}
PENDING_AGE_HELP = "Age of the oldest pending webhook delivery: a dead endpoint shows here two days before failed."
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
    doc, labels = (PENDING_AGE_HELP, ()) if name == PENDING_AGE else GAUGES[name][:2]
    return GaugeMetricFamily(name, doc, labels=("org", *labels, *own))


def build_info(version: str) -> Metric:
    info = GaugeMetricFamily(BUILD_INFO, "The exporter's version.", labels=("version",))
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
        for labels, value in GAUGES[name][2](snapshot.health).items():
            metric.add_metric((org, *labels), value)


def _add_counts(metric: Metric, name: str, org: str, store: Store, relabel) -> None:
    width = len(FAMILIES[name].labels)

    def full(labels: tuple) -> tuple:
        return (org, *labels) if relabel is None else (org, *labels[:width], *relabel(labels[width:]))

    exemplars = store.exemplars if name in EXEMPLAR_FAMILIES else {}
    if FAMILIES[name].kind == "counter":
        scale = MILLI_CENTS_PER_DOLLAR if name == "callingbox_billed_amount_dollars_total" else 1
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


class Collector(_Collector):
    """Holds the latest published snapshot of every target and renders them all at each collect."""

    def __init__(self, version: str, clock=time.time):
        self.version = version
        self.clock = clock
        self.snapshots: dict[str, Snapshot] = {}
        self._read: Mapping[str, Snapshot] = {}  # the snapshots the last whole scrape served

    async def publish(self, org: str, snapshot: Snapshot) -> None:
        """A coroutine so that a subclass (exposition.Exposition) can render its pages here."""
        self.snapshots[org] = snapshot  # one reference swap: scrapes see the old or the new whole

    def withdraw(self, org: str) -> None:
        """A target removed by a reload: its series leave the exposition."""
        self.snapshots.pop(org, None)

    def read(self, snapshots: Mapping[str, Snapshot]) -> None:
        """A scrape served the whole of `snapshots` (not a `name[]` part): new series it showed may
        move on once their hold has passed (born at zero, SPEC §3)."""
        self._read = snapshots

    def read_at(self, org: str) -> float | None:
        """When the snapshot of `org` that the last scrape served was published; None: none yet."""
        snapshot = self._read.get(org)
        return None if snapshot is None else snapshot.published_at

    def collect(self):
        snapshots = dict(self.snapshots)
        now = self.clock()
        extra = metadata_labels(snapshots.values())
        for name in TARGET_FAMILIES:
            if name == PENDING_AGE:
                yield build_info(self.version)
            metric = family(name, extra)
            for org, snap in snapshots.items():
                add_target(metric, name, org, snap, extra, now)
            yield metric
