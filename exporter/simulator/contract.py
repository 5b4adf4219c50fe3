"""What the API docs leave open (SPEC §1), played on demand: end details written after the end,
outcome fields without their subject, undocumented statuses, whole-second timestamps, a settled
call without its amount, by-id reads that lag the list. Below lifecycle.py's plans: `Contract`
reshapes records and planned steps; app.py and handlers.py apply it, truth.py counts by SPEC's words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

from .call import _Step
from .lifecycle import format_ts

# The end details SPEC §1 lets the API write after the terminal version, in the two groups a
# late CDR tends to bring them: the call's end first, then its bill.
_LATE_END = ("hangup_cause", "error_code", "error_message", "duration_seconds")
_LATE_BILL = ("billed_duration_seconds", "billing_amount_milli_cents", "cost_breakdown")
_AMOUNT = ("billing_amount_milli_cents", "cost_breakdown")
_STAMPS = ("created_at", "started_at", "answered_at", "ended_at", "updated_at")
# `docs_open=True`: every behaviour on, at shares a real API might plausibly show.
DOCS_OPEN = {
    "late_end_details": 0.4,
    "subjectless_outcomes": True,
    "undocumented_status": 0.05,
    "whole_seconds": True,
    "amount_lag": 0.2,
    "by_id_not_found": 0.1,
    "by_id_faults": 0.05,
}


@dataclass(frozen=True)
class StampOf:
    """Placeholder in a planned change: the time another step of the call was applied (a detail
    such as `answered_at` that is written later than it happened)."""

    step: _Step


@dataclass(frozen=True)
class Contract:
    """How far the simulated API strays into what the docs leave open; all off by default."""

    late_end_details: float = 0.0  # share of ended calls whose end details come in later versions
    late_detail_delay: float = 0.5  # wall seconds from the end to the last late detail
    subjectless_outcomes: bool = False  # webhook_status without webhook_url, result_status with returns {}
    undocumented_status: float = 0.0  # share of no_answer calls ending `voicemail`; a third as many dial
    whole_seconds: bool = False  # timestamps without fraction: versions share an updated_at
    amount_lag: float = 0.0  # share of settled calls whose amount comes a second or so after settling
    by_id_not_found: float = 0.0  # share of by-id reads of a listed call answering 404
    by_id_faults: float = 0.0  # share of by-id reads answering 429 or 503

    @classmethod
    def resolve(cls, docs_open: bool, **options: float | bool | None) -> Contract:
        """The contract from `docs_open` and the options given explicitly (None: not given)."""
        contract = cls(**{**(DOCS_OPEN if docs_open else {}), **{k: v for k, v in options.items() if v is not None}})
        for f in fields(cls):
            value = getattr(contract, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            if f.type == "float" and not (0 <= value <= 1 or f.name == "late_detail_delay" and value >= 0):
                raise ValueError(f"{f.name} must lie in [0, 1] (a delay: >= 0), got {value!r}")
        return contract

    def stamp(self, t: float) -> str:
        """Unix seconds → the API's timestamp, without fraction in whole-second mode."""
        ts = format_ts(t)
        return ts[:19] + "Z" if self.whole_seconds else ts

    def shape(self, record: dict, extracted: bool = False) -> dict:
        """A new record, or a history one (`extracted`: long final), as this API writes it; in place."""
        if self.subjectless_outcomes:
            # The docs type both fields as plain strings: no URL still reads `pending`, for ever,
            # and a call without a schema is extracted against an empty one.
            if not record["webhook_url"]:
                record["webhook_status"] = "pending"
            if not record["returns"]:
                record["returns"] = {}
                if extracted:
                    record.update(result_status="completed", result={})
        if self.whole_seconds:
            for key in _STAMPS:
                if record[key]:
                    record[key] = record[key][:19] + "Z"
        return record

    def vary(self, rng: random.Random, steps: list[_Step], record: dict, fixed_causes: bool) -> list[_Step]:
        """A call's planned steps with the open behaviours drawn for it. `rng` is the call's own,
        so a default run draws exactly what it drew before these options existed."""
        end = next(step for step in steps if "ended_at" in step.changes)
        if record["returns"] == {}:  # an empty schema extracts an empty result
            for step in steps:
                if step.changes.get("result") is not None:
                    step.changes["result"] = {}
        self._undocumented(rng, steps, end, fixed_causes)
        bill = self._late(rng, steps, end) if rng.random() < self.late_end_details else end
        if end.changes["status"] == "completed" and rng.random() < self.amount_lag:
            settle = next(step for step in steps if "reservation_status" in step.changes)
            amount = {key: bill.changes.pop(key) for key in _AMOUNT}
            steps.append(_Step(max(bill.due, settle.due) + rng.uniform(0.5, 1.5), amount, settle.hide))
        return steps

    def _undocumented(self, rng: random.Random, steps: list[_Step], end: _Step, fixed_causes: bool) -> None:
        """A newer API version's statuses: `voicemail` (terminal, with ended_at) instead of
        no_answer, and `dialing` (active) between initiated and ringing."""
        if end.changes["status"] == "no_answer" and rng.random() < self.undocumented_status:
            end.changes.update(status="voicemail", voicemail_detected=True)
            if not fixed_causes:
                end.changes["hangup_cause"] = "voicemail"
        by_status = {step.changes.get("status"): step for step in steps}
        if "ringing" in by_status and rng.random() < self.undocumented_status / 3:
            dial = (by_status["initiated"].due + by_status["ringing"].due) / 2
            steps.append(_Step(dial, {"status": "dialing"}, by_status["initiated"].hide))

    def _late(self, rng: random.Random, steps: list[_Step], end: _Step) -> _Step:
        """Move the end details out of the terminal step into one or two later ones, within
        `late_detail_delay`; returns the step that now carries the bill."""
        late = {key: end.changes.pop(key) for key in (*_LATE_END, *_LATE_BILL)}
        answer = next((step for step in steps if "answered_at" in step.changes), None)
        if answer is not None:  # answered, but the API tells when only with the rest
            del answer.changes["answered_at"]
            late["answered_at"] = StampOf(answer)
        last = end.due + self.late_detail_delay * rng.uniform(0.5, 1.0)
        if rng.random() < 0.5:  # everything at once
            bill = _Step(last, late, end.hide)
            steps.append(bill)
        else:  # the cause first, the bill later
            first = end.due + (last - end.due) * rng.uniform(0.2, 0.8)
            steps.append(_Step(first, {k: v for k, v in late.items() if k not in _LATE_BILL}, end.hide))
            bill = _Step(last, {k: late[k] for k in _LATE_BILL}, end.hide)
            steps.append(bill)
        # A call released (never billed) before its bill arrives would be accounted at 0 without
        # its billed duration, and what an observer counts would hang on when it looked: release
        # it with its bill instead.
        release = next(step for step in steps if "reservation_status" in step.changes)
        if release.changes["reservation_status"] == "released" and release.due <= bill.due:
            bill.changes["reservation_status"] = release.changes.pop("reservation_status")
            if not release.changes:  # by identity: steps compare by due time only
                steps[:] = [step for step in steps if step is not release]
        return bill
