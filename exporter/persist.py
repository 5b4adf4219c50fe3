"""The state file of one poll loop: opened at start, handed over at a reload, saved after each poll in a worker thread.

A save runs off the event loop, shielded: a poll cancelled by a reload lets its save finish, and
`settle` waits for it, so the poller that takes over never has its own save overtaken by an
older one. A save that fails is logged and reported, never raised: the counts wait in memory.
"""

from __future__ import annotations

import asyncio
import logging

from . import state
from .ledger import Ledger
from .liveness import Heartbeat, ledger_work
from .store import Store

log = logging.getLogger(__name__)


class Persister:
    """One target's state database (`path`; none without a state file) and its save in flight."""

    def __init__(self, path: str | None, org: str, heartbeat: Heartbeat):
        self.path, self.org, self.heartbeat = path, org, heartbeat
        self.db: state.StateDB | None = None  # the state file's database, once restored
        self._saving: asyncio.Future | None = None  # the last save, running in a worker thread

    async def open(self, buckets: dict, label_limit: int, extra_labels: tuple[str, ...]) -> state.Restored | None:
        """What the state file holds, under today's config; None without one. Raises state.StateError."""
        if not self.path:
            return None
        self.db, restored = await asyncio.to_thread(
            state.StateDB.open, self.path, self.org, buckets, label_limit, extra_labels
        )
        return restored

    def take_over(self, old: Persister) -> None:
        """The database follows the ledger it holds; a new path is written whole at the next save."""
        if old.path == self.path:
            self.db, old.db = old.db, None
        elif self.path:
            self.db = state.StateDB(self.path, self.org)

    async def save(self, ledger: Ledger, store: Store, extra: dict, adding: dict | None = None) -> bool:
        """Save the state file, if any, with `adding` on top of the store's counts (StateDB.save).
        Not durable means not published: counts wait in memory."""
        if not self.path:
            ledger.take_changed()  # nothing writes them: let the sets of changes go
            store.take_changed()
            return True
        if self.db is None:  # never restored (a caller that polls at once): the first save writes it whole
            self.db = state.StateDB(self.path, self.org)
        try:
            # Shielded: a poll cancelled by a reload lets its save finish; `settle` waits for it.
            self._saving = asyncio.ensure_future(asyncio.to_thread(self.db.save, ledger, store, extra, adding))
            with self.heartbeat.step("state save", ledger_work(len(ledger.calls))):
                await asyncio.shield(self._saving)
            return True
        except Exception as error:
            log.error("state not saved", extra={"org": self.org, "path": self.path, "error": str(error)})
            return False

    async def settle(self) -> None:
        """Wait for a save its cancelled poll left running."""
        if self._saving is not None:
            await asyncio.gather(self._saving, return_exceptions=True)

    async def close(self) -> None:
        """Close the state database, once the last save is done."""
        await self.settle()
        db, self.db = self.db, None
        if db is not None:
            await asyncio.to_thread(db.close)
