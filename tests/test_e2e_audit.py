"""The self-audit on a real exporter: silent on an honest API, and catching each kind of lie.

The story: calls flow with an 8 s settle window and an audit every 2 s, so each call is audited
once, when it is 6-8 s old and settled. The honest run audits many calls and finds nothing. Then
the simulator lies about settled calls that are about to be audited: a terminal status, a
billing amount, a webhook and an extraction outcome rewritten without bumping `updated_at`; a
call inserted into the past; a call deleted. Each lie is counted once under its own kind and
logged with the call id, and nothing else is.

Then a poller in process, on a clock the test moves (issue 18): audit windows tile the timeline
however the polls drift and across a restart, so each late-committed call is reported once; a
clean run audits every call created exactly once; a spot-check finds a rewrite no window reaches.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable

import aiohttp
from test_e2e_exact import KEY

from exporter.catalogue import AUDIT_KINDS
from exporter.config import Secret, Target
from exporter.metrics import Collector
from exporter.poller import Poller
from exporter.records import parse_timestamp
from exporter.simulator import Simulator, _seconds, format_ts, serve_in_thread
from helpers import FixedClock, SkippingClock, live_simulator, wait_until

CHECKED, MISMATCHES = "callingbox_exporter_audit_calls_checked_total", "callingbox_exporter_audit_mismatches_total"
SKIPPED = "callingbox_exporter_audit_skipped_seconds_total"

KINDS = ("missing", "extra", "status", "billing", "webhook", "extraction")


def mismatches(exporter) -> dict[str, float]:
    samples = exporter.scrape()
    return {
        kind: samples.get(("callingbox_exporter_audit_mismatches_total", (("kind", kind), ("org", "default"))), -1)
        for kind in KINDS
    }


def checked(exporter, method: str | None = None) -> float:
    """Calls audited by `method` (window, spot_check), or by both."""
    return sum(
        exporter.scrape().get((CHECKED, (("method", m), ("org", "default"))), 0)
        for m in ((method,) if method else ("window", "spot_check"))
    )


def last_audit(exporter) -> float:
    return exporter.scrape().get(("callingbox_exporter_last_audit_timestamp_seconds", (("org", "default"),)), 0)


def wait_for_audits(exporter, n: int) -> None:
    """Until `n` more audits are done and published (each one interval after the last)."""
    for i in range(n):
        previous = last_audit(exporter)
        wait_until(lambda: last_audit(exporter) > previous, 30, message=f"audit {i + 1} of {n} more")


def final_calls(sim, age_from: float, age_to: float) -> list[dict]:
    """Visible, final calls created between `age_to` and `age_from` seconds ago, oldest first."""
    now = time.time()
    with sim._lock:
        calls = [c for c in sim._calls.values() if c.final(now)]
        records = [c.latest for c in calls]
    return [r for r in records if age_from <= now - parse_timestamp(r["created_at"]) <= age_to]


def test_an_honest_api_audits_clean_and_each_lie_is_caught_once(stack):
    weights = {"completed": 70, "no_answer": 10, "busy": 5, "failed": 10, "canceled": 5}
    sim, url = live_simulator(stack, KEY, seed=61, rate=25, outcome_weights=weights)
    exporter = stack.exporter(
        {
            "api_url": url,
            "poll_interval": "0.3s",
            "overlap": "1s",
            "settle_window": "8s",
            "audit_interval": "2s",
            "initial_lookback": "1h",
        },
        env={"CALLINGBOX_API_KEY": KEY},
    ).start()
    wait_until(exporter.ready, 20, message="first poll")

    # Honest: after a few audits, calls were checked and nothing disagrees.
    wait_until(lambda: checked(exporter) >= 100, 40, message="100 calls audited")
    assert mismatches(exporter) == dict.fromkeys(KINDS, 0), exporter.log()[-3000:]

    # The lies, told about settled calls 3-5 s old: audited 1-5 s from now.
    def pick(predicate) -> dict:
        return wait_until(
            lambda: next((r for r in final_calls(sim, 3, 5) if predicate(r) and r["id"] not in told.values()), None),
            10,
            message="a call to lie about",
        )

    told: dict[str, str] = {}
    told["status"] = pick(lambda r: r["status"] == "completed")["id"]
    sim.tamper(told["status"], status="failed")
    told["billing"] = pick(lambda r: (r["billing_amount_milli_cents"] or 0) > 0)["id"]
    sim.tamper(told["billing"], billing_amount_milli_cents=999_999)
    told["webhook"] = pick(lambda r: r["webhook_status"] == "delivered")["id"]
    sim.tamper(told["webhook"], webhook_status="failed")
    told["extraction"] = pick(lambda r: r["result_status"] == "completed")["id"]
    sim.tamper(told["extraction"], result_status="failed")
    told["extra"] = pick(lambda r: True)["id"]
    sim.delete(told["extra"])
    told["missing"] = sim.insert_past(4.0)

    wait_until(
        lambda: min(mismatches(exporter).values()) >= 1, 30, message=f"every kind caught: {mismatches(exporter)}"
    )
    wait_for_audits(exporter, 2)
    assert mismatches(exporter) == dict.fromkeys(KINDS, 1), exporter.log()[-3000:]  # nothing counted twice
    log = exporter.log()
    for kind, call_id in told.items():
        assert 'msg="audit mismatch"' in log and f"kind={kind}" in log and call_id in log, (kind, call_id)

    # The ledger stays bounded by the settle window: ~8 s of calls at 25/s, not the whole run.
    tracked = exporter.scrape()[("callingbox_exporter_tracked_calls", (("org", "default"),))]
    assert tracked < 25 * 8 * 2.5, tracked


def test_spot_checks_fetch_tracked_calls_by_id_and_find_a_rewrite(stack):
    """With a settle window of an hour the window audit reaches no call: only spot-checks can."""
    sim, url = stack.simulator(seed=62, rate=20, max_calls=60, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    exporter = stack.exporter(
        {
            "api_url": url,
            "poll_interval": "0.3s",
            "overlap": "1s",
            "settle_window": "1h",
            "audit_interval": "1s",
            "audit_sample": 1000,
            "initial_lookback": "1h",
            "max_requests_per_minute": 100_000,
        },  # every call checked every second
        env={"CALLINGBOX_API_KEY": KEY},
    ).start()
    wait_until(sim.all_final, 60, message="all calls final")
    by_id = sim.stats["by_id_requests"]
    wait_until(lambda: sim.stats["by_id_requests"] >= by_id + 120, 30, message="two rounds of spot-checks")
    assert checked(exporter) >= 100
    assert mismatches(exporter) == dict.fromkeys(KINDS, 0), exporter.log()[-3000:]

    victim = next(r for r in final_calls(sim, 0, 3600) if r["status"] == "completed")["id"]
    sim.tamper(victim, status="busy")
    wait_until(lambda: mismatches(exporter)["status"] == 1, 20, message="the rewrite found by a spot-check")
    by_id = sim.stats["by_id_requests"]
    wait_until(lambda: sim.stats["by_id_requests"] >= by_id + 120, 30, message="two more rounds of spot-checks")
    assert mismatches(exporter) == {**dict.fromkeys(KINDS, 0), "status": 1}  # found again, counted once
    assert victim in exporter.log()


# ---- windows that tile the timeline: a poller in process, on a clock the test moves ----------
#
# The poller runs against the simulator over loopback, its `now` a virtual clock. The API commits
# calls late: each shows up, final, LATE = settle_window − audit_interval after its created_at
# (updated_at is the commit). That is deeper than ordinary reads go (hot_window), and no read can
# list it before the audit whose window holds it (a window ends at now − LATE): that audit alone
# can find it, as `missing`. Polls drift, some reads are slow (a stalled response) and some fail
# with a 503 and back off, so audits come late by varying amounts.

SETTLE, INTERVAL, POLL, SPACING = 10.0, 2.0, 0.5, 0.03
LATE = SETTLE - INTERVAL
T0 = 1_800_000_000.0  # the virtual clock's start: calls created before it do not exist


def audit_target(url: str, **settings) -> Target:
    return Target(
        api_url=url,
        api_key=Secret(KEY),
        **{
            "poll_interval": POLL,
            "settle_window": SETTLE,
            "overlap": 1.0,
            "hot_window": 3.0,
            "audit_interval": INTERVAL,
            "audit_sample": 0,
            "max_requests_per_minute": 100_000,
            **settings,
        },
    )


def audit_poller(url: str, session, clock, seed: int, **settings) -> Poller:
    """A Poller of `audit_target(url, **settings)` on `clock`, its randomness seeded with `seed`."""
    return Poller(audit_target(url, **settings), Collector("test"), session, clock=clock, rng=random.Random(seed))


class LateCommits:
    """Calls created every SPACING seconds from T0 to `until`, each committed LATE seconds later."""

    def __init__(self, sim: Simulator, until: float):
        self.sim, self.until = sim, until
        self.created: dict[str, float] = {}  # call id → created_at
        self._next = T0 + SPACING / 2

    def commit_due(self, now: float) -> None:
        """Commit every call whose time has come by `now` (before the poll at `now` reads).

        Its time is LATE after its created_at as the API writes it and the exporter reads it:
        format_ts floors to the millisecond, so that is up to 1 ms before `_next`. Timed from
        `_next`, a call whose audit window ends in that millisecond (at now − LATE) would be
        committed only after that audit, into a stretch it had read, and no later read reaches it.
        """
        while self._next < self.until:
            created = format_ts(self._next)
            if _seconds(created) + LATE >= now:
                return
            # Final when committed, its hangup cause told: nothing keeps it open (SPEC §4, end_grace),
            # so no read plan reaches down to it before the audit whose window holds it.
            call_id = self.sim.insert_past(
                0.0,
                created_at=created,
                started_at=created,
                answered_at=created,
                ended_at=created,
                updated_at=format_ts(self._next + LATE),
                hangup_cause="customer_hangup",
            )
            self.created[call_id] = _seconds(created)
            self._next += SPACING


async def drive(
    poller: Poller,
    clock: FixedClock,
    sim: Simulator,
    commits: LateCommits,
    rng: random.Random,
    until: Callable[[], bool],
    polls: int = 400,
) -> None:
    """Poll on the virtual clock until `until()`: each poll's own wait, plus 0-0.3 s of drift;
    now and then a slow read (stalled 0.7 s) or a 503 (the back-off that follows)."""
    for _ in range(polls):
        if until():
            return
        commits.commit_due(clock.now)
        luck = rng.random()
        if luck < 0.08:
            sim.inject("status", code=503)
        elif luck < 0.12:
            sim.inject("timeout", delay=0.7)
        _, wait = await poller.poll()
        clock.now += wait + rng.uniform(0.0, 0.3)
    raise AssertionError(f"not done after {polls} polls")


def windows_of(records: list[logging.LogRecord]) -> list[tuple[float, float]]:
    return [(r.start, r.end) for r in records if r.getMessage() == "audit done"]


def missing_reported(records: list[logging.LogRecord]) -> collections.Counter:
    return collections.Counter(r.call_id for r in records if r.getMessage() == "audit mismatch" and r.kind == "missing")


def assert_tiled(windows: list[tuple[float, float]]) -> None:
    gaps = [(end, start) for (_, end), (start, _) in zip(windows, windows[1:]) if start != end]
    assert not gaps, f"windows that do not join: {gaps[:5]}"


async def test_calls_committed_late_are_each_reported_once_however_the_polls_drift(caplog):
    sim = Simulator(seed=181, rate=0, api_key=KEY)
    clock = FixedClock(T0)
    with serve_in_thread(sim) as url, caplog.at_level(logging.INFO, logger="exporter.tally"):
        commits = LateCommits(sim, until=T0 + 5 * INTERVAL)
        async with aiohttp.ClientSession() as session:
            poller = audit_poller(url, session, clock, 181)
            await poller.restore()
            await drive(
                poller,
                clock,
                sim,
                commits,
                random.Random(18),
                until=lambda: (poller.tally.schedule.audited_until or 0) > commits.until,
            )
    windows = windows_of(caplog.records)
    assert_tiled(windows)
    assert sum(end - start > INTERVAL + 0.05 for start, end in windows) >= 3, "audits came late, by varying amounts"
    assert len(commits.created) > 300
    assert missing_reported(caplog.records) == collections.Counter(list(commits.created)), (
        "each call committed late is reported once, none falls between two windows"
    )
    store = poller.store
    assert store.counters[MISMATCHES] == {**{(k,): 0 for k in AUDIT_KINDS}, ("missing",): len(commits.created)}
    assert store.counters[CHECKED] == {("window",): len(commits.created), ("spot_check",): 0}
    assert store.counters[SKIPPED][()] == 0


async def test_a_restart_between_two_audits_neither_skips_nor_repeats_a_slice(tmp_path, caplog):
    """The state file holds where the last window ended. The restart takes 3 s, so the first
    poll after it carries an audit that is late and reads back to that point."""
    sim = Simulator(seed=182, rate=0, api_key=KEY)
    clock = FixedClock(T0)
    state_file = str(tmp_path / "state.db")
    with serve_in_thread(sim) as url, caplog.at_level(logging.INFO, logger="exporter.tally"):
        commits = LateCommits(sim, until=T0 + 6 * INTERVAL)
        async with aiohttp.ClientSession() as session:
            first = audit_poller(url, session, clock, 182, state_file=state_file)
            await first.restore()
            await drive(
                first, clock, sim, commits, random.Random(1), until=lambda: len(windows_of(caplog.records)) >= 6
            )
            assert first.tally.schedule.next_audit > clock.now, "stopped between two audits"
            before = windows_of(caplog.records)
            await first.close()

            clock.now += 3.0  # down: the next audit is due meanwhile
            second = audit_poller(url, session, clock, 183, state_file=state_file)
            await second.restore()
            assert second.tally.schedule.audited_until == before[-1][1]
            await drive(
                second,
                clock,
                sim,
                commits,
                random.Random(2),
                until=lambda: (second.tally.schedule.audited_until or 0) > commits.until,
            )
            await second.close()
    windows = windows_of(caplog.records)
    assert windows[len(before)][0] == before[-1][1], "the first window after the restart starts at the saved end"
    assert windows[len(before)][1] - windows[len(before)][0] > INTERVAL + 1.0, "and it was late"
    assert_tiled(windows)
    assert missing_reported(caplog.records) == collections.Counter(list(commits.created)), (
        "no slice skipped or repeated"
    )
    assert second.store.counters[CHECKED][("window",)] == len(commits.created)


async def test_a_clean_run_audits_every_call_created_once_and_finds_nothing(caplog):
    """Honest calls, counted live; then the clock runs ahead until the windows have passed them
    all. At each audit, the calls audited by window are exactly those created (after the
    baseline) before the window's end, and at the end exactly the calls the truth counts."""
    sim = Simulator(seed=184, rate=20, max_calls=120, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    clock = SkippingClock()
    with serve_in_thread(sim) as url, caplog.at_level(logging.INFO, logger="exporter.tally"):
        async with aiohttp.ClientSession() as session:
            poller = audit_poller(url, session, clock, 184, audit_sample=5, initial_lookback=3600.0)
            await poller.restore()
            baseline = poller.ledger.baseline
            checked = []  # (where each audit's window ended, calls audited by window so far)

            async def poll() -> float:
                audits = len(windows_of(caplog.records))
                _, wait = await poller.poll()
                if len(windows_of(caplog.records)) > audits:
                    checked.append((poller.tally.schedule.audited_until, poller.store.counters[CHECKED][("window",)]))
                return wait

            for _ in range(200):  # live: polls on the poller's own schedule until every call is final
                wait = await poll()
                if sim.all_final() and not poller.ledger.open:
                    break
                await asyncio.sleep(wait)
            else:
                raise AssertionError("calls not final after 200 polls")
            with sim._lock:
                created = sorted(_seconds(c.versions[0][1]["created_at"]) for c in sim._calls.values())
            rng = random.Random(185)
            for _ in range(200):  # then ahead: drifting polls, some failing, until every call is audited
                if (poller.tally.schedule.audited_until or 0) > created[-1]:
                    break
                if rng.random() < 0.1:
                    sim.inject("status", code=503)
                clock.skipped += await poll() + rng.uniform(0.0, 0.3)
            else:
                raise AssertionError("calls not audited after 200 polls")
            truth = sim.truth(baseline)
    assert_tiled(windows_of(caplog.records))
    assert sum(created[0] < end <= created[-1] for end, _ in checked) >= 2, "the calls span several windows"
    assert all(count == sum(baseline < c < end for c in created) for end, count in checked)
    store = poller.store
    total = sum(v for (name, _), v in truth.counters.items() if name == "callingbox_calls_created_total")
    assert store.counters[CHECKED][("window",)] == total == len(created) == 120
    assert store.counters[CHECKED][("spot_check",)] > 0
    assert sum(store.counters[MISMATCHES].values()) == 0, caplog.text[-2000:]


async def test_a_rewrite_only_a_spot_check_can_see_is_found_when_the_sample_reaches_it_and_counted_once():
    """A tracked call rewritten inside the settle window, updated_at kept: list reads skip it as
    unchanged and no window reaches it for an hour. A sample of 3 of the 20 tracked calls is
    fetched by id at each audit (a seeded draw): the rewrite counts the moment one fetches it, once."""
    sim = Simulator(seed=186, rate=200, max_calls=20, time_scale=1000, webhook_retry_base=0.01, api_key=KEY)
    clock = SkippingClock()
    with serve_in_thread(sim) as url:
        wait_until(sim.all_final, 30, message="the twenty calls final")
        async with aiohttp.ClientSession() as session:
            poller = audit_poller(
                url, session, clock, 186, settle_window=3600.0, audit_sample=3, initial_lookback=3600.0
            )
            await poller.restore()
            assert (await poller.poll())[0] and len(poller.ledger.calls) == 20
            with sim._lock:
                victim = next(c.id for c in sim._calls.values() if c.latest["status"] == "completed")
            sim.tamper(victim, status="busy")

            def fetched() -> int:
                return sum(path == f"/v1/calls/{victim}" for _, path, _ in list(sim.requests))

            rounds = 0
            while fetched() < 3:
                assert rounds < 200, "the sample never reached the rewritten call"
                clock.skipped += INTERVAL + 0.1  # each poll carries an audit, and its spot-checks
                assert (await poller.poll())[0]
                rounds += 1
                found = poller.store.counters[MISMATCHES][("status",)]
                assert found == (1 if fetched() else 0), "found exactly when a spot-check fetched it"
    store = poller.store
    assert store.counters[MISMATCHES] == {**{(k,): 0 for k in AUDIT_KINDS}, ("status",): 1}, "found 3 times, once"
    assert store.counters[CHECKED] == {("window",): 0, ("spot_check",): 3 * rounds}
