"""Self-audit: recount one closed window of long-settled calls and compare with the ledger.

Pure, like the accounting: the poller feeds it the records of the window as its list read
passes them (the window runs from where the last one ended to an `audit_interval` past the settle
window, so the calls in it are settled; see Tally.audit_due), together with the ledger's state of
each call.
A mismatch means the exporter's counts and the API disagree about a call: the API changed a
call without bumping `updated_at`, a call appeared in the past, one vanished, or a bug.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from .accounting import CallState
from .catalogue import EXTRACTIONS, OUTCOMES
from .records import Record


class Mismatch(NamedTuple):
    kind: str
    call_id: str
    detail: str


class Audit:
    """One audit of the calls created in [start, end)."""

    def __init__(self, start: float, end: float, baseline: float):
        self.start, self.end, self.baseline = start, end, baseline
        self.checked = 0
        self.seen: set[str] = set()
        self.mismatches: list[Mismatch] = []

    def covers(self, created_at: float) -> bool:
        return self.start <= created_at < self.end

    def check(self, record: Record, state: CallState | None) -> None:
        """Compare one record of the window with what the ledger counted for it."""
        if record.id in self.seen:
            return  # listed twice in one read: one call, checked once
        self.seen.add(record.id)
        if record.created_at <= self.baseline:
            return  # counted nothing by design: history before the first start
        self.checked += 1
        found = self.mismatches.append
        if state is None:
            found(Mismatch("missing", record.id, f"a {record.status} call the exporter never counted"))
            return
        if record.terminal and state.status != record.status:
            found(Mismatch("status", record.id, f"counted {state.status}, the API says {record.status}"))
        amount = record.billing_amount_milli_cents or 0
        if state.billed and record.reservation_status != "reserved" and state.amount not in (None, amount):
            found(Mismatch("billing", record.id, f"counted {state.amount} milli-cents, the API says {amount}"))
        if record.webhook_status in OUTCOMES and state.webhook != record.webhook_status:
            found(Mismatch("webhook", record.id, f"counted {state.webhook}, the API says {record.webhook_status}"))
        if record.result_status in EXTRACTIONS and state.result != record.result_status:
            found(Mismatch("extraction", record.id, f"counted {state.result}, the API says {record.result_status}"))

    def finish(self, calls: Iterable[tuple[str, CallState]]) -> list[Mismatch]:
        """After a complete read: tracked calls of the window that the API no longer lists.

        `calls` iterates (call id, state) pairs: a Ledger does.
        """
        for call_id, state in calls:
            if self.covers(state.created_at) and call_id not in self.seen and state.created_at > self.baseline:
                self.checked += 1
                self.mismatches.append(Mismatch("extra", call_id, "counted, but the API no longer lists it"))
        return self.mismatches
