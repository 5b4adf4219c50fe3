"""One target's counting settings: the part of its config that the tally, the read plan and the
audit schedule read, frozen once per target (`Settings.of`) so none of them takes a dozen arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalogue import END_GRACE
from .config import Target


@dataclass(frozen=True)
class Settings:
    """How one target counts, reads and audits (SPEC §4); the defaults are the config's."""

    settle_window: float
    overlap: float
    give_up_after: float  # straggler_give_up
    org: str = "default"
    metadata_keys: tuple[str, ...] = ()  # the metadata keys of metadata_labels, in config order
    audit_interval: float = 0.0  # 0: no self-audit
    hot_window: float = 1800.0
    full_read_interval: float = 3 * 3600.0
    refresh_interval: float = 300.0  # open_refresh_interval
    poll_interval: float = 15.0
    end_grace: float = END_GRACE

    @classmethod
    def of(cls, target: Target) -> Settings:
        return cls(
            target.settle_window,
            target.overlap,
            target.straggler_give_up,
            target.name,
            tuple(key for key, _ in target.metadata_labels),
            target.audit_interval,
            target.hot_window,
            target.full_read_interval,
            target.open_refresh_interval,
            target.poll_interval,
            target.end_grace,
        )
