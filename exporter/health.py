"""What a poll publishes: the target's `Status`, its `Health` summary and the `Snapshot` of both.

The poller builds a `Health` from its tally after each poll (`summarise`) and publishes it with a
copy of the store as one immutable `Snapshot`; /metrics, the landing page and /-/ready read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .ledger import Summary
from .store import Store
from .tally import Tally


@dataclass
class Status:
    """What the poller knows of its own schedule: the part of the health the ledger cannot say."""

    up: bool = False
    ready: bool = False  # the first poll since the start has finished, successfully or not (/-/ready)
    last_poll: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    failures: int = 0
    backoff: float = 0.0  # seconds the next poll waits beyond poll_interval
    next_poll: float | None = None


@dataclass(frozen=True)
class Health:
    """Everything a target's gauges, card and readiness show, as of one publish."""

    status: Status = field(default_factory=Status)
    watermark: float | None = None
    tracked: int = 0
    stragglers: int = 0
    active: dict = field(default_factory=dict)  # (direction, status, *capped metadata values) → calls
    webhooks_pending: int = 0
    webhook_pending_oldest: float | None = None
    last_audit: float | None = None
    audited_until: float | None = None  # created_at up to which the audit windows reach
    read_depth: float = 0.0  # seconds of history the last list read covered
    last_full_read: float | None = None
    open_calls: dict = field(default_factory=dict)  # refresh path ("list", "by_id") → open calls
    daily_budget_dollars: float | None = None  # the target's daily_budget_dollars, if it sets one


@dataclass(frozen=True)
class Snapshot:
    """What a target published: counts that are on disk, and its health at that moment."""

    store: Store
    health: Health
    published_at: float = 0.0  # when the poller published it: what a scrape of it has read (Collector.read_at)


def summarise(tally: Tally, summary: Summary, status: Status, daily_budget_dollars: float | None = None) -> Health:
    """The one summary of a target that its gauges, card and readiness show."""
    store, plan, planner, schedule = tally.store, tally.planner.last_plan, tally.planner, tally.schedule
    active: dict = {}
    for (direction, call_status, *extra), calls in summary.active.items():
        # capped like the counters' label values: statuses outside the docs, metadata values
        key = (direction, store.status(call_status, peek=True), *store.peek_extra(tuple(extra)))
        active[key] = active.get(key, 0) + calls
    return Health(
        replace(status),
        tally.ledger.watermark,
        summary.tracked,
        summary.stragglers,
        active,
        summary.webhooks_pending,
        summary.webhook_pending_oldest,
        schedule.last_audit,
        schedule.audited_until,
        0.0 if plan is None else max(0.0, (status.last_poll or 0.0) - plan.horizon),
        planner.last_full_read,
        {} if plan is None else dict(plan.open_calls),
        daily_budget_dollars,
    )
