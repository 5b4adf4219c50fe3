"""Liveness: /-/healthy fails for a wedged or ended poll loop, never for an API outage.

The heartbeat's rule is tested with a hand-driven clock; then real pollers, run by the
Supervisor and served by the app, behind a probe: one whose read hangs because its deadline is
broken (the bug the probe exists for), one whose loop has died, one through an outage of 401s,
5xx, timeouts and a 429, and one reading a large first list slowly but steadily.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import bcrypt
import pytest
import yaml
from aiohttp import web

from exporter import api, deadline, webconfig
from exporter.config import Secret, Target
from exporter.exposition import Exposition
from exporter.liveness import MARGIN, SECONDS_PER_CALL, Heartbeat, Turns, ledger_work
from exporter.poller import Poller
from exporter.simulator import Simulator, format_ts, serve_in_thread
from exporter.supervisor import Supervisor
from exporter.web import make_app
from exporter.webconfig import Guard

KEY = "sk_test_liveness_0123456789"
SMALL_MARGIN = 0.5  # seconds: tests wait out a limit of 2 x bound + this


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- the heartbeat's rule ----------------------------------------------------------------------


def test_a_step_is_alive_until_twice_its_bound_plus_the_margin():
    clock = Clock()
    heartbeat = Heartbeat(clock)
    with heartbeat.step("list read", 30.0):
        clock.t += 2 * 30 + MARGIN
        assert heartbeat.overdue() is None
        clock.t += 1
        assert heartbeat.overdue() == "list read running for 121s, past its limit of 120s"
    assert heartbeat.overdue() is None, "a step that ended is not wedged"


def test_a_wait_for_the_api_budget_has_no_bound_but_a_step_beside_it_has():
    clock = Clock()
    heartbeat = Heartbeat(clock)
    with heartbeat.step("waiting for the API budget", None):
        clock.t += 86_400  # a Retry-After of a day holds the key: the API's to say, not a wedge
        assert heartbeat.overdue() is None
        with heartbeat.step("call by id", 5.0):
            clock.t += 2 * 5 + MARGIN + 1
            assert heartbeat.overdue() == "call by id running for 71s, past its limit of 70s"


def test_nothing_running_in_the_middle_of_a_poll_for_longer_than_the_margin_is_wedged():
    """An await that is no step: the loop stopped somewhere no bound was promised."""
    clock = Clock()
    heartbeat = Heartbeat(clock)
    clock.t += 10 * MARGIN
    assert heartbeat.overdue() is None, "no step yet: the loop has not started"
    with heartbeat.step("state save", 10.0):
        pass
    clock.t += MARGIN
    assert heartbeat.overdue() is None
    clock.t += 1
    assert heartbeat.overdue() == "no step running for 61s, past its limit of 60s"


def test_a_pass_over_the_ledger_is_bounded_by_its_size():
    assert ledger_work(0) == MARGIN
    assert ledger_work(1_000_000) == MARGIN + 1_000_000 * SECONDS_PER_CALL
    assert SECONDS_PER_CALL >= 20 * 0.453 / 100_000, "20 times the measured first save (BENCHMARKS.md)"


async def test_a_turn_is_given_to_the_loop_only_once_the_budget_is_spent():
    clock = Clock()
    turns = Turns(budget=0.001, clock=clock)
    ran: list[str] = []

    async def beside() -> None:
        ran.append("beside")

    task = asyncio.create_task(beside())
    await turns.give()  # no time has passed: the caller goes on, the task waits
    assert ran == [] and turns.given == 0
    clock.t += 0.002
    await turns.give()  # the budget is spent: the task runs before the caller goes on
    assert ran == ["beside"] and turns.given == 1
    await task
    await turns.give()  # a fresh budget from the turn
    assert turns.given == 1


async def test_a_turn_lets_the_io_that_has_arrived_run_before_the_caller_goes_on():
    """A request already in its socket is read in the turn, not after one more piece of work."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ran: list[bytes] = []
    loop.add_reader(ours.fileno(), lambda: ran.append(ours.recv(1)))
    try:
        theirs.send(b"x")
        await Turns(budget=0.0).give()
        assert ran == [b"x"]
    finally:
        loop.remove_reader(ours.fileno())
        ours.close()
        theirs.close()


# --- pollers behind the probe -------------------------------------------------------------------


class Served:
    """Pollers run by a Supervisor, the app in front of them; the probes asked over HTTP."""

    def __init__(self, client, supervisor: Supervisor):
        self.client, self.supervisor = client, supervisor

    async def get(self, path: str) -> tuple[int, str]:
        response = await self.client.get(path)
        return response.status, await response.text()

    def poller(self, name: str = "default") -> Poller:
        return self.supervisor.pollers[name]


@pytest.fixture
async def served(aiohttp_client):
    """`await served(targets, make_poller=Poller)`: the targets' loops running, their app served."""
    stack: list[tuple[aiohttp.ClientSession, Supervisor]] = []

    async def start(targets: list[Target], make_poller=Poller) -> Served:
        session = aiohttp.ClientSession()
        collector = Exposition("test")
        supervisor = Supervisor(collector, session, make_poller)
        stack.append((session, supervisor))
        await supervisor.prepare(targets)
        for poller in supervisor:
            poller.heartbeat.margin = SMALL_MARGIN
        supervisor.start()
        client = await aiohttp_client(make_app(collector, collector, "test", wedged=supervisor.wedged))
        return Served(client, supervisor)

    yield start
    for session, supervisor in stack:
        await supervisor.stop()
        await session.close()


async def wait_for(predicate, timeout: float, message: str):
    deadline_at = time.monotonic() + timeout
    while not (value := await predicate()):
        if time.monotonic() > deadline_at:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.05)
    return value


def target(url: str, **settings) -> Target:
    return Target(
        api_url=url,
        api_key=Secret(KEY),
        initial_lookback=3600.0,
        **{"poll_interval": 0.2, "request_timeout": 0.5, **settings},
    )


async def test_a_read_that_outlives_its_deadline_fails_the_probe_with_one_line(served, monkeypatch):
    """The bug the probe is for: a deadline that does not hold (here switched off) and a body
    that trickles. /metrics still answers, with callingbox_up 1 from the last poll that ended:
    only the probe can tell, and Kubernetes restarts the pod."""

    async def unbounded(at, seconds, awaitable):
        return await awaitable

    monkeypatch.setattr(api, "_within", unbounded)
    monkeypatch.setattr(deadline, "FLOOR", 0.5)  # a small list read promises 0.5 + 0.5 s
    sim = Simulator(seed=3, rate=50, max_calls=20, time_scale=1000, api_key=KEY)
    with serve_in_thread(sim) as url:
        app = await served([target(url, name="stuck")])
        await wait_for(lambda: _up(app, "stuck"), 10, "a first poll that measures the list")
        sim.inject("trickle", every=0.2, duration=20)
        started = time.monotonic()
        status, text = await wait_for(lambda: _unhealthy(app), 10, "/-/healthy to fail")
        assert time.monotonic() - started >= 2 * 1.0 + SMALL_MARGIN - 0.1
        assert text.startswith("Unhealthy: the poll loop of stuck is wedged: list read running for ")
        assert text.count("\n") == 1 and text.endswith("past its limit of 2s.\n")
        status, page = await app.get("/metrics")
        assert status == 200 and 'callingbox_up{org="stuck"} 1.0' in page, "a wedged poll publishes nothing"


async def _unhealthy(app: Served):
    status, text = await app.get("/-/healthy")
    return (status, text) if status == 503 else None


async def test_a_poll_loop_that_ended_fails_the_probe(served):
    class Broken(Poller):
        async def run(self) -> None:
            raise RuntimeError("a bug past the loop's own guard")

    app = await served([target("http://127.0.0.1:9", name="broken")], make_poller=Broken)
    status, text = await wait_for(lambda: _unhealthy(app), 5, "/-/healthy to fail")
    assert text == "Unhealthy: the poll loop of broken has ended.\n"


async def test_behind_a_password_the_probe_names_no_target(aiohttp_client, tmp_path):
    """The probes need no password (Kubernetes has none), so their answers name no target then."""
    path = tmp_path / "web.yml"
    path.write_text(
        yaml.safe_dump({"basic_auth_users": {"prometheus": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()}})
    )
    collector = Exposition("test")
    app = make_app(
        collector,
        collector,
        "test",
        guard=Guard(str(path), webconfig.load(str(path))),
        wedged=lambda: ("acme", "is wedged: state save running for 900s, past its limit of 800s"),
    )
    response = await (await aiohttp_client(app)).get("/-/healthy")
    assert (response.status, await response.text()) == (
        503,
        "Unhealthy: a poll loop is wedged: state save running for 900s, past its limit of 800s.\n",
    )


async def test_an_api_outage_never_fails_the_probe(served):
    """401s, 5xx, stalls past request_timeout, a reset and a 429: every poll fails or waits,
    callingbox_up is 0, the back-off grows, and /-/healthy answers 200 at every look."""
    sim = Simulator(seed=5, rate=20, max_calls=40, time_scale=300, api_key=KEY)
    with serve_in_thread(sim) as url:
        # One failed poll each (aiohttp retries a reset once by itself), then a 429 waited out.
        for kind, count, params in (
            ("unauthorized", 1, {}),
            ("status", 1, {"code": 503}),
            ("timeout", 1, {"delay": 2.0}),
            ("reset", 2, {}),
            ("429", 1, {"retry_after": 1}),
        ):
            sim.inject(kind, count, **params)
        app = await served([target(url)])
        looks, downs = 0, 0
        while sim.stats["list_requests"] < 6:  # the six requests the faults answer (two resets)
            assert await app.get("/-/healthy") == (200, "Healthy.\n")
            looks += 1
            downs += app.poller().status.up is False and app.poller().status.failures > 0
            assert looks < 600, "the faults are served within 30 s"
            await asyncio.sleep(0.05)
        await wait_for(lambda: _up(app), 20, "a successful poll after the outage")
        assert await app.get("/-/healthy") == (200, "Healthy.\n")
        assert downs > 0, "the target was seen down while the probe said healthy"


async def _up(app: Served, name: str = "default") -> bool:
    assert await app.get("/-/healthy") == (200, "Healthy.\n")
    return app.poller(name).status.up


async def test_a_large_first_read_arriving_slowly_but_steadily_never_fails_the_probe(
    served, monkeypatch, aiohttp_server
):
    """Three seconds of body, past a floor-sized deadline's limit (2 x 0.7 + 0.5 s): the first
    read's deadline is sized from the bytes a settle window is expected to hold, so the read
    completes and the probe says healthy throughout."""
    monkeypatch.setattr(deadline, "FLOOR", 0.2)
    now = time.time()
    calls = [
        {
            "id": f"call-{n}",
            "status": "completed",
            "direction": "outbound",
            "created_at": format_ts(now - 60),
            "updated_at": format_ts(now - 30),
            "ended_at": format_ts(now - 30),
            "pad": "x" * 900,
        }
        for n in range(300)
    ]
    body = json.dumps(calls).encode()
    pieces = [body[i : i + len(body) // 30 + 1] for i in range(0, len(body), len(body) // 30 + 1)]

    async def slowly(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for piece in pieces:  # one every 0.1 s
            await response.write(piece)
            await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    api_app = web.Application()
    api_app.router.add_get("/v1/calls", slowly)
    url = str((await aiohttp_server(api_app)).make_url("")).rstrip("/")
    app = await served([target(url, poll_interval=60)])
    started = time.monotonic()
    while not app.poller().status.ready:
        assert await app.get("/-/healthy") == (200, "Healthy.\n")
        assert time.monotonic() - started < 20, "the first read ends"
        await asyncio.sleep(0.05)
    assert time.monotonic() - started > 2 * (0.5 + 0.2) + SMALL_MARGIN, "slower than a floor-sized limit"
    assert app.poller().status.up, app.poller().status.last_error
    assert await app.get("/-/healthy") == (200, "Healthy.\n")
