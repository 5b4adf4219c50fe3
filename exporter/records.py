"""The call record as the exporter reads it.

`decode_record` turns one decoded JSON object from `GET /v1/calls` into a typed `Record`
holding only the fields the accounting reads, or an `Invalid` naming why it was rejected.
Unknown fields are ignored, as newer API versions add them.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

ACTIVE_STATUSES = ("queued", "initiated", "ringing", "in_progress")
TERMINAL_STATUSES = ("completed", "no_answer", "busy", "canceled", "failed")
STATUSES = frozenset(ACTIVE_STATUSES + TERMINAL_STATUSES)
DIRECTIONS = ("outbound", "inbound")


class Record(NamedTuple):
    id: str
    status: str
    direction: str
    created_at: float
    updated_at: float
    started_at: float | None
    answered_at: float | None
    ended_at: float | None
    duration_seconds: int | None
    billed_duration_seconds: int | None
    billing_amount_milli_cents: int | None
    reservation_status: str | None
    webhook_status: str | None
    result_status: str | None
    hangup_cause: str | None
    error_code: str | None
    extra: tuple[str | None, ...] = ()  # the configured metadata values, as label values

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Invalid(NamedTuple):
    """A record that cannot be accounted; `reason` is the metric label value."""

    reason: str
    call_id: str | None = None


class _Reject(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def parse_timestamp(value: str) -> float:
    """RFC 3339 → Unix seconds. Python 3.11's fromisoformat reads `Z` and fractions."""
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("timestamp without offset")
    return moment.timestamp()


def _timestamp(obj: dict, key: str, required: bool = False) -> float | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _Reject("missing_field")
        return None
    if not isinstance(value, str):
        raise _Reject("bad_timestamp")
    try:
        return parse_timestamp(value)
    except ValueError:
        raise _Reject("bad_timestamp") from None


def _integer(obj: dict, key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int subclass in Python; an API sending true is not sending a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Reject("bad_type")
    if value < 0:
        raise _Reject("bad_value")
    return value


def _text(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _Reject("bad_type")


def metadata_value(value: object) -> str | None:
    """A metadata value as a label value: scalars as text, anything nested as `other`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return "other"


def _extra(obj: dict, keys: tuple[str, ...]) -> tuple[str | None, ...]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return (None,) * len(keys)
    return tuple(metadata_value(metadata.get(key)) for key in keys)


def decode_record(obj: object, metadata_keys: tuple[str, ...] = ()) -> Record | Invalid:
    """Validate one array element; never raises. `metadata_keys` are read into `extra`."""
    if not isinstance(obj, dict):
        return Invalid("not_object")
    call_id = obj.get("id")
    if not isinstance(call_id, str) or not call_id:
        return Invalid("missing_field" if call_id is None else "bad_type")
    try:
        status = obj.get("status")
        if status is None:
            raise _Reject("missing_field")
        if not isinstance(status, str):
            raise _Reject("bad_type")
        if status not in STATUSES:
            raise _Reject("unknown_status")
        direction = _text(obj, "direction")
        if direction not in DIRECTIONS:
            direction = "none" if not direction else "other"
        return Record(
            id=call_id,
            status=status,
            direction=direction,
            created_at=_timestamp(obj, "created_at", required=True),
            updated_at=_timestamp(obj, "updated_at", required=True),
            started_at=_timestamp(obj, "started_at"),
            answered_at=_timestamp(obj, "answered_at"),
            ended_at=_timestamp(obj, "ended_at"),
            duration_seconds=_integer(obj, "duration_seconds"),
            billed_duration_seconds=_integer(obj, "billed_duration_seconds"),
            billing_amount_milli_cents=_integer(obj, "billing_amount_milli_cents"),
            reservation_status=_text(obj, "reservation_status"),
            webhook_status=_text(obj, "webhook_status"),
            result_status=_text(obj, "result_status"),
            hangup_cause=_text(obj, "hangup_cause"),
            error_code=_text(obj, "error_code"),
            extra=_extra(obj, metadata_keys) if metadata_keys else (),
        )
    except _Reject as reject:
        return Invalid(reject.reason, call_id)
