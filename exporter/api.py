"""The CallingBox API client: auth, timeouts, fault classification, streaming decode.

`GET /v1/calls` returns the organization's whole history as one JSON array, newest first.
`list_calls` decodes it element by element as bytes arrive, so the caller can stop at the
settle window and close the response without ever holding the body. The key is added to
requests here and scrubbed from anything this module raises; nothing else sees it.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import AsyncIterator, Callable

import aiohttp

from .config import Secret

CHUNK_BYTES = 64 * 1024
MAX_PENDING_CHARS = 4 * 1024 * 1024  # one array element larger than this is treated as corrupt

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_decoder = json.JSONDecoder()


class ApiError(Exception):
    """A failed request; `code` is the HTTP status as text, or `error` when none came back."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


class Unauthorized(ApiError):
    pass


class RateLimited(ApiError):
    def __init__(self, message: str, retry_after: float | None):
        super().__init__(message, "429")
        self.retry_after = retry_after


class BodyError(ApiError):
    """A 200 whose body was not a complete JSON array (truncated, HTML, garbage)."""

    def __init__(self, message: str):
        super().__init__(message, "200")


class ArrayStream:
    """Incremental decoder of one top-level JSON array: feed bytes, get the finished elements.

    Each element is decoded by the C scanner of the standard library (`raw_decode`) straight
    from the text buffer; an element cut by a chunk boundary is retried when more bytes come.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text = ""
        self._state = "start"  # start → first → comma ⇄ item → done

    def feed(self, chunk: bytes, final: bool = False) -> list[object]:
        try:
            text = self._text + self._utf8.decode(chunk, final)
        except UnicodeDecodeError:
            raise BodyError("response body is not UTF-8") from None
        items: list[object] = []
        pos, end = 0, len(text)
        while True:
            pos = _WHITESPACE.match(text, pos).end()
            if pos == end:
                break
            char = text[pos]
            if self._state == "start":
                if char != "[":
                    raise BodyError("response body is not a JSON array")
                self._state, pos = "first", pos + 1
            elif self._state == "comma" or (self._state == "first" and char == "]"):
                if char == "]":
                    self._state = "done"
                elif char == ",":
                    self._state = "item"
                else:
                    raise BodyError(f"unexpected {char!r} between array elements")
                pos += 1
            elif self._state in ("first", "item"):
                try:
                    value, stop = _decoder.raw_decode(text, pos)
                except json.JSONDecodeError:
                    break  # incomplete (or corrupt: `finish` or the size guard will tell)
                if not isinstance(value, (dict, list, str)) and (stop == end or text[stop] not in ",] \t\n\r"):
                    break  # a number cut by the chunk boundary (`2` of `2.5`): wait for the rest
                items.append(value)
                self._state, pos = "comma", stop
            else:
                raise BodyError("data after the end of the JSON array")
        self._text = text[pos:]
        if len(self._text) > MAX_PENDING_CHARS:
            raise BodyError("response body holds an unreadable or oversized element")
        return items

    def finish(self) -> None:
        """The body ended: it must have closed the array."""
        self.feed(b"", final=True)
        if self._state != "done" or self._text.strip():
            raise BodyError("response body ended before the JSON array was complete")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Client:
    """One organization's view of the API over a shared aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: Secret | None,
        timeout: float,
        on_response: Callable[[str], None] = lambda code: None,
    ):
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._key = api_key
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._on_response = on_response
        self.bytes_read = 0

    @property
    def key(self) -> Secret | None:
        return self._key

    def use_key(self, api_key: Secret) -> None:
        """Authenticate the next requests with a rotated key."""
        self._key = api_key

    def _scrub(self, text: str) -> str:
        if self._key is not None and self._key.reveal():
            text = text.replace(self._key.reveal(), "***")
        return text[:300]

    async def _get(self, path: str) -> aiohttp.ClientResponse:
        headers = {"Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        try:
            response = await self._session.get(self._base_url + path, headers=headers, timeout=self._timeout)
        except (aiohttp.ClientError, TimeoutError) as error:
            self._on_response("error")
            raise ApiError(self._scrub(f"request failed: {type(error).__name__}: {error}")) from None
        self._on_response(str(response.status))
        if response.status == 200:
            return response
        try:
            detail = self._scrub((await response.text(errors="replace"))[:300])
        except (aiohttp.ClientError, TimeoutError):
            detail = ""
        finally:
            response.release()
        message = f"HTTP {response.status}: {detail}".strip()
        if response.status == 401:
            raise Unauthorized(message, "401")
        if response.status == 429:
            raise RateLimited(message, _retry_after(response.headers.get("Retry-After")))
        raise ApiError(message, str(response.status))

    @asynccontextmanager
    async def list_calls(self) -> AsyncIterator[AsyncIterator[list[object]]]:
        """`async with client.list_calls() as batches: async for batch in batches: ...`

        Leaving the block early closes the connection, so the server stops sending history.
        """
        response = await self._get("/v1/calls")
        complete = False

        async def batches() -> AsyncIterator[list[object]]:
            nonlocal complete
            stream = ArrayStream()
            try:
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    self.bytes_read += len(chunk)
                    items = stream.feed(chunk)
                    if items:
                        yield items
                stream.finish()
            except (aiohttp.ClientError, TimeoutError) as error:
                raise BodyError(self._scrub(f"reading the response failed: {type(error).__name__}: {error}")) from None
            complete = True

        try:
            yield batches()
        finally:
            if complete:
                response.release()
            else:
                response.close()
