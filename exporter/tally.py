"""One target's counting core: the only path from a raw call object of the API to counts.

It owns the ledger and the store, the memories that keep counts exact however often the API
shows the same thing (a malformed record counted once, an audit mismatch reported once), the
audit window, the read plan (how deep each poll reads, which open calls it asks by id) and the
health summary that /metrics, the landing page and /-/ready read. No I/O and no clock: the
poller reads the API and passes `now`, so every path here is a plain call. Past 300 lines
because the plan, the list read and the audit all decide what one call object means for the
counts, and read best side by side.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from typing import Iterator, NamedTuple

from .accounting import deviations
from .audit import Audit, Mismatch
from .catalogue import BY_ID_NOT_FOUND_BUT_LISTED, DEVIATION_BITS, END_GRACE, relabel
from .ledger import Ledger, Summary, give_up_age
from .listread import ListRead
from .records import Invalid, Record, decode_record, fingerprint
from .store import Store

INVALID_MEMORY = 10_000  # malformed records remembered so a re-read does not count them again
INVALID_LOG_LIMIT = 10  # malformed records logged one by one per read; the rest are summed up
REPORTED_MEMORY = 10_000  # audit mismatches remembered so a lie found twice counts once
BYTES_PER_CALL = 1500.0  # a call object's size in a list read, until a read has measured it
REQUEST_BYTES = 500.0  # what a request by id costs beyond its body: headers both ways
# An audit reaches back at most this many settle windows: after audits stalled for longer (an
# idle org answering 304s, audits turned off a while) the rest of the backlog is skipped, not read.
CATCH_UP = 2.0

log = logging.getLogger(__name__)


@dataclass
class Status:
    """What the poller knows of its own schedule: the part of the health the ledger cannot say."""

    up: bool = False
    ready: bool = False  # the first poll since the start has finished, successfully or not (/-/ready)
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
    audited_until: float | None = None  # created_at up to which the audit windows reach
    read_depth: float = 0.0  # seconds of history the last list read covered
    last_full_read: float | None = None
    open_calls: dict = field(default_factory=dict)  # refresh path ("list", "by_id") → open calls
    daily_budget_dollars: float | None = None  # the target's daily_budget_dollars, if it sets one


class Plan(NamedTuple):
    """What one poll reads: the list down to `horizon`, then `by_id` calls by id."""

    horizon: float
    full: bool
    by_id: list[str]
    open_calls: dict[str, int]  # refresh path → open calls


class Tally:
    def __init__(self, org: str, ledger: Ledger, store: Store, metadata_keys: tuple[str, ...] = (), *,
                 settle_window: float, overlap: float, give_up_after: float, audit_interval: float = 0.0,
                 now: float = 0.0, hot_window: float = 1800.0, full_read_interval: float = 3600.0,
                 refresh_interval: float = 300.0, poll_interval: float = 15.0, end_grace: float = END_GRACE):
        self.org, self.ledger, self.store, self.metadata_keys = org, ledger, store, metadata_keys
        self.settle_window, self.overlap, self.give_up_after = settle_window, overlap, give_up_after
        self.audit_interval = audit_interval
        self.hot_window, self.full_read_interval = hot_window, full_read_interval
        self.refresh_interval, self.poll_interval, self.end_grace = refresh_interval, poll_interval, end_grace
        # Calls that answered 404 by id: dropped only once a list read that covers them lacks them too.
        self.not_found: dict[str, float] = {}  # call id → created_at
        self._invalid_seen: dict[str, None] = {}  # fingerprints, oldest first
        self._reported: set[tuple[str, str]] = set()  # (call id, kind) already counted as a mismatch
        self.invalid_logged = 0  # malformed records logged in the current read
        self.next_audit = now + audit_interval  # the first audit comes an interval after the start
        self.last_audit: float | None = None
        # created_at up to which calls have been audited: where the next window starts. Saved in
        # the state file (audit_state), so a restart neither skips nor repeats a slice.
        self.audited_until: float | None = None
        self.read_at: float | None = None  # when the last complete list read ran (saved too)
        self.next_full_read = now  # the first poll reads the whole settle window
        self.last_full_read: float | None = None
        self.bytes_per_call = BYTES_PER_CALL  # measured by each list read
        self.calls_per_second = 1.0  # how fast the list grows, in created_at: measured by each list read
        self.last_read: tuple[float, float] | None = None  # (horizon, time) of the last complete list read
        self.last_plan: Plan | None = None

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

    def list_read(self, now: float, audit: Audit | None = None, horizon: float | None = None) -> ListRead:
        self.invalid_logged = 0
        return ListRead(self, now, audit, now - self.settle_window if horizon is None else horizon)

    def expire(self, now: float) -> int:
        """Count `none` for the hangups that `end_grace` after their call's end are still unknown."""
        events = self.ledger.overdue(now, self.end_grace)
        if events:
            self.store.count(events, now)
        return len(events)

    def listed(self, read: ListRead) -> None:
        """After a complete read: a call that answered 404 by id is gone only if the read covers
        its creation and did not list it (SPEC §4 "Not found"); one it listed was a lagging read."""
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

    # ---- the read plan: read only what can have changed (SPEC §4) ---------------------------

    def plan(self, now: float, last_refreshed: dict[str, float], batch: int) -> Plan:
        """How deep this poll reads the list, and which open calls past that depth it asks by id.

        A full read of the settle window comes first, then every `full_read_interval` (and with
        each audit). Otherwise the read covers `hot_window`, where new calls and their normal
        lifecycle show, and never less than back to the newest update already read, less the
        overlap (a restart after downtime reads what it missed). An open call older than that
        is due by id once its refresh interval, which grows with its age up to
        `refresh_interval`, has passed; the read goes deeper instead where the calls in between
        cost fewer bytes than the requests would, or where more are due than `batch` a poll can ask
        within a refresh interval.
        """
        window = now - self.settle_window
        watermark = self.ledger.watermark
        audit = self.audit_due(now)
        full = watermark is None or now >= self.next_full_read or audit is not None
        horizon = window if full else max(window, min(now - self.hot_window, watermark - self.overlap))
        if self.not_found:
            # A call that answered 404 by id is settled by the next read that covers it.
            horizon = min(horizon, min(self.not_found.values()))
        if audit is not None:
            # The audit's window starts where the last one ended. The poll that carries it comes
            # after the interval has passed, so that start lies a little past the settle window:
            # the read reaches back to it (at most CATCH_UP windows, see audit_due).
            horizon = min(horizon, audit.start)
        give_up = now - give_up_age(self.settle_window, self.give_up_after)
        due: list[tuple[float, str]] = []  # (created_at, id): open calls past the read whose turn has come
        listed = past = 0  # open calls the list read reaches; those it does not
        calls = self.ledger.calls
        for call_id in self.ledger.open:
            s = calls.get(call_id)
            if s is None:
                continue
            created = s.created_at
            if created >= horizon:
                listed += 1
                continue
            if created < give_up:
                continue
            past += 1
            # Its turn: a twentieth of its age, within [poll_interval, refresh_interval], shortened by
            # up to half by its id, so calls asked together do not stay in step.
            every = min(self.refresh_interval, max(self.poll_interval, (now - created) / 20))
            every *= 0.5 + (hash(call_id) & 1023) / 2048
            if now - last_refreshed.get(call_id, float("-inf")) >= every:
                due.append((created, call_id))
        due.sort(reverse=True)  # newest first: the cheapest to reach by reading deeper
        if due and not full:
            # Reading down to a call costs the calls created in between, at the rate the list grows.
            # By id, `batch` a poll serve a refresh interval's turns; a backlog beyond that is read.
            by_id_cost = self.bytes_per_call + REQUEST_BYTES
            capacity = batch * max(1.0, self.refresh_interval / self.poll_interval)
            reach = None
            for i, (created, _) in enumerate(due):
                if created < window:
                    break  # past the settle window: only by id
                between = (horizon - created) * self.calls_per_second
                if between * self.bytes_per_call <= (i + 1) * by_id_cost or len(due) - i - 1 >= capacity:
                    reach = i
            if reach is not None:
                horizon = due[reach][0]
                listed, past = listed + reach + 1, past - reach - 1
                due = due[reach + 1:]
        # By id, the least recently asked first (then the oldest), so each gets its turn.
        asked = sorted(due, key=lambda d: (last_refreshed.get(d[1], float("-inf")), d[0]))
        return Plan(horizon, full, [call_id for _, call_id in asked[:batch]], {"list": listed, "by_id": past})

    def read_done(self, read: ListRead, plan: Plan, bytes_read: int) -> None:
        """Learn from a complete list read: the size of a call, when the next full read is due."""
        if read.records:
            self.bytes_per_call = max(200.0, bytes_read / read.records)
            self.calls_per_second = read.records / max(1.0, read.now - read.horizon)
        if plan.full:
            self.last_full_read, self.next_full_read = read.now, read.now + self.full_read_interval
        self.last_plan = plan

    # ---- the self-audit ------------------------------------------------------------------

    def audit_due(self, now: float) -> Audit | None:
        """The audit that rides on this read, if one is due: from the end of the last audited
        window to an interval past the settle window (settled calls that the read reaches anyway).

        Windows tile the timeline, however late the poll: each starts exactly where the last
        one ended, and the poll's read reaches back to that start (`plan`). The calls created
        there are still in the ledger: a sweep keeps final calls created from `audited_until`
        on (`keep_from`) and runs only after the read. The first audit starts at the settle
        window: nothing before it was audited. A window ends no later than the previous read:
        a call this read is the first to list was not missed, it is new (a read gap, a first
        read), and the next window audits it. The start moves up, skipping what lies before,
        when reads stopped for longer than the settle window (calls created meanwhile were
        never read, so never counted: each would be reported missing) or when the backlog is
        older than CATCH_UP settle windows.
        """
        if not self.audit_interval or now < self.next_audit:
            return None
        horizon = now - self.settle_window
        read_at = float("-inf") if self.read_at is None else self.read_at
        start = self.audited_until
        if start is None:
            start = horizon
        elif read_at < horizon:
            start = max(start, horizon)
        else:
            start = max(start, now - CATCH_UP * self.settle_window)
        # max: a settle window made longer by a reload can put the start past the end; the window is empty
        return Audit(start, max(start, min(horizon + self.audit_interval, read_at)), self.ledger.baseline)

    def keep_from(self, now: float) -> float | None:
        """created_at from which a sweep keeps final calls past the settle window: the next
        audit window's, which a late audit reads past the window. None: the window alone."""
        if not self.audit_interval or self.audited_until is None:
            return None
        return max(self.audited_until, now - CATCH_UP * self.settle_window)

    def conclude_audit(self, audit: Audit, now: float) -> None:
        """Count and log what a complete read's audit found; the next window is due an interval later."""
        audit.finish(self.ledger)
        mismatches = self.report(audit, "window")
        if self.audited_until is not None and audit.start > self.audited_until:
            skipped = audit.start - self.audited_until
            self.store.inc("callingbox_exporter_audit_skipped_seconds_total", (), skipped)
            log.warning("audit skipped calls never to be audited", extra={
                "org": self.org, "from": self.audited_until, "to": audit.start, "skipped_s": round(skipped, 3)})
        self.last_audit, self.next_audit, self.audited_until = now, now + self.audit_interval, audit.end
        log.info("audit done", extra={"org": self.org, "start": audit.start, "end": audit.end,
                                      "checked": audit.checked, "mismatches": mismatches})

    def audit_state(self) -> dict[str, float | None]:
        """What the state file keeps of the audit's schedule (`resume_audit` reads it back)."""
        return {"audited_until": self.audited_until, "read_at": self.read_at, "last_audit": self.last_audit}

    def resume_audit(self, saved: dict) -> None:
        """Carry on from a restored `audit_state`: the next window starts where the last one ended,
        due when it leaves the settle window, as it was before the restart. A state without it
        (the first start, an older version) keeps the schedule of a first start."""
        values = {key: saved.get(key) for key in ("audited_until", "read_at", "last_audit")}
        values = {key: float(v) if isinstance(v, (int, float)) else None for key, v in values.items()}
        self.read_at, self.last_audit = values["read_at"], values["last_audit"]
        if values["audited_until"] is not None:
            self.audited_until = values["audited_until"]
            self.next_audit = self.audited_until + self.settle_window

    def report(self, audit: Audit, method: str) -> int:
        """Count the calls an audit checked (`method`: window, spot_check) and its mismatches,
        each call and kind once however often it is found."""
        self.store.inc("callingbox_exporter_audit_calls_checked_total", (method,), audit.checked)
        return self.report_mismatches(audit.mismatches)

    def report_mismatches(self, mismatches: list[Mismatch]) -> int:
        found = 0
        for mismatch in mismatches:
            if (mismatch.call_id, mismatch.kind) in self._reported:
                continue
            self._reported.add((mismatch.call_id, mismatch.kind))
            found += 1
            self.store.inc("callingbox_exporter_audit_mismatches_total", (mismatch.kind,))
            log.warning("audit mismatch", extra={"org": self.org, "kind": mismatch.kind, "call_id": mismatch.call_id,
                                                 "detail": mismatch.detail})
        if len(self._reported) > REPORTED_MEMORY:  # forget calls no longer tracked
            self._reported = {r for r in self._reported if r[0] in self.ledger.calls}
        return found

    def spot_sample(self, rng: random.Random, size: int) -> list[str]:
        """Tracked calls to fetch by id and compare: any counted after the baseline."""
        candidates = [call_id for call_id, s in self.ledger.calls.items() if s.created_at > self.ledger.baseline]
        return rng.sample(candidates, min(size, len(candidates)))

    def spot_check(self, audit: Audit, call_id: str, obj: object | None) -> None:
        """Compare one call fetched by id (None: the API answered 404) with what was counted.

        Only a call whose API version is no newer than the one accounted can disagree: news is
        for the next list read, while a change that kept its `updated_at` is a silent rewrite. A
        404 proves nothing alone (by-id reads may lag the list): the next read that covers the
        call tells (`listed`), and a call it lacks is reported by the window audit or vanishes.
        """
        state = self.ledger.calls.get(call_id)
        if obj is None:
            self.missing_by_id(call_id)
            return
        record = self.decode(obj)
        if record is None or state is None or record.updated_at > state.updated_at:
            return
        audit.check(record, state)

    # ---- bounded memory and the health summary ---------------------------------------------

    def prune(self, now: float) -> Iterator[int]:
        """The whole-ledger part of a sweep, in slices (Ledger.prune): a full read's poll runs it."""
        keep_from = self.keep_from(now)
        horizon = now - self.settle_window
        return self.ledger.prune(horizon if keep_from is None else min(horizon, keep_from))

    def sweep(self, now: float, everything: bool = True) -> Summary:
        """Drop calls the ledger need not keep (see Ledger.sweep) and summarise the open ones."""
        summary = self.ledger.sweep(now, self.settle_window, self.give_up_after, everything, self.keep_from(now))
        if summary.given_up:
            log.warning("stragglers given up", extra={"org": self.org, "calls": summary.given_up})
        return summary

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

    def health(self, summary: Summary, status: Status, extra_labels: tuple[str, ...] = ()) -> Health:
        """The one summary of a target that its gauges, card and readiness show."""
        active = {}
        for (direction, call_status, *extra), calls in summary.active.items():
            # capped like the counters' label values: statuses outside the docs, metadata values
            key = (direction, self.store.status(call_status, peek=True), *self.store.peek_extra(tuple(extra)))
            active[key] = active.get(key, 0) + calls
        plan = self.last_plan
        return Health(replace(status), self.ledger.watermark, summary.tracked, summary.stragglers, active,
                      summary.webhooks_pending, summary.webhook_pending_oldest, self.last_audit, self.audited_until,
                      0.0 if plan is None else max(0.0, (status.last_poll or 0.0) - plan.horizon),
                      self.last_full_read, {} if plan is None else dict(plan.open_calls))

    def adopt(self, old: "Tally", extra_labels: tuple[str, ...], old_extra_labels: tuple[str, ...],
              same_store: bool, buckets: dict, label_limit: int) -> list[str]:
        """Carry an old tally of the same org over a reload; returns histograms restarted."""
        self.ledger, self._invalid_seen, self._reported = old.ledger, old._invalid_seen, old._reported
        self.not_found = old.not_found
        self.next_audit, self.last_audit, self.audited_until = old.next_audit, old.last_audit, old.audited_until
        self.read_at = old.read_at
        # The read plan carries on too: a reload is no reason for a full read.
        self.next_full_read = min(old.next_full_read, (old.last_full_read or old.next_full_read) + self.full_read_interval)
        self.last_full_read, self.last_read, self.last_plan = old.last_full_read, old.last_read, old.last_plan
        self.bytes_per_call, self.calls_per_second = old.bytes_per_call, old.calls_per_second
        if same_store:
            self.store = old.store
            return []
        self.store, reset = Store.from_json(old.store.to_json(), buckets, label_limit, extra_labels)
        if old_extra_labels != extra_labels:
            for call in self.ledger.calls.values():
                call.extra = relabel(old_extra_labels, call.extra, extra_labels)
            self.ledger.touch_all()
        return reset
