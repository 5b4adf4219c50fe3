"""Faults on demand: the kinds `Simulator.inject` accepts and the answers they give instead of,
or inside, the call list (errors, 429, stalls, trickles, resets, non-JSON, malformed elements). Used by
`handlers.py`; the truth never counts what a fault adds, as nothing here is a call.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
import uuid
from typing import Any

from aiohttp import web

FAULT_KINDS = frozenset(
    {"status", "429", "timeout", "reset", "truncate", "non_json", "unauthorized", "malformed", "duplicates", "trickle"}
)


async def fault_answer(request: web.Request, kind: str | None, params: dict) -> web.StreamResponse | None:
    """What a list request gets instead of the list under fault `kind`; None: the list (maybe damaged)."""
    if kind == "status":
        return _error(int(params.get("code", 503)), "upstream unavailable")
    if kind == "429":  # retry_after: seconds, an HTTP date as a string, or None for no header
        retry_after = params.get("retry_after", 1)
        headers = (
            {}
            if retry_after is None
            else {"Retry-After": retry_after if isinstance(retry_after, str) else f"{retry_after:g}"}
        )
        return _error(429, "rate limit exceeded", headers)
    if kind == "unauthorized":
        return _error(401, "invalid api key")
    if kind == "non_json":
        return web.Response(text="<html>upstream error</html>", content_type="text/html")
    if kind == "reset":
        return _drop_connection(request)
    if kind == "timeout":
        await _stall(request, params.get("delay", 5.0))
    return None


async def trickle(request: web.Request, body: bytes, every: float = 3.0, duration: float = 60.0) -> web.StreamResponse:
    """A 200 whose `body` (the list's start) comes a byte every `every` seconds, each gap shorter
    than a client's between-bytes timeout, so only a deadline for the whole answer ends it. After
    `duration` seconds the connection is dropped without the rest (a truncated body), so a test
    ends; a client that gives up first ends it sooner."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    ends = time.monotonic() + duration
    try:
        for byte in body:
            await response.write(bytes([byte]))
            if time.monotonic() + every > ends:
                break
            await _stall(request, every)  # returns early once the client has closed the connection
            if request.transport is None or request.transport.is_closing():
                break
    except ConnectionError:
        pass
    if request.transport is not None:
        request.transport.close()
    return response


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _malformed(j: int, template: dict | None, rng: random.Random) -> bytes:
    """One broken array element; never a call, so never in the truth."""
    kind = j % 7
    if kind == 0:
        return b'"call record unavailable"'
    if kind == 1 or template is None:
        return b"42"
    record = dict(template, id=str(uuid.UUID(int=rng.getrandbits(128), version=4)))
    if kind == 2:
        del record["id"]
    elif kind == 3:
        record["status"] = 3
    elif kind == 4:
        record["status"] = ""  # a status outside the docs is a status (SPEC §4); an empty one is not
    elif kind == 5:
        record["created_at"] = "yesterday at noon"
    else:
        record["duration_seconds"] = "95"
    return _dumps(record)


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def _stall(request: web.Request, delay: float) -> None:
    """Hold the answer for `delay` seconds, or until the client gives up waiting."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(min(0.05, delay))


def _drop_connection(request: web.Request) -> web.Response:
    """Answer nothing: reset the TCP connection, as a crashing load balancer would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes the close a TCP RST, so the client reads "connection reset".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response()  # never sent: aiohttp finds the connection gone and drops it quietly
