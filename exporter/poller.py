"""The loop of one target: read the API → count (the tally) → persist → publish, then wait.

Only what is asynchronous lives here: the schedule, the key, the reads, the state file and
the back-off. Each poll hands what it reads to the target's `Tally`, whose counts reach
`/metrics` only after the state holding them is on disk (persist, then publish), so a crash
never shows Prometheus a counter going backwards. Faults back off with jitter; they never end
the loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import time

import aiohttp

from . import logs, state
from .api import ApiError, Client, NotFound, RateLimited, Unauthorized
from .audit import Audit
from .budget import Budgets
from .config import ConfigError, Target, read_key_file
from .health import Snapshot, Status, summarise
from .ledger import Ledger
from .liveness import Heartbeat, ledger_work
from .metrics import Collector
from .plan import Plan
from .selfmetrics import SelfMetrics
from .settings import Settings
from .store import Store
from .stragglers import Refresher
from .tally import ReadResult, Tally

MAX_BACKOFF = 300.0
RATE_LIMIT_RETRIES = 3
KEY_CHECK_INTERVAL = 1.0  # seconds between looks at api_key_file while waiting for the next poll
FREEZE_CALLS = 10_000  # calls restored or newly tracked before the ledger is frozen out of the cyclic GC

log = logging.getLogger(__name__)


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
        self.heartbeat = Heartbeat()  # every wait of the loop is a step with its bound: /-/healthy reads it
        key = target.api_key.reveal() if target.api_key is not None else None
        budget = (budgets or Budgets()).for_key(key, target.max_requests_per_minute)
        self.clock = clock
        self.rng = rng or random.Random()
        self.status = Status()
        self.extra_labels = tuple(label for _, label in target.metadata_labels)
        self.settings = Settings.of(target)
        self.tally = self._tally(Ledger(baseline=clock() - target.initial_lookback),
                                 Store(dict(target.buckets), target.max_label_values, self.extra_labels))
        self.metrics = SelfMetrics(self.store)  # the client's requests and bytes, the polls: into the store
        self.client = Client(session, target.api_url, target.api_key, target.request_timeout, self.metrics,
                             budget, self.heartbeat.step)
        self.stragglers = Refresher(target.name, target.straggler_concurrency, target.straggler_batch)
        self._key_stamp: tuple | None = ("unread",)  # the api_key_file version in use; read again at the first poll
        self._wake = asyncio.Event()  # set to end the wait before the next poll
        self._streak: tuple[tuple[str, str], int, float] | None = None  # failing: (kind, polls, since)
        self.db: state.StateDB | None = None  # the state file's database, once restored
        self._saving: asyncio.Future | None = None  # the last save, running in a worker thread
        self._frozen = 0  # tracked calls at the last gc.freeze (see _freeze_growth)

    def _tally(self, ledger: Ledger, store: Store) -> Tally:
        store.configure_visibility(self.target.new_series_hold, self.target.label_idle)
        return Tally(self.settings, ledger, store, self.clock())

    @property
    def org(self) -> str:
        return self.target.name

    @property
    def ledger(self) -> Ledger:
        return self.tally.ledger

    @property
    def store(self) -> Store:
        return self.tally.store

    async def restore(self) -> None:
        """Open the state file, if any, and serve its values at once (not ready until a poll).

        Raises state.StateError for a file that cannot be used: the exporter does not start (or
        the reload is refused) rather than count from zero over it.
        """
        if self.target.state_file:
            self.db, restored = await asyncio.to_thread(
                state.StateDB.open, self.target.state_file, self.org, dict(self.target.buckets),
                self.target.max_label_values, self.extra_labels,
            )
            if restored is not None:
                self.tally = self._tally(restored.ledger, restored.store)
                self.tally.schedule.resume(restored.extra)  # where the last audit window ended
                self.metrics.use(self.store)
                log.info(
                    "state restored",
                    extra={"org": self.org, "tracked_calls": len(self.ledger.calls), "watermark": self.ledger.watermark},
                )
                if len(self.ledger.calls) >= FREEZE_CALLS:
                    gc.collect()  # once, at start: nothing else to collect yet costs little
                    self._freeze_growth()
        await self._publish(self.clock(), durable=True)

    def adopt(self, old: "Poller") -> None:
        """Take over a stopped poller of the same org (a reload changed its settings).

        Its ledger and counters carry on; with new buckets or label caps the store is rebuilt
        as a restore would. Nothing is published here: what the old poller had counted but not
        yet persisted is published after this poller's first save, as always.
        """
        self.status, self._streak = old.status, old._streak
        if old.target.state_file == self.target.state_file:
            self.db, old.db = old.db, None  # the database follows the ledger it holds
        elif self.target.state_file:
            self.db = state.StateDB(self.target.state_file, self.org)  # the next save writes it whole
        settings = ("buckets", "max_label_values", "metadata_labels")
        same = all(getattr(old.target, s) == getattr(self.target, s) for s in settings)
        reset = self.tally.adopt(old.tally, self.extra_labels, old.extra_labels, same, dict(self.target.buckets),
                                 self.target.max_label_values)
        self.store.configure_visibility(self.target.new_series_hold, self.target.label_idle)
        self.metrics.use(self.store)
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
            with self.heartbeat.step("wait for the next poll", wait):
                await self._wait(wait)

    async def settle(self) -> None:
        """Wait for a save its cancelled poll left running: a poller that adopts this one's ledger
        must not have its own save overtaken by an older one."""
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)

    async def close(self) -> None:
        """Close the state database: the poller is stopped for good (not replaced by a reload)."""
        await self.settle()
        db, self.db = self.db, None
        if db is not None:
            await asyncio.to_thread(db.close)

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
        """One poll: read and count, persist, then publish. Returns (succeeded, wait before the next)."""
        started, now = time.monotonic(), self.clock()
        self.status.last_poll = now
        self._rotate_key()
        self.metrics.poll_started()
        tally = self.tally
        plan = tally.plan(now, self.stragglers.last_refreshed, self.target.straggler_batch)
        stats: dict[str, int] = {}
        problem: Exception | None = None
        try:
            read = await self._read(now, plan)
            stats.update(read.stats)
            self.client.read_succeeded()
            if read.audit is not None and not read.not_modified:  # a 304 read nothing to audit
                tally.conclude_audit(read.audit, now)
                if self.target.audit_sample:
                    await self._spot_check()
        except ApiError as error:
            problem = error
        except Exception as error:
            log.exception("poll crashed", extra={"org": self.org})
            problem = error
        read_seconds = time.monotonic() - started
        if problem is None:  # then the calls the list no longer shows; their failures do not fail the poll
            stats.update(await self.stragglers.refresh(self.client, tally, now, plan.by_id))
        poll_seconds = time.monotonic() - started
        # Final calls past the settle window leave the ledger only here, after the read (the whole
        # ledger on a full read, in slices with scrapes served between them; calls that just turned
        # final otherwise), and not those created from `audited_until` on (AuditSchedule.keep_from):
        # when the next audit comes late and reads back past the settle window to where the last
        # window ended, the ledger still holds what it counted there, so an honest call is not `missing`.
        if plan.full:
            with self.heartbeat.step("ledger prune", ledger_work(len(self.ledger.calls))):
                for _ in tally.prune(now):
                    await asyncio.sleep(0)
        tally.expire(now)  # hangup causes still unknown `end_grace` after the end count as `none`
        summary = tally.sweep(now, everything=False)
        # New series that a scrape has read at their birth value move on (SPEC §3), saved as such.
        self.store.births.release(self.clock(), self.collector.read_at(self.org))
        durable, problem = await self._persist(problem, poll_seconds)
        backoff = self._conclude(problem, now)
        # A list read slower than the interval slows the polls down to its pace: the API is never
        # read back to back, however large the window grows.
        delay = backoff if problem else max(self.target.poll_interval, read_seconds)
        self.status.backoff = max(0.0, delay - self.target.poll_interval)
        self.status.next_poll = self.clock() + delay
        await self._publish(now, durable, summary)
        log.debug(
            "poll done",
            extra={"org": self.org, "result": "error" if problem else "success", "full": plan.full,
                   "depth_s": round(now - plan.horizon), "bytes": self.metrics.poll_bytes,
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

    async def _persist(self, problem: Exception | None, seconds: float) -> tuple[bool, Exception | None]:
        """Count the poll and save the state file, if any; returns (durable, the poll's problem).

        The poll is counted in the save that holds its counts. Not durable means not published:
        counts wait in memory, and a poll that read well fails as `state not saved`: the one
        outcome a save can still change (SelfMetrics.unsaved).
        """
        self.metrics.poll("error" if problem else "success", seconds)
        if not self.target.state_file:
            self.ledger.take_changed()  # nothing writes them: let the sets of changes go
            self.store.take_changed()
            return True, problem
        if self.db is None:  # never restored (a caller that polls at once): the first save writes it whole
            self.db = state.StateDB(self.target.state_file, self.org)
        try:
            # Shielded: a poll cancelled by a reload lets its save finish; `settle` waits for it.
            self._saving = asyncio.ensure_future(asyncio.to_thread(
                self.db.save, self.ledger, self.store, self.tally.schedule.state()))
            with self.heartbeat.step("state save", ledger_work(len(self.ledger.calls))):
                await asyncio.shield(self._saving)
            return True, problem
        except Exception as error:
            log.error("state not saved", extra={"org": self.org, "path": self.target.state_file, "error": str(error)})
            if problem is None:
                self.metrics.unsaved()
                problem = OSError("state not saved")
            return False, problem

    def _conclude(self, problem: Exception | None, now: float) -> float:
        """Update the status the web pages show and log the streak. Returns the back-off.

        Expected trouble logs once per streak (STYLE.md): the first failure and each change of
        kind at warn (a rejected key at error), repeats at debug, and one info line on recovery.
        """
        status = self.status
        status.ready = True  # the first poll has finished, successfully or not (SPEC §2, /-/ready)
        if problem is None:
            status.up, status.last_error = True, None
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

    async def _spot_check(self) -> None:
        """The audit's second half: a sample of tracked calls fetched by id and compared."""
        sample = self.tally.spot_sample(self.rng, self.target.audit_sample)
        audit = Audit(float("-inf"), float("inf"), self.ledger.baseline)
        for call_id in sample:
            try:
                obj = await self.client.get_call(call_id)
            except NotFound:
                obj = None
            except ApiError as error:
                log.warning("audit spot-check stopped", extra={"org": self.org, "error": str(error)})
                break
            self.tally.spot_check(audit, call_id, obj)
        if sample:
            self.tally.report(audit, "spot_check")

    async def _read(self, now: float, plan: Plan) -> ReadResult:
        """Read the list down to the plan's depth, a 429 waited out a few times; returns what it saw."""
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            read = self.tally.list_read(now, plan)
            size = self.tally.planner.expected_bytes(now, plan.horizon)
            try:
                async with self.client.list_calls(read.fields, size) as body:
                    result = await read.drain(body, self._between_batches)
                self.tally.settle_read(result)
                return result
            except RateLimited as error:
                if attempt == RATE_LIMIT_RETRIES:
                    raise
                wait = min(MAX_BACKOFF, error.retry_after if error.retry_after is not None else self.target.poll_interval)
                log.warning("rate limited", extra={"org": self.org, "retry_after_s": wait})
                with self.heartbeat.step("Retry-After wait", wait):
                    await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _between_batches(self) -> None:
        self._freeze_growth()
        await asyncio.sleep(0)  # a large read yields to scrapes between chunks

    def _backoff(self, problem: Exception | None) -> float:
        """Exponential with ±20 % jitter, never past MAX_BACKOFF; a rejected key retries four times slower."""
        base = self.target.poll_interval * (4 if isinstance(problem, Unauthorized) else 1)
        delay = base * 2 ** min(self.status.failures - 1, 20)
        return min(MAX_BACKOFF, delay * self.rng.uniform(0.8, 1.2))

    def _freeze_growth(self) -> None:
        """Keep the ledger out of the cyclic GC's walks once it has grown by FREEZE_CALLS calls
        (a restore, a first poll, a burst): its calls hold no reference cycles, and every full
        collection would otherwise visit each of them, a pause of tens of milliseconds per
        100 000 calls on the event loop. gc.freeze moves what exists now to the permanent
        generation: calls dropped later are still freed by their reference count. A cycle that
        happened to be garbage at that instant stays, which is why this runs only on growth."""
        tracked = len(self.ledger.calls)
        if tracked >= self._frozen + FREEZE_CALLS:
            gc.freeze()
            self._frozen = tracked
        elif tracked < self._frozen:
            self._frozen = tracked  # calls left since: growth counts from here

    async def _publish(self, now: float, durable: bool, summary=None) -> None:
        """Publish the health; the counts too when durable, else the counts last published stay."""
        summary = summary if summary is not None else self.tally.sweep(now)
        health = summarise(self.tally, summary, self.status, self.target.daily_budget_dollars)
        previous, at = self.collector.snapshots.get(self.org), self.clock()
        if durable or previous is None:  # new series shown at their birth value (born at zero, SPEC §3)
            store = self.tally.store.published(at)
        else:
            store = previous.store
        await self.collector.publish(self.org, Snapshot(store, health, at))


def _stamp(path: str) -> tuple | None:
    """The version of a file as the file system tells it (inode, size, mtime): a cheap change check."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
