"""The poller in process against the simulator over loopback: persist, then publish; 429s; back-off.

Each test drives `Poller.poll()` by hand, so the order of a poll's steps can be observed
directly: what was on disk when a snapshot was published, what a failed save left on /metrics,
when a rate-limited read asked again.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import aiohttp

from exporter.config import Secret, Target
from exporter.health import Snapshot
from exporter.metrics import Collector
from exporter.poller import MAX_BACKOFF, RATE_LIMIT_RETRIES, Poller
from exporter.simulator import Simulator, serve_in_thread
from exporter.state import read

KEY = "sk_test_poller_0123456789"
ENDED = "callingbox_calls_ended_total"


def quiet_simulator(seed: int) -> Simulator:
    """Twenty calls that end at once (time compressed), then nothing new."""
    return Simulator(seed=seed, rate=200, max_calls=20, time_scale=1000, webhook_retry_base=0.01, api_key=KEY)


def target(url: str, **settings) -> Target:
    # No hold of new series (born at zero): these stories look at what each poll publishes.
    return Target(
        api_url=url,
        api_key=Secret(KEY),
        initial_lookback=3600.0,
        **{"poll_interval": 0.2, "new_series_hold": 0.0, **settings},
    )


def ended(store) -> int:
    return sum(store.counters[ENDED].values())


class DiskCheckingCollector(Collector):
    """A real Collector that also notes, at each publish, what the state file on disk holds."""

    def __init__(self, state_file: str):
        super().__init__("test")
        self.state_file = state_file
        self.published: list[tuple[int, int | None]] = []  # (ended calls published, ended calls on disk)

    async def publish(self, org: str, snapshot: Snapshot) -> None:
        on_disk = read(self.state_file)
        self.published.append((ended(snapshot.store), None if on_disk is None else ended(on_disk.store)))
        await super().publish(org, snapshot)


def calls_requests(sim: Simulator) -> list[tuple[float, int]]:
    """(arrival, status) of each list request the simulator answered, in order."""
    return [(arrived, status) for arrived, path, status in list(sim.requests) if path == "/v1/calls"]


async def test_a_snapshot_is_published_only_once_the_state_holding_it_is_on_disk(tmp_path):
    sim = quiet_simulator(seed=71)
    with serve_in_thread(sim) as url:
        state_file = str(tmp_path / "state.db")
        collector = DiskCheckingCollector(state_file)
        async with aiohttp.ClientSession() as session:
            poller = Poller(target(url, state_file=state_file), collector, session)
            await poller.restore()
            for _ in range(100):  # bounded: the twenty calls end within a few polls
                ok, wait = await poller.poll()
                assert ok
                if sim.all_final() and collector.published[-1][0] == 20:
                    break
                await asyncio.sleep(wait)  # the poller's own schedule
    assert collector.published[0] == (0, None), "the restore publishes the empty start; no file yet"
    assert collector.published[-1] == (20, 20)
    for published, on_disk in collector.published[1:]:
        assert on_disk == published, "each snapshot was on disk, with the same counts, before it was published"


async def test_a_state_that_cannot_be_saved_publishes_nothing_and_reports_down(tmp_path):
    sim = quiet_simulator(seed=72)
    with serve_in_thread(sim) as url:
        blocker = tmp_path / "not-a-directory"
        state_file = str(blocker / "state.db")
        collector = Collector("test")
        async with aiohttp.ClientSession() as session:
            poller = Poller(target(url, state_file=state_file), collector, session)
            await poller.restore()
            start = collector.snapshots["default"]
            blocker.write_text("a file where the state directory should be\n")
            failed = 0
            for _ in range(100):
                ok, wait = await poller.poll()
                assert not ok and wait > 0
                failed += 1
                if ended(poller.store) == 20:
                    break
                await asyncio.sleep(0.2)  # the scenario: polls keep coming while the disk is broken
            assert ended(poller.store) == 20, "the calls were read and counted in memory"
            shown = collector.snapshots["default"]
            assert shown.store is start.store, "no count that is not on disk reached /metrics"
            assert not shown.health.status.up and shown.health.status.last_error == "state not saved"
            polls = poller.store.counters["callingbox_exporter_polls_total"]
            assert (polls[("success",)], polls[("error",)]) == (0, failed), (
                "each poll counted once, as the error it was"
            )

            # The directory comes back: the next poll saves, then publishes everything held.
            blocker.unlink()
            blocker.mkdir()
            assert (await poller.poll())[0]
    published = collector.snapshots["default"]
    assert ended(published.store) == 20 and published.health.status.up
    on_disk = read(state_file).store
    assert ended(on_disk) == 20
    for store in (published.store, on_disk, poller.store):
        polls = store.counters["callingbox_exporter_polls_total"]
        assert (polls[("success",)], polls[("error",)]) == (1, failed), "the save held the poll that made it"


class Clock:
    """Wall time, plus what the test skips ahead."""

    def __init__(self):
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped


async def test_new_series_are_published_at_zero_until_a_scrape_read_them_and_the_hold_passed(tmp_path):
    """Born at zero (SPEC §3); a restart then serves the restored values at once."""
    sim = quiet_simulator(seed=77)
    with serve_in_thread(sim) as url:
        settings = dict(new_series_hold=60.0, state_file=str(tmp_path / "state.db"))
        clock, collector = Clock(), Collector("test")
        async with aiohttp.ClientSession() as session:
            poller = Poller(target(url, **settings), collector, session, clock=clock)
            await poller.restore()
            for _ in range(100):  # bounded: the twenty calls end within a few polls
                assert (await poller.poll())[0]
                if ended(poller.store) == 20:
                    break
                await asyncio.sleep(0.2)
            assert ended(poller.store) == 20 and ended(read(settings["state_file"]).store) == 20
            assert ended(collector.snapshots["default"].store) == 0, "published at 0: no scrape has read it"
            clock.skipped = 120.0
            assert (await poller.poll())[0]
            assert ended(collector.snapshots["default"].store) == 0, "the hold passed, but nothing read the zeros"
            collector.read(dict(collector.snapshots))  # a scrape
            assert (await poller.poll())[0]
            assert ended(collector.snapshots["default"].store) == 20
            await poller.close()

            restarted = Poller(target(url, **settings), Collector("test"), session, clock=clock)
            await restarted.restore()
            assert ended(restarted.collector.snapshots["default"].store) == 20, "restored: visible at once"
            await restarted.close()


async def test_a_retry_after_given_as_an_http_date_is_waited_for():
    sim = quiet_simulator(seed=73)
    with serve_in_thread(sim) as url:
        async with aiohttp.ClientSession() as session:
            poller = Poller(target(url), Collector("test"), session)
            until = int(time.time()) + 3  # HTTP dates have whole seconds
            sim.inject("429", retry_after=formatdate(until, usegmt=True))
            assert (await poller.poll())[0]
    (limited, code), (retried, retry_code) = calls_requests(sim)[:2]
    assert (code, retry_code) == (429, 200)
    assert retried >= until, f"asked again {until - retried:.2f}s before the date the API gave"


async def test_a_429_without_retry_after_waits_a_poll_interval():
    sim = quiet_simulator(seed=74)
    with serve_in_thread(sim) as url:
        async with aiohttp.ClientSession() as session:
            poller = Poller(target(url, poll_interval=1.5), Collector("test"), session)
            sim.inject("429", retry_after=None)
            assert (await poller.poll())[0]
    (limited, code), (retried, retry_code) = calls_requests(sim)[:2]
    assert (code, retry_code) == (429, 200)
    assert retried - limited >= 1.5


async def test_429s_past_the_retries_fail_the_poll_and_the_next_one_succeeds():
    sim = quiet_simulator(seed=75)
    with serve_in_thread(sim) as url:
        async with aiohttp.ClientSession() as session:
            poller = Poller(target(url), Collector("test"), session)
            sim.inject("429", count=RATE_LIMIT_RETRIES + 1, retry_after=0.05)
            ok, wait = await poller.poll()
            assert not ok and wait > 0
            assert not poller.status.up and "429" in poller.status.last_error
            assert poller.store.counters["callingbox_exporter_api_requests_total"][("429",)] == RATE_LIMIT_RETRIES + 1
            assert (await poller.poll())[0]
            assert poller.status.up and poller.status.failures == 0
    codes = [code for _, code in calls_requests(sim)]
    assert codes[: RATE_LIMIT_RETRIES + 2] == [429] * (RATE_LIMIT_RETRIES + 1) + [200]


async def test_the_back_off_grows_then_stops_at_its_cap():
    sim = quiet_simulator(seed=76)
    with serve_in_thread(sim) as url:
        async with aiohttp.ClientSession() as session:
            poller = Poller(target(url, poll_interval=10.0), Collector("test"), session)
            sim.inject("status", count=8, code=503)
            waits = []
            for _ in range(8):
                ok, wait = await poller.poll()
                assert not ok
                waits.append(wait)
    assert all(later > earlier for earlier, later in zip(waits[:4], waits[1:5])), waits  # 10, 20, 40, 80, 160 s
    assert all(wait <= MAX_BACKOFF for wait in waits), waits
    assert waits[-1] == waits[-2] == MAX_BACKOFF, "past the cap, the jitter cannot push it beyond"


async def test_the_daily_budget_of_a_target_is_published_from_the_start():
    """daily_budget_dollars reaches /metrics with the restored state, before any poll (and only when set)."""
    async with aiohttp.ClientSession() as session:
        collector = Collector("test")
        await Poller(
            target("http://127.0.0.1:9", name="acme", daily_budget_dollars=250.0), collector, session
        ).restore()
        await Poller(target("http://127.0.0.1:9", name="globex"), collector, session).restore()
    samples = {
        (s.name, s.labels.get("org")): s.value
        for family in collector.collect()
        for s in family.samples
        if s.name == "callingbox_daily_budget_dollars"
    }
    assert samples == {("callingbox_daily_budget_dollars", "acme"): 250.0}
