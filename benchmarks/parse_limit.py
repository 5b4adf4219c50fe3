"""The parse limit: the fastest decoder available (msgspec) decoding the same bytes in memory.

`CallFields` holds just the fields `exporter.records.Record` reads, typed as the exporter
validates them (timestamps parsed as RFC 3339, counts as ints); unknown fields are ignored. No
exporter can ingest faster than this decode alone. Without msgspec (`pip install .[bench]`)
the parse-limit figures are left out and say so.
"""

from __future__ import annotations

from datetime import datetime

try:
    import msgspec
except ImportError:  # the bench extra is not installed
    msgspec = None


def available() -> bool:
    return msgspec is not None


def version() -> str | None:
    return getattr(msgspec, "__version__", None)


if msgspec is not None:

    class CallFields(msgspec.Struct, kw_only=True):
        id: str
        status: str
        direction: str | None = None
        created_at: datetime
        updated_at: datetime
        started_at: datetime | None = None
        answered_at: datetime | None = None
        ended_at: datetime | None = None
        duration_seconds: int | None = None
        billed_duration_seconds: int | None = None
        billing_amount_milli_cents: int | None = None
        reservation_status: str | None = None
        webhook_status: str | None = None
        result_status: str | None = None
        hangup_cause: str | None = None
        error_code: str | None = None

    _decoder = msgspec.json.Decoder(list[CallFields])

    def decode(body: bytes) -> list:
        return _decoder.decode(body)
