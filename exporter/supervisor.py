"""The running targets: one poller task each, and reloads that add, remove or change them.

A reload applies a new, already validated config. Removed targets stop and their series leave
/metrics; added ones restore their state and start; a changed target's poller is replaced by
one that adopts its ledger and counters, so nothing is lost or counted twice. Targets whose
settings did not change keep running untouched.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterator, Sequence

import aiohttp

from .budget import Budgets
from .config import Target
from .metrics import Collector
from .poller import Poller

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, collector: Collector, session: aiohttp.ClientSession,
                 make_poller: Callable[..., Poller] = Poller):
        self.collector, self.session, self.make_poller = collector, session, make_poller
        self.pollers: dict[str, Poller] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.budgets = Budgets()  # one per API key, shared by the targets using it, across reloads

    def __iter__(self) -> Iterator[Poller]:
        return iter(list(self.pollers.values()))

    def __len__(self) -> int:
        return len(self.pollers)

    async def prepare(self, targets: Sequence[Target]) -> None:
        """Create and restore the pollers of a first config; nothing polls yet."""
        for target in targets:
            poller = self.make_poller(target, self.collector, self.session, budgets=self.budgets)
            await poller.restore()
            self.pollers[target.name] = poller

    def start(self) -> None:
        for name, poller in self.pollers.items():
            if name not in self._tasks:
                self._tasks[name] = asyncio.create_task(poller.run(), name=f"poll-{name}")

    async def _stop(self, name: str) -> Poller:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return self.pollers.pop(name)

    async def apply(self, targets: Sequence[Target]) -> dict[str, list[str]]:
        """Make the running targets those of `targets`; returns what was added, removed, changed."""
        wanted = {t.name: t for t in targets}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        for name in [n for n in self.pollers if n not in wanted]:
            await self._stop(name)
            self.collector.withdraw(name)
            changes["removed"].append(name)
        for name, target in wanted.items():
            current = self.pollers.get(name)
            if current is not None and current.target == target:
                if current.status.failures:
                    current.wake()  # a reload is an operator's "try again now": it ends a back-off
                continue
            poller = self.make_poller(target, self.collector, self.session, budgets=self.budgets)
            if current is None:
                await poller.restore()
                changes["added"].append(name)
            else:
                poller.adopt(await self._stop(name))
                changes["changed"].append(name)
            self.pollers[name] = poller
        self.pollers = {name: self.pollers[name] for name in wanted}  # the config's order
        self.start()
        return changes

    async def stop(self) -> None:
        for name in list(self._tasks):
            task = self._tasks.pop(name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
