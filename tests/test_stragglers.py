"""Stragglers: calls past the settle window that are not final, refreshed by `GET /v1/calls/{id}`.

The story: the list read stops at the settle window, so a call still changing after it (a
webhook retrying, a reservation settling, a call held up) is asked for by id, a bounded batch
per poll and a few at a time, until it is final or too old. What comes back is counted exactly
once, as the simulator's truth says; a call the API no longer knows is counted as vanished,
once, and forgotten. A failing refresh never fails the poll.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
import pytest
from aiohttp import web

from exporter.accounting import CallState
from exporter.api import ApiError, BodyError, Client, NotFound, RateLimited
from exporter.config import ConfigError, Secret, Target, build
from exporter.ledger import Ledger
from exporter.metrics import Collector
from exporter.poller import Poller
from exporter.settings import Settings
from exporter.simulator import OUTCOME_WEIGHTS, Simulator, serve_in_thread
from exporter.store import Store
from exporter.stragglers import Refresher
from exporter.tally import Tally
from helpers import SkippingClock, call_object, differences, is_final, sample_value, wait_until

KEY = "sk_test_stragglers_0123456789"
NOW = 1_800_000_000.0
WINDOW = 1000.0
GIVE_UP = 5000.0
CREATED = "callingbox_calls_created_total"
CALLS = "callingbox_calls_ended_total"
WEBHOOKS = "callingbox_webhook_deliveries_total"
MONEY = "callingbox_billed_amount_dollars_total"
VANISHED = "callingbox_exporter_vanished_calls_total"


# ---- the refresher against a scripted API -------------------------------------------------


def api_call(call_id: str, status: str, created_at: float, updated_at: float, **fields) -> dict:
    """A call object as the API sends it: outbound, timestamps as text."""
    terminal = is_final(status)
    return (
        call_object(
            call_id,
            status,
            created_at,
            updated_at,
            reservation_status="settled" if terminal else "reserved",
            billing_amount_milli_cents=9000,
            webhook_status=None,
            result_status=None,
            to_number="+14155550100",
            webhook_url="https://hooks.example/cb",
            hangup_cause="customer_hangup" if terminal else None,
        )
        | fields
    )


class ScriptedApi:
    """`get_call` answers from `answers[id]` (a list consumed in order; the last one repeats).

    An answer may be an exception to raise. Records how many requests were in flight at most.
    """

    def __init__(self, answers: dict[str, list], delay: float = 0.0):
        self.answers, self.delay = answers, delay
        self.asked: list[str] = []
        self.in_flight = self.max_in_flight = 0

    async def get_call(self, call_id: str) -> dict:
        self.asked.append(call_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            queue = self.answers[call_id]
            answer = queue.pop(0) if len(queue) > 1 else queue[0]
        finally:
            self.in_flight -= 1
        if isinstance(answer, Exception):
            raise answer
        return answer


def tracked(*calls: tuple[str, CallState]) -> Ledger:
    return Ledger(baseline=NOW - 10 * GIVE_UP, watermark=NOW, calls=dict(calls))


def pending_webhook(created_at: float, updated_at: float | None = None) -> CallState:
    """Ended, billed, its webhook still pending: a typical straggler."""
    return CallState(
        "outbound",
        "completed",
        created_at,
        updated_at or created_at + 60,
        billed=True,
        webhook="pending",
        webhook_pending_since=created_at + 60,
    )


def refresher(concurrency: int = 4, batch: int = 100) -> Refresher:
    return Refresher("default", concurrency, batch)


def tally_of(ledger: Ledger, store: Store | None = None) -> Tally:
    """The target's counting core over `ledger` and `store`, with this file's window and give-up age."""
    return Tally(
        Settings(WINDOW, 120.0, GIVE_UP, hot_window=WINDOW), ledger, store if store is not None else Store(), now=NOW
    )


def due(r: Refresher, tally: Tally, now: float) -> list[str]:
    """The calls the read plan asks by id this poll (every poll reads the whole window here)."""
    return tally.plan(now, r.last_refreshed, r.batch).by_id


async def refresh(r: Refresher, api, tally: Tally, now: float) -> dict[str, int]:
    return await r.refresh(api, tally, now, due(r, tally, now))


def test_only_calls_past_the_window_not_final_and_not_given_up_are_due():
    ledger = tracked(
        ("inside", pending_webhook(NOW - WINDOW + 10)),
        ("straggler", pending_webhook(NOW - 2 * WINDOW)),
        ("ringing", CallState("outbound", "ringing", NOW - 3 * WINDOW, NOW - 3 * WINDOW + 5)),
        ("final", CallState("outbound", "completed", NOW - 2 * WINDOW, NOW - 2 * WINDOW + 60, billed=True)),
        ("too_old", pending_webhook(NOW - GIVE_UP - 1)),
    )
    assert due(refresher(), tally_of(ledger), NOW) == ["ringing", "straggler"]  # never asked: oldest first


def test_a_batch_per_poll_takes_the_least_recently_refreshed_first_so_every_straggler_gets_its_turn():
    ledger = tracked(*((f"s{i}", pending_webhook(NOW - WINDOW - 100 - i)) for i in range(7)))
    r = refresher(batch=3)
    turns = []
    for poll in (0, 1, 2, 300, 301):  # seconds: a straggler's turn comes again within 5 minutes
        asked = due(r, tally_of(ledger), NOW + poll)
        turns.append(asked)
        for call_id in asked:
            r.last_refreshed[call_id] = NOW + poll
    assert turns == [["s6", "s5", "s4"], ["s3", "s2", "s1"], ["s0"], ["s6", "s5", "s4"], ["s3", "s2", "s1"]]


async def test_refreshed_records_count_their_final_events_exactly_once():
    created = NOW - WINDOW - 500
    ledger = tracked(("a", CallState("outbound", "in_progress", created, created + 30)))
    answers = {
        "a": [
            api_call("a", "completed", created, created + 90, webhook_status="pending", reservation_status="reserved"),
            api_call("a", "completed", created, created + 95, webhook_status="pending"),  # settles: billed now
            api_call("a", "completed", created, created + 95, webhook_status="pending"),  # the same again
            api_call("a", "completed", created, created + 300, webhook_status="delivered"),
        ]
    }
    api, store, r = ScriptedApi(answers), Store(), refresher()
    for poll in range(5):
        stats = await refresh(r, api, tally_of(ledger, store), NOW + 300 * poll)  # its turn each time
    assert api.asked == ["a"] * 4, "final after the fourth answer: not asked again"
    assert stats == {"stragglers_refreshed": 0, "stragglers_not_found": 0, "straggler_errors": 0}
    assert store.counters[CALLS][("outbound", "completed")] == 1
    assert store.counters[MONEY][("outbound",)] == 9000
    assert store.counters[WEBHOOKS][("delivered",)] == 1
    assert store.counters[CREATED][("outbound",)] == 0, "creation was counted by the list read, not here"
    assert ledger.calls["a"].final


def list_read(tally: Tally, now: float, listed: list[dict]) -> None:
    """A complete list read as deep as the read plan says, listing `listed`."""
    read = tally.list_read(now, tally.plan(now, {}, 100))
    for obj in listed:
        read.take(obj)
    tally.settle_read(read.result())


async def test_a_404_by_id_drops_a_call_only_once_a_list_read_that_covers_it_lacks_it_too():
    created = NOW - 2 * WINDOW
    ledger = tracked(*((call_id, pending_webhook(created)) for call_id in ("gone", "lagging", "kept")))
    not_found = [NotFound('HTTP 404: {"error": "call not found"}', "404")]
    kept = api_call("kept", "completed", created, created + 60, webhook_status="pending")
    lagging = api_call("lagging", "completed", created, created + 60, webhook_status="pending")
    api = ScriptedApi({"gone": not_found, "lagging": not_found, "kept": [kept]})
    store, r = Store(), refresher()
    tally = tally_of(ledger, store)
    stats = await refresh(r, api, tally, NOW)
    assert stats["stragglers_not_found"] == 2 and set(ledger.calls) == {"gone", "lagging", "kept"}, (
        "a 404 alone drops nothing: by-id reads may lag the list"
    )
    assert store.counters[VANISHED][()] == 0
    # The next read reaches back to them (past the settle window here) and lists all but one.
    assert tally.plan(NOW + 1, r.last_refreshed, 100).horizon <= created
    list_read(tally, NOW + 1, [kept, lagging])
    assert set(ledger.calls) == {"lagging", "kept"} and store.counters[VANISHED][()] == 1
    deviations = store.counters["callingbox_exporter_contract_deviations_total"]
    assert deviations[("by_id_not_found_but_listed",)] == 1
    list_read(tally, NOW + 2, [kept])  # settled: the next reads need not reach back
    assert store.counters[VANISHED][()] == 1 and deviations[("by_id_not_found_but_listed",)] == 1
    assert tally.plan(NOW + 3, r.last_refreshed, 100).horizon > created


async def test_other_errors_keep_the_call_for_the_next_poll_and_a_429_stops_the_batch():
    ledger = tracked(*((f"c{i}", pending_webhook(NOW - WINDOW - 100 - i)) for i in range(6)))
    answers = {
        f"c{i}": [api_call(f"c{i}", "completed", NOW - WINDOW - 100 - i, NOW - WINDOW, webhook_status="pending")]
        for i in range(6)
    }
    answers["c5"] = [ApiError("HTTP 503: upstream unavailable", "503"), answers["c5"][0]]
    answers["c3"] = [RateLimited("HTTP 429: slow down", 1.0), answers["c3"][0]]
    api, store, r = ScriptedApi(answers), Store(), refresher(concurrency=1)
    stats = await refresh(r, api, tally_of(ledger, store), NOW)
    assert api.asked == ["c5", "c4", "c3"], "oldest first; nothing more after the 429"
    assert stats == {"stragglers_refreshed": 1, "stragglers_not_found": 0, "straggler_errors": 2}
    assert len(ledger.calls) == 6
    stats = await refresh(r, api, tally_of(ledger, store), NOW + 1)
    assert api.asked[3:] == ["c2", "c1", "c0"], "those not asked yet; the others wait their turn"
    stats = await refresh(r, api, tally_of(ledger, store), NOW + 301)
    assert api.asked[6:] == ["c5", "c4", "c3", "c2", "c1", "c0"], "the least recently asked first"
    assert stats["straggler_errors"] == 0


async def test_a_malformed_answer_is_counted_once_and_the_call_kept():
    ledger = tracked(("bad", pending_webhook(NOW - 2 * WINDOW)))
    broken = api_call("bad", "", NOW - 2 * WINDOW, NOW - 2 * WINDOW + 70)
    api, store, r = ScriptedApi({"bad": [broken]}), Store(), refresher()
    tally = tally_of(ledger, store)  # one target: its memory of malformed records lasts across polls
    for poll in range(3):
        await refresh(r, api, tally, NOW + 300 * poll)  # its turn each time
    counted = {reason: n for reason, n in store.counters["callingbox_exporter_invalid_records_total"].items() if n}
    assert counted == {("unknown_status",): 1}  # every other reason stays at its 0 (SPEC §3)
    assert "bad" in ledger.calls and len(api.asked) == 3


@pytest.mark.parametrize("concurrency, batch", [(1, 5), (3, 10), (4, 100)])
async def test_refreshes_stay_within_the_concurrency_bound_and_the_batch(concurrency, batch):
    ledger = tracked(*((f"c{i}", pending_webhook(NOW - WINDOW - 100 - i)) for i in range(30)))
    answers = {
        f"c{i}": [api_call(f"c{i}", "completed", NOW - WINDOW - 100 - i, NOW - WINDOW, webhook_status="pending")]
        for i in range(30)
    }
    api = ScriptedApi(answers, delay=0.01)
    stats = await refresh(refresher(concurrency, batch), api, tally_of(ledger, Store()), NOW)
    assert len(api.asked) == stats["stragglers_refreshed"] == min(batch, 30)
    assert api.max_in_flight == concurrency


async def test_an_unexpected_error_is_logged_and_does_not_escape(caplog):
    ledger = tracked(("a", pending_webhook(NOW - 2 * WINDOW)))

    class Broken:
        async def get_call(self, call_id):
            raise KeyError("bug")

    stats = await refresh(refresher(), Broken(), tally_of(ledger, Store()), NOW)
    assert stats["straggler_errors"] == 1 and "a" in ledger.calls
    assert "straggler refresh crashed" in caplog.text


# ---- Client.get_call -----------------------------------------------------------------------


@pytest.fixture
async def by_id(aiohttp_server):
    """An API whose answers by id the test sets: call_id → (status, body, content type)."""
    answers: dict[str, tuple[int, str, str]] = {}
    seen: list[str] = []

    async def get_call(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        status, body, kind = answers[request.match_info["call_id"]]
        return web.Response(status=status, text=body, content_type=kind)

    app = web.Application()
    app.router.add_get("/v1/calls/{call_id}", get_call)
    server = await aiohttp_server(app)
    return answers, str(server.make_url("")).rstrip("/"), seen


class Codes:
    """A recorder (api.Recorder) that keeps the code of each answer."""

    def __init__(self, codes: list[str]):
        self.codes = codes

    def response(self, code: str) -> None:
        self.codes.append(code)

    def body_bytes(self, endpoint: str, size: int) -> None:
        pass


async def test_get_call_returns_the_object_and_tells_a_404_of_the_api_from_any_other(by_id):
    answers, url, seen = by_id
    answers["ok"] = (200, json.dumps({"id": "ok", "status": "queued"}), "application/json")
    answers["gone"] = (404, '{"error": "call gone not found"}', "application/json")
    answers["proxy"] = (404, "<html>not here</html>", "text/html")
    answers["list"] = (200, "[]", "application/json")
    answers["boom"] = (503, '{"error": "upstream unavailable"}', "application/json")
    codes: list[str] = []
    async with aiohttp.ClientSession() as session:
        client = Client(session, url, Secret(KEY), 5.0, Codes(codes))
        assert await client.get_call("ok") == {"id": "ok", "status": "queued"}
        with pytest.raises(NotFound):
            await client.get_call("gone")
        with pytest.raises(ApiError) as proxy:
            await client.get_call("proxy")
        assert not isinstance(proxy.value, NotFound), "a 404 page that is not the API's says nothing of the call"
        with pytest.raises(BodyError):
            await client.get_call("list")
        with pytest.raises(ApiError) as boom:
            await client.get_call("boom")
    assert boom.value.code == "503"
    assert codes == ["200", "404", "404", "200", "503"]
    assert seen[0] == f"Bearer {KEY}"


# ---- configuration -------------------------------------------------------------------------


def test_straggler_keys_have_defaults_and_are_validated(tmp_path):
    target = Target()
    assert (target.straggler_give_up, target.straggler_concurrency, target.straggler_batch) == (7 * 86400, 4, 100)
    path = tmp_path / "c.yml"
    path.write_text("straggler_give_up: 96h\nstraggler_concurrency: 2\nstraggler_batch: 10\n")
    (target,) = build(config_file=str(path), demo=True).targets
    assert (target.straggler_give_up, target.straggler_concurrency, target.straggler_batch) == (96 * 3600, 2, 10)
    for text, message in [
        ("straggler_concurrency: 0\n", "straggler_concurrency: 0 is not a whole number of at least 1"),
        ("straggler_batch: many\n", "straggler_batch: 'many' is not a whole number of at least 1"),
        ("straggler_give_up: soon\n", "straggler_give_up: 'soon' is not a duration (e.g. 15s, 2m)"),
        ("straggler_give_up: 24h\n", "straggler_give_up: '24h' is shorter than settle_window"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            build(config_file=str(path), demo=True)
        assert str(error.value) == message


# ---- the poller against the simulator, in process ------------------------------------------


def post_call(url: str, **body) -> str:
    request = urllib.request.Request(
        url + "/v1/calls",
        data=json.dumps({"to_number": "+14155550123", **body}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["id"]


def held_calls(sim: Simulator, url: str, n: int, **body) -> list[str]:
    """`n` calls created now that will answer every outcome (webhook, extraction), frozen as queued.

    Every call is to be `completed` (the slowest path), so holding it at once always finds it
    long before its end, whatever the machine's load.
    """
    sim.set_outcome_weights({"completed": 1})
    ids = []
    for _ in range(n):
        call_id = post_call(url, webhook_url="https://hooks.example/cb", returns={"ok": "boolean"}, **body)
        sim.hold(call_id)
        ids.append(call_id)
    sim.set_outcome_weights(OUTCOME_WEIGHTS)
    return ids


async def test_the_poller_refreshes_stragglers_by_id_a_batch_per_poll_within_the_concurrency_bound():
    sim = Simulator(seed=5, rate=0, time_scale=30, api_key=KEY, by_id_delay=0.05)
    with serve_in_thread(sim) as url:
        ids = held_calls(sim, url, 12)
        target = Target(
            api_url=url,
            api_key=Secret(KEY),
            settle_window=2.0,
            initial_lookback=60.0,
            straggler_concurrency=3,
            straggler_batch=5,
        )
        async with aiohttp.ClientSession() as session:
            clock = SkippingClock()
            poller = Poller(target, Collector("test"), session, clock=clock)
            assert (await poller.poll())[0]
            assert set(poller.ledger.calls) == set(ids) and sim.stats["by_id_requests"] == 0
            clock.skipped = 17.2  # every call past the settle window, not final, and its turn by id come (15 s)
            per_poll = []
            for _ in range(3):
                before = sim.stats["by_id_requests"]
                assert (await poller.poll())[0]
                per_poll.append(sim.stats["by_id_requests"] - before)
        assert per_poll == [5, 5, 2], (
            "a full batch while more are due, never more; then the last two (the rest wait their turn)"
        )
        assert sim.stats["by_id_max_in_flight"] == 3, "three at a time: concurrent, and never more"
        assert set(poller.stragglers.last_refreshed) == set(ids), "each straggler had its turn"
        requests = poller.store.counters["callingbox_exporter_api_requests_total"]
        assert requests == {("200",): sim.stats["list_requests"] + sim.stats["by_id_requests"]}
        assert poller.collector.snapshots["default"].health.stragglers == 12


async def test_failing_refreshes_do_not_fail_the_poll_nor_drop_up():
    sim = Simulator(seed=6, rate=0, time_scale=30, api_key=KEY)
    with serve_in_thread(sim) as url:
        ids = held_calls(sim, url, 2)
        target = Target(api_url=url, api_key=Secret(KEY), settle_window=2.0, initial_lookback=60.0)
        async with aiohttp.ClientSession() as session:
            clock = SkippingClock()
            poller = Poller(target, Collector("test"), session, clock=clock)
            assert (await poller.poll())[0]
            clock.skipped = 2.2  # both calls past the settle window: stragglers

            async def unavailable(call_id: str) -> dict:
                raise ApiError("HTTP 503: upstream unavailable", "503")

            poller.client.get_call = unavailable
            ok, _ = await poller.poll()
        assert ok and poller.status.up and poller.status.last_error is None
        assert set(poller.ledger.calls) == set(ids), "kept for the next poll"
        snapshot = poller.collector.snapshots["default"]
        assert snapshot.health.status.up and snapshot.health.stragglers == 2


# ---- the whole system: exporter process, simulator, truth ----------------------------------


def _config(url: str, **extra) -> dict:
    # One poll a second: the refreshes stay well inside the key's default request budget.
    return {
        "api_url": url,
        "poll_interval": "1s",
        "overlap": "10s",
        "initial_lookback": "1h",
        "settle_window": "4s",
        **extra,
    }


def _polls(exporter) -> float:
    return sample_value(exporter.scrape(), "callingbox_exporter_polls_total", result="success")


def _more_polls(exporter, n: int = 3) -> None:
    polls = _polls(exporter)
    wait_until(lambda: _polls(exporter) >= polls + n, 30, message=f"{n} more polls")


def _equal_to_truth(sim, exporter) -> list[str]:
    wait_until(sim.all_final, 120, message="simulator calls final")
    truth = sim.truth(0)
    try:
        wait_until(lambda: not differences(exporter.scrape(), truth), 60, message="exporter caught up with truth")
    except AssertionError:
        return differences(exporter.scrape(), truth)
    _more_polls(exporter)
    return differences(exporter.scrape(), truth)


def test_stragglers_past_the_settle_window_are_refreshed_by_id_and_counted_exactly_once(stack):
    # Webhooks retry from 0.1 s: the ~10 % that keep failing stay pending for ~13 s, well past
    # the 4 s settle window, so some calls become stragglers by themselves.
    sim, url = stack.simulator(
        seed=23, rate=40, max_calls=60, time_scale=30, webhook_retry_base=0.1, late_commit=0.2, api_key=KEY
    )
    exporter = stack.exporter(_config(url, straggler_batch=3), env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(exporter.ready, 30, message="ready")
    (held,) = held_calls(sim, url, 1)
    created = time.time()

    wait_until(lambda: time.time() > created + 5, 10, message="the held call past the settle window")
    _more_polls(exporter)  # read without it: only its refresh by id can see it now
    assert sample_value(exporter.scrape(), "callingbox_exporter_stragglers") >= 1
    sim.release(held)  # it rings, talks, settles, extracts and delivers its webhook, all unlisted

    assert _equal_to_truth(sim, exporter) == []
    assert sample_value(exporter.scrape(), CALLS, direction="outbound", status="completed") >= 1
    assert sample_value(exporter.scrape(), "callingbox_exporter_stragglers") == 0
    assert sample_value(exporter.scrape(), VANISHED) == 0
    assert sim.stats["by_id_requests"] > 0
    assert sample_value(exporter.scrape(), "callingbox_up") == 1


def test_a_straggler_deleted_from_the_api_is_counted_as_vanished_once_and_dropped(stack):
    sim, url = stack.simulator(seed=29, rate=0, time_scale=30, webhook_retry_base=0.1, api_key=KEY)
    exporter = stack.exporter(_config(url), env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(exporter.ready, 30, message="ready")
    gone, other = held_calls(sim, url, 2)
    wait_until(
        lambda: sample_value(exporter.scrape(), "callingbox_exporter_stragglers") == 2, 30, message="two stragglers"
    )

    assert sim.delete(gone)
    wait_until(
        lambda: sample_value(exporter.scrape(), VANISHED) == 1, 30, message="the deleted call counted as vanished"
    )
    _more_polls(exporter)
    assert sample_value(exporter.scrape(), VANISHED) == 1, "once"
    assert sample_value(exporter.scrape(), "callingbox_exporter_stragglers") == 1
    assert sample_value(exporter.scrape(), "callingbox_exporter_tracked_calls") == 1
    assert sample_value(exporter.scrape(), "callingbox_exporter_api_requests_total", code="404") >= 1

    sim.release(other)
    assert _equal_to_truth(sim, exporter) == []
    assert sample_value(exporter.scrape(), VANISHED) == 1
    assert sample_value(exporter.scrape(), "callingbox_exporter_tracked_calls") == 0
