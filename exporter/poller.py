"""The loop of one target: fetch → account → persist → publish, then wait.

A poll reads `GET /v1/calls` newest first and stops at the settle window. Its counts reach
`/metrics` only after the state holding them is on disk (persist, then publish), so a crash
never shows Prometheus a counter going backwards. Faults back off with jitter; they never
end the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass

import aiohttp

from . import logs, state
from .accounting import Ledger
from .audit import Audit, Mismatch
from .budget import Budgets
from .api import ApiError, Client, NotFound, RateLimited, Unauthorized
from .config import ConfigError, Target, read_key_file
from .metrics import Collector, Health, Snapshot
from .store import Store
from .records import Invalid, decode_record, fields_type, fingerprint, timestamp_of
from .stragglers import Refresher

MAX_BACKOFF = 300.0
RATE_LIMIT_RETRIES = 3
INVALID_LOG_LIMIT = 10  # malformed records logged one by one per poll; the rest are summed up
REPORTED_MEMORY = 10_000  # audit mismatches remembered so a lie found twice counts once
INVALID_MEMORY = 10_000  # malformed records remembered so a re-read does not count them again
KEY_CHECK_INTERVAL = 1.0  # seconds between looks at api_key_file while waiting for the next poll

log = logging.getLogger(__name__)


@dataclass
class Status:
    """What the landing page and /-/ready say about a target."""

    up: bool = False
    ready: bool = False
    last_poll: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    failures: int = 0
    tracked: int = 0
    watermark: float | None = None
    backoff: float = 0.0  # seconds the next poll waits beyond poll_interval
    next_poll: float | None = None


class Poller:
    def __init__(
        self,
        target: Target,
        collector: Collector,
        session: aiohttp.ClientSession,
        clock=time.time,
        rng: random.Random | None = None,
        budgets: Budgets | None = None,
    ):
        self.target = target
        self.collector = collector
        key = target.api_key.reveal() if target.api_key is not None else None
        budget = (budgets or Budgets()).for_key(key, target.max_requests_per_minute)
        self.client = Client(session, target.api_url, target.api_key, target.request_timeout, self._count_response,
                             budget)
        self.clock = clock
        self.rng = rng or random.Random()
        self.status = Status()
        self.metadata_keys = tuple(key for key, _ in target.metadata_labels)
        self.extra_labels = tuple(label for _, label in target.metadata_labels)
        self.stragglers = Refresher(target.name, target.straggler_concurrency, target.straggler_batch,
                                    target.straggler_give_up, self.metadata_keys)
        self.store = Store(dict(target.buckets), target.max_label_values, self.extra_labels)
        self.ledger = Ledger(baseline=clock() - target.initial_lookback)
        self._invalid_seen: dict[str, None] = {}
        self._key_stamp: tuple | None = ("unread",)  # the api_key_file version in use; read again at the first poll
        self._wake = asyncio.Event()  # set to end the wait before the next poll
        self._streak: tuple[tuple[str, str], int, float] | None = None  # failing: (kind, polls, since)
        self._next_audit = clock() + target.audit_interval  # the first audit comes an interval after the start
        self._audit: Audit | None = None  # the audit riding on the current read, if one is due
        self.last_audit: float | None = None
        self._audited_until: float | None = None  # created_at up to which calls have been audited
        self._reported: set[tuple[str, str]] = set()  # (call id, kind) already counted as a mismatch

    @property
    def org(self) -> str:
        return self.target.name

    def _count_response(self, code: str) -> None:
        self.store.inc("callingbox_exporter_api_requests_total", (code,))

    async def restore(self) -> None:
        """Load the state file, if any, and serve its values at once (not ready until a poll)."""
        if self.target.state_file:
            restored = await asyncio.to_thread(
                state.load, self.target.state_file, self.org, dict(self.target.buckets), self.target.max_label_values,
                self.extra_labels,
            )
            if restored is not None:
                self.ledger, self.store = restored.ledger, restored.store
                log.info(
                    "state restored",
                    extra={"org": self.org, "tracked_calls": len(self.ledger.calls), "watermark": self.ledger.watermark},
                )
        summary = self.ledger.sweep(self.clock(), self.target.settle_window, self.target.straggler_give_up)
        self._publish(summary)

    def adopt(self, old: "Poller") -> None:
        """Take over a stopped poller of the same org (a reload changed its settings).

        Its ledger and counters carry on; with new buckets or label caps the store is rebuilt
        as a restore would. Nothing is published here: what the old poller had counted but not
        yet persisted is published after this poller's first save, as always.
        """
        self.ledger, self.status, self._invalid_seen = old.ledger, old.status, old._invalid_seen
        self._streak = old._streak
        self._key_stamp = ("unread",)
        settings = ("buckets", "max_label_values", "metadata_labels")
        if all(getattr(old.target, s) == getattr(self.target, s) for s in settings):
            self.store = old.store
        else:
            self.store, reset = Store.from_json(old.store.to_json(), dict(self.target.buckets),
                                                self.target.max_label_values, self.extra_labels)
            if old.extra_labels != self.extra_labels:
                for call in self.ledger.calls.values():
                    saved = dict(zip(old.extra_labels, call.extra))
                    call.extra = tuple(saved.get(label) for label in self.extra_labels)
            if reset:
                log.warning("histograms restarted: buckets changed", extra={"org": self.org, "histograms": ",".join(reset)})

    async def run(self) -> None:
        """Poll forever; returns only when cancelled."""
        while True:
            try:
                _, wait = await self.poll()
            except Exception:  # a bug must not end the loop; say so loudly and carry on
                log.exception("poll crashed", extra={"org": self.org})
                self.status.failures += 1
                wait = self._backoff(None)
            await self._wait(wait)

    def wake(self) -> None:
        """End the wait before the next poll (a reload, a rotated key): it runs now."""
        self._wake.set()

    async def _wait(self, seconds: float) -> None:
        """Sleep until the next poll is due, or less: a changed api_key_file ends the wait at once,
        so a rotated Secret fixes a rejected key within seconds, not after a long back-off."""
        deadline = time.monotonic() + seconds
        self._wake.clear()
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._wake.wait(), min(left, KEY_CHECK_INTERVAL))
                return
            except asyncio.TimeoutError:
                if self.target.api_key_file and self._key_stamp != _stamp(self.target.api_key_file):
                    if self.status.failures:
                        log.info("API key file changed; the back-off ends", extra={"org": self.org})
                    return

    async def poll(self) -> tuple[bool, float]:
        """One poll: read and account, persist, then publish. Returns (succeeded, wait before the next)."""
        started, now = time.monotonic(), self.clock()
        self.status.last_poll = now
        self._rotate_key()
        self.client.bytes_read = 0
        stats = {"records": 0, "examined": 0, "events": 0, "invalid": 0}
        problem: Exception | None = None
        audit_due = self.target.audit_interval > 0 and now >= self._next_audit
        try:
            await self._read(now, stats, audit_due)
            self.client.read_succeeded()
            if self._audit is not None and not self.client.not_modified:  # a 304 read nothing to audit
                self._conclude_audit(self._audit, now)
                if self.target.audit_sample:
                    await self._spot_check()
        except ApiError as error:
            problem = error
        except Exception as error:
            log.exception("poll crashed", extra={"org": self.org})
            problem = error
        self._audit = None
        read_seconds = time.monotonic() - started
        if problem is None:  # then the calls the list no longer shows; their failures do not fail the poll
            stats.update(await self.stragglers.refresh(self.client, self.ledger, self.store, now,
                                                       self.target.settle_window))
        self.store.inc("callingbox_exporter_polls_total", ("error" if problem else "success",))
        self.store.observe("callingbox_exporter_poll_duration_seconds", (), time.monotonic() - started)
        summary = self.ledger.sweep(now, self.target.settle_window, self.target.straggler_give_up)
        if summary.given_up:
            log.warning("stragglers given up", extra={"org": self.org, "calls": summary.given_up})
        durable = await self._persist()
        if not durable and problem is None:
            # Neither saved nor shown, so this poll's `success` can still become the error it is.
            self.store.inc("callingbox_exporter_polls_total", ("success",), -1)
            self.store.inc("callingbox_exporter_polls_total", ("error",))
            problem = OSError("state not saved")
        backoff = self._conclude(problem, now)
        # A list read slower than the interval slows the polls down to its pace: the API is never
        # read back to back, however large the window grows.
        delay = backoff if problem else max(self.target.poll_interval, read_seconds)
        self.status.backoff = max(0.0, delay - self.target.poll_interval)
        self.status.next_poll = self.clock() + delay
        if durable:
            self._publish(summary)
        log.debug(
            "poll done",
            extra={"org": self.org, "result": "error" if problem else "success", "bytes": self.client.bytes_read,
                   "tracked": summary.tracked, "duration_s": round(time.monotonic() - started, 3), **stats},
        )
        return problem is None, delay

    def _rotate_key(self) -> None:
        """Re-read api_key_file when it changed, so a rotated (Kubernetes) Secret needs no restart."""
        path = self.target.api_key_file
        if not path:
            return
        stamp = _stamp(path)
        if stamp is not None and stamp == self._key_stamp:
            return
        try:
            key = read_key_file("api_key_file", path)
        except ConfigError as error:
            if stamp != self._key_stamp:
                log.error("API key file unreadable; the previous key stays in use",
                          extra={"org": self.org, "error": str(error)})
            self._key_stamp = stamp
            return
        self._key_stamp = stamp
        if key != self.client.key:
            logs.redact(key.reveal())
            self.client.use_key(key)
            self.status.failures = 0  # a new key starts its own back-off, from the shortest
            log.info("API key reloaded from its file", extra={"org": self.org})

    async def _persist(self) -> bool:
        """Save the state file, if any. Not durable means not published: counts wait in memory."""
        if not self.target.state_file:
            return True
        try:
            await asyncio.to_thread(state.save, self.target.state_file, self.org, self.ledger, self.store)
            return True
        except Exception as error:
            log.error("state not saved", extra={"org": self.org, "path": self.target.state_file, "error": str(error)})
            return False

    def _conclude(self, problem: Exception | None, now: float) -> float:
        """Update the status the web pages show and log the streak. Returns the back-off.

        Expected trouble logs once per streak (STYLE.md): the first failure and each change of
        kind at warn (a rejected key at error), repeats at debug, and one info line on recovery.
        """
        status = self.status
        if problem is None:
            status.up, status.ready, status.last_error = True, True, None
            status.failures, status.last_success = 0, now
            if self._streak is not None:
                _, polls, since = self._streak
                log.info("poll recovered", extra={"org": self.org, "failures": polls, "down_s": round(now - since, 1)})
                self._streak = None
            return 0.0
        status.up, status.last_error = False, str(problem)
        status.failures += 1
        backoff = self._backoff(problem)
        code = getattr(problem, "code", "error")
        kind = (type(problem).__name__, code)
        previous, polls, since = self._streak or (None, 0, now)
        self._streak = (kind, polls + 1, since)
        rejected = isinstance(problem, Unauthorized)
        level = logging.DEBUG if kind == previous else logging.ERROR if rejected else logging.WARNING
        log.log(level, "API key rejected" if rejected else "poll failed",
                extra={"org": self.org, "code": code, "error": str(problem), "backoff_s": round(backoff, 2)})
        return backoff

    def _report(self, audit: Audit) -> int:
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

    def _conclude_audit(self, audit: Audit, now: float) -> None:
        """Count and log what a complete read's audit found; the next window is due an interval later."""
        audit.finish(self.ledger)
        mismatches = self._report(audit)
        self.last_audit, self._next_audit, self._audited_until = now, now + self.target.audit_interval, audit.end
        log.info("audit done", extra={"org": self.org, "checked": audit.checked, "mismatches": mismatches})

    async def _spot_check(self) -> None:
        """The audit's second half: a sample of tracked calls fetched by id and compared.

        Only a call whose API version is no newer than the one accounted can disagree: news is
        for the next list read, while a change that kept its `updated_at` is a silent rewrite.
        """
        candidates = [call_id for call_id, s in self.ledger.calls.items() if s.created_at > self.ledger.baseline]
        sample = self.rng.sample(candidates, min(self.target.audit_sample, len(candidates)))
        audit = Audit(float("-inf"), float("inf"), self.ledger.baseline)
        for call_id in sample:
            state = self.ledger.calls.get(call_id)
            try:
                obj = await self.client.get_call(call_id)
            except NotFound:
                if state is not None:
                    audit.checked += 1
                    audit.mismatches.append(Mismatch("extra", call_id, "counted, but the API answers 404 for it"))
                continue
            except ApiError as error:
                log.warning("audit spot-check stopped", extra={"org": self.org, "error": str(error)})
                break
            record = decode_record(obj, self.metadata_keys)
            if type(record) is Invalid or state is None or record.updated_at > state.updated_at:
                continue
            audit.check(record, state)
        if sample:
            self._report(audit)

    async def _read(self, now: float, stats: dict, audit_due: bool = False) -> None:
        """Read the list until the settle window and account every record in it."""
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            if audit_due:
                # The oldest interval still inside the settle window (settled, and read anyway),
                # joined to the last audited one so no call slips between two audits.
                horizon = now - self.target.settle_window
                start = self._audited_until if self._audited_until is not None and self._audited_until >= horizon else horizon
                self._audit = Audit(start, horizon + self.target.audit_interval, self.ledger.baseline)
            try:
                await self._read_once(now, stats)
                return
            except RateLimited as error:
                if attempt == RATE_LIMIT_RETRIES:
                    raise
                wait = min(MAX_BACKOFF, error.retry_after if error.retry_after is not None else self.target.poll_interval)
                log.warning("rate limited", extra={"org": self.org, "retry_after_s": wait})
                await asyncio.sleep(wait)

    async def _read_once(self, now: float, stats: dict) -> None:
        horizon = now - self.target.settle_window
        overlap, ledger, store, keys, audit = self.target.overlap, self.ledger, self.store, self.metadata_keys, self._audit
        fields = fields_type(bool(keys))
        cutoff = None if ledger.watermark is None else ledger.watermark - overlap  # older: unchanged, skipped
        newest: float | None = None
        past_window = False
        async with self.client.list_calls(fields) as batches:
            async for batch in batches:
                for obj in batch:
                    stats["records"] += 1
                    if type(obj) is fields:
                        # The common case, read without building a Record: where is it, has it changed?
                        created, updated = timestamp_of(obj.created_at), timestamp_of(obj.updated_at)
                        if created is not None and updated is not None:
                            if created < horizon:
                                past_window = True  # newest first: all that follows is settled history
                                break
                            if newest is None or updated > newest:
                                newest = updated
                            if cutoff is not None and updated < cutoff and (audit is None or not audit.covers(created)):
                                continue
                    record = decode_record(obj, keys)
                    if type(record) is Invalid:
                        self._invalid(obj, record, stats)
                        continue
                    if record.created_at < horizon:
                        past_window = True
                        break
                    if newest is None or record.updated_at > newest:
                        newest = record.updated_at
                    if ledger.examines(record.updated_at, overlap):
                        stats["examined"] += 1
                        events = ledger.account(record)
                        if events:
                            stats["events"] += len(events)
                            store.count(events, now)
                    if audit is not None and audit.covers(record.created_at):
                        audit.check(record, ledger.calls.get(record.id))
                if past_window:
                    break
                await asyncio.sleep(0)  # a large read yields to scrapes between chunks
        ledger.complete_poll(newest)

    def _invalid(self, obj: object, invalid: Invalid, stats: dict) -> None:
        """Count a malformed record once, however many polls read it again."""
        seen = fingerprint(obj)
        if seen in self._invalid_seen:
            return
        self._invalid_seen[seen] = None
        if len(self._invalid_seen) > INVALID_MEMORY:
            del self._invalid_seen[next(iter(self._invalid_seen))]
        self.store.inc("callingbox_exporter_invalid_records_total", (invalid.reason,))
        stats["invalid"] += 1
        if stats["invalid"] <= INVALID_LOG_LIMIT:
            log.warning("invalid record skipped", extra={"org": self.org, "reason": invalid.reason, "call_id": invalid.call_id})
        elif stats["invalid"] == INVALID_LOG_LIMIT + 1:
            log.warning("more invalid records this poll; counted, not logged", extra={"org": self.org})

    def _backoff(self, problem: Exception | None) -> float:
        """Exponential with ±20 % jitter, never past MAX_BACKOFF; a rejected key retries four times slower."""
        base = self.target.poll_interval * (4 if isinstance(problem, Unauthorized) else 1)
        delay = base * 2 ** min(self.status.failures - 1, 20)
        return min(MAX_BACKOFF, delay * self.rng.uniform(0.8, 1.2))

    def _active(self, active: dict[tuple, int]) -> dict[tuple, int]:
        """Active calls by direction, status and capped metadata values."""
        if not self.extra_labels:
            return active
        capped: dict[tuple, int] = {}
        for (direction, status, *extra), calls in active.items():
            key = (direction, status, *self.store.peek_extra(tuple(extra)))
            capped[key] = capped.get(key, 0) + calls
        return capped

    def _publish(self, summary) -> None:
        self.status.tracked, self.status.watermark = summary.tracked, self.ledger.watermark
        health = Health(
            up=self.status.up,
            last_success=self.status.last_success,
            watermark=self.ledger.watermark,
            tracked=summary.tracked,
            stragglers=summary.stragglers,
            active=self._active(summary.active),
            webhooks_pending=summary.webhooks_pending,
            webhook_pending_oldest=summary.webhook_pending_oldest,
            last_audit=self.last_audit,
            backoff=self.status.backoff,
            next_poll=self.status.next_poll,
        )
        self.collector.publish(self.org, Snapshot(self.store.copy(), health))


def _stamp(path: str) -> tuple | None:
    """The version of a file as the file system tells it (inode, size, mtime): a cheap change check."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
