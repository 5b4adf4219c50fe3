"""The loop of one target: plan → read → tally → persist → publish, then wait.

Only what is asynchronous lives here: the schedule, the reads, the state file (its saves:
persist.py). Each poll hands the API's list body to the target's `Tally` (the gate that counts),
whose counts reach `/metrics` only after the state holding them is on disk (persist, then
publish), so a crash never shows Prometheus a counter going backwards. Faults back off with
jitter (backoff.py); they never end the loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import Iterator

import aiohttp

from .api import ApiError, Client, RateLimited
from .backoff import MAX_BACKOFF, Streak
from .budget import Budgets
from .config import Target
from .health import Snapshot, Status, summarise
from .keyfile import KeyFile
from .ledger import Ledger
from .liveness import Heartbeat, Turns, ledger_work
from .metrics import Collector
from .persist import Persister
from .plan import Plan
from .selfmetrics import SelfMetrics
from .settings import Settings
from .store import Store
from .stragglers import Refresher
from .tally import ReadResult, Tally

RATE_LIMIT_RETRIES = 3
FREEZE_CALLS = 10_000  # calls restored or newly tracked before the ledger is frozen out of the cyclic GC
AUDIT_SLICE = 1_000  # calls an audit walks between two looks at the event loop's turn (Turns)

log = logging.getLogger(__name__)


class Poller:
    """One target's poll loop: plan → read → tally → persist → publish, then wait."""

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
        self.turns = Turns()  # long work on the event loop gives it a turn every TURN seconds (scrapes)
        key = target.api_key.reveal() if target.api_key is not None else None
        budget = (budgets or Budgets()).for_key(key, target.max_requests_per_minute)
        self.clock = clock
        self.rng = rng or random.Random()
        self.status = Status()
        self.extra_labels = tuple(label for _, label in target.metadata_labels)
        self.settings = Settings.of(target)
        self.tally = self._tally(
            Ledger(baseline=clock() - target.initial_lookback),
            Store(dict(target.buckets), target.max_label_values, self.extra_labels),
        )
        self.metrics = SelfMetrics(self.store)  # the client's requests and bytes, the polls: into the store
        self.client = Client(
            session, target.api_url, target.api_key, target.request_timeout, self.metrics, budget, self.heartbeat.step
        )
        self.stragglers = Refresher(target.name, target.straggler_concurrency, target.straggler_batch)
        self.key_file = KeyFile(target.api_key_file)  # the api_key_file version in use
        self._wake = asyncio.Event()  # set to end the wait before the next poll
        self.streak = Streak(target.name, target.poll_interval, self.rng)
        self.saver = Persister(target.state_file, target.name, self.heartbeat)  # the state file, if any
        self._freeze = GrowthFreeze()

    def _tally(self, ledger: Ledger, store: Store) -> Tally:
        store.configure_visibility(self.target.new_series_hold, self.target.label_idle)
        return Tally(self.settings, ledger, store, self.clock())

    async def _in_slices(self, step: str, slices: Iterator[int]) -> None:
        """A walk of the whole ledger, a slice at a time with scrapes served between them."""
        with self.heartbeat.step(step, ledger_work(len(self.ledger.calls))):
            for _ in slices:
                await self.turns.give()

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
        restored = await self.saver.open(dict(self.target.buckets), self.target.max_label_values, self.extra_labels)
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
                self._freeze(len(self.ledger.calls))
        await self._publish(self.clock(), durable=True)

    def adopt(self, old: Poller) -> None:
        """Take over a stopped poller of the same org (a reload changed its settings).

        Its ledger and counters carry on; with new buckets or label caps the store is rebuilt
        as a restore would. Nothing is published here: what the old poller had counted but not
        yet persisted is published after this poller's first save, as always.
        """
        self.status, self.streak.current = old.status, old.streak.current
        self.saver.take_over(old.saver)  # the database follows the ledger it holds
        settings = ("buckets", "max_label_values", "metadata_labels")
        same = all(getattr(old.target, s) == getattr(self.target, s) for s in settings)
        reset = self.tally.adopt(
            old.tally,
            self.extra_labels,
            old.extra_labels,
            same,
            dict(self.target.buckets),
            self.target.max_label_values,
        )
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
                wait = self.streak.backoff(self.status.failures, None)
            with self.heartbeat.step("wait for the next poll", wait):
                await self._wait(wait)

    async def settle(self) -> None:
        """Wait for a save its cancelled poll left running: a poller that adopts this one's ledger
        must not have its own save overtaken by an older one."""
        await self.saver.settle()

    async def close(self) -> None:
        """Close the state database: the poller is stopped for good (not replaced by a reload)."""
        await self.saver.close()

    def wake(self) -> None:
        """End the wait before the next poll (a reload, a rotated key): it runs now."""
        self._wake.set()

    async def _wait(self, seconds: float) -> None:
        """Sleep until the next poll is due, or less: a changed api_key_file ends the wait at once,
        so a rotated Secret fixes a rejected key within seconds, not after a long back-off."""
        if await self.key_file.wait(seconds, self._wake) and self.status.failures:
            log.info("API key file changed; the back-off ends", extra={"org": self.org})

    async def poll(self) -> tuple[bool, float]:
        """One poll: read and count, persist, then publish. Returns (succeeded, wait before the next)."""
        started, now = time.monotonic(), self.clock()
        self.status.last_poll = now
        key = self.key_file.new_key(self.client.key, self.org)  # a rotated (Kubernetes) Secret needs no restart
        if key is not None:
            self.client.use_key(key)
            self.status.failures = 0  # a new key starts its own back-off, from the shortest
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
                unlisted = read.audit.unlisted(self.ledger, AUDIT_SLICE)  # the calls it did not list
                await self._in_slices("audit", unlisted)
                tally.conclude_audit(read.audit, now)
                if self.target.audit_sample:
                    await self.stragglers.spot_check(self.client, tally, self.rng, self.target.audit_sample)
        except ApiError as error:
            problem = error
        except Exception as error:
            log.exception("poll crashed", extra={"org": self.org})
            problem = error
        read_seconds = time.monotonic() - started
        if problem is None:  # then the calls the list no longer shows; their failures do not fail the poll
            stats.update(await self.stragglers.refresh(self.client, tally, now, plan.by_id))
        self.metrics.poll_took(time.monotonic() - started)
        # Final calls past the settle window leave the ledger only here, after the read (the whole
        # ledger on a full read, in slices with scrapes served between them; calls that just turned
        # final otherwise), and not those created from `audited_until` on (AuditSchedule.keep_from):
        # when the next audit comes late and reads back past the settle window to where the last
        # window ended, the ledger still holds what it counted there, so an honest call is not `missing`.
        if plan.full:
            await self._in_slices("ledger prune", tally.prune(now))
        tally.expire(now)  # hangup causes still unknown `end_grace` after the end count as `none`
        summary = tally.sweep(now, everything=False)
        # New series that a scrape has read at their birth value move on (SPEC §3), saved as such.
        self.store.births.release(self.clock(), self.collector.read_at(self.org))
        # The save holds this poll's outcome with its counts; the store counts it once the save told.
        durable = await self._persist(self.metrics.saving("error" if problem else "success"))
        if not durable and problem is None:  # neither saved nor shown: this poll is the error it is
            problem = OSError("state not saved")
        self.metrics.poll("error" if problem else "success")
        backoff = self.streak.conclude(self.status, problem, now)
        # A list read slower than the interval slows the polls down to its pace: the API is never
        # read back to back, however large the window grows.
        delay = backoff if problem else max(self.target.poll_interval, read_seconds)
        self.status.backoff = max(0.0, delay - self.target.poll_interval)
        self.status.next_poll = self.clock() + delay
        await self._publish(now, durable, summary)
        log.debug(
            "poll done",
            extra={
                "org": self.org,
                "result": "error" if problem else "success",
                "full": plan.full,
                "depth_s": round(now - plan.horizon),
                "bytes": self.metrics.poll_bytes,
                "tracked": summary.tracked,
                "duration_s": round(time.monotonic() - started, 3),
                **stats,
            },
        )
        return problem is None, delay

    async def _persist(self, adding: dict | None = None) -> bool:
        """Save the state file, if any, with `adding` on top of the store's counts (StateDB.save).
        Not durable means not published: counts wait in memory."""
        return await self.saver.save(self.ledger, self.store, self.tally.schedule.state(), adding)

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
                wait = min(
                    MAX_BACKOFF, error.retry_after if error.retry_after is not None else self.target.poll_interval
                )
                log.warning("rate limited", extra={"org": self.org, "retry_after_s": wait})
                with self.heartbeat.step("Retry-After wait", wait):
                    await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _between_batches(self) -> None:
        self._freeze(len(self.ledger.calls))
        await self.turns.give()  # a large read yields to scrapes every TURN seconds or so

    async def _publish(self, now: float, durable: bool, summary=None) -> None:
        """Publish the health; the counts too when durable, else the counts last published stay."""
        summary = summary if summary is not None else self.tally.sweep(now)
        health = summarise(self.tally, summary, self.status, self.target.daily_budget_dollars)
        previous, at = self.collector.snapshot(self.org), self.clock()
        if durable or previous is None:  # new series shown at their birth value (born at zero, SPEC §3)
            store = self.tally.store.published(at)
        else:
            store = previous.store
        await self.collector.publish(self.org, Snapshot(store, health, at))


class GrowthFreeze:
    """Keeps the ledger out of the cyclic GC's walks once it has grown by FREEZE_CALLS calls
    (a restore, a first poll, a burst): its calls hold no reference cycles, and every full
    collection would otherwise visit each of them, a pause of tens of milliseconds per
    100 000 calls on the event loop. gc.freeze moves what exists now to the permanent
    generation: calls dropped later are still freed by their reference count. A cycle that
    happened to be garbage at that instant stays, which is why this runs only on growth."""

    def __init__(self) -> None:
        self.frozen = 0  # tracked calls at the last gc.freeze

    def __call__(self, tracked: int) -> None:
        if tracked >= self.frozen + FREEZE_CALLS:
            gc.freeze()
            self.frozen = tracked
        elif tracked < self.frozen:
            self.frozen = tracked  # calls left since: growth counts from here
