"""One target's gate: the only path from a raw call object of the API to counts (decode → account → store).

A list read (`ListRead`) takes the stream of call objects, skips those that hold no news, decodes
the rest (records.py), accounts them in the ledger (ledger.py, accounting.py) and counts the events
in the store; a call fetched by id takes the same gate. The tally also keeps the memories that keep
counts exact however often the API shows the same thing (a malformed record counted once, an audit
mismatch reported once by findings.py, a 404 by id settled by the next read). The read plan
(plan.py) and the audit schedule (audit.py) ride along. No clock: the poller passes `now`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from typing import NamedTuple

from .accounting import deviations
from .audit import Audit, AuditSchedule, Mismatch
from .catalogue import BY_ID_NOT_FOUND_BUT_LISTED, DEVIATION_BITS, relabel
from .counting import Counting
from .findings import Findings
from .ledger import Ledger, Summary
from .plan import Plan, ReadPlanner
from .records import Invalid, Record, decode_record, fields_type, fingerprint, timestamp_of
from .settings import Settings
from .store import Store

INVALID_MEMORY = 10_000  # malformed records remembered so a re-read does not count them again
INVALID_LOG_LIMIT = 10  # malformed records logged one by one per read; the rest are summed up

log = logging.getLogger(__name__)


class ReadResult(NamedTuple):
    """What one complete list read saw: `Tally.settle_read` learns from it, the poller logs `stats`."""

    plan: Plan
    now: float
    horizon: float
    audit: Audit | None  # the audit window that rode on the read, checked as far as the read went
    newest: float | None  # the newest updated_at listed
    records: int
    examined: int
    events: int
    invalid: int  # malformed records logged in this read
    bytes: int  # body bytes the read took
    not_modified: bool  # a 304: the list is as it was at the last full read
    appeared: list[Mismatch]  # unknown calls listed where an earlier read had not listed them
    suspects_listed: frozenset[str]  # calls that answered 404 by id, listed after all

    @property
    def stats(self) -> dict[str, int]:
        return {"records": self.records, "examined": self.examined, "events": self.events, "invalid": self.invalid}


class Tally:
    """One target's counting gate, with its ledger, store, read plan and audit schedule."""

    def __init__(self, settings: Settings, ledger: Ledger, store: Store, now: float = 0.0):
        self.settings, self.ledger, self.store = settings, ledger, store
        self.planner = ReadPlanner(settings, now)
        self.schedule = AuditSchedule(settings, now)
        # Calls that answered 404 by id: dropped only once a list read that covers them lacks them too.
        self.not_found: dict[str, float] = {}  # call id → created_at
        self._invalid_seen: dict[str, None] = {}  # fingerprints, oldest first
        self.findings = Findings(settings.org, log)  # audit mismatches reported, each once
        self.invalid_logged = 0  # malformed records logged in the current read

    @property
    def org(self) -> str:
        return self.settings.org

    # ---- raw call object → counts ---------------------------------------------------------

    def decode(self, obj: object) -> Record | None:
        """The record, or None for a malformed one: counted and logged once, however often it is read."""
        record = decode_record(obj, self.settings.metadata_keys)
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
                log.warning(
                    "invalid record skipped",
                    extra={"org": self.org, "reason": record.reason, "call_id": record.call_id},
                )
            elif self.invalid_logged == INVALID_LOG_LIMIT + 1:
                log.warning("more invalid records this poll; counted, not logged", extra={"org": self.org})
        return None

    def count(self, record: Record, now: float, counting: Counting | None = None) -> int:
        """Count what `record` says that the ledger has not counted yet; returns the events.
        `counting`: the store's counting at `now` that a list read counts all its calls through."""
        events = self.ledger.account(record)
        if events:
            if counting is None:
                self.store.count(events, now)
            else:
                counting.count(events)
        return len(events)

    def expire(self, now: float) -> int:
        """Count `none` for the hangups that `end_grace` after their call's end are still unknown."""
        events = self.ledger.overdue(now, self.settings.end_grace)
        if events:
            self.store.count(events, now)
        return len(events)

    # ---- the list read ---------------------------------------------------------------------

    def plan(self, now: float, last_refreshed: dict[str, float], batch: int) -> Plan:
        """What this poll reads (plan.py), with the audit that is due riding on it."""
        audit = self.schedule.due(now, self.ledger.baseline)
        return self.planner.plan(now, self.ledger, audit, self.not_found.values(), last_refreshed, batch)

    def list_read(self, now: float, plan: Plan | None = None) -> ListRead:
        """A read as `plan` says; without one, the settle window without an audit."""
        self.invalid_logged = 0
        return ListRead(self, now, plan or Plan(now - self.settings.settle_window, True, [], {}))

    def settle_read(self, read: ReadResult) -> None:
        """After a complete read: the watermark moves to the newest update it saw, the plan learns
        from it, calls that appeared in the past are reported, and 404s by id are settled."""
        self.ledger.complete_poll(read.newest)
        self.schedule.read_done(read.now)
        self.planner.learn(read.plan, read.now, read.horizon, read.records, read.bytes)
        if read.appeared:
            self.findings.report_mismatches(read.appeared, self.ledger, self.store)
        self._settle_not_found(read)

    def _settle_not_found(self, read: ReadResult) -> None:
        """A call that answered 404 by id is gone only if the read covers its creation and did not
        list it (SPEC §4 "Not found"); one it listed was a lagging read."""
        for call_id, created in list(self.not_found.items()):
            state = self.ledger.calls.get(call_id)
            if state is None:
                del self.not_found[call_id]
            elif call_id in read.suspects_listed:
                del self.not_found[call_id]
                self.store.count(deviations(state, DEVIATION_BITS[BY_ID_NOT_FOUND_BUT_LISTED]))
                self.ledger.changed.add(call_id)
            elif created >= read.horizon:
                del self.not_found[call_id]
                self.vanished(call_id)
                log.warning("tracked call vanished from the API", extra={"org": self.org, "call_id": call_id})

    def missing_by_id(self, call_id: str) -> bool:
        """`GET /v1/calls/{id}` answered 404 for a tracked call: the next read that covers it tells."""
        state = self.ledger.calls.get(call_id)
        if state is None or call_id in self.not_found:
            return False
        self.not_found[call_id] = state.created_at
        return True

    def vanished(self, call_id: str) -> bool:
        """A tracked call the API no longer knows: it is forgotten and counted once."""
        if not self.ledger.forget(call_id):
            return False
        self.store.inc("callingbox_exporter_vanished_calls_total", ())
        return True

    # ---- the self-audit's findings (findings.py) -----------------------------------------

    def conclude_audit(self, audit: Audit, now: float) -> None:
        """Count and log what a complete read's audit found; the next window is due an interval later."""
        self.findings.conclude(audit, now, self.ledger, self.store, self.schedule)

    def report(self, audit: Audit, method: str) -> int:
        """Count the calls an audit checked (`method`: window, spot_check) and its mismatches,
        each call and kind once however often it is found."""
        return self.findings.report(audit, method, self.ledger, self.store)

    def spot_candidates(self, slice_size: int = 5_000) -> Iterator[list[str]]:
        """The calls a spot-check may sample (any counted after the baseline), a slice of the
        ledger at a time, so the caller can serve scrapes between slices (stragglers.py)."""
        pairs, baseline = list(self.ledger.calls.items()), self.ledger.baseline
        for start in range(0, len(pairs), slice_size):
            yield [call_id for call_id, s in pairs[start : start + slice_size] if s.created_at > baseline]

    def spot_check(self, audit: Audit, call_id: str, obj: object | None) -> None:
        """Compare one call fetched by id (None: the API answered 404) with what was counted.

        Only a call whose API version is no newer than the one accounted can disagree: news is
        for the next list read, while a change that kept its `updated_at` is a silent rewrite. A
        404 proves nothing alone (by-id reads may lag the list): the next read that covers the
        call tells, and a call it lacks is reported by the window audit or vanishes.
        """
        state = self.ledger.calls.get(call_id)
        if obj is None:
            self.missing_by_id(call_id)
            return
        record = self.decode(obj)
        if record is None or state is None or record.updated_at > state.updated_at:
            return
        audit.check(record, state)

    # ---- bounded memory ---------------------------------------------------------------------

    def prune(self, now: float) -> Iterator[int]:
        """The whole-ledger part of a sweep, in slices (Ledger.prune): a full read's poll runs it."""
        keep_from = self.schedule.keep_from(now)
        horizon = now - self.settings.settle_window
        return self.ledger.prune(horizon if keep_from is None else min(horizon, keep_from))

    def sweep(self, now: float, everything: bool = True) -> Summary:
        """Drop calls the ledger need not keep (see Ledger.sweep) and summarise the open ones."""
        s = self.settings
        summary = self.ledger.sweep(now, s.settle_window, s.give_up_after, everything, self.schedule.keep_from(now))
        if summary.given_up:
            log.warning("stragglers given up", extra={"org": self.org, "calls": summary.given_up})
        return summary

    def adopt(
        self,
        old: Tally,
        extra_labels: tuple[str, ...],
        old_extra_labels: tuple[str, ...],
        same_store: bool,
        buckets: dict,
        label_limit: int,
    ) -> list[str]:
        """Carry an old tally of the same org over a reload; returns histograms restarted."""
        self.ledger, self._invalid_seen, self.findings = old.ledger, old._invalid_seen, old.findings
        self.not_found = old.not_found
        self.schedule.carry(old.schedule)
        self.planner.carry(old.planner)  # the read plan carries on too: a reload is no reason for a full read
        if same_store:
            self.store = old.store
            return []
        self.store, reset = Store.from_json(old.store.to_json(), buckets, label_limit, extra_labels)
        if old_extra_labels != extra_labels:
            for call in self.ledger.calls.values():
                call.extra = relabel(old_extra_labels, call.extra, extra_labels)
            self.ledger.touch_all()
        return reset


class ListRead:
    """One read of `GET /v1/calls` in progress, newest first down to its plan's horizon: each
    element goes through the gate (skip what is no news, decode, account, count) as it streams in.

    A record whose `updated_at` says it is no news (Ledger.is_news) is skipped before a `Record`
    is built, unless the audit riding on this read covers it. The check is per call, so a read may
    reach deeper than the last one (a full read, an open call) and still count each change once.
    """

    def __init__(self, tally: Tally, now: float, plan: Plan):
        self.tally, self.now, self.plan, self.horizon = tally, now, plan, plan.horizon
        self.audit = plan.audit.fresh() if plan.audit is not None else None  # each attempt audits afresh
        self.fields = fields_type(bool(tally.settings.metadata_keys))
        self.calls, self.baseline, self.overlap = tally.ledger.calls, tally.ledger.baseline, tally.settings.overlap
        self.is_news = tally.ledger.is_news
        # Created in here, a call the ledger does not know appeared in the past: the last read saw
        # that stretch of the list without it (bar the overlap's late commits).
        last = tally.planner.last_read
        self.seen = (last[0], last[1] - self.overlap) if last is not None else (0.0, 0.0)
        self.appeared: list[Mismatch] = []
        self.suspects = tally.not_found  # calls that answered 404 by id: is each still listed?
        self.suspects_listed: set[str] = set()
        self.newest: float | None = None
        self.records = self.examined = self.events = 0
        # Each series' bookkeeping once per read, its counts summed until a flush: `result` or the end of `drain`.
        self.counting = tally.store.counting(now)

    async def drain(self, body: AsyncIterable[list[object]], between: Callable[[], Awaitable[None]]) -> ReadResult:
        """Take the batches of a list body (api.ListBody) until one lies past the horizon, awaiting
        `between` after each (the poller yields to scrapes there); returns what the read saw."""
        try:
            async for batch in body:
                if not all(map(self.take, batch)):
                    break  # past the horizon: leaving the body closes the response
                await between()
        finally:  # a read that fails or is cancelled midway keeps what it counted, as event by event
            self.counting.flush()
        return self.result(getattr(body, "bytes", 0), getattr(body, "not_modified", False))

    def take(self, obj: object) -> bool:
        """Account one element of the list; False once it lies past the horizon (stop there)."""
        self.records += 1
        audit = self.audit
        if self.suspects:
            call_id = obj.get("id") if isinstance(obj, dict) else getattr(obj, "id", None)
            if type(call_id) is str and call_id in self.suspects:
                self.suspects_listed.add(call_id)
        news = None  # whether it is news, once asked
        if type(obj) is self.fields:
            # The common case, read without building a Record: where is it, is it news?
            created, updated = timestamp_of(obj.created_at), timestamp_of(obj.updated_at)
            if created is not None and updated is not None:
                if created < self.horizon:
                    return False  # newest first: all that follows is settled history
                if self.newest is None or updated > self.newest:
                    self.newest = updated
                if type(obj.id) is str:
                    news = self.is_news(obj.id, updated, self.overlap)  # the record will say the same
                    if not news and (audit is None or not audit.covers(created)):
                        return True
        record = self.tally.decode(obj)
        if record is None:
            return True
        if record.created_at < self.horizon:
            return False
        if self.newest is None or record.updated_at > self.newest:
            self.newest = record.updated_at
        known = record.id in self.calls
        if not known and self.seen[0] <= record.created_at < self.seen[1] and record.created_at > self.baseline:
            self.appeared.append(
                Mismatch(
                    "missing",
                    record.id,
                    "appeared in the past, after a read of its time had not listed it; counted now",
                )
            )
        if news if news is not None else self.is_news(record.id, record.updated_at, self.overlap):
            self.examined += 1
            self.events += self.tally.count(record, self.now, self.counting)
        if audit is not None and audit.covers(record.created_at):
            # A settled call the ledger did not know before this read appeared in the past: it is
            # counted now like any news, and reported as missing from what had been counted.
            audit.check(record, self.calls.get(record.id) if known else None)
        return True

    def result(self, body_bytes: int = 0, not_modified: bool = False) -> ReadResult:
        """What the read saw, for `Tally.settle_read` once it reached its end; its counts are in the store."""
        self.counting.flush()
        return ReadResult(
            self.plan,
            self.now,
            self.horizon,
            self.audit,
            self.newest,
            self.records,
            self.examined,
            self.events,
            self.tally.invalid_logged,
            body_bytes,
            not_modified,
            self.appeared,
            frozenset(self.suspects_listed),
        )
