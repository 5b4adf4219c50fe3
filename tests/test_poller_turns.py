"""A large read leaves the event loop to scrapes, and counts the same for it.

The API client hands a list body over a few elements at a time (api.PIECE) and the poller gives
the event loop a turn between pieces once its time budget is spent (liveness.Turns); the prune
of a full read walks the ledger in slices the same way. With a budget of zero every piece and
slice gives a turn, so these tests count turns and watch what a task beside the poll sees
while the read goes on: orders and counts, never a duration.
"""

from __future__ import annotations

import asyncio
import math

import aiohttp

from exporter import api
from exporter.config import Secret, Target
from exporter.liveness import Turns
from exporter.metrics import Collector
from exporter.poller import Poller
from exporter.simulator import Simulator, serve_in_thread

KEY = "sk_test_poller_turns_0123456789"
CALLS = 3_000
PRUNE_SLICE = 1_000  # calls a full read's prune walks between two turns (Tally.prune)


def history() -> Simulator:
    """CALLS calls of the last hour, all ended; nothing new."""
    return Simulator(seed=29, rate=0, history=CALLS, history_age=60, history_spacing=1.0, api_key=KEY)


def target(url: str, state_file: str) -> Target:
    day = 86400.0
    return Target(
        api_url=url,
        api_key=Secret(KEY),
        initial_lookback=day,
        settle_window=day,
        new_series_hold=0.0,
        state_file=state_file,
    )


async def first_poll(url: str, state_file: str, turns: Turns) -> Poller:
    async with aiohttp.ClientSession() as session:
        poller = Poller(target(url, state_file), Collector("test"), session)
        poller.turns = turns
        await poller.restore()
        ok, _ = await poller.poll()
        assert ok, poller.status.last_error
        return poller


async def test_a_large_read_gives_the_loop_a_turn_per_piece_and_a_task_beside_it_runs_between(tmp_path):
    seen: list[int] = []  # what a task beside the poll saw of the ledger, once per turn of the loop
    done = False

    async def beside(poller_box: list) -> None:
        while not done:
            if poller_box:
                seen.append(len(poller_box[0].ledger.calls))
            await asyncio.sleep(0)

    with serve_in_thread(history()) as url:
        async with aiohttp.ClientSession() as session:
            poller = Poller(target(url, str(tmp_path / "state.db")), Collector("test"), session)
            poller.turns = Turns(budget=0.0)  # a turn at every piece and slice
            await poller.restore()
            box = [poller]
            watcher = asyncio.create_task(beside(box))
            ok, _ = await poller.poll()
            done = True
            await watcher
    assert ok, poller.status.last_error
    assert len(poller.ledger.calls) == CALLS
    pieces, slices = math.ceil(CALLS / api.PIECE), math.ceil(CALLS / PRUNE_SLICE)
    assert poller.turns.given >= pieces + slices
    # The task beside the poll ran while the read had counted some calls and not yet all: at
    # least once per piece but the last.
    partway = {n for n in seen if 0 < n < CALLS}
    assert len(partway) >= pieces - 1


async def test_a_read_counts_the_same_whatever_its_turns(tmp_path):
    with serve_in_thread(history()) as url:
        every = await first_poll(url, str(tmp_path / "every.db"), Turns(budget=0.0))
        never = await first_poll(url, str(tmp_path / "never.db"), Turns(budget=math.inf))
    assert every.turns.given > 0 and never.turns.given == 0
    assert every.store.counters == never.store.counters
    calls = {name: h for name, h in every.store.histograms.items() if not name.startswith("callingbox_exporter_")}
    assert calls and calls == {name: never.store.histograms[name] for name in calls}  # not the poll's own duration
    assert set(every.ledger.calls) == set(never.ledger.calls)


async def test_the_prune_of_a_full_read_walks_the_ledger_a_thousand_calls_at_a_time(tmp_path):
    with serve_in_thread(history()) as url:
        poller = await first_poll(url, str(tmp_path / "state.db"), Turns())
    slices = list(poller.tally.prune(poller.status.last_poll))
    assert slices == [min(CALLS, n * PRUNE_SLICE) for n in range(1, math.ceil(CALLS / PRUNE_SLICE) + 1)]
    assert len(poller.ledger.calls) == CALLS  # none is past the settle window
