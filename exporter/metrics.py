"""The prometheus_client Collector that renders the last published snapshot of every target.

The poller publishes immutable `Snapshot`s (a store copy and the health gauges); `collect`
renders the latest one per target, so every scrape sees one consistent state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as _Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .catalogue import (
    ACTIVE_STATUSES, CALL_FAMILIES, DIRECTIONS, EXEMPLAR_FAMILIES, FAMILIES, MILLI_CENTS_PER_DOLLAR, READ_PATHS,
)
from .store import Store
from .tally import Health


@dataclass(frozen=True)
class Snapshot:
    """What a target published: counts that are on disk, and its health at that moment."""

    store: Store
    health: Health


_NO_ACTIVE_CALLS = {(d, s): 0 for d in DIRECTIONS for s in ACTIVE_STATUSES}


def _relabeling(own: tuple[str, ...], union: tuple[str, ...]):
    """Maps a target's metadata label values (in its own order) onto the union's order."""
    if own == union:
        return lambda values: values
    positions = [own.index(label) if label in own else None for label in union]
    return lambda values: tuple("" if i is None else values[i] for i in positions)


def _exemplar(kept: tuple[str, float, float], scale: int = 1) -> Exemplar:
    call_id, value, when = kept
    return Exemplar({"call_id": call_id}, value / scale if scale != 1 else value, when)


class Collector(_Collector):
    """Renders the latest published snapshot of every target."""

    def __init__(self, version: str, clock=time.time):
        self.version = version
        self.clock = clock
        self.snapshots: dict[str, Snapshot] = {}

    def publish(self, org: str, snapshot: Snapshot) -> None:
        self.snapshots[org] = snapshot  # one reference swap: scrapes see the old or the new whole

    def withdraw(self, org: str) -> None:
        """A target removed by a reload: its series leave the exposition."""
        self.snapshots.pop(org, None)

    def collect(self):
        snapshots = dict(self.snapshots)
        now = self.clock()
        # Metadata label names of all targets; a target without one exports it empty (= absent).
        extra = tuple(dict.fromkeys(label for snap in snapshots.values() for label in snap.store.extra_labels))
        relabel = {org: _relabeling(snap.store.extra_labels, extra) for org, snap in snapshots.items()}
        for name, family in FAMILIES.items():
            call_family = name in CALL_FAMILIES and extra
            label_names = ("org", *family.labels, *(extra if call_family else ()))

            def full(org: str, labels: tuple) -> tuple:
                if not call_family:
                    return (org, *labels)
                width = len(family.labels)
                return (org, *labels[:width], *relabel[org](labels[width:]))

            if family.kind == "counter":
                metric = CounterMetricFamily(name, family.doc, labels=label_names)
                scale = MILLI_CENTS_PER_DOLLAR if name == "callingbox_billed_amount_dollars_total" else 1
                for org, snap in snapshots.items():
                    exemplars = snap.store.exemplars
                    for labels, value in snap.store.counters.get(name, {}).items():
                        exemplar = exemplars.get((name, labels, -1)) if name in EXEMPLAR_FAMILIES else None
                        if exemplar is not None:
                            exemplar = _exemplar(exemplar, scale)
                        metric.add_metric(full(org, labels), value / scale if scale != 1 else value, exemplar=exemplar)
            else:
                metric = HistogramMetricFamily(name, family.doc, labels=label_names)
                with_exemplars = name in EXEMPLAR_FAMILIES
                for org, snap in snapshots.items():
                    bounds, exemplars = snap.store.buckets[name], snap.store.exemplars
                    for labels, counts in snap.store.histograms.get(name, {}).items():
                        cumulative, running = [], 0
                        for index, bound in enumerate((*bounds, "+Inf")):
                            running += counts[index]
                            bucket = (floatToGoString(bound) if index < len(bounds) else bound, running)
                            exemplar = exemplars.get((name, labels, index)) if with_exemplars else None
                            cumulative.append(bucket if exemplar is None else (*bucket, _exemplar(exemplar)))
                        metric.add_metric(full(org, labels), cumulative, sum_value=counts[-1])
            yield metric
        yield from self._gauges(snapshots, now, extra, relabel)

    def _gauges(self, snapshots: dict[str, Snapshot], now: float, extra: tuple[str, ...], relabel: dict):
        def gauge(name, doc, labels=()):
            return GaugeMetricFamily(name, doc, labels=("org", *labels))

        active = gauge("callingbox_calls_active", "Calls now queued, initiated, ringing or in progress.",
                       ("direction", "status", *extra))
        pending = gauge("callingbox_webhooks_pending", "Tracked calls whose webhook delivery is pending.")
        oldest = gauge(
            "callingbox_webhook_pending_oldest_age_seconds",
            "Age of the oldest pending webhook delivery: a dead endpoint shows here two days before failed.",
        )
        up = gauge("callingbox_up", "1 when the last poll of the CallingBox API succeeded.")
        last = gauge("callingbox_exporter_last_success_timestamp_seconds", "When the last poll succeeded.")
        watermark = gauge("callingbox_exporter_watermark_timestamp_seconds", "Newest updated_at processed.")
        tracked = gauge("callingbox_exporter_tracked_calls", "Calls held in the per-call ledger.")
        stragglers = gauge(
            "callingbox_exporter_stragglers", "Tracked calls past the settle window that are not final yet."
        )
        audited = gauge("callingbox_exporter_last_audit_timestamp_seconds", "When the last self-audit completed.")
        backoff = gauge("callingbox_exporter_backoff_seconds",
                        "Seconds the next poll waits beyond poll_interval: failures back off, slow reads slow down.")
        next_poll = gauge("callingbox_exporter_next_poll_timestamp_seconds", "When the next poll of the API starts.")
        depth = gauge("callingbox_exporter_read_depth_seconds",
                      "How far back in created_at the last list read went: the settle window on a full read.")
        full = gauge("callingbox_exporter_last_full_read_timestamp_seconds",
                     "When the list was last read down to the settle window.")
        open_calls = gauge("callingbox_exporter_open_calls",
                           "Tracked calls not final yet, by how they are kept up to date: each list read, or by id.",
                           ("path",))
        for org, snap in snapshots.items():
            h = snap.health
            none = snap.store.none_extra
            zeros = {(d, s, *none): 0 for d, s in _NO_ACTIVE_CALLS}
            for (direction, status, *values), value in ({**zeros, **h.active}).items():
                active.add_metric((org, direction, status, *relabel[org](tuple(values))), value)
            pending.add_metric((org,), h.webhooks_pending)
            age = 0.0 if h.webhook_pending_oldest is None else max(0.0, now - h.webhook_pending_oldest)
            oldest.add_metric((org,), age)
            up.add_metric((org,), 1 if h.status.up else 0)
            last.add_metric((org,), h.status.last_success or 0)
            watermark.add_metric((org,), h.watermark or 0)
            tracked.add_metric((org,), h.tracked)
            stragglers.add_metric((org,), h.stragglers)
            audited.add_metric((org,), h.last_audit or 0)
            backoff.add_metric((org,), h.status.backoff)
            next_poll.add_metric((org,), h.status.next_poll or 0)
            depth.add_metric((org,), h.read_depth)
            full.add_metric((org,), h.last_full_read or 0)
            for path in READ_PATHS:
                open_calls.add_metric((org, path), h.open_calls.get(path, 0))
        yield from (active, pending, oldest, up, last, watermark, tracked, stragglers, audited, backoff, next_poll,
                    depth, full, open_calls)
        info = GaugeMetricFamily("callingbox_exporter_build_info", "The exporter's version.", labels=("version",))
        info.add_metric((self.version,), 1)
        yield info
