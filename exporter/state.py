"""Persist and restore one target's store and ledger, atomically.

The file is replaced by write → fsync → rename → fsync(dir), so a crash at any instant leaves
the old or the new state, never a torn one. The poller publishes a poll's counts only after
`save` returns: a value Prometheus has seen is never lost by a `kill -9`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import NamedTuple

import msgspec

from .accounting import CallState, Ledger
from .catalogue import relabel
from .store import Store

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


class Restored(NamedTuple):
    ledger: Ledger
    store: Store
    reset_histograms: list[str]


ENCODE_SLICE = 2000  # calls per encode call: each C call holds the GIL, scrapes wait that long
_encoder = msgspec.json.Encoder()  # 3x json.dumps on the ledger (BENCHMARKS.md, case 3)


def _entry(s: CallState) -> list:
    entry = [s.direction, s.status, s.created_at, s.updated_at, s.billed, s.webhook, s.result, s.webhook_pending_since,
             s.amount]
    if s.extra:
        entry.append(s.extra)
    return entry


def _call(fields: list, saved_extra: tuple[str, ...], extra_labels: tuple[str, ...]) -> CallState:
    state = CallState(*fields[:9])
    if extra_labels:
        state.extra = relabel(saved_extra, fields[9] if len(fields) > 9 else (), extra_labels)
    return state


def encode(org: str, ledger: Ledger, store: Store) -> bytes:
    """The state document as JSON, the ledger encoded a slice at a time (see ENCODE_SLICE)."""
    head = {
        "version": FORMAT_VERSION,
        "org": org,
        "saved_at": time.time(),
        "baseline": ledger.baseline,
        "watermark": ledger.watermark,
        "store": store.to_json(),
    }
    items = list(ledger.calls.items())
    slices = (
        _encoder.encode({call_id: _entry(s) for call_id, s in items[i : i + ENCODE_SLICE]})[1:-1]
        for i in range(0, len(items), ENCODE_SLICE)
    )
    calls = b",".join(slices)
    return _encoder.encode(head)[:-1] + b',"calls":{' + calls + b"}}"


def decode(data: bytes, buckets=None, label_limit: int = 50, extra_labels: tuple[str, ...] = ()) -> Restored:
    document = json.loads(data)
    if not isinstance(document, dict) or not all(
        isinstance(document.get(key), dict) for key in ("calls", "store")
    ):
        raise ValueError("not a state document")
    if document.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported state version {document.get('version')!r}")
    saved_extra = tuple(document["store"].get("extra_labels", ()))
    if extra_labels:
        calls = {call_id: _call(fields, saved_extra, extra_labels) for call_id, fields in document["calls"].items()}
    else:
        calls = {call_id: CallState(*fields[:9]) for call_id, fields in document["calls"].items()}
    ledger = Ledger(document["baseline"], document["watermark"], calls)
    store, reset = Store.from_json(document["store"], buckets, label_limit, extra_labels)
    return Restored(ledger, store, reset)


def write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save(path: str, org: str, ledger: Ledger, store: Store) -> None:
    write_atomically(path, encode(org, ledger, store))


def load(path: str, org: str, buckets=None, label_limit: int = 50, extra_labels: tuple[str, ...] = ()) -> Restored | None:
    """The saved state, or None when there is none.

    An unreadable file cannot come from our own writes (they are atomic); it is moved aside
    and the target starts afresh with a new baseline, so nothing is counted twice.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    try:
        restored = decode(data, buckets, label_limit, extra_labels)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        aside = f"{path}.corrupt-{time.time_ns()}"
        os.replace(path, aside)
        log.error("state file unreadable, starting afresh", extra={"org": org, "path": path, "moved_to": aside, "error": str(error)})
        return None
    for name in restored.reset_histograms:
        log.warning("histogram buckets changed, histogram restarts from zero", extra={"org": org, "histogram": name})
    return restored
