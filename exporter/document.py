"""A store as the JSON document it is saved as, and back under today's config.

Above the store, like visibility.py: `Store.to_json` and `Store.from_json` delegate here. The state
database keeps its rows and reads them back into this document (state.py), so every restore applies
the same rules: renamed families, labels added to a family, metadata labels re-keyed, buckets.
"""

from __future__ import annotations

from .catalogue import CALL_FAMILIES, FAMILIES, STATUSES, added_labels, relabel
from .migrate import RENAMED


def document(store) -> dict:
    """The store's counters, histograms, today's totals and visibility, as JSON values."""
    return {
        "counters": {name: [[*k, v] for k, v in series.items()] for name, series in store.counters.items()},
        "histograms": {
            name: {"buckets": list(store.buckets[name]), "series": [[*k, *v] for k, v in series.items()]}
            for name, series in store.histograms.items()
        },
        "today": {"day": store.today_day, "totals": store.today},
        "extra_labels": list(store.extra_labels),
        "label_use": store.label_use.to_json(),
        "births": store.births.to_json(store),
    }


def restore(store, data: dict) -> list[str]:
    """Fill a new `store` from a saved document; returns the histogram names whose buckets changed (reset).

    Series saved under other metadata labels are re-keyed by label name: a label no longer
    configured is summed away, a new one reads `none`, so totals stay exact.
    """
    saved_extra = tuple(data.get("extra_labels", ()))
    merge = saved_extra != store.extra_labels  # several saved series may land in one
    reset: list[str] = []

    def keyed(name: str, row: list) -> tuple[tuple, list]:
        width = len(FAMILIES[name].labels)
        if name not in CALL_FAMILIES:
            return tuple(row[:width]), row[width:]
        extra = relabel(saved_extra, row[width : width + len(saved_extra)], store.extra_labels, "none")
        return (*row[:width], *extra), row[width + len(saved_extra) :]

    for name, rows in data["counters"].items():
        name = RENAMED.get(name, name)
        if name not in FAMILIES:
            continue
        series = store.counters.setdefault(name, {})
        for row in rows:
            filled = added_labels(name, row[:-1])  # saved before the family gained a label
            if filled is not None:
                row = [*filled, row[-1]]
            labels, (value,) = keyed(name, row)
            series[labels] = series.get(labels, 0) + value if merge and name in CALL_FAMILIES else value
            store.births.visible.setdefault(name, set()).add(labels)  # restored: Prometheus has seen it
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
            store.births.visible.setdefault(name, set()).add(labels)
    # Values already exported keep their label under the caps: read them off the series.
    positions = {
        "hangup_cause": ("callingbox_call_hangups_total", 2),
        "error_code": ("callingbox_call_errors_total", 1),
        "status": ("callingbox_calls_ended_total", 1),
    }
    for index, label in enumerate(store.extra_labels):
        positions[label] = ("callingbox_calls_created_total", 1 + index)
    for label, (family, position) in positions.items():
        store.seen[label] = {k[position] for k in store.counters.get(family, {})} - {"none", "other"} - STATUSES
    store.label_use.restore(data.get("label_use"), store.seen)  # idle ones leave `seen` at the first expire
    if not merge:  # re-keyed series are shown at once
        store.births.restore(data.get("births"), store)
    today = data.get("today") or {}
    if isinstance(today.get("day"), int) and isinstance(today.get("totals"), dict):
        store.today_day, store.today = today["day"], dict(today["totals"])
    store.changed = set(store.series())  # rebuilt: none of it has been saved in this shape
    return reset
