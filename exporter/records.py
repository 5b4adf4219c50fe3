"""The call record as the exporter reads it.

`decode_record` turns one element of `GET /v1/calls` into a typed `Record` holding only the
fields the accounting reads, or an `Invalid` naming why it was rejected. Unknown fields are
ignored, as newer API versions add them. An element comes either as a `CallFields` struct
(msgspec's fast path: the decoder skips every other field and parses the timestamps in C) or,
when a batch could not take that path, as the plain decoded JSON value.
"""

from __future__ import annotations

from datetime import datetime
from operator import attrgetter
from typing import Any, NamedTuple

import msgspec

from .catalogue import (
    BAD_TIMESTAMP,
    BAD_TYPE,
    BAD_VALUE,
    DEVIATION_BITS,
    DIRECTIONS,
    MISSING_FIELD,
    NOT_OBJECT,
    OUTCOME_WITHOUT_SUBJECT,
    RESERVATIONS,
    RESULT_STATUSES,
    STATUSES,
    TERMINAL_STATUSES,
    UNDOCUMENTED_VALUE,
    UNKNOWN_STATUS,
    WEBHOOK_STATUSES,
)


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
    deviations: int = 0  # DEVIATION_BITS of what this version does that the docs leave open

    @property
    def terminal(self) -> bool:
        """A documented terminal status, or one outside the docs once the call has ended (SPEC §4)."""
        return is_terminal(self.status, self.ended_at)


def is_terminal(status: str, ended_at: float | None) -> bool:
    return status in TERMINAL_STATUSES or (status not in STATUSES and ended_at is not None)


FIELDS = (
    "id",
    "status",
    "direction",
    "created_at",
    "updated_at",
    "started_at",
    "answered_at",
    "ended_at",
    "duration_seconds",
    "billed_duration_seconds",
    "billing_amount_milli_cents",
    "reservation_status",
    "webhook_status",
    "result_status",
    "hangup_cause",
    "error_code",
)


class CallFields(msgspec.Struct):
    """What the fast decoder keeps of a call: `Any` where `decode_record` judges the type itself.

    Timestamps are typed, so msgspec parses RFC 3339 in C; one that is not makes the whole batch
    fall back to the plain path, where `decode_record` names the problem.
    """

    id: Any = None
    status: Any = None
    direction: Any = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    started_at: datetime | None = None
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    duration_seconds: Any = None
    billed_duration_seconds: Any = None
    billing_amount_milli_cents: Any = None
    reservation_status: Any = None
    webhook_status: Any = None
    result_status: Any = None
    hangup_cause: Any = None
    error_code: Any = None
    # The subjects of the outcomes (SPEC §4): whether a webhook is configured, a schema to extract.
    webhook_url: Any = None
    returns: msgspec.Raw = msgspec.Raw(b"null")  # kept as its bytes: only its emptiness matters


class CallFieldsWithMetadata(CallFields):
    metadata: Any = None  # decoded only when metadata_labels are configured: it costs a dict per call


def fields_type(with_metadata: bool) -> type[CallFields]:
    return CallFieldsWithMetadata if with_metadata else CallFields


_fields_of = attrgetter(*FIELDS)


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


def _timestamp(value: object, required: bool = False) -> float | None:
    if value is None:
        if required:
            raise _Reject(MISSING_FIELD)
        return None
    if type(value) is datetime:  # the fast path parsed it already
        if value.tzinfo is None:
            raise _Reject(BAD_TIMESTAMP)
        return value.timestamp()
    if not isinstance(value, str):
        raise _Reject(BAD_TIMESTAMP)
    try:
        return parse_timestamp(value)
    except ValueError:
        raise _Reject(BAD_TIMESTAMP) from None


def _integer(value: object) -> int | None:
    if value is None:
        return None
    # bool is an int subclass in Python; an API sending true is not sending a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Reject(BAD_TYPE)
    if value < 0:
        raise _Reject(BAD_VALUE)
    return value


def _text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _Reject(BAD_TYPE)


def timestamp_of(value: datetime | None) -> float | None:
    """A fast-path timestamp as Unix seconds, or None when only `decode_record` can judge it."""
    if value is None or value.tzinfo is None:
        return None
    return value.timestamp()


def metadata_value(value: object) -> str | None:
    """A metadata value as a label value: scalars as text, anything nested as `other`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return "other"


def _extra(metadata: object, keys: tuple[str, ...]) -> tuple[str | None, ...]:
    if not isinstance(metadata, dict):
        return (None,) * len(keys)
    return tuple(metadata_value(metadata.get(key)) for key in keys)


def _has_schema(returns: object) -> bool:
    """A non-empty `returns` object: an extraction to wait for. Raw bytes on the fast path."""
    if isinstance(returns, msgspec.Raw):
        raw = bytes(returns)
        return raw[:1] == b"{" and raw[1:-1].strip() != b""
    return isinstance(returns, dict) and bool(returns)


_UNDOCUMENTED, _NO_SUBJECT = DEVIATION_BITS[UNDOCUMENTED_VALUE], DEVIATION_BITS[OUTCOME_WITHOUT_SUBJECT]


_record = tuple.__new__  # a Record with every field, built directly: NamedTuple's __new__ is twice as slow


def decode_record(obj: object, metadata_keys: tuple[str, ...] = ()) -> Record | Invalid:
    """Validate one array element; never raises. `metadata_keys` are read into `extra`.

    Values outside the docs are kept (a new status is a label value) and flagged in `deviations`;
    an outcome without its subject (a webhook status with no webhook_url, an extraction status
    with no schema) is dropped here, so it counts nothing and holds no call open (SPEC §4).
    """
    if isinstance(obj, CallFields):
        values = _fields_of(obj)
        metadata = getattr(obj, "metadata", None)
        webhook_url, returns = obj.webhook_url, obj.returns
    elif isinstance(obj, dict):
        values = tuple(map(obj.get, FIELDS))
        metadata = obj.get("metadata")
        webhook_url, returns = obj.get("webhook_url"), obj.get("returns")
    else:
        return Invalid(NOT_OBJECT)
    (
        call_id,
        status,
        direction,
        created_at,
        updated_at,
        started_at,
        answered_at,
        ended_at,
        duration,
        billed,
        amount,
        reservation,
        webhook,
        result,
        hangup,
        error,
    ) = values
    if not isinstance(call_id, str) or not call_id:
        return Invalid(MISSING_FIELD if call_id is None else BAD_TYPE)
    try:
        if status is None:
            raise _Reject(MISSING_FIELD)
        if not isinstance(status, str):
            raise _Reject(BAD_TYPE)
        if not status:
            raise _Reject(UNKNOWN_STATUS)
        deviations = 0 if status in STATUSES else _UNDOCUMENTED
        if direction not in DIRECTIONS:  # a tuple: any value compares, a wrong type is judged below
            direction = _text(direction)
            deviations |= _UNDOCUMENTED if direction else 0
            direction = "none" if not direction else "other"
        reservation, webhook, result = _text(reservation), _text(webhook), _text(result)
        if reservation is not None and reservation not in RESERVATIONS:
            deviations |= _UNDOCUMENTED
        if webhook is not None and not (isinstance(webhook_url, str) and webhook_url):
            webhook, deviations = None, deviations | _NO_SUBJECT
        if result is not None and not _has_schema(returns):
            result, deviations = None, deviations | _NO_SUBJECT
        if (webhook is not None and webhook not in WEBHOOK_STATUSES) or (
            result is not None and result not in RESULT_STATUSES
        ):
            deviations |= _UNDOCUMENTED
        return _record(
            Record,
            (
                call_id,
                status,
                direction,
                _timestamp(created_at, True),
                _timestamp(updated_at, True),
                _timestamp(started_at),
                _timestamp(answered_at),
                _timestamp(ended_at),
                _integer(duration),
                _integer(billed),
                _integer(amount),
                reservation,
                webhook,
                result,
                _text(hangup),
                _text(error),
                _extra(metadata, metadata_keys) if metadata_keys else (),
                deviations,
            ),
        )
    except _Reject as reject:
        return Invalid(reject.reason, call_id)


def _same_instant(value: object) -> object:
    """A timestamp as seconds whichever way it was decoded; anything else as it is."""
    try:
        return _timestamp(value)
    except _Reject:
        return value


def fingerprint(obj: object) -> str:
    """The identity of an element, the same whether the fast or the plain path decoded it."""
    if isinstance(obj, CallFields):
        values = _fields_of(obj)
    elif isinstance(obj, dict):
        values = tuple(map(obj.get, FIELDS))
    else:
        return "value:" + repr(obj)
    return repr(tuple(_same_instant(v) if i in _TIMESTAMP_POSITIONS else v for i, v in enumerate(values)))


_TIMESTAMP_POSITIONS = frozenset(i for i, name in enumerate(FIELDS) if name.endswith("_at"))
