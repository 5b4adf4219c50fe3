"""Self-audit: which window of long-settled calls is due (`AuditSchedule`), and what recounting it
against the ledger finds (`Audit`).

Pure, like the accounting: the list read feeds an `Audit` the records of its window as it passes
them (the window runs from where the last one ended to an `audit_interval` past the settle window,
so the calls in it are settled; see AuditSchedule.due), together with the ledger's state of each
call. A mismatch means the exporter's counts and the API disagree about a call: the API changed a
call without bumping `updated_at`, a call appeared in the past, one vanished, or a bug.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

from .accounting import CallState
from .catalogue import EXTRACTIONS, OUTCOMES
from .records import Record
from .settings import Settings

# An audit reaches back at most this many settle windows: after audits stalled for longer (an
# idle org answering 304s, audits turned off a while) the rest of the backlog is skipped, not read.
CATCH_UP = 2.0


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
        self.finished = False  # the tracked calls the read did not list are counted (`finish`)

    def fresh(self) -> Audit:
        """The same window, nothing checked yet: what each attempt of a read (a 429 retried) audits."""
        return Audit(self.start, self.end, self.baseline)

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

        `calls` iterates (call id, state) pairs: a Ledger does. Done once: after `unlisted` has
        walked them in slices, this walks nothing.
        """
        for _ in self.unlisted(calls, float("inf")):
            pass
        return self.mismatches

    def unlisted(self, calls: Iterable[tuple[str, CallState]], slice_size: float = 5_000) -> Iterator[int]:
        """`finish` a slice at a time: it yields after each `slice_size` calls (the calls walked so
        far), so the caller can serve scrapes between slices; the calls are taken at the start."""
        if self.finished:
            return
        pairs, walked = list(calls), 0
        while walked < len(pairs):
            end = int(min(len(pairs), walked + slice_size))
            for call_id, state in pairs[walked:end]:
                if self.covers(state.created_at) and call_id not in self.seen and state.created_at > self.baseline:
                    self.checked += 1
                    self.mismatches.append(Mismatch("extra", call_id, "counted, but the API no longer lists it"))
            walked = end
            yield walked
        self.finished = True


class AuditSchedule:
    """When one target's next audit window is due and where it starts: the windows tile the timeline."""

    def __init__(self, settings: Settings, now: float = 0.0):
        self.settle_window, self.interval = settings.settle_window, settings.audit_interval
        self.next_audit = now + self.interval  # the first audit comes an interval after the start
        self.last_audit: float | None = None
        # created_at up to which calls have been audited: where the next window starts. Saved in
        # the state file (`state`), so a restart neither skips nor repeats a slice.
        self.audited_until: float | None = None
        self.read_at: float | None = None  # when the last complete list read ran (saved too)

    def due(self, now: float, baseline: float) -> Audit | None:
        """The audit that rides on this poll's read, if one is due: from the end of the last audited
        window to an interval past the settle window (settled calls that the read reaches anyway).

        Windows tile the timeline, however late the poll: each starts exactly where the last
        one ended, and the poll's read reaches back to that start (plan.py). The calls created
        there are still in the ledger: a sweep keeps final calls created from `audited_until`
        on (`keep_from`) and runs only after the read. The first audit starts at the settle
        window: nothing before it was audited. A window ends no later than the previous read:
        a call this read is the first to list was not missed, it is new (a read gap, a first
        read), and the next window audits it. The start moves up, skipping what lies before,
        when reads stopped for longer than the settle window (calls created meanwhile were
        never read, so never counted: each would be reported missing) or when the backlog is
        older than CATCH_UP settle windows.
        """
        if not self.interval or now < self.next_audit:
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
        return Audit(start, max(start, min(horizon + self.interval, read_at)), baseline)

    def keep_from(self, now: float) -> float | None:
        """created_at from which a sweep keeps final calls past the settle window: the next
        audit window's, which a late audit reads past the window. None: the window alone."""
        if not self.interval or self.audited_until is None:
            return None
        return max(self.audited_until, now - CATCH_UP * self.settle_window)

    def read_done(self, now: float) -> None:
        """A complete list read ran at `now`: no later audit window ends past it."""
        self.read_at = now

    def concluded(self, audit: Audit, now: float) -> float:
        """An audit's window is done; the next is due an interval later. Returns the seconds of
        created_at skipped before its start (never to be audited), 0 when it joined the last."""
        skipped = 0.0
        if self.audited_until is not None and audit.start > self.audited_until:
            skipped = audit.start - self.audited_until
        self.last_audit, self.next_audit, self.audited_until = now, now + self.interval, audit.end
        return skipped

    def state(self) -> dict[str, float | None]:
        """What the state file keeps of the schedule (`resume` reads it back)."""
        return {"audited_until": self.audited_until, "read_at": self.read_at, "last_audit": self.last_audit}

    def resume(self, saved: dict) -> None:
        """Carry on from a restored `state`: the next window starts where the last one ended, due
        when it leaves the settle window, as it was before the restart. A state without it (the
        first start, an older version) keeps the schedule of a first start."""
        values = {key: saved.get(key) for key in ("audited_until", "read_at", "last_audit")}
        values = {key: float(v) if isinstance(v, (int, float)) else None for key, v in values.items()}
        self.read_at, self.last_audit = values["read_at"], values["last_audit"]
        if values["audited_until"] is not None:
            self.audited_until = values["audited_until"]
            self.next_audit = self.audited_until + self.settle_window

    def carry(self, old: AuditSchedule) -> None:
        """Carry on from the schedule of the same target before a reload."""
        self.next_audit, self.last_audit = old.next_audit, old.last_audit
        self.audited_until, self.read_at = old.audited_until, old.read_at
