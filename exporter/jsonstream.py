"""Incremental decoder of one top-level JSON array, fed bytes in whatever chunks arrive.

msgspec decodes batches cut at element boundaries it validates; the standard library reads one
element at a time where it must. Pure: no I/O. `api.py` feeds it a response body and turns a
StreamError into its BodyError.
"""

from __future__ import annotations

import codecs
import json
import re

import msgspec

MAX_PENDING_CHARS = 4 * 1024 * 1024  # one array element larger than this is treated as corrupt

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_decoder = json.JSONDecoder()
CUT_ATTEMPTS = 4  # cuts tried, last first, before one element is read the plain way


class StreamError(ValueError):
    """The bytes are not one complete JSON array (truncated, not UTF-8, not JSON, bad separators)."""


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
            if buf[start : start + 1] != b"[":
                raise StreamError("response body is not a JSON array")
            buf, self._opened = buf[start + 1 :], True
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
                    return self._fast.decode(b"[" + buf[: cut + 1] + b"]"), buf[buf.index(b"{", cut) :]
                except msgspec.DecodeError:
                    end = cut  # inside a nested array, or a bad element before it: try an earlier cut
        return None, buf

    def _one(self, buf: bytes) -> tuple[object, bytes]:
        """One element the plain way, and what follows its comma; or _INCOMPLETE, or _END at `]`."""
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(buf, False)
        except UnicodeDecodeError:
            raise StreamError("response body is not UTF-8") from None
        pos = _WHITESPACE.match(text).end()
        if text[pos : pos + 1] == "]":
            return _END, buf
        try:
            value, stop = _decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return _INCOMPLETE, buf
        after = _WHITESPACE.match(text, stop).end()
        if after == len(text) or (not isinstance(value, (dict, list, str)) and text[stop] not in ",] \t\n\r"):
            return _INCOMPLETE, buf  # the separator, or the rest of a number (`2` of `2.5`), has not come yet
        if text[after] == "]":
            return value, buf[len(text[:after].encode()) :]
        if text[after] != ",":
            raise StreamError(f"unexpected {text[after]!r} between array elements")
        return value, buf[len(text[: after + 1].encode()) :]

    def _hand_over(self, buf: bytes, final: bool) -> list[object]:
        """The rest of the response goes the plain way (its end, or an oversized element)."""
        state = (
            "item" if self._elements and not buf.lstrip().startswith(b"]") else "comma" if self._elements else "first"
        )
        self._plain = PlainArrayStream(state)
        return self._plain.feed(buf, final)

    def finish(self) -> list[object]:
        """The body ended: it must have closed the array. Returns the elements still held back."""
        items: list[object] = []
        if self._plain is None:
            if not self._opened:
                raise StreamError("response body ended before the JSON array was complete")
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
            raise StreamError("response body is not UTF-8") from None
        items: list[object] = []
        pos, end = 0, len(text)
        while True:
            pos = _WHITESPACE.match(text, pos).end()
            if pos == end:
                break
            char = text[pos]
            if self._state == "start":
                if char != "[":
                    raise StreamError("response body is not a JSON array")
                self._state, pos = "first", pos + 1
            elif self._state == "comma" or (self._state == "first" and char == "]"):
                if char == "]":
                    self._state = "done"
                elif char == ",":
                    self._state = "item"
                else:
                    raise StreamError(f"unexpected {char!r} between array elements")
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
                raise StreamError("data after the end of the JSON array")
        self._text = text[pos:]
        if len(self._text) > MAX_PENDING_CHARS:
            raise StreamError("response body holds an unreadable or oversized element")
        return items

    def finish(self) -> list[object]:
        """The body ended: it must have closed the array."""
        items = self.feed(b"", final=True)
        if self._state != "done" or self._text.strip():
            raise StreamError("response body ended before the JSON array was complete")
        return items
