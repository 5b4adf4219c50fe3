"""What one target's self-audit found, counted in its store and logged, each mismatch once however often it is found.

The tally (tally.py) hands over each audit it concludes, spot-check or window, and each call a
list read saw appear in the past; this object keeps the memory of what was already reported, so a
lie the API tells twice counts once. The log lines go to the logger the tally passes in.
"""

from __future__ import annotations

import logging

from .audit import Audit, AuditSchedule, Mismatch
from .ledger import Ledger
from .store import Store

REPORTED_MEMORY = 10_000  # audit mismatches remembered so a lie found twice counts once


class Findings:
    """One target's audit findings: counted, logged, and the (call id, kind) pairs already reported."""

    def __init__(self, org: str, log: logging.Logger):
        self.org, self.log = org, log
        self.reported: set[tuple[str, str]] = set()  # (call id, kind) already counted as a mismatch

    def conclude(self, audit: Audit, now: float, ledger: Ledger, store: Store, schedule: AuditSchedule) -> None:
        """Count and log what a complete read's audit found; the next window is due an interval later."""
        audit.finish(ledger)
        mismatches = self.report(audit, "window", ledger, store)
        until = schedule.audited_until
        skipped = schedule.concluded(audit, now)
        if skipped:
            store.inc("callingbox_exporter_audit_skipped_seconds_total", (), skipped)
            self.log.warning(
                "audit skipped calls never to be audited",
                extra={"org": self.org, "from": until, "to": audit.start, "skipped_s": round(skipped, 3)},
            )
        self.log.info(
            "audit done",
            extra={
                "org": self.org,
                "start": audit.start,
                "end": audit.end,
                "checked": audit.checked,
                "mismatches": mismatches,
            },
        )

    def report(self, audit: Audit, method: str, ledger: Ledger, store: Store) -> int:
        """Count the calls an audit checked (`method`: window, spot_check) and its mismatches,
        each call and kind once however often it is found."""
        store.inc("callingbox_exporter_audit_calls_checked_total", (method,), audit.checked)
        return self.report_mismatches(audit.mismatches, ledger, store)

    def report_mismatches(self, mismatches: list[Mismatch], ledger: Ledger, store: Store) -> int:
        found = 0
        for mismatch in mismatches:
            if (mismatch.call_id, mismatch.kind) in self.reported:
                continue
            self.reported.add((mismatch.call_id, mismatch.kind))
            found += 1
            store.inc("callingbox_exporter_audit_mismatches_total", (mismatch.kind,))
            self.log.warning(
                "audit mismatch",
                extra={"org": self.org, "kind": mismatch.kind, "call_id": mismatch.call_id, "detail": mismatch.detail},
            )
        if len(self.reported) > REPORTED_MEMORY:  # forget calls no longer tracked
            self.reported = {r for r in self.reported if r[0] in ledger.calls}
        return found
