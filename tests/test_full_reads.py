"""How often the default configuration reads the whole settle window (issue 26).

A full read costs every call of the settle window (209 MB a read for the reference org of
BENCHMARKS.md case 6), so the defaults make the self-audits the full reads: one every
`audit_interval`, never a second one between them, however the polls drift.
"""

from __future__ import annotations

import random

from exporter.config import Target
from exporter.ledger import Ledger
from exporter.settings import Settings
from exporter.store import Store
from exporter.tally import Tally
from helpers import call_object

NOW = 1_700_000_000.0
HOUR = 3600.0
WINDOW = 72 * HOUR
SPACING = 900.0  # a final call created every 15 min: the window holds 288


def default_settings() -> Settings:
    """The config's defaults for the read tiers and the audit (a Target's), 72 h settle window."""
    settings = Settings.of(Target())
    assert settings.settle_window == WINDOW
    return settings


FIRST = NOW - 2 * WINDOW
CALLS = [
    call_object(f"c{i}", "completed", FIRST + i * SPACING, FIRST + i * SPACING + 60)
    for i in range(int((3 * WINDOW) / SPACING))
]


def listed(now: float):
    """The list at `now`: final calls created every SPACING seconds, updated 60 s later, newest first."""
    newest = min(len(CALLS) - 1, int((now - 60 - FIRST) // SPACING))
    return (CALLS[i] for i in range(newest, -1, -1))


def run(t: Tally, start: float, hours: float, rng: random.Random) -> list[tuple[float, bool]]:
    """Polls every 15-40 s from `start` for `hours`; returns (time, carried an audit) of each full read."""
    full_reads, now = [], start
    while now < start + hours * HOUR:
        plan = t.plan(now, {}, batch=10)
        read = t.list_read(now, plan)
        for obj in listed(now):
            if not read.take(obj):
                break
        result = read.result()
        t.settle_read(result)
        if result.audit is not None:
            for _ in result.audit.unlisted(t.ledger):
                pass
            t.conclude_audit(result.audit, now)
        t.sweep(now, everything=False)
        if plan.full:
            full_reads.append((now, plan.audit is not None))
        now += rng.uniform(15, 40)
    return full_reads


def test_by_default_the_audits_are_the_full_reads_one_every_audit_interval():
    settings = default_settings()
    assert settings.audit_interval == settings.full_read_interval == 3 * HOUR
    t = Tally(settings, Ledger(NOW - WINDOW), Store(), now=NOW)
    full_reads = run(t, NOW, 10, random.Random(26))
    assert [audit for _, audit in full_reads] == [False, True, True, True], "the first read, then one per audit"
    gaps = [b - a for (a, _), (b, _) in zip(full_reads, full_reads[1:])]
    assert all(3 * HOUR <= gap < 3 * HOUR + 40 for gap in gaps), gaps


def test_after_a_restart_the_full_reads_fall_back_in_step_with_the_audits():
    settings = default_settings()
    t = Tally(settings, Ledger(NOW - WINDOW), Store(), now=NOW)
    run(t, NOW, 4, random.Random(1))  # the first read, and one audit at 3 h
    saved = t.schedule.state()
    restart = NOW + 5 * HOUR  # down for an hour: the next audit is due 1 h after the restart
    again = Tally(settings, t.ledger, t.store, now=restart)
    again.schedule.resume(saved)
    full_reads = run(again, restart, 8, random.Random(2))
    # The restart's own full read, then only the audits' (at about 1 h and 4 h, 7 h after it).
    assert [audit for _, audit in full_reads] == [False, True, True, True]
    assert full_reads[1][0] - restart < 1.1 * HOUR
