"""What older versions wrote, read into today's shape: renamed metric families and the JSON state file.

The JSON file (format 1) is what releases before SQLite saved at every poll. The exporter no longer
writes it: state.py migrates such a file into a database at open, through the readers here, and
`encode_v1` stays beside them for the migration tests and the benchmark's reference. Pure data:
the errors here are ValueError (unreadable) or UnknownVersion; state.py words them for the operator.
"""

from __future__ import annotations

import json
import os
import time

import msgspec

from .accounting import CallState
from .catalogue import FAMILIES, relabel
from .ledger import Ledger

JSON_VERSION = 1
SLICE = 2000  # calls encoded per slice, as the releases that wrote the file did
# Saved family names of an older version → today's: a state file written before a rename keeps
# its counts (a silent zero would read as a counter reset in Prometheus).
RENAMED = {"callingbox_calls_total": "callingbox_calls_ended_total"}


class UnknownVersion(Exception):
    """A JSON state document of another format version than JSON_VERSION."""

    def __init__(self, version: object):
        super().__init__(f"unknown format version {version!r}")
        self.version = version


def document_v1(data: bytes) -> dict:
    """The format-1 document in `data`; raises ValueError when it is none, UnknownVersion."""
    document = json.loads(data)
    if not isinstance(document, dict) or not all(isinstance(document.get(key), dict) for key in ("calls", "store")):
        raise ValueError("not a state document")
    if document.get("version") != JSON_VERSION:
        raise UnknownVersion(document.get("version"))
    return document


def as_saved_v1(document: dict) -> tuple[dict[str, list], tuple[str, ...]]:
    """The histogram buckets and metadata labels the document was saved under."""
    saved = document["store"]
    buckets = {name: h["buckets"] for name, h in saved["histograms"].items() if name in FAMILIES}
    return buckets, tuple(saved.get("extra_labels", ()))


def ledger_v1(document: dict, extra_labels: tuple[str, ...] = ()) -> Ledger:
    """The document's ledger, its calls' metadata values re-keyed onto `extra_labels`. Its store
    is `document["store"]`, already in the shape `Store.from_json` reads."""
    saved_extra = tuple(document["store"].get("extra_labels", ()))
    calls = {call_id: _call_v1(fields, saved_extra, extra_labels) for call_id, fields in document["calls"].items()}
    return Ledger(document["baseline"], document["watermark"], calls)


def _call_v1(fields: list, saved_extra: tuple[str, ...], extra_labels: tuple[str, ...]) -> CallState:
    state = CallState(*fields[:9])
    if extra_labels:
        state.extra = relabel(saved_extra, fields[9] if len(fields) > 9 else (), extra_labels)
    return state


def encode_v1(org: str, ledger: Ledger, store) -> bytes:
    """The format-1 JSON document of a ledger and a store, as releases before SQLite wrote it."""
    head = {
        "version": JSON_VERSION,
        "org": org,
        "saved_at": time.time(),
        "baseline": ledger.baseline,
        "watermark": ledger.watermark,
        "store": store.to_json(),
    }
    encoder = msgspec.json.Encoder()
    items = list(ledger.calls.items())
    slices = (
        encoder.encode({call_id: _entry_v1(s) for call_id, s in items[i : i + SLICE]})[1:-1]
        for i in range(0, len(items), SLICE)
    )
    return encoder.encode(head)[:-1] + b',"calls":{' + b",".join(slices) + b"}}"


def _entry_v1(s: CallState) -> list:
    entry = [
        s.direction,
        s.status,
        s.created_at,
        s.updated_at,
        s.billed,
        s.webhook,
        s.result,
        s.webhook_pending_since,
        s.amount,
    ]
    return entry + [s.extra] if s.extra else entry


def write_atomically(path: str, data: bytes) -> None:
    """Replace `path` by `data`: write, fsync, rename, fsync the directory."""
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
