"""Client.list_calls: the body goes through the decoder, and a body it refuses is a BodyError.

A 200 whose body is cut short, not JSON or not one array fails the read with a BodyError coded
"200" and the decoder's own message: what the poller counts and logs. The decoder itself is
tested in test_jsonstream.py.
"""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from exporter.api import BodyError, Client
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
