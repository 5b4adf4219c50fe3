"""One target's counting core: the only path from a raw call object of the API to counts.

It owns the ledger and the store, the memories that keep counts exact however often the API
shows the same thing (a malformed record counted once, an audit mismatch reported once), the
audit window, and the health summary that /metrics, the landing page and /-/ready read. No I/O
and no clock: the poller reads the API and passes `now`, so every path here is a plain call.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace

from .accounting import Ledger, Summary, give_up_age
from .audit import Audit, Mismatch
from .catalogue import relabel
from .records import Invalid, Record, decode_record, fields_type, fingerprint, timestamp_of
from .store import Store

INVALID_MEMORY = 10_000  # malformed records remembered so a re-read does not count them again
INVALID_LOG_LIMIT = 10  # malformed records logged one by one per read; the rest are summed up
REPORTED_MEMORY = 10_000  # audit mismatches remembered so a lie found twice counts once

log = logging.getLogger(__name__)


@dataclass
class Status:
    """What the poller knows of its own schedule: the part of the health the ledger cannot say."""

    up: bool = False
    ready: bool = False
    last_poll: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    failures: int = 0
    backoff: float = 0.0  # seconds the next poll waits beyond poll_interval
    next_poll: float | None = None


@dataclass(frozen=True)
class Health:
    """Everything a target's gauges, card and readiness show, as of one publish."""

    status: Status = field(default_factory=Status)
    watermark: float | None = None
    tracked: int = 0
    stragglers: int = 0
    active: dict = field(default_factory=dict)  # (direction, status, *capped metadata values) → calls
    webhooks_pending: int = 0
    webhook_pending_oldest: float | None = None
    last_audit: float | None = None


class Tally:
    def __init__(self, org: str, ledger: Ledger, store: Store, metadata_keys: tuple[str, ...] = (), *,
                 settle_window: float, overlap: float, give_up_after: float, audit_interval: float = 0.0,
                 now: float = 0.0):
        self.org, self.ledger, self.store, self.metadata_keys = org, ledger, store, metadata_keys
        self.settle_window, self.overlap, self.give_up_after = settle_window, overlap, give_up_after
        self.audit_interval = audit_interval
        self._invalid_seen: dict[str, None] = {}  # fingerprints, oldest first
        self._reported: set[tuple[str, str]] = set()  # (call id, kind) already counted as a mismatch
        self.invalid_logged = 0  # malformed records logged in the current read
        self.next_audit = now + audit_interval  # the first audit comes an interval after the start
        self.last_audit: float | None = None
        self.audited_until: float | None = None  # created_at up to which calls have been audited

    # ---- raw call object → counts ---------------------------------------------------------

    def decode(self, obj: object) -> Record | None:
        """The record, or None for a malformed one: counted and logged once, however often it is read."""
        record = decode_record(obj, self.metadata_keys)
        if type(record) is not Invalid:
            return record
        seen = fingerprint(obj)
        if seen not in self._invalid_seen:
            self._invalid_seen[seen] = None
            if len(self._invalid_seen) > INVALID_MEMORY:
                del self._invalid_seen[next(iter(self._invalid_seen))]
            self.store.inc("callingbox_exporter_invalid_records_total", (record.reason,))
            self.invalid_logged += 1
            if self.invalid_logged <= INVALID_LOG_LIMIT:
                log.warning("invalid record skipped", extra={"org": self.org, "reason": record.reason,
                                                             "call_id": record.call_id})
            elif self.invalid_logged == INVALID_LOG_LIMIT + 1:
                log.warning("more invalid records this poll; counted, not logged", extra={"org": self.org})
        return None

    def account(self, record: Record, now: float) -> int:
        """Count what `record` says that the ledger has not counted yet; returns the events."""
        events = self.ledger.account(record)
        if events:
            self.store.count(events, now)
        return len(events)

    def list_read(self, now: float, audit: Audit | None = None) -> "ListRead":
        self.invalid_logged = 0
        return ListRead(self, now, audit)

    # ---- the self-audit ------------------------------------------------------------------

    def audit_due(self, now: float) -> Audit | None:
        """The audit that rides on this read, if one is due: the oldest interval still inside the
        settle window (settled, and read anyway), joined to the last audited one."""
        if not self.audit_interval or now < self.next_audit:
            return None
        horizon = now - self.settle_window
        until = self.audited_until
        start = until if until is not None and until >= horizon else horizon
        return Audit(start, horizon + self.audit_interval, self.ledger.baseline)

    def conclude_audit(self, audit: Audit, now: float) -> None:
        """Count and log what a complete read's audit found; the next window is due an interval later."""
        audit.finish(self.ledger)
        mismatches = self.report(audit)
        self.last_audit, self.next_audit, self.audited_until = now, now + self.audit_interval, audit.end
        log.info("audit done", extra={"org": self.org, "checked": audit.checked, "mismatches": mismatches})

    def report(self, audit: Audit) -> int:
        """Count and log an audit's mismatches, each call and kind once however often it is found."""
        found = 0
        for mismatch in audit.mismatches:
            if (mismatch.call_id, mismatch.kind) in self._reported:
                continue
            self._reported.add((mismatch.call_id, mismatch.kind))
            found += 1
            self.store.inc("callingbox_exporter_audit_mismatches_total", (mismatch.kind,))
            log.warning("audit mismatch", extra={"org": self.org, "kind": mismatch.kind, "call_id": mismatch.call_id,
                                                 "detail": mismatch.detail})
        if len(self._reported) > REPORTED_MEMORY:  # forget calls no longer tracked
            self._reported = {r for r in self._reported if r[0] in self.ledger.calls}
        self.store.inc("callingbox_exporter_audit_calls_checked_total", (), audit.checked)
        return found

    def spot_sample(self, rng: random.Random, size: int) -> list[str]:
        """Tracked calls to fetch by id and compare: any counted after the baseline."""
        candidates = [call_id for call_id, s in self.ledger.calls.items() if s.created_at > self.ledger.baseline]
        return rng.sample(candidates, min(size, len(candidates)))

    def spot_check(self, audit: Audit, call_id: str, obj: object | None) -> None:
        """Compare one call fetched by id (None: the API answered 404) with what was counted.

        Only a call whose API version is no newer than the one accounted can disagree: news is
        for the next list read, while a change that kept its `updated_at` is a silent rewrite.
        """
        state = self.ledger.calls.get(call_id)
        if obj is None:
            if state is not None:
                audit.checked += 1
                audit.mismatches.append(Mismatch("extra", call_id, "counted, but the API answers 404 for it"))
            return
        record = self.decode(obj)
        if record is None or state is None or record.updated_at > state.updated_at:
            return
        audit.check(record, state)

    # ---- bounded memory and the health summary ---------------------------------------------

    def sweep(self, now: float) -> Summary:
        """Drop final calls past the settle window from the ledger and summarise what is left."""
        summary = self.ledger.sweep(now, self.settle_window, self.give_up_after)
        if summary.given_up:
            log.warning("stragglers given up", extra={"org": self.org, "calls": summary.given_up})
        return summary

    def stragglers(self, now: float) -> list[tuple[str, float]]:
        """Tracked calls the list no longer shows that are not final: (call id, created_at).

        The same bounds as `Ledger.sweep`: created before the window, after the give-up age.
        """
        horizon = now - self.settle_window
        give_up = now - give_up_age(self.settle_window, self.give_up_after)
        return [(call_id, s.created_at) for call_id, s in self.ledger.calls.items()
                if give_up <= s.created_at < horizon and not s.final]

    def vanished(self, call_id: str) -> bool:
        """The API answers 404 for a tracked call: it is forgotten and counted once."""
        if self.ledger.calls.pop(call_id, None) is None:
            return False
        self.store.inc("callingbox_exporter_vanished_calls_total", ())
        return True

    def health(self, summary: Summary, status: Status, extra_labels: tuple[str, ...] = ()) -> Health:
        """The one summary of a target that its gauges, card and readiness show."""
        active = summary.active
        if extra_labels:  # capped like the counters' metadata values
            active = {}
            for (direction, call_status, *extra), calls in summary.active.items():
                key = (direction, call_status, *self.store.peek_extra(tuple(extra)))
                active[key] = active.get(key, 0) + calls
        return Health(replace(status), self.ledger.watermark, summary.tracked, summary.stragglers, active,
                      summary.webhooks_pending, summary.webhook_pending_oldest, self.last_audit)

    def adopt(self, old: "Tally", extra_labels: tuple[str, ...], old_extra_labels: tuple[str, ...],
              same_store: bool, buckets: dict, label_limit: int) -> list[str]:
        """Carry an old tally of the same org over a reload; returns histograms restarted."""
        self.ledger, self._invalid_seen, self._reported = old.ledger, old._invalid_seen, old._reported
        self.next_audit, self.last_audit, self.audited_until = old.next_audit, old.last_audit, old.audited_until
        if same_store:
            self.store = old.store
            return []
        self.store, reset = Store.from_json(old.store.to_json(), buckets, label_limit, extra_labels)
        if old_extra_labels != extra_labels:
            for call in self.ledger.calls.values():
                call.extra = relabel(old_extra_labels, call.extra, extra_labels)
        return reset


class ListRead:
    """One read of `GET /v1/calls` in progress: newest first, to the settle window.

    Records unchanged since the watermark (less the overlap) are skipped before a `Record` is
    built, unless the audit riding on this read covers them.
    """

    def __init__(self, tally: Tally, now: float, audit: Audit | None):
        self.tally, self.now, self.audit = tally, now, audit
        self.horizon = now - tally.settle_window
        self.fields = fields_type(bool(tally.metadata_keys))
        watermark = tally.ledger.watermark
        self.cutoff = None if watermark is None else watermark - tally.overlap  # older: unchanged, skipped
        self.newest: float | None = None
        self.records = self.examined = self.events = 0

    def take(self, obj: object) -> bool:
        """Account one element of the list; False once it lies past the settle window (stop there)."""
        self.records += 1
        audit, ledger = self.audit, self.tally.ledger
        if type(obj) is self.fields:
            # The common case, read without building a Record: where is it, has it changed?
            created, updated = timestamp_of(obj.created_at), timestamp_of(obj.updated_at)
            if created is not None and updated is not None:
                if created < self.horizon:
                    return False  # newest first: all that follows is settled history
                if self.newest is None or updated > self.newest:
                    self.newest = updated
                if self.cutoff is not None and updated < self.cutoff and (audit is None or not audit.covers(created)):
                    return True
        record = self.tally.decode(obj)
        if record is None:
            return True
        if record.created_at < self.horizon:
            return False
        if self.newest is None or record.updated_at > self.newest:
            self.newest = record.updated_at
        if ledger.examines(record.updated_at, self.tally.overlap):
            self.examined += 1
            self.events += self.tally.account(record, self.now)
        if audit is not None and audit.covers(record.created_at):
            audit.check(record, ledger.calls.get(record.id))
        return True

    def finish(self) -> None:
        """The read reached its end: the watermark moves to the newest update it saw."""
        self.tally.ledger.complete_poll(self.newest)

    @property
    def stats(self) -> dict[str, int]:
        return {"records": self.records, "examined": self.examined, "events": self.events,
                "invalid": self.tally.invalid_logged}
