"""The CallingBox API client: auth, timeouts, fault classification, streaming decode.

`GET /v1/calls` returns the organization's whole history as one JSON array, newest first.
`list_calls` decodes it in batches as bytes arrive, so the caller can stop at the settle
window and close the response without ever holding the body. The key is added to requests
here and scrubbed from anything this module raises; nothing else sees it.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import AsyncIterator, Callable
from urllib.parse import quote

import aiohttp
import msgspec

from .budget import Budget
from .config import Secret

CHUNK_BYTES = 64 * 1024
MAX_PENDING_CHARS = 4 * 1024 * 1024  # one array element larger than this is treated as corrupt

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_decoder = json.JSONDecoder()
CUT_ATTEMPTS = 4  # cuts tried, last first, before one element is read the plain way


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


class NotFound(ApiError):
    """404 with the API's own `{"error": ...}` body: the call does not exist (any more)."""


class BodyError(ApiError):
    """A 200 whose body was not a complete JSON array (truncated, HTML, garbage)."""

    def __init__(self, message: str):
        super().__init__(message, "200")


class ArrayStream:
    """Incremental decoder of one top-level JSON array: feed bytes, get the finished elements.

    The fast way hands msgspec every complete element received so far in one call, typed as
    `item_type`, so only the wanted fields are built. Where the elements end is found by
    looking for `},{"id":` (or any `},{`) from the end of the buffer; such a cut may fall in a
    nested array, but then the batch is not valid JSON and msgspec refuses it, so a batch it
    accepts is exactly the elements sent. When no cut works (a malformed or non-object
    element, an odd layout), one element is read the plain way and the fast way resumes.
    """

    def __init__(self, item_type: type | None = None) -> None:
        self._fast = msgspec.json.Decoder(list[item_type]) if item_type is not None else None
        self._plain: PlainArrayStream | None = None if item_type is not None else PlainArrayStream()
        self._bytes = b""
        self._opened = False  # the `[` was read
        self._elements = 0

    def feed(self, chunk: bytes, final: bool = False) -> list[object]:
        if self._plain is not None:
            return self._plain.feed(chunk, final)
        buf = self._bytes + chunk
        if not self._opened:
            start = _WHITESPACE_BYTES.match(buf).end()
            if start == len(buf) and not final:
                return []
            if buf[start:start + 1] != b"[":
                raise BodyError("response body is not a JSON array")
            buf, self._opened = buf[start + 1:], True
        items: list[object] = []
        while True:
            batch, buf = self._batch(buf)
            if batch is None:
                one, buf = self._one(buf)
                if one is _INCOMPLETE:
                    break
                if one is _END:
                    self._bytes = b""
                    return items + self._hand_over(buf, final)
                batch = [one]
            items.extend(batch)
            self._elements += len(batch)
        self._bytes = buf
        if final or len(buf) > MAX_PENDING_CHARS:
            self._bytes = b""
            return items + self._hand_over(buf, final)
        return items

    def _batch(self, buf: bytes) -> tuple[list[object] | None, bytes]:
        """The complete elements at the start of `buf`, decoded in one call, and what is left."""
        for pattern, attempts in ((_ELEMENT_CUT, CUT_ATTEMPTS), (_ANY_CUT, 2)):
            end = len(buf)
            for _ in range(attempts):
                cut = _last_cut(pattern, buf, end)
                if cut < 0:
                    break
                try:
                    return self._fast.decode(b"[" + buf[: cut + 1] + b"]"), buf[buf.index(b"{", cut):]
                except msgspec.DecodeError:
                    end = cut  # inside a nested array, or a bad element before it: try an earlier cut
        return None, buf

    def _one(self, buf: bytes) -> tuple[object, bytes]:
        """One element the plain way, and what follows its comma; or _INCOMPLETE, or _END at `]`."""
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(buf, False)
        except UnicodeDecodeError:
            raise BodyError("response body is not UTF-8") from None
        pos = _WHITESPACE.match(text).end()
        if text[pos:pos + 1] == "]":
            return _END, buf
        try:
            value, stop = _decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return _INCOMPLETE, buf
        after = _WHITESPACE.match(text, stop).end()
        if after == len(text) or (not isinstance(value, (dict, list, str)) and text[stop] not in ",] \t\n\r"):
            return _INCOMPLETE, buf  # the separator, or the rest of a number (`2` of `2.5`), has not come yet
        if text[after] == "]":
            return value, buf[len(text[:after].encode()):]
        if text[after] != ",":
            raise BodyError(f"unexpected {text[after]!r} between array elements")
        return value, buf[len(text[: after + 1].encode()):]

    def _hand_over(self, buf: bytes, final: bool) -> list[object]:
        """The rest of the response goes the plain way (its end, or an oversized element)."""
        state = "item" if self._elements and not buf.lstrip().startswith(b"]") else "comma" if self._elements else "first"
        self._plain = PlainArrayStream(state)
        return self._plain.feed(buf, final)

    def finish(self) -> list[object]:
        """The body ended: it must have closed the array. Returns the elements still held back."""
        items: list[object] = []
        if self._plain is None:
            if not self._opened:
                raise BodyError("response body ended before the JSON array was complete")
            buf, self._bytes = self._bytes, b""
            items = self._hand_over(buf, False)
        return items + self._plain.finish()


_INCOMPLETE, _END = object(), object()
_WHITESPACE_BYTES = re.compile(rb"[ \t\n\r]*")
# A cut between two calls: the API writes `id` first. Inside a string `{"` cannot occur unescaped.
_ELEMENT_CUT = re.compile(rb'\}[ \t\n\r]*,[ \t\n\r]*\{[ \t\n\r]*"id"[ \t\n\r]*:')
_ANY_CUT = re.compile(rb"\}[ \t\n\r]*,[ \t\n\r]*\{")


def _last_cut(pattern: re.Pattern, buf: bytes, end: int) -> int:
    """Index of the `}` of the last match of `pattern` starting before `end`, or -1."""
    i = buf.rfind(b"}", 0, end)
    while i >= 0:
        if pattern.match(buf, i):
            return i
        i = buf.rfind(b"}", 0, i)
    return -1


class PlainArrayStream:
    """The plain way: each element decoded by the standard library's C scanner (`raw_decode`)
    straight from the text; an element cut by a chunk boundary is retried when more bytes come.
    """

    def __init__(self, state: str = "start") -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._text = ""
        # start → first → comma ⇄ item → done; a hand-over from the fast path starts past the `[`
        self._state = state

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

    def finish(self) -> list[object]:
        """The body ended: it must have closed the array."""
        items = self.feed(b"", final=True)
        if self._state != "done" or self._text.strip():
            raise BodyError("response body ended before the JSON array was complete")
        return items


def _conditions(validators: dict[str, str]) -> dict[str, str]:
    """If-None-Match when the API gave an ETag, else If-Modified-Since for a Last-Modified."""
    if "ETag" in validators:
        return {"If-None-Match": validators["ETag"]}
    if "Last-Modified" in validators:
        return {"If-Modified-Since": validators["Last-Modified"]}
    return {}


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
        budget: Budget | None = None,
    ):
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._key = api_key
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._on_response = on_response
        self.budget = budget
        self.bytes_read = 0
        # Conditional list reads: the validators of the last list read in full, and those of the
        # current one (confirmed by the poller once its read succeeded).
        self._validators: dict[str, str] = {}
        self._received: dict[str, str] = {}
        self.not_modified = False

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

    async def _get(self, path: str, conditions: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        headers = {"Accept": "application/json", **(conditions or {})}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        if self.budget is not None:
            await self.budget.acquire()
        try:
            response = await self._session.get(self._base_url + path, headers=headers, timeout=self._timeout)
        except (aiohttp.ClientError, TimeoutError) as error:
            self._on_response("error")
            raise ApiError(self._scrub(f"request failed: {type(error).__name__}: {error}")) from None
        self._on_response(str(response.status))
        if response.status == 200 or (response.status == 304 and conditions):
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
            retry_after = _retry_after(response.headers.get("Retry-After"))
            if self.budget is not None and retry_after:
                self.budget.hold(retry_after)  # every target on this key waits, not only this one
            raise RateLimited(message, retry_after)
        raise ApiError(message, str(response.status))

    @asynccontextmanager
    async def list_calls(self, item_type: type | None = None) -> AsyncIterator[AsyncIterator[list[object]]]:
        """`async with client.list_calls(CallFields) as batches: async for batch in batches: ...`

        Elements come as `item_type` structs where the fast path could decode them, else as plain
        JSON values. Leaving the block early closes the connection, so the server stops sending.
        """
        response = await self._get("/v1/calls", _conditions(self._validators))
        complete = False
        self.not_modified = response.status == 304  # the list is as it was at the last full read
        self._received = {k: response.headers[k] for k in ("ETag", "Last-Modified") if k in response.headers}
        if self.not_modified:
            response.release()

            async def nothing() -> AsyncIterator[list[object]]:
                return
                yield

            yield nothing()
            return

        async def batches() -> AsyncIterator[list[object]]:
            nonlocal complete
            stream = ArrayStream(item_type)
            try:
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    self.bytes_read += len(chunk)
                    items = stream.feed(chunk)
                    if items:
                        yield items
                items = stream.finish()
                if items:
                    yield items
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

    def read_succeeded(self) -> None:
        """The last list read was accounted in full: its validators may spare the next one."""
        if not self.not_modified:
            self._validators = self._received

    async def get_call(self, call_id: str) -> dict:
        """`GET /v1/calls/{id}`: the call object as decoded JSON.

        Raises NotFound only for a 404 whose body is the API's JSON error: a 404 page from a
        proxy or a wrong base URL says nothing about the call, so it stays an ApiError.
        """
        try:
            response = await self._get("/v1/calls/" + quote(call_id, safe=""))
        except ApiError as error:
            if error.code == "404" and _is_api_error(str(error).partition(": ")[2]):
                raise NotFound(str(error), "404") from None
            raise
        try:
            body = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                body += chunk
                if len(body) > MAX_PENDING_CHARS:
                    raise BodyError("response body holds an oversized call object")
            self.bytes_read += len(body)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise BodyError(self._scrub(f"reading the response failed: {type(error).__name__}: {error}")) from None
        finally:
            response.release()
        try:
            value = json.loads(body)
        except ValueError:  # also UnicodeDecodeError
            raise BodyError("response body is not JSON") from None
        if not isinstance(value, dict):
            raise BodyError("response body is not a JSON object")
        return value


def _is_api_error(body: str) -> bool:
    """Whether a body is the API's `{"error": "..."}`."""
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), str)
