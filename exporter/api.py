"""The CallingBox API client: auth, timeouts, fault classification, streaming reads.

`GET /v1/calls` returns the organization's whole history as one JSON array, newest first.
`list_calls` feeds it to `jsonstream.ArrayStream` as bytes arrive and yields the decoded
batches, so the caller can stop at the settle window and close the response without ever
holding the body; a body the decoder refuses becomes a BodyError. The key is added to
requests here and scrubbed from anything this module raises; nothing else sees it.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import AsyncIterator, Callable
from urllib.parse import quote

import aiohttp

from .budget import Budget
from .config import Secret
from .jsonstream import MAX_PENDING_CHARS, ArrayStream, StreamError

CHUNK_BYTES = 64 * 1024


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
        on_bytes: Callable[[str, int], None] = lambda endpoint, size: None,
    ):
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._key = api_key
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._on_response = on_response
        self.budget = budget
        self._on_bytes = on_bytes  # body bytes read, by endpoint ("list", "call"): the API's cost
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
                    self._on_bytes("list", len(chunk))
                    items = stream.feed(chunk)
                    if items:
                        yield items
                items = stream.finish()
                if items:
                    yield items
            except StreamError as error:
                raise BodyError(str(error)) from None
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
            self._on_bytes("call", len(body))
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
