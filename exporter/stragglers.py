"""Calls read by id: open calls past the list read (stragglers past the settle window, and the
calls an ordinary poll's shorter read does not reach; SPEC §4, read only what can have changed),
and the self-audit's spot-checks.

A call still changing after the read's depth (webhook retries for ~42 h, a late settlement, a
long call) is not listed by it. After each successful list read the poller asks
`GET /v1/calls/{id}` for those whose turn the read plan says has come, a few at a time. Each
answer takes the list's path through the target's tally, so its events count once. A 404 alone
proves nothing (by-id reads may lag the list): the next list read that covers the call tells.
"""

from __future__ import annotations

import asyncio
import logging
import random

from .api import ApiError, NotFound, RateLimited, Unauthorized
from .audit import Audit
from .tally import Tally

log = logging.getLogger(__name__)


class Refresher:
    """One target's calls asked by id: its open calls past the list read, a few at a time, each
    answer handed to the tally (`last_refreshed` tells the read plan whose turn has come); and
    the audit's sample of tracked calls (`spot_check`)."""

    def __init__(self, org: str, concurrency: int, batch: int):
        self.org, self.concurrency, self.batch = org, concurrency, batch
        # straggler id → poll time it was last asked for. Not persisted: after a restart every
        # straggler is simply due at once, which only changes the order.
        self.last_refreshed: dict[str, float] = {}

    async def refresh(self, client, tally: Tally, now: float, due: list[str]) -> dict[str, int]:
        """Refresh the due stragglers and account what comes back. Never raises (bar cancellation):
        a failed refresh keeps its call for the next poll and does not fail the poll."""
        stats = {"stragglers_refreshed": 0, "stragglers_not_found": 0, "straggler_errors": 0}
        failures: list[Exception] = []
        try:
            # Forget calls no longer tracked; those not asked yet are due at once.
            self.last_refreshed = {c: t for c, t in self.last_refreshed.items() if c in tally.ledger.calls}
            pending = iter(due)
            halted = False

            async def worker() -> None:
                nonlocal halted
                for call_id in pending:  # shared: each id is taken by one worker
                    if halted:
                        return
                    self.last_refreshed[call_id] = now
                    try:
                        await self._refresh_one(client, tally, now, call_id, stats)
                    except Exception as error:  # kept for the next poll; a bug is logged below with its traceback
                        stats["straggler_errors"] += 1
                        failures.append(error)
                        # A 429 or a rejected key: ask no more this poll.
                        halted = halted or isinstance(error, (RateLimited, Unauthorized))

            await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(due)))))
        except Exception as error:
            failures.append(error)
        refused = [f for f in failures if isinstance(f, ApiError)]
        if refused:  # once per poll, like a failed list read
            log.warning(
                "straggler refresh failed",
                extra={"org": self.org, "calls": len(refused), "code": refused[0].code, "error": str(refused[0])},
            )
        bugs = [f for f in failures if not isinstance(f, ApiError)]
        if bugs:
            log.error("straggler refresh crashed", exc_info=bugs[0], extra={"org": self.org, "calls": len(bugs)})
        return stats

    async def _refresh_one(self, client, tally: Tally, now: float, call_id: str, stats: dict[str, int]) -> None:
        try:
            obj = await client.get_call(call_id)
        except NotFound:
            if tally.missing_by_id(call_id):  # the next read that covers it tells whether it is gone
                stats["stragglers_not_found"] += 1
                log.info(
                    "tracked call not found by id; the next list read covering it tells",
                    extra={"org": self.org, "call_id": call_id},
                )
            return
        record = tally.decode(obj)
        if record is None:  # malformed: counted once however often it comes back; the call is kept
            return
        if record.id != call_id:
            raise ApiError(f"GET /v1/calls/{call_id} answered call {record.id}", "200")
        tally.count(record, now)
        stats["stragglers_refreshed"] += 1

    async def spot_check(self, client, tally: Tally, rng: random.Random, size: int) -> None:
        """The audit's second half: a sample of `size` tracked calls fetched by id and compared."""
        candidates: list[str] = []
        for part in tally.spot_candidates():  # the whole ledger, in slices: scrapes go on between them
            candidates += part
            await asyncio.sleep(0)
        sample = rng.sample(candidates, min(size, len(candidates)))
        audit = Audit(float("-inf"), float("inf"), tally.ledger.baseline)
        for call_id in sample:
            try:
                obj = await client.get_call(call_id)
            except NotFound:
                obj = None
            except ApiError as error:
                log.warning("audit spot-check stopped", extra={"org": self.org, "error": str(error)})
                break
            tally.spot_check(audit, call_id, obj)
        if sample:
            tally.report(audit, "spot_check")
