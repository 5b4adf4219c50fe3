"""The ground truth: what a perfect observer of the simulated API counts, and when (SPEC §3/§4).

`ledger` turns each committed version of a call into dated events; `Truth.after` sums them
(for `Simulator.truth()`, app.py), which tests compare with the exporter's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .lifecycle import TERMINAL, _seconds


@dataclass
class Truth:
    """What the exporter must count: keys are (metric name, sorted label pairs without org)."""

    counters: dict[tuple[str, tuple[tuple[str, str], ...]], int | float]
    observations: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]

    @classmethod
    def after(cls, events: Iterable[_Event], after: float, until: float = math.inf) -> Truth:
        """The sum of `events` dated strictly after `after` (and at or before `until`): counters
        added up, observations listed."""
        counters: dict = {}
        observations: dict = {}
        for date, name, labels, value, observed in events:
            if date <= after or date > until:
                continue
            if observed:
                observations.setdefault((name, labels), []).append(value)
            else:
                counters[(name, labels)] = counters.get((name, labels), 0) + value
        return cls(counters, observations)

    def total(self, name: str, **labels: str) -> int | float:
        """Sum of a counter over every series whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, lbl), v in self.counters.items() if n == name and wanted <= set(lbl))


# An event a perfect observer counts: (date, metric, labels, value, is_observation).
_Event = tuple[float, str, tuple[tuple[str, str], ...], Any, bool]

ACTIVE = frozenset({"queued", "initiated", "ringing", "in_progress"})
# Each end detail counts once (SPEC §4), from the first terminal version that carries it.
END_DETAILS = ("hangup_cause", "error_code", "duration", "answer_delay", "setup_delay", "billing")


def is_terminal(record: dict) -> bool:
    """SPEC §4: one of the five terminal statuses, or a status outside the nine with `ended_at`."""
    status = record["status"]
    return status in TERMINAL or (status not in ACTIVE and record["ended_at"] is not None)


@dataclass(slots=True)
class Counted:
    """What the truth has counted of one call: its terminal transition and which end details."""

    ended: str | None = None  # the transition's date (ended_at, else updated_at); None: not ended
    status: str = ""  # the transition's status, the label of its hangup and duration
    details: tuple[str, ...] = ()  # the END_DETAILS counted so far (a set would cost 700 bytes a call)


def ledger(
    prev: dict | None, new: dict, counted: Counted | None = None, cause_coming: bool = False
) -> tuple[list[_Event], Counted]:
    """The events counted when a call moves from version `prev` to `new` (SPEC §3/§4).

    `counted` is what was counted of the call before (None: nothing); the updated one is returned.
    `cause_coming`: a later version of the call will carry a `hangup_cause`, so a terminal
    version without one does not count `none` yet (the exporter waits `end_grace` for it).
    """
    events: list[_Event] = []
    counted = counted or Counted()
    direction = new["direction"]

    def add(date: str, name: str, value: Any = 1, observed: bool = False, **labels: str | None) -> None:
        events.append((_seconds(date), name, _label_key(tuple(labels.items())), value, observed))

    if prev is None:
        add(new["created_at"], "callingbox_calls_created_total", direction=direction)
    if counted.ended is None and is_terminal(new):
        counted.ended, counted.status = new["ended_at"] or new["updated_at"], new["status"]
        add(counted.ended, "callingbox_calls_ended_total", direction=direction, status=new["status"])
    if counted.ended is not None:
        _end_details(new, counted, cause_coming, add)
    for key, subject, metric, outcomes in (
        ("webhook_status", "webhook_url", "callingbox_webhook_deliveries_total", ("delivered", "failed")),
        ("result_status", "returns", "callingbox_result_extractions_total", ("completed", "failed")),
    ):
        # An outcome needs its subject (SPEC §4): a webhook URL, a non-empty returns schema.
        if new[subject] and new[key] in outcomes and (prev is None or prev[key] != new[key]):
            add(new["updated_at"], metric, status=new[key])
    return events, counted


_LABEL_KEYS: dict[tuple, tuple[tuple[str, str], ...]] = {}  # a few hundred label sets at most


def _label_key(labels: tuple[tuple[str, str | None], ...]) -> tuple[tuple[str, str], ...]:
    """The labels as a Truth key: sorted, a missing value as "none". One shared tuple per label
    set, so days of events hold a handful of keys, not one each."""
    key = _LABEL_KEYS.get(labels)
    if key is None:
        key = _LABEL_KEYS[labels] = tuple(sorted((k, v or "none") for k, v in labels))
    return key


def _end_details(new: dict, counted: Counted, cause_coming: bool, add: Any) -> None:
    """Each end detail `new` is the first terminal version to carry, dated by the transition:
    it belongs to the call's end however late it is written (SPEC §4)."""
    when, status, direction = counted.ended, counted.status, new["direction"]

    def first(detail: str, carried: bool) -> bool:
        if detail in counted.details or not carried:
            return False
        counted.details += (detail,)
        return True

    if first("hangup_cause", new["hangup_cause"] is not None or not cause_coming):
        add(when, "callingbox_call_hangups_total", direction=direction, status=status, hangup_cause=new["hangup_cause"])
    if first("error_code", new["error_code"] is not None):
        add(when, "callingbox_call_errors_total", direction=direction, error_code=new["error_code"])
    if first("duration", new["duration_seconds"] is not None):
        add(when, "callingbox_call_duration_seconds", new["duration_seconds"], True, direction=direction, status=status)
    for name, start, end in (("answer", "started_at", "answered_at"), ("setup", "created_at", "started_at")):
        if first(f"{name}_delay", bool(new[start] and new[end])):
            add(
                when,
                f"callingbox_call_{name}_delay_seconds",
                _seconds(new[end]) - _seconds(new[start]),
                True,
                direction=direction,
            )
    # Billing (SPEC §3): once the reservation is no longer `reserved`, and a `settled` one has
    # its amount. Every terminal version of the simulator carries `ended_at`.
    reservation, amount = new["reservation_status"], new["billing_amount_milli_cents"]
    if first("billing", reservation != "reserved" and not (reservation == "settled" and amount is None)):
        add(when, "callingbox_billed_amount_milli_cents", amount or 0, direction=direction)
        if new["billed_duration_seconds"] is not None:
            add(
                when,
                "callingbox_call_billed_duration_seconds",
                new["billed_duration_seconds"],
                True,
                direction=direction,
            )
