"""One simulated call: its planned steps, and the versions of its record that readers may see.

Plain data at the bottom of the simulator package (stdlib only): `lifecycle.py` plans the steps,
`player.py` applies them and commits each version, the handlers read what is visible now.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(order=True, slots=True)
class _Step:
    due: float  # wall time
    changes: dict = field(compare=False)
    hide: float = field(default=0.0, compare=False)  # late commit: visible this long after it happens
    applied: float | None = field(default=None, compare=False)  # when it happened, once it has


@dataclass(slots=True)  # days of past calls: a few hundred bytes less each
class _Call:
    id: str
    steps: deque[_Step] | tuple[()]  # the planned future, by due time; () once the call is final
    versions: list[tuple[float, dict]] = field(default_factory=list)  # (visible_at, record)
    counted: Any = None  # truth.Counted: what the truth has counted of this call so far

    @property
    def latest(self) -> dict:
        return self.versions[-1][1]

    def commit(self, record: dict, visible_at: float, now: float) -> None:
        # Visibility is monotonic: a later change never shows before an earlier one.
        if self.versions:
            visible_at = max(visible_at, self.versions[-1][0])
        self.versions.append((visible_at, record))
        self.visible(now)

    def visible(self, now: float) -> dict | None:
        """The version readers see now (None before the creation is visible)."""
        versions = self.versions
        while len(versions) > 1 and versions[1][0] <= now:
            del versions[0]  # superseded by a visible newer version: nobody can read it again
        return versions[0][1] if versions[0][0] <= now else None

    def final(self, now: float) -> bool:
        # Nothing left to happen (the plan ends terminal, settled, delivered or failed, replay
        # done) and readers can see the last version.
        return not self.steps and self.versions[-1][0] <= now
