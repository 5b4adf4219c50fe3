"""The aggregate store of counters and histograms, and the collector that renders it.

A `Store` is plain dictionary arithmetic: accounting events go in, label caps are applied,
and it serialises for the state file. It also keeps, per series, the id of the latest call
counted (an exemplar, so a panel can link a spike to one real call) and today's totals for
the landing page. The poller publishes immutable `Snapshot`s; the
`Collector` renders the latest one per target, so every scrape sees one consistent state.
"""

from __future__ import annotations

import bisect
import copy
import time
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as _Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from .accounting import EXTRACTIONS, OUTCOMES, Billed, Created, Ended, Event, ExtractionOutcome, WebhookOutcome
from .records import ACTIVE_STATUSES, DIRECTIONS, INVALID_REASONS, TERMINAL_STATUSES

AUDIT_KINDS = ("missing", "extra", "status", "billing", "webhook", "extraction")

MILLI_CENTS_PER_DOLLAR = 100_000
CAPPED_LABELS = ("hangup_cause", "error_code")

DURATION_BUCKETS = (0, 5, 10, 20, 30, 60, 120, 180, 300, 600, 1200, 1800, 3600)
DELAY_BUCKETS = (0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 45, 60)
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Family(NamedTuple):
    kind: str  # counter | histogram
    labels: tuple[str, ...]  # without org
    doc: str


FAMILIES: dict[str, Family] = {
    "callingbox_calls_created_total": Family("counter", ("direction",), "Calls first observed, by direction."),
    "callingbox_calls_ended_total": Family(
        "counter", ("direction", "status"), "Calls first observed in a terminal status."
    ),
    "callingbox_call_hangups_total": Family(
        "counter", ("direction", "status", "hangup_cause"), "Terminal calls by hangup cause."
    ),
    "callingbox_call_errors_total": Family(
        "counter", ("direction", "error_code"), "Terminal calls with an error code."
    ),
    "callingbox_webhook_deliveries_total": Family(
        "counter", ("status",), "Webhook outcomes observed (delivered, failed); a replay counts again."
    ),
    "callingbox_result_extractions_total": Family(
        "counter", ("status",), "Structured-data extraction outcomes observed (completed, failed)."
    ),
    "callingbox_billed_amount_dollars_total": Family(
        "counter", ("direction",), "Money billed for settled calls, in US dollars."
    ),
    "callingbox_call_duration_seconds": Family(
        "histogram", ("direction", "status"), "duration_seconds of terminal calls."
    ),
    "callingbox_call_answer_delay_seconds": Family(
        "histogram", ("direction",), "Time from ringing to answer (answered_at - started_at)."
    ),
    "callingbox_call_billed_duration_seconds": Family(
        "histogram", ("direction",), "billed_duration_seconds of settled calls."
    ),
    "callingbox_call_setup_delay_seconds": Family(
        "histogram", ("direction",), "Time from creation to ringing (started_at - created_at)."
    ),
    "callingbox_exporter_polls_total": Family("counter", ("result",), "Polls of the CallingBox API by result."),
    "callingbox_exporter_poll_duration_seconds": Family("histogram", (), "Wall time of a poll, fetch to publish."),
    "callingbox_exporter_api_requests_total": Family(
        "counter", ("code",), "Requests to the CallingBox API by HTTP status, or error when none came back."
    ),
    "callingbox_exporter_invalid_records_total": Family(
        "counter", ("reason",), "API records skipped because they could not be read."
    ),
    "callingbox_exporter_label_overflow_total": Family(
        "counter", ("label",), "Label values folded into 'other' by the per-label cap."
    ),
    "callingbox_exporter_vanished_calls_total": Family(
        "counter", (), "Tracked calls that the API no longer knows (404 by id)."
    ),
    "callingbox_exporter_audit_mismatches_total": Family(
        "counter", ("kind",), "Self-audit: calls whose counts disagree with the API (missing, extra, status, ...)."
    ),
    "callingbox_exporter_audit_calls_checked_total": Family(
        "counter", (), "Self-audit: settled calls recounted against the API."
    ),
}

DEFAULT_BUCKETS: dict[str, tuple[float, ...]] = {
    "callingbox_call_duration_seconds": DURATION_BUCKETS,
    "callingbox_call_answer_delay_seconds": DELAY_BUCKETS,
    "callingbox_call_billed_duration_seconds": DURATION_BUCKETS,
    "callingbox_call_setup_delay_seconds": DELAY_BUCKETS,
    "callingbox_exporter_poll_duration_seconds": POLL_BUCKETS,
}


# Families whose series carry the call_id of the latest call counted, as an OpenMetrics exemplar.
EXEMPLAR_FAMILIES = frozenset({
    "callingbox_calls_ended_total",
    "callingbox_call_hangups_total",
    "callingbox_call_errors_total",
    "callingbox_billed_amount_dollars_total",
    "callingbox_call_duration_seconds",
    "callingbox_call_answer_delay_seconds",
    "callingbox_call_billed_duration_seconds",
    "callingbox_call_setup_delay_seconds",
})
SECONDS_PER_DAY = 86_400
# Saved family names of an older version → today's: a state file written before a rename keeps
# its counts (a silent zero would read as a counter reset in Prometheus).
RENAMED = {"callingbox_calls_total": "callingbox_calls_ended_total"}
# Families about calls: their series also carry the target's metadata labels, if configured.
CALL_FAMILIES = frozenset(
    {name for name, family in FAMILIES.items() if "direction" in family.labels}
    | {"callingbox_webhook_deliveries_total", "callingbox_result_extractions_total"}
)


def _initial_series(extra_labels: tuple[str, ...] = ()) -> Iterable[tuple[str, tuple[str, ...]]]:
    """Series known to exist, exported at 0 so the first failure shows in increase()."""
    none_extra = ("none",) * len(extra_labels)
    for name, labels in _base_series():
        yield name, (*labels, *none_extra) if name in CALL_FAMILIES else labels
    # Every label capped by Store.capped: the free-text ones and the metadata labels.
    for label in (*CAPPED_LABELS, *extra_labels):
        yield "callingbox_exporter_label_overflow_total", (label,)


def _base_series() -> Iterable[tuple[str, tuple[str, ...]]]:
    for d in DIRECTIONS:
        yield "callingbox_calls_created_total", (d,)
        yield "callingbox_billed_amount_dollars_total", (d,)
        for s in TERMINAL_STATUSES:
            yield "callingbox_calls_ended_total", (d, s)
            yield "callingbox_call_duration_seconds", (d, s)
        for name in ("answer_delay", "billed_duration", "setup_delay"):
            yield f"callingbox_call_{name}_seconds", (d,)
    for s in OUTCOMES:
        yield "callingbox_webhook_deliveries_total", (s,)
    for s in EXTRACTIONS:
        yield "callingbox_result_extractions_total", (s,)
    for result in ("success", "error"):
        yield "callingbox_exporter_polls_total", (result,)
    for reason in INVALID_REASONS:
        yield "callingbox_exporter_invalid_records_total", (reason,)
    yield "callingbox_exporter_poll_duration_seconds", ()
    yield "callingbox_exporter_vanished_calls_total", ()
    yield "callingbox_exporter_audit_calls_checked_total", ()
    for kind in AUDIT_KINDS:
        yield "callingbox_exporter_audit_mismatches_total", (kind,)


def label_value(value: str | None) -> str:
    return value if value else "none"


class Store:
    """Counters and histograms of one target, keyed by label values (org excluded)."""

    def __init__(self, buckets: dict[str, tuple[float, ...]] | None = None, label_limit: int = 50,
                 extra_labels: tuple[str, ...] = ()):
        self.buckets = {**DEFAULT_BUCKETS, **(buckets or {})}
        self.label_limit = label_limit
        # Metadata label names, appended (in this order) to the labels of CALL_FAMILIES series.
        self.extra_labels = tuple(extra_labels)
        self.none_extra = ("none",) * len(self.extra_labels)
        self._zeroed: set[tuple] = set()  # (direction, extra) whose terminal series exist at 0
        self.counters: dict[str, dict[tuple[str, ...], int | float]] = {}
        # histogram series: per-bucket counts (not cumulative), then the +Inf overflow, then the sum
        self.histograms: dict[str, dict[tuple[str, ...], list[float]]] = {}
        self.seen: dict[str, set[str]] = {label: set() for label in (*CAPPED_LABELS, *self.extra_labels)}
        # (family, labels, bucket index or -1 for a counter) → (call_id, value, when counted)
        self.exemplars: dict[tuple[str, tuple[str, ...], int], tuple[str, float, float]] = {}
        # Counted since 00:00 UTC of day `today_day`: created, each terminal status, milli_cents.
        self.today_day: int | None = None
        self.today: dict[str, int] = {}
        for name, labels in _initial_series(self.extra_labels):
            if FAMILIES[name].kind == "counter":
                self.counters.setdefault(name, {})[labels] = 0
            else:
                self.histograms.setdefault(name, {})[labels] = self._empty(name)

    def _empty(self, name: str) -> list[float]:
        return [0] * (len(self.buckets[name]) + 1) + [0.0]

    def inc(self, name: str, labels: tuple[str, ...], amount: int | float = 1) -> None:
        series = self.counters.setdefault(name, {})
        series[labels] = series.get(labels, 0) + amount

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> int:
        """Count `value` in its bucket; returns the bucket's index (len(bounds) for +Inf)."""
        series = self.histograms.setdefault(name, {})
        counts = series.get(labels)
        if counts is None:
            counts = series[labels] = self._empty(name)
        index = bisect.bisect_left(self.buckets[name], value)
        counts[index] += 1
        counts[-1] += value
        return index

    def capped(self, label: str, value: str | None) -> str:
        """The label value to export: `none` for null, `other` once the cap is full."""
        value = label_value(value)
        seen = self.seen[label]
        if value in seen or value in ("none", "other"):
            return value
        if len(seen) < self.label_limit:
            seen.add(value)
            return value
        self.inc("callingbox_exporter_label_overflow_total", (label,))
        return "other"

    def capped_extra(self, extra: tuple) -> tuple[str, ...]:
        """Metadata values as label values, each capped like hangup_cause."""
        if not self.extra_labels:
            return ()
        if len(extra) != len(self.extra_labels):  # a call first seen under another metadata_labels config
            extra = (*extra, *(None,) * len(self.extra_labels))[: len(self.extra_labels)]
        return tuple(self.capped(label, value) for label, value in zip(self.extra_labels, extra))

    def peek_extra(self, extra: tuple) -> tuple[str, ...]:
        """Like capped_extra, without counting a fold: for gauges, rendered again at every poll."""
        values = []
        for label, value in zip(self.extra_labels, (*extra, *(None,) * len(self.extra_labels))):
            value, seen = label_value(value), self.seen[label]
            if value not in seen and value not in ("none", "other"):
                if len(seen) >= self.label_limit:
                    value = "other"
                else:
                    seen.add(value)
            values.append(value)
        return tuple(values)

    def _zero_series(self, direction: str, x: tuple[str, ...]) -> None:
        """A new campaign (metadata values) gets its terminal series at 0, as the first start does."""
        self._zeroed.add((direction, x))
        for s in TERMINAL_STATUSES:
            self.counters["callingbox_calls_ended_total"].setdefault((direction, s, *x), 0)
        for s in OUTCOMES:
            self.counters["callingbox_webhook_deliveries_total"].setdefault((s, *x), 0)
        for s in EXTRACTIONS:
            self.counters["callingbox_result_extractions_total"].setdefault((s, *x), 0)

    def count(self, events: Iterable[Event], now: float | None = None) -> None:
        """Add the events to the counters; with `now`, also to today's totals and the exemplars."""
        with_extra = bool(self.extra_labels)
        for event in events:
            kind = type(event)
            x = self.capped_extra(event.extra) if with_extra else ()
            if kind is Created:
                d = event.direction
                self.inc("callingbox_calls_created_total", (d, *x))
                if with_extra and (d, x) not in self._zeroed:
                    self._zero_series(d, x)
                self._today(now, "created", 1)
            elif kind is Ended:
                d, s, call = event.direction, event.status, event.call_id
                self._counted("callingbox_calls_ended_total", (d, s, *x), 1, call, now)
                cause = self.capped("hangup_cause", event.hangup_cause)
                self._counted("callingbox_call_hangups_total", (d, s, cause, *x), 1, call, now)
                if event.error_code is not None:
                    code = self.capped("error_code", event.error_code)
                    self._counted("callingbox_call_errors_total", (d, code, *x), 1, call, now)
                if event.duration is not None:
                    self._observed("callingbox_call_duration_seconds", (d, s, *x), event.duration, call, now)
                if event.answer_delay is not None:
                    self._observed("callingbox_call_answer_delay_seconds", (d, *x), event.answer_delay, call, now)
                if event.setup_delay is not None:
                    self._observed("callingbox_call_setup_delay_seconds", (d, *x), event.setup_delay, call, now)
                self._today(now, s, 1)
            elif kind is Billed:
                d, call = event.direction, event.call_id
                self._counted("callingbox_billed_amount_dollars_total", (d, *x), event.milli_cents, call, now)
                if event.billed_seconds is not None:
                    self._observed("callingbox_call_billed_duration_seconds", (d, *x), event.billed_seconds, call, now)
                self._today(now, "milli_cents", event.milli_cents)
            elif kind is WebhookOutcome:
                self.inc("callingbox_webhook_deliveries_total", (event.status, *x))
            elif kind is ExtractionOutcome:
                self.inc("callingbox_result_extractions_total", (event.status, *x))

    def _counted(self, name: str, labels: tuple[str, ...], amount: int, call_id: str | None, now: float | None):
        self.inc(name, labels, amount)
        if call_id and now is not None:
            self.exemplars[name, labels, -1] = (call_id, amount, now)

    def _observed(self, name: str, labels: tuple[str, ...], value: float, call_id: str | None, now: float | None):
        index = self.observe(name, labels, value)
        if call_id and now is not None:
            self.exemplars[name, labels, index] = (call_id, value, now)

    def _today(self, now: float | None, key: str, amount: int) -> None:
        if now is None:
            return
        day = int(now // SECONDS_PER_DAY)
        if day != self.today_day:
            self.today_day, self.today = day, {}
        self.today[key] = self.today.get(key, 0) + amount

    def today_totals(self, now: float) -> dict[str, int]:
        """What was counted since 00:00 UTC: `created`, each terminal status, `milli_cents`."""
        return dict(self.today) if self.today_day == int(now // SECONDS_PER_DAY) else {}

    def copy(self) -> "Store":
        clone = copy.copy(self)
        clone.counters = {name: dict(series) for name, series in self.counters.items()}
        clone.histograms = {name: {k: list(v) for k, v in series.items()} for name, series in self.histograms.items()}
        clone.seen = {label: set(values) for label, values in self.seen.items()}
        clone.exemplars = dict(self.exemplars)
        clone.today = dict(self.today)
        return clone

    def to_json(self) -> dict:
        return {
            "counters": {name: [[*k, v] for k, v in series.items()] for name, series in self.counters.items()},
            "histograms": {
                name: {"buckets": list(self.buckets[name]), "series": [[*k, *v] for k, v in series.items()]}
                for name, series in self.histograms.items()
            },
            "today": {"day": self.today_day, "totals": self.today},
            "extra_labels": list(self.extra_labels),
        }

    @classmethod
    def from_json(cls, data: dict, buckets=None, label_limit: int = 50,
                  extra_labels: tuple[str, ...] = ()) -> tuple["Store", list[str]]:
        """Restore a store; returns it and the histogram names whose buckets changed (reset).

        Series saved under other metadata labels are re-keyed by label name: a label no longer
        configured is summed away, a new one reads `none`, so totals stay exact.
        """
        store = cls(buckets, label_limit, extra_labels)
        saved_extra = tuple(data.get("extra_labels", ()))
        merge = saved_extra != store.extra_labels  # several saved series may land in one
        reset: list[str] = []

        def keyed(name: str, row: list) -> tuple[tuple, list]:
            width = len(FAMILIES[name].labels)
            if name not in CALL_FAMILIES:
                return tuple(row[:width]), row[width:]
            saved = dict(zip(saved_extra, row[width:width + len(saved_extra)]))
            extra = tuple(saved.get(label, "none") for label in store.extra_labels)
            return (*row[:width], *extra), row[width + len(saved_extra):]

        for name, rows in data["counters"].items():
            name = RENAMED.get(name, name)
            if name not in FAMILIES:
                continue
            series = store.counters.setdefault(name, {})
            for row in rows:
                labels, (value,) = keyed(name, row)
                series[labels] = series.get(labels, 0) + value if merge and name in CALL_FAMILIES else value
        for name, saved in data["histograms"].items():
            if name not in FAMILIES:
                continue
            if tuple(saved["buckets"]) != tuple(store.buckets[name]):
                reset.append(name)
                continue
            series = store.histograms.setdefault(name, {})
            for row in saved["series"]:
                labels, counts = keyed(name, row)
                if merge and labels in series:
                    counts = [a + b for a, b in zip(series[labels], counts)]
                series[labels] = list(counts)
        # Values already exported keep their label under the caps: read them off the series.
        positions = {"hangup_cause": ("callingbox_call_hangups_total", 2), "error_code": ("callingbox_call_errors_total", 1)}
        for index, label in enumerate(store.extra_labels):
            positions[label] = ("callingbox_calls_created_total", 1 + index)
        for label, (family, position) in positions.items():
            store.seen[label] = {k[position] for k in store.counters.get(family, {})} - {"none", "other"}
        today = data.get("today") or {}
        if isinstance(today.get("day"), int) and isinstance(today.get("totals"), dict):
            store.today_day, store.today = today["day"], dict(today["totals"])
        return store, reset


@dataclass(frozen=True)
class Health:
    """Gauges of one target at publish time."""

    up: bool = False
    last_success: float | None = None
    watermark: float | None = None
    tracked: int = 0
    stragglers: int = 0
    active: dict = field(default_factory=dict)
    webhooks_pending: int = 0
    webhook_pending_oldest: float | None = None
    last_audit: float | None = None
    backoff: float = 0.0
    next_poll: float | None = None


@dataclass(frozen=True)
class Snapshot:
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
        for org, snap in snapshots.items():
            h = snap.health
            none = snap.store.none_extra
            zeros = {(d, s, *none): 0 for d, s in _NO_ACTIVE_CALLS}
            for (direction, status, *values), value in ({**zeros, **h.active}).items():
                active.add_metric((org, direction, status, *relabel[org](tuple(values))), value)
            pending.add_metric((org,), h.webhooks_pending)
            age = 0.0 if h.webhook_pending_oldest is None else max(0.0, now - h.webhook_pending_oldest)
            oldest.add_metric((org,), age)
            up.add_metric((org,), 1 if h.up else 0)
            last.add_metric((org,), h.last_success or 0)
            watermark.add_metric((org,), h.watermark or 0)
            tracked.add_metric((org,), h.tracked)
            stragglers.add_metric((org,), h.stragglers)
            audited.add_metric((org,), h.last_audit or 0)
            backoff.add_metric((org,), h.backoff)
            next_poll.add_metric((org,), h.next_poll or 0)
        yield from (active, pending, oldest, up, last, watermark, tracked, stragglers, audited, backoff, next_poll)
        info = GaugeMetricFamily("callingbox_exporter_build_info", "The exporter's version.", labels=("version",))
        info.add_metric((self.version,), 1)
        yield info
