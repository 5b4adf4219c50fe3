"""The CallingBox API client: auth, timeouts, fault classification, streaming reads.

`GET /v1/calls` returns the organization's whole history as one JSON array, newest first.
`list_calls` feeds it to `jsonstream.ArrayStream` as bytes arrive and yields a `ListBody` of
the decoded batches (PIECE elements at most: the caller's work between two is short), so the
caller can stop at the settle window and close the response without ever holding the body; a
body the decoder refuses becomes a BodyError. Requests and body bytes are reported to one
`Recorder` (selfmetrics.py). Every request has a deadline for its whole answer, connect to last
byte (deadline.py), so a body that trickles fails like a timeout; each request is a step of the
caller's heartbeat (liveness.py) that ends by that deadline.
The key is added to requests here and scrubbed from anything this module raises; nothing else sees it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from email.utils import parsedate_to_datetime
from typing import Protocol, TypeVar
from urllib.parse import quote

import aiohttp

from .budget import Budget
from .config import Secret
from .deadline import call_deadline, list_deadline
from .jsonstream import MAX_PENDING_CHARS, ArrayStream, StreamError

CHUNK_BYTES = 64 * 1024
PIECE = 16  # elements handed over at a time: the caller can give the event loop a turn between two
T = TypeVar("T")
# A step of the caller's heartbeat: `with step("list read", seconds): ...` (liveness.Heartbeat.step).
Step = Callable[[str, "float | None"], AbstractContextManager]


class Recorder(Protocol):
    """Where the client reports its own work (selfmetrics.SelfMetrics): nothing else leaves it."""

    def response(self, code: str) -> None: ...  # a request ended: its HTTP status, or `error`

    def body_bytes(self, endpoint: str, size: int) -> None: ...  # body bytes read ("list", "call")


class _NoRecorder:
    def response(self, code: str) -> None:
        pass

    def body_bytes(self, endpoint: str, size: int) -> None:
        pass


class ListBody:
    """The decoded batches of one `GET /v1/calls` response (`async for batch in body`), and what
    the read says of itself: the body bytes read so far, and whether it was a 304."""

    def __init__(self, not_modified: bool = False):
        self._batches: AsyncIterator[list[object]] | None = None  # set by Client.list_calls
        self.bytes = 0
        self.not_modified = not_modified  # a 304: the list is as it was at the last full read

    def __aiter__(self) -> AsyncIterator[list[object]]:
        return self._batches if self._batches is not None else _nothing()


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


class DeadlineExceeded(ApiError):
    """No whole answer within the request's deadline (connect to last byte): a stalled or trickling
    response, which a between-bytes timeout never ends. Coded `error`, like a timeout."""

    def __init__(self, seconds: float):
        super().__init__(f"no whole response within its deadline of {seconds:.1f}s (connect to last byte)")


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


async def _within(at: float, seconds: float, awaitable: Awaitable[T]) -> T:
    """`await awaitable`, cut off at event-loop time `at`, the deadline of a `seconds` request."""
    try:
        async with asyncio.timeout_at(at) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            raise DeadlineExceeded(seconds) from None
        raise  # aiohttp's own connect or between-bytes timeout


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
        metrics: Recorder | None = None,
        budget: Budget | None = None,
        step: Step = lambda what, seconds: nullcontext(),
    ):
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._key = api_key
        self.request_timeout = timeout
        # aiohttp's timeouts end a connect or a silence; the deadline (_within) ends the whole answer.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._step = step
        self._late = 0  # list reads in a row that missed their deadline: the next one gets longer
        self._metrics: Recorder = metrics if metrics is not None else _NoRecorder()
        self.budget = budget
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

    def list_deadline(self, expected_bytes: float) -> float:
        """Seconds the next list read may take, connect to last byte (deadline.list_deadline)."""
        return list_deadline(self.request_timeout, expected_bytes, self._late)

    async def _wait_for_budget(self) -> None:
        """Room in the key's request budget. A step without a limit: how long is the API's to say
        (a Retry-After holds every request on the key), so a wait here never counts as wedged."""
        if self.budget is not None:
            with self._step("waiting for the API budget", None):
                await self.budget.acquire()

    async def _get(
        self, path: str, at: float, seconds: float, conditions: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """The answer to `GET path`, its headers before event-loop time `at` (the deadline of a
        request of `seconds`); its body is the caller's to read before `at` too."""
        headers = {"Accept": "application/json", **(conditions or {})}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        try:
            response = await _within(
                at, seconds, self._session.get(self._base_url + path, headers=headers, timeout=self._timeout)
            )
        except DeadlineExceeded:
            self._metrics.response("error")
            raise
        except (aiohttp.ClientError, TimeoutError) as error:
            self._metrics.response("error")
            raise ApiError(self._scrub(f"request failed: {type(error).__name__}: {error}")) from None
        self._metrics.response(str(response.status))
        if response.status == 200 or (response.status == 304 and conditions):
            return response
        try:
            detail = self._scrub((await _within(at, seconds, response.text(errors="replace")))[:300])
        except (aiohttp.ClientError, TimeoutError, DeadlineExceeded):
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
    async def list_calls(self, item_type: type | None = None, expected_bytes: float = 0.0) -> AsyncIterator[ListBody]:
        """`async with client.list_calls(CallFields, size) as body: async for batch in body: ...`

        Elements come as `item_type` structs where the fast path could decode them, else as plain
        JSON values. Leaving the block early closes the connection, so the server stops sending.
        The read has a deadline sized from `expected_bytes` (list_deadline), the caller's work on
        the batches included; past it, DeadlineExceeded.
        """
        seconds = self.list_deadline(expected_bytes)
        await self._wait_for_budget()
        try:
            with self._step("list read", seconds):
                at = asyncio.get_running_loop().time() + seconds
                response = await self._get("/v1/calls", at, seconds, _conditions(self._validators))
                self.not_modified = response.status == 304  # the list is as it was at the last full read
                self._received = {k: response.headers[k] for k in ("ETag", "Last-Modified") if k in response.headers}
                if self.not_modified:
                    response.release()
                    yield ListBody(not_modified=True)
                    return
                complete: list[bool] = []
                body = ListBody()
                body._batches = self._batches(response, body, item_type, at, seconds, complete)
                try:
                    yield body
                finally:
                    if complete:
                        response.release()
                    else:
                        response.close()
        except DeadlineExceeded:
            self._late += 1
            raise

    async def _batches(
        self,
        response: aiohttp.ClientResponse,
        body: ListBody,
        item_type: type | None,
        at: float,
        seconds: float,
        complete: list[bool],
    ) -> AsyncIterator[list[object]]:
        """The decoded elements of a list body, read before `at` (its bytes told to `body`);
        `complete` gets True at its end."""
        stream = ArrayStream(item_type)
        try:
            while chunk := await _within(at, seconds, response.content.read(CHUNK_BYTES)):
                body.bytes += len(chunk)
                self._metrics.body_bytes("list", len(chunk))
                for piece in _pieces(stream.feed(chunk)):
                    yield piece
            for piece in _pieces(stream.finish()):
                yield piece
        except StreamError as error:
            raise BodyError(str(error)) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise BodyError(self._scrub(f"reading the response failed: {type(error).__name__}: {error}")) from None
        complete.append(True)

    def read_succeeded(self) -> None:
        """The last list read was accounted in full: its validators may spare the next one, and
        the next read's deadline is sized afresh."""
        self._late = 0
        if not self.not_modified:
            self._validators = self._received

    async def get_call(self, call_id: str) -> dict:
        """`GET /v1/calls/{id}`: the call object as decoded JSON.

        Raises NotFound only for a 404 whose body is the API's JSON error: a 404 page from a
        proxy or a wrong base URL says nothing about the call, so it stays an ApiError.
        """
        seconds = call_deadline(self.request_timeout)
        await self._wait_for_budget()
        with self._step("call by id", seconds):
            at = asyncio.get_running_loop().time() + seconds
            try:
                response = await self._get("/v1/calls/" + quote(call_id, safe=""), at, seconds)
            except ApiError as error:
                if error.code == "404" and _is_api_error(str(error).partition(": ")[2]):
                    raise NotFound(str(error), "404") from None
                raise
            try:
                body = bytearray()
                while chunk := await _within(at, seconds, response.content.read(CHUNK_BYTES)):
                    body += chunk
                    if len(body) > MAX_PENDING_CHARS:
                        raise BodyError("response body holds an oversized call object")
                self._metrics.body_bytes("call", len(body))
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


def _pieces(items: list[object]) -> Iterator[list[object]]:
    """`items` PIECE at a time (none when empty)."""
    return (items[start : start + PIECE] for start in range(0, len(items), PIECE))


async def _nothing() -> AsyncIterator[list[object]]:
    """The batches of a 304: none."""
    return
    yield


def _is_api_error(body: str) -> bool:
    """Whether a body is the API's `{"error": "..."}`."""
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), str)
