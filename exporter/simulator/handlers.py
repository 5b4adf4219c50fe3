"""The simulated API's HTTP side: auth and request log middleware, GET/POST /v1/calls, GET
/v1/calls/{id}, the list streamed in chunks with any injected damage. A mixin of `Simulator`
(app.py), split off to keep each module short; it reads the call store under the simulator's lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from .call import _Call
from .contract import Contract
from .faults import _dumps, _error, _malformed, fault_answer, trickle


class Handlers:
    """The HTTP handlers of `Simulator`, mixed into it. Besides the state below they call
    `Player._create` (a POSTed call), `Lifecycles._history_record` (history in the list) and
    `Simulator._now` (the simulated clock, which reads answer at)."""

    seed: int
    history: int
    api_key: str | None
    chunk_size: int
    by_id_delay: float
    conditional: bool
    contract: Contract
    _by_id_rng: random.Random
    requests: deque[tuple[float, str, int]]
    stats: dict[str, int]
    _lock: threading.Lock
    _calls: dict[str, _Call]
    _faults: deque[tuple[str, dict]]
    _now: Any

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        arrived = time.time()
        response = await self._answer(request, handler)
        with self._lock:
            self.requests.append((arrived, request.path, response.status))  # what an API budget test reads
        return response

    async def _answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.api_key is not None:
            expected = f"Bearer {self.api_key}".encode()
            if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
                return _error(401, "invalid api key")
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405: answer in the API's format
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason.lower())

    async def _get_call(self, request: web.Request) -> web.Response:
        call_id = request.match_info["call_id"]
        with self._lock:
            self.stats["by_id_requests"] += 1
            self.stats["by_id_in_flight"] += 1
            self.stats["by_id_max_in_flight"] = max(self.stats["by_id_max_in_flight"], self.stats["by_id_in_flight"])
        try:
            if self.by_id_delay:
                await asyncio.sleep(self.by_id_delay)
            with self._lock:
                call = self._calls.get(call_id)
                record = call.visible(self._now()) if call else None
                lagging = self._by_id_lag(call_id, listed=record is not None)
        finally:
            with self._lock:
                self.stats["by_id_in_flight"] -= 1
        if lagging is not None:
            return lagging
        if record is None:
            return _error(404, f"call {call_id} not found")
        return web.json_response(record)

    def _by_id_lag(self, call_id: str, listed: bool) -> web.Response | None:
        """What a lagging by-id replica answers instead of the call (SPEC §1), if it lags this time:
        429 or 503 for any call, a 404 for one the list still shows. Under the lock."""
        rng, contract = self._by_id_rng, self.contract
        if contract.by_id_faults and rng.random() < contract.by_id_faults:
            self.stats["by_id_lagged"] += 1
            if rng.random() < 0.5:
                return _error(429, "rate limit exceeded", {"Retry-After": "1"})
            return _error(503, "upstream unavailable")
        if listed and contract.by_id_not_found and rng.random() < contract.by_id_not_found:
            self.stats["by_id_lagged"] += 1
            return _error(404, f"call {call_id} not found")
        return None

    async def _create_call_http(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body must be a JSON object")
        if not isinstance(body, dict) or not isinstance(body.get("to_number"), str) or not body["to_number"]:
            return _error(400, "to_number is required")
        # No webhook and no extraction unless asked for, as with the real API.
        overrides = {"direction": "outbound", "webhook_url": body.get("webhook_url"), "returns": body.get("returns")}
        for key in ("to_number", "from_number", "prompt", "language", "context", "metadata"):
            if key in body:
                overrides[key] = body[key]
        with self._lock:
            call = self._create(self._now(), overrides)
        return web.json_response(call.latest, status=201)

    async def _list_calls(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.stats["list_requests"] += 1
            kind, params = self._faults.popleft() if self._faults else (None, {})
        answer = await fault_answer(request, kind, params)
        if answer is not None:
            return answer
        with self._lock:
            now = self._now()  # a frozen clock answers as at the instant it stopped
            live = [r for r in (c.visible(now) for c in reversed(self._calls.values())) if r is not None]
        headers = {}
        if self.conditional and kind is None:
            # The list's version: it changes whenever a visible record does (or one appears or goes).
            tag = hashlib.sha256(repr([(r["id"], r["updated_at"]) for r in live]).encode()).hexdigest()[:16]
            headers["ETag"] = f'"{tag}-{self.history}"'
            if request.headers.get("If-None-Match") == headers["ETag"]:
                return web.Response(status=304, headers=headers)
        items = self._items(live, kind, params)
        if kind == "trickle":  # the list's first chunk, a byte at a time
            start = next(_chunks(items, self.chunk_size, True), b"[]")
            return await trickle(request, start, float(params.get("every", 3.0)), float(params.get("duration", 60.0)))
        if kind == "truncate":
            items = itertools.islice(items, (len(live) + self.history) // 2)
        return await self._stream(request, items, complete=kind != "truncate", headers=headers)

    def _items(self, live: list[dict], kind: str | None, params: dict) -> Iterator[bytes]:
        """Each array element as JSON, with any injected malformed or duplicate records."""
        records = itertools.chain(live, map(self._history_record, range(self.history)))
        n = int(params.get("n", 5 if kind == "malformed" else 10)) if kind in ("malformed", "duplicates") else 0
        span = len(live) or self.history  # damage the live calls, or the history if there are none
        picks = [j * span // n for j in range(n)]
        bad: dict[int, list[bytes]] = {}  # record index → malformed elements to put before it
        if kind == "malformed":
            rng = random.Random(f"{self.seed}:malformed:{self.stats['list_requests']}")
            template = live[0] if live else self._history_record(0) if self.history else None
            for j, i in enumerate(picks):
                bad.setdefault(i, []).append(_malformed(j, template, rng))
        doubled = set(picks) if kind == "duplicates" else set()
        for i, record in enumerate(records):
            yield from bad.pop(i, ())
            item = _dumps(record)
            yield item
            if i in doubled:
                yield item
        for rest in bad.values():  # more picks than records
            yield from rest

    async def _stream(
        self, request: web.Request, items: Iterator[bytes], complete: bool, headers: dict | None = None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", **(headers or {})})
        sent = 0
        try:
            await response.prepare(request)
            for chunk in _chunks(items, self.chunk_size, complete):
                await response.write(chunk)
                sent += len(chunk)
                await asyncio.sleep(0)  # in --demo the exporter shares this loop: let it run
            if complete:
                await response.write_eof()
            elif request.transport is not None:
                # Flush what was written, then close without the final chunk: a truncated body.
                request.transport.close()
        except ConnectionError:
            self.stats["client_closed_early"] += 1  # e.g. the exporter stopped at its settle window
        finally:
            self.stats["bytes_sent"] += sent
            self.stats["last_list_bytes"] = sent
        return response  # aiohttp notices a dead connection and drops the rest quietly


def _chunks(items: Iterator[bytes], size: int, complete: bool) -> Iterator[bytes]:
    """Join array elements into a JSON array, cut into pieces of about `size` bytes."""
    buffer, length = [b"["], 1
    for n, item in enumerate(items):
        if n:
            buffer.append(b",")
        buffer.append(item)
        length += len(item) + 1
        if length >= size:
            yield b"".join(buffer)
            buffer, length = [], 0
    if complete:
        buffer.append(b"]")
    if buffer:
        yield b"".join(buffer)
