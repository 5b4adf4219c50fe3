"""Client.list_calls: the body goes through the decoder, and a body it refuses is a BodyError.

A 200 whose body is cut short, not JSON or not one array fails the read with a BodyError coded
"200" and the decoder's own message: what the poller counts and logs. The decoder itself is
tested in test_jsonstream.py. Every request has a deadline for its whole answer, sized from what
it is expected to carry: a trickle fails at it (coded `error`), a big body arriving steadily does not.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager

import aiohttp
import pytest
from aiohttp import web

from exporter import api, deadline
from exporter.api import ApiError, BodyError, Client, DeadlineExceeded
from exporter.budget import Budget
from exporter.records import CallFields

MODES = pytest.mark.parametrize("item_type", [None, CallFields], ids=["plain", "fast"])


@pytest.fixture
async def serve(aiohttp_server):
    """`await serve(body)`: the base URL of an API whose `GET /v1/calls` answers 200 with `body`."""

    async def start(body: bytes) -> str:
        async def list_calls(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/v1/calls", list_calls)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")

    return start


async def read_all(url: str, item_type: type | None) -> list:
    async with aiohttp.ClientSession() as session:
        client = Client(session, url, None, 5.0)
        items: list = []
        async with client.list_calls(item_type) as batches:
            async for batch in batches:
                items.extend(batch)
        return items


@MODES
async def test_a_complete_array_yields_its_elements(serve, item_type):
    items = await read_all(await serve(b'[{"id": "a"}, {"id": "b"}]'), item_type)
    assert [item["id"] if isinstance(item, dict) else item.id for item in items] == ["a", "b"]


class Recorded:
    """A recorder (api.Recorder) that keeps what the client reports."""

    def __init__(self):
        self.codes: list[str] = []
        self.bytes: dict[str, int] = {}

    def response(self, code: str) -> None:
        self.codes.append(code)

    def body_bytes(self, endpoint: str, size: int) -> None:
        self.bytes[endpoint] = self.bytes.get(endpoint, 0) + size


async def test_a_list_read_says_how_many_bytes_it_read_and_reports_them_once(serve):
    body = json.dumps([{"id": f"c{i}", "status": "queued"} for i in range(5000)]).encode()
    recorded = Recorded()
    async with aiohttp.ClientSession() as session:
        client = Client(session, await serve(body), None, 5.0, recorded)
        async with client.list_calls() as listed:
            items = [item async for batch in listed for item in batch]
    assert len(items) == 5000 and listed.bytes == len(body) and not listed.not_modified
    assert recorded.codes == ["200"] and recorded.bytes == {"list": len(body)}


@MODES
@pytest.mark.parametrize(
    "body, message",
    [
        (b'[{"id": "a"}, {"id": "b"', "response body ended before the JSON array was complete"),
        (b"<html><body>502 Bad Gateway</body></html>", "response body is not a JSON array"),
        (b'[{"id": "a"} {"id": "b"}]', "unexpected '{' between array elements"),
        (b'["\xff"]', "response body is not UTF-8"),
    ],
    ids=["truncated", "html", "no_comma", "not_utf8"],
)
async def test_a_body_the_decoder_refuses_is_a_body_error_coded_200(serve, item_type, body, message):
    with pytest.raises(BodyError) as error:
        await read_all(await serve(body), item_type)
    assert (str(error.value), error.value.code) == (message, "200")


# --- deadlines: the whole answer, connect to last byte (SPEC §4, Faults) ---------------------------


@pytest.fixture
async def dribble(aiohttp_server):
    """`await dribble(pieces, gap)`: the base URL of an API whose list and call-by-id answers are
    200s sent as `pieces`, one every `gap` seconds: never silent for long, maybe never done."""

    async def start(pieces: list[bytes], gap: float) -> str:
        async def answer(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            for n, piece in enumerate(pieces):
                if n:
                    await asyncio.sleep(gap)
                await response.write(piece)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/v1/calls", answer)
        app.router.add_get("/v1/calls/{call_id}", answer)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/")

    return start


def small_deadlines(monkeypatch, floor: float = 0.6, throughput: int = 64 * 1024) -> None:
    """Deadlines a test can wait out: a body's floor under a second."""
    monkeypatch.setattr(deadline, "FLOOR", floor)
    monkeypatch.setattr(deadline, "MIN_THROUGHPUT", throughput)


async def read_list(client: Client, expected_bytes: float = 0.0) -> list:
    items: list = []
    async with client.list_calls(None, expected_bytes) as batches:
        async for batch in batches:
            items.extend(batch)
    return items


async def test_a_list_body_that_trickles_fails_at_its_deadline_coded_error(dribble, monkeypatch):
    """A byte every 0.2 s never trips the 0.5 s between-bytes timeout; the deadline ends it."""
    small_deadlines(monkeypatch)
    url = await dribble([b"["] + [b" "] * 100, gap=0.2)  # 20 s of whitespace, then no end
    async with aiohttp.ClientSession() as session:
        client = Client(session, url, None, 0.5)
        seconds = client.list_deadline(0)
        assert seconds == 0.5 + 0.6
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as error:
            await read_list(client)
        elapsed = time.monotonic() - started
    assert seconds <= elapsed < seconds + 1.0
    assert error.value.code == "error" and "deadline of 1.1s" in str(error.value)


async def test_a_large_body_arriving_steadily_is_read_whole_within_the_deadline_its_size_gives(dribble, monkeypatch):
    """160 kB at 160 kB/s takes a second, past request_timeout + the floor, but not past a deadline
    sized from the bytes expected: a slow big read is not a stalled one."""
    small_deadlines(monkeypatch, floor=0.2)
    element = b'{"id": "%05d", "pad": "' + b"x" * 980 + b'"}'
    elements = [element % n for n in range(160)]
    body = b"[" + b",".join(elements) + b"]"
    pieces = [body[i : i + 16_000] for i in range(0, len(body), 16_000)]  # one every 0.1 s
    async with aiohttp.ClientSession() as session:
        client = Client(session, await dribble(pieces, gap=0.1), None, 0.5)
        with pytest.raises(DeadlineExceeded):  # sized for a small list: 0.7 s
            await read_list(client, expected_bytes=0)
        assert client.list_deadline(0) == 2 * 0.7, "the next read after a missed deadline gets twice as long"
        client.read_succeeded()
        assert client.list_deadline(0) == 0.7, "and a read in full sizes the next afresh"
        assert client.list_deadline(len(body)) == 0.5 + 2 * len(body) / (64 * 1024)
        items = await read_list(client, expected_bytes=len(body))
    assert [item["id"] for item in items] == [f"{n:05d}" for n in range(160)]


async def test_a_call_by_id_that_trickles_fails_at_request_timeout(dribble):
    async with aiohttp.ClientSession() as session:
        client = Client(
            session, await dribble([b'{"id": "a", "status": "completed"'] + [b" "] * 50, gap=0.2), None, 0.5
        )
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as error:
            await client.get_call("a")
        elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.5 and error.value.code == "error"


async def test_each_request_is_a_heartbeat_step_bounded_by_its_deadline_and_the_budget_wait_is_not(serve):
    """What liveness.py relies on: a request's step ends by its deadline; a wait for the API
    budget (a Retry-After may hold a key for an hour) has no bound."""
    steps: list[tuple[str, float | None]] = []

    @contextmanager
    def step(what: str, seconds: float | None):
        steps.append((what, seconds))
        yield

    async with aiohttp.ClientSession() as session:
        client = Client(session, await serve(b'[{"id": "a"}]'), None, 5.0, budget=Budget(600), step=step)
        await read_list(client, expected_bytes=1_000_000)
        with pytest.raises(ApiError):
            await client.get_call("a")  # this API has no call by id: 404
    assert steps == [
        ("waiting for the API budget", None),
        ("list read", client.list_deadline(1_000_000)),
        ("waiting for the API budget", None),
        ("call by id", 5.0),
    ]


@MODES
async def test_a_list_body_is_handed_over_a_few_elements_at_a_time_all_in_order(serve, item_type):
    body = json.dumps([{"id": f"c{i}", "status": "queued"} for i in range(1000)]).encode()
    async with aiohttp.ClientSession() as session:
        client = Client(session, await serve(body), None, 5.0)
        async with client.list_calls(item_type) as listed:
            batches = [batch async for batch in listed]
    ids = [item["id"] if isinstance(item, dict) else item.id for batch in batches for item in batch]
    assert ids == [f"c{i}" for i in range(1000)]
    assert max(map(len, batches)) <= api.PIECE and len(batches) >= 1000 // api.PIECE
