"""One read of `GET /v1/calls` in progress: what each element of the list means for the counts.

The poller feeds the elements here as the stream decodes them; each goes through the tally's
decoder and ledger, so a deeper or later read counts each change once. It also notes what the
read shows beyond counts: calls that appeared in the past, and calls that answered 404 by id.
"""

from __future__ import annotations

from .audit import Audit, Mismatch
from .records import fields_type, timestamp_of


class ListRead:
    """One read of `GET /v1/calls` in progress: newest first, down to its horizon.

    A record whose `updated_at` is no newer than the version the ledger holds is unchanged and
    skipped before a `Record` is built (unless the audit riding on this read covers it). The
    check is per call, so a read may reach deeper than the last one (a full read, an open call)
    and still count each change once; a late-committed update is newer, so it is examined.
    """

    def __init__(self, tally, now: float, audit: Audit | None, horizon: float):
        """`tally`: the target's Tally (tally.py, below in the flow), which decodes and counts."""
        self.tally, self.now, self.audit, self.horizon = tally, now, audit, horizon
        self.fields = fields_type(bool(tally.metadata_keys))
        self.calls = tally.ledger.calls
        watermark = tally.ledger.watermark
        self.settled = float("inf") if watermark is None else watermark - tally.overlap  # older twins: unchanged
        # Created in here, a call the ledger does not know appeared in the past: the last read saw
        # that stretch of the list without it (bar the overlap's late commits).
        last = tally.last_read
        self.seen = (last[0], last[1] - tally.overlap) if last is not None else (0.0, 0.0)
        self.appeared: list[Mismatch] = []
        self.suspects = tally.not_found  # calls that answered 404 by id: is each still listed?
        self.suspects_listed: set[str] = set()
        self.newest: float | None = None
        self.records = self.examined = self.events = 0

    def take(self, obj: object) -> bool:
        """Account one element of the list; False once it lies past the settle window (stop there)."""
        self.records += 1
        audit, ledger = self.audit, self.tally.ledger
        if self.suspects:
            call_id = obj.get("id") if isinstance(obj, dict) else getattr(obj, "id", None)
            if type(call_id) is str and call_id in self.suspects:
                self.suspects_listed.add(call_id)
        if type(obj) is self.fields:
            # The common case, read without building a Record: where is it, has it changed?
            created, updated = timestamp_of(obj.created_at), timestamp_of(obj.updated_at)
            if created is not None and updated is not None:
                if created < self.horizon:
                    return False  # newest first: all that follows is settled history
                if self.newest is None or updated > self.newest:
                    self.newest = updated
                state = self.calls.get(obj.id) if type(obj.id) is str else None
                if state is not None and (updated < state.updated_at or updated == state.updated_at < self.settled) \
                        and (audit is None or not audit.covers(created)):
                    return True  # not news (Ledger.is_news), known before building a Record
        record = self.tally.decode(obj)
        if record is None:
            return True
        if record.created_at < self.horizon:
            return False
        if self.newest is None or record.updated_at > self.newest:
            self.newest = record.updated_at
        known = record.id in self.calls
        if not known and self.seen[0] <= record.created_at < self.seen[1] and record.created_at > ledger.baseline:
            self.appeared.append(Mismatch("missing", record.id, "appeared in the past, after a read of its time"
                                          " had not listed it; counted now"))
        if ledger.is_news(record.id, record.updated_at, self.tally.overlap):
            self.examined += 1
            self.events += self.tally.account(record, self.now)
        if audit is not None and audit.covers(record.created_at):
            # A settled call the ledger did not know before this read appeared in the past: it is
            # counted now like any news, and reported as missing from what had been counted.
            audit.check(record, self.calls.get(record.id) if known else None)
        return True

    def finish(self) -> None:
        """The read reached its end: the watermark moves to the newest update it saw."""
        self.tally.ledger.complete_poll(self.newest)
        self.tally.last_read, self.tally.read_at = (self.horizon, self.now), self.now
        if self.appeared:
            self.tally.report_mismatches(self.appeared)
        self.tally.listed(self)

    @property
    def stats(self) -> dict[str, int]:
        return {"records": self.records, "examined": self.examined, "events": self.events,
                "invalid": self.tally.invalid_logged}
