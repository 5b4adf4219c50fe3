"""The ground truth: what a perfect observer of the simulated API counts, and when (SPEC §3/§4).

`ledger` turns each committed version of a call into dated events; `Simulator.truth()` (app.py)
sums them into a `Truth`, which tests compare with the exporter's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .lifecycle import TERMINAL, _seconds


@dataclass
class Truth:
    """What the exporter must count: keys are (metric name, sorted label pairs without org)."""

    counters: dict[tuple[str, tuple[tuple[str, str], ...]], int | float]
    observations: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]

    def total(self, name: str, **labels: str) -> int | float:
        """Sum of a counter over every series whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, lbl), v in self.counters.items() if n == name and wanted <= set(lbl))


# An event a perfect observer counts: (date, metric, labels, value, is_observation).
_Event = tuple[float, str, tuple[tuple[str, str], ...], Any, bool]


def ledger(prev: dict | None, new: dict, billed: bool) -> tuple[list[_Event], bool]:
    """The events counted when a call moves from version `prev` to `new` (SPEC §3/§4).

    `billed` says whether billing was already accounted for this call; the new flag is returned.
    """
    events: list[_Event] = []
    direction = new["direction"]

    def add(date: str, name: str, value: Any = 1, observed: bool = False, **labels: str | None) -> None:
        key = tuple(sorted((k, v or "none") for k, v in labels.items()))
        events.append((_seconds(date), name, key, value, observed))

    if prev is None:
        add(new["created_at"], "callingbox_calls_created_total", direction=direction)
    status = new["status"]
    if status in TERMINAL and (prev is None or prev["status"] not in TERMINAL):
        when = new["ended_at"] or new["updated_at"]
        add(when, "callingbox_calls_ended_total", direction=direction, status=status)
        add(when, "callingbox_call_hangups_total", direction=direction, status=status,
            hangup_cause=new["hangup_cause"])
        if new["error_code"] is not None:
            add(when, "callingbox_call_errors_total", direction=direction, error_code=new["error_code"])
        if new["duration_seconds"] is not None:
            add(when, "callingbox_call_duration_seconds", new["duration_seconds"], True,
                direction=direction, status=status)
        for name, start, end in (("answer", "started_at", "answered_at"), ("setup", "created_at", "started_at")):
            if new[start] and new[end]:
                add(when, f"callingbox_call_{name}_delay_seconds", _seconds(new[end]) - _seconds(new[start]),
                    True, direction=direction)
    for key, metric, outcomes in (
        ("webhook_status", "callingbox_webhook_deliveries_total", ("delivered", "failed")),
        ("result_status", "callingbox_result_extractions_total", ("completed", "failed")),
    ):
        if new[key] in outcomes and (prev is None or prev[key] != new[key]):
            add(new["updated_at"], metric, status=new[key])
    if not billed and status in TERMINAL and new["reservation_status"] != "reserved":
        # Billing belongs to the terminal transition (SPEC §3): dated by the call's end, however
        # late it settles. Every terminal version here carries `ended_at`.
        billed, ended = True, new["ended_at"] or new["updated_at"]
        add(ended, "callingbox_billed_amount_milli_cents", new["billing_amount_milli_cents"] or 0,
            direction=direction)
        if new["billed_duration_seconds"] is not None:
            add(ended, "callingbox_call_billed_duration_seconds", new["billed_duration_seconds"],
                True, direction=direction)
    return events, billed
