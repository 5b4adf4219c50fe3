"""The running targets: one poller task each, and reloads that add, remove or change them.

A reload applies a new, already validated config. Removed targets stop and their series leave
/metrics; added ones restore their state and start; a changed target's poller is replaced by
one that adopts its ledger and counters, so nothing is lost or counted twice. Targets whose
settings did not change keep running untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence

import aiohttp

from . import state
from .budget import Budgets
from .config import ConfigError, Target
from .metrics import Collector
from .poller import Poller

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self, collector: Collector, session: aiohttp.ClientSession, make_poller: Callable[..., Poller] = Poller
    ):
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

    def wedged(self) -> tuple[str, str] | None:
        """(org, why) of a poll loop that has ended or is wedged (liveness.Heartbeat), else None:
        what makes /-/healthy fail. Loops not started yet, or stopped by a reload, are not asked."""
        for name, poller in list(self.pollers.items()):
            task = self._tasks.get(name)
            if task is None:
                continue
            if task.done():
                return name, "has ended"
            why = poller.heartbeat.overdue()
            if why is not None:
                return name, f"is wedged: {why}"
        return None

    def start(self) -> None:
        for name, poller in self.pollers.items():
            if name not in self._tasks:
                self._tasks[name] = asyncio.create_task(poller.run(), name=f"poll-{name}")

    async def _stop(self, name: str) -> Poller:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        poller = self.pollers.pop(name)
        await poller.settle()
        return poller

    async def _restored(self, targets: Sequence[Target]) -> dict[str, Poller]:
        """Pollers for added targets, restored. A state file refused fails the reload like a bad
        config (ConfigError), and the pollers restored so far are closed and withdrawn."""
        pollers: dict[str, Poller] = {}
        for target in targets:
            poller = pollers[target.name] = self.make_poller(target, self.collector, self.session, budgets=self.budgets)
            try:
                await poller.restore()
            except state.StateError as error:
                for name, restored in pollers.items():
                    await restored.close()
                    self.collector.withdraw(name)
                log.error("config not reloaded; the running one stays in force", extra={"error": str(error)})
                raise ConfigError(f"targets[{target.name}].state_file", str(error)) from error
        return pollers

    async def apply(self, targets: Sequence[Target]) -> dict[str, list[str]]:
        """Make the running targets those of `targets`; returns what was added, removed, changed.

        Added targets restore their state first, so a refused state file changes nothing running.
        """
        wanted = {t.name: t for t in targets}
        changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
        added = await self._restored([t for name, t in wanted.items() if name not in self.pollers])
        for name in [n for n in self.pollers if n not in wanted]:
            await (await self._stop(name)).close()
            self.collector.withdraw(name)
            changes["removed"].append(name)
        for name, target in wanted.items():
            current = self.pollers.get(name)
            if name in added:
                self.pollers[name] = added[name]
                changes["added"].append(name)
            elif current.target == target:
                if current.status.failures:
                    current.wake()  # a reload is an operator's "try again now": it ends a back-off
            else:
                poller = self.make_poller(target, self.collector, self.session, budgets=self.budgets)
                old = await self._stop(name)
                poller.adopt(old)
                await old.close()  # its state database, unless the new poller took it over (same file)
                self.pollers[name] = poller
                changes["changed"].append(name)
        self.pollers = {name: self.pollers[name] for name in wanted}  # the config's order
        self.start()
        return changes

    async def stop(self) -> None:
        for name in list(self._tasks):
            task = self._tasks.pop(name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for poller in self.pollers.values():
            await poller.close()
