"""Event-time replay: an organization's past, counted by the same gate as a live poll (backfill.py).

The list shows each call once, as it is now. `versions` turns that one record into the versions
a live exporter would have read, each at the time its events are dated (SPEC §4, "Baseline"):
the call's creation at `created_at`; its end, and everything that belongs to the end (hangup
cause, error code, durations, billing), at `ended_at`; its outcomes (webhook, extraction) at
`updated_at`, the only date the API gives them. `Replay` feeds those versions, in time order,
through `Tally.count` with the clock at each version's time, and stops at the cut-off: what
happens after it is the live exporter's to count. No I/O and no clock.

What a single record cannot tell, the replay cannot count: a webhook delivered and later
replayed by hand counts once, at the replay; an outcome is dated by the call's last update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from .ledger import Ledger, give_up_age
from .records import Record
from .settings import Settings
from .store import Store
from .tally import Tally

# Kinds of version, in the order a call goes through them.
CREATED, ENDED, LATEST = 0, 1, 2
SWEEP_EVERY = 3600.0  # seconds of event time between two sweeps of the ledger (final calls past the window)


class Version(NamedTuple):
    at: float  # when the events of this version happened (event time)
    kind: int  # CREATED, ENDED or LATEST
    last: bool  # no later version of this call follows


class Grid:
    """The instants a replay samples: `since` (the baseline), every multiple of `step` after it
    (so a day starts on a step), and `until` (the cut-off)."""

    def __init__(self, since: float, until: float, step: float):
        self.since, self.until, self.step = since, until, step
        self._last = math.ceil(until / step)

    def times(self) -> Iterator[float]:
        yield self.since
        at = (math.floor(self.since / self.step) + 1) * self.step
        while at < self.until:
            yield at
            at += self.step
        yield self.until

    def sample_of(self, at: float) -> float:
        """Which sample first shows an event at `at` (a key: equal for events no sample separates)."""
        if at <= self.since:
            return -math.inf
        if at > self.until:
            return math.inf
        k = math.ceil(at / self.step)
        return k if k < self._last else self._last


def versions(record: Record, grid: Grid | None = None) -> list[Version]:
    """The versions of `record` to replay, oldest first, each at most once per instant.

    Creation comes first; the end (`ended_at`, else `updated_at` as for a live read) lies between
    creation and the last update, however odd the timestamps; the record as it is comes last.
    With a `grid`, versions that no sample separates are one, the later: the samples are the
    same, and most calls begin, end and settle within one step (a third of the work).
    """
    created, updated = record.created_at, record.updated_at
    times = [(created, CREATED)]
    if record.terminal:
        ended = record.ended_at if record.ended_at is not None else updated
        times.append((min(max(ended, created), max(updated, created)), ENDED))
    times.append((max(updated, created), LATEST))
    kept: list[tuple[float, int]] = []
    sample_of = grid.sample_of if grid is not None else float
    before = None
    for at, kind in times:
        sample = sample_of(at)
        if kept and sample == before:
            kept[-1] = (at, kind)  # the later kind holds all the earlier one says
        else:
            kept.append((at, kind))
        before = sample
    return [Version(at, kind, i == len(kept) - 1) for i, (at, kind) in enumerate(kept)]


def as_of(record: Record, version: Version) -> Record:
    """The record as a live read at `version.at` would have shown it."""
    if version.kind == LATEST:
        return record if record.updated_at == version.at else record._replace(updated_at=version.at)
    if version.kind == ENDED:
        # Ended, with its end details and billing; outcomes still to come are pending.
        return record._replace(
            updated_at=version.at,
            webhook_status=None if record.webhook_status is None else "pending",
            result_status=None if record.result_status is None else "pending",
            deviations=0,
        )
    return record._replace(
        status="queued",
        updated_at=version.at,
        started_at=None,
        answered_at=None,
        ended_at=None,
        duration_seconds=None,
        billed_duration_seconds=None,
        billing_amount_milli_cents=None,
        reservation_status=None,
        webhook_status=None,
        result_status=None,
        hangup_cause=None,
        error_code=None,
        deviations=0,
    )


class Replay:
    """One target's past replayed in event time from `since` (the baseline) to `until` (the cut-off).

    Feed it `(version, record)` pairs in time order (`run`); at each of `steps` it hands the store
    to `sample`, so the series can be written as they were then. Afterwards `tally` holds what a
    live exporter would hold at the cut-off: the counts, the open calls and the final calls still
    inside the settle window (a live read must find them known, or it would count their deviations
    again), with the cut-off as baseline and watermark.
    """

    def __init__(self, settings: Settings, store: Store, since: float, until: float):
        self.settings, self.since, self.until = settings, since, until
        self.tally = Tally(settings, Ledger(baseline=since), store, since)
        self.pending: set[str] = set()  # calls with versions still to come
        self.next_sweep = since + SWEEP_EVERY
        self.fed = self.skipped = 0  # versions fed; versions after the cut-off, left to the live exporter

    def run(
        self, feed: Iterable[tuple[Version, Record]], steps: Iterable[float], sample: Callable[[float, Store], None]
    ) -> Tally:
        """Replay `feed` (sorted by `Version.at`) and sample the store at each of `steps`
        (ascending, the last one `until`); returns the tally as it stands at the cut-off."""
        points = iter(steps)
        step = next(points, None)
        for version, record in feed:
            while step is not None and version.at > step:
                self._sample(step, sample)
                step = next(points, None)
            if version.at > self.until:
                self.skipped += 1
                continue
            self.feed(version, record)
        while step is not None:
            self._sample(step, sample)
            step = next(points, None)
        return self.finish()

    def feed(self, version: Version, record: Record) -> None:
        """Count one version at its own time."""
        call_id = record.id
        if version.last:
            self.pending.discard(call_id)
        else:
            self.pending.add(call_id)
        self.tally.count(as_of(record, version), version.at)
        self.fed += 1

    def _sample(self, at: float, sample: Callable[[float, Store], None]) -> None:
        tally = self.tally
        tally.expire(at)  # hangups still without a cause `end_grace` after their end: `none`
        if at >= self.next_sweep:
            self.sweep(at)
        sample(at, tally.store)

    def sweep(self, now: float) -> None:
        """As a live exporter's sweep: final calls past the settle window leave the ledger, open
        ones past `straggler_give_up` are given up; never a call with versions still to come,
        which would come back as new and count its creation twice. The set of changed calls is
        let go: the state is written whole once, at the end."""
        self.next_sweep = now + SWEEP_EVERY
        ledger, pending = self.tally.ledger, self.pending
        horizon = now - self.settings.settle_window
        give_up = now - give_up_age(self.settings.settle_window, self.settings.give_up_after)
        # The ledger holds calls in the order of their first version, creation: the oldest first.
        gone = []
        for call_id, state in ledger.calls.items():
            if state.created_at >= horizon:
                break
            if call_id not in pending and (state.final or state.created_at < give_up):
                gone.append(call_id)
        for call_id in gone:
            ledger.forget(call_id)
        # The ledger's own sweep, told to drop and give up nothing: it lets go of the calls that
        # turned final since the last one, and of the open ones that left.
        ledger.sweep(now, self.settings.settle_window, math.inf, everything=False, keep_from=-math.inf)
        ledger.take_changed()

    def finish(self) -> Tally:
        """The tally at the cut-off, ready to be saved: the cut-off is its baseline and watermark."""
        self.sweep(self.until)
        ledger = self.tally.ledger
        ledger.baseline = ledger.watermark = self.until
        return self.tally
