"""decode_record: one JSON object of `GET /v1/calls` → a typed Record, or Invalid(reason)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from exporter.catalogue import CONTRACT_DEVIATIONS, DEVIATION_BITS
from exporter.records import CallFields, Invalid, Record, decode_record, parse_timestamp

ID = "5f1d7c3e-8a54-4b8e-9d7a-0c2b1e6f9a10"
CREATED = datetime(2023, 11, 7, 5, 31, 56, tzinfo=UTC).timestamp()


def exact_to_microsecond(expected):
    """Float seconds near 1.7e9 carry ~0.2 µs of rounding; anything coarser is a real error."""
    return pytest.approx(expected, abs=1e-6)  # abs only: no relative tolerance


def call(**overrides) -> dict:
    """A complete call object as the API documents it."""
    obj = {
        "id": ID,
        "to_number": "+14155550100",
        "from_number": "+14155550199",
        "status": "completed",
        "direction": "outbound",
        "prompt": "Book a table for two",
        "context": {"name": "Ada"},
        "returns": {"booked": "boolean"},
        "result": {"booked": True},
        "result_status": "completed",
        "result_error": None,
        "language": "en",
        "webhook_url": "https://example.com/hook",
        "webhook_status": "delivered",
        "webhook_error": None,
        "created_at": "2023-11-07T05:31:56Z",
        "started_at": "2023-11-07T05:31:58.250Z",
        "answered_at": "2023-11-07T05:32:03+00:00",
        "ended_at": "2023-11-07T05:33:04.5Z",
        "duration_seconds": 61,
        "billed_duration_seconds": 62,
        "billing_amount_milli_cents": 1550,
        "reservation_status": "settled",
        "error_code": None,
        "error_message": None,
        "hangup_cause": "normal_clearing",
        "metadata": {"crm_id": 7},
        "updated_at": "2023-11-07T05:33:05.123Z",
    }
    obj.update(overrides)
    return obj


def test_full_record_decodes_every_field_the_accounting_reads():
    obj = call(sentiment="happy", transcript=[{"role": "agent"}], cost={"usd": 1})  # newer API fields
    # timestamps to the microsecond: exactly what RFC 3339 text can carry
    record = decode_record(obj)
    assert record.extra == ()  # no metadata_labels configured: nothing read from metadata
    assert record.deviations == 0
    assert record[:-2] == exact_to_microsecond(
        Record(
            id=ID,
            status="completed",
            direction="outbound",
            created_at=CREATED,
            updated_at=CREATED + 69.123,
            started_at=CREATED + 2.25,
            answered_at=CREATED + 7,
            ended_at=CREATED + 68.5,
            duration_seconds=61,
            billed_duration_seconds=62,
            billing_amount_milli_cents=1550,
            reservation_status="settled",
            webhook_status="delivered",
            result_status="completed",
            hangup_cause="normal_clearing",
            error_code=None,
        )[:-2]
    )


def test_minimal_record_with_nullable_fields_null_decodes():
    obj = {"id": ID, "status": "queued", "created_at": "2023-11-07T05:31:56Z", "updated_at": "2023-11-07T05:31:56Z"}
    assert decode_record(obj) == Record(
        ID, "queued", "none", CREATED, CREATED, None, None, None, None, None, None, None, None, None, None, None
    )


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("2023-11-07T05:31:56Z", CREATED),
        ("2023-11-07T05:31:56.123Z", CREATED + 0.123),
        ("2023-11-07T05:31:56+00:00", CREATED),
        ("2023-11-07T05:31:56.5+00:00", CREATED + 0.5),
        ("2023-11-07T07:31:56+02:00", CREATED),
        ("2023-11-07T05:31:56.123456Z", CREATED + 0.123456),
    ],
)
def test_rfc3339_timestamps_parse_to_unix_seconds(text, seconds):
    assert parse_timestamp(text) == exact_to_microsecond(seconds)
    assert decode_record(call(created_at=text)).created_at == exact_to_microsecond(seconds)


@pytest.mark.parametrize(
    "direction, exported",
    [("outbound", "outbound"), ("inbound", "inbound"), (None, "none"), ("", "none"), ("sideways", "other")],
)
def test_direction_outside_the_api_values_is_folded(direction, exported):
    assert decode_record(call(direction=direction)).direction == exported


@pytest.mark.parametrize(
    "status", ["queued", "initiated", "ringing", "in_progress", "completed", "no_answer", "busy", "canceled", "failed"]
)
def test_every_api_status_is_accepted(status):
    assert decode_record(call(status=status)).status == status


@pytest.mark.parametrize(
    "obj, reason, call_id",
    [
        ([1, 2], "not_object", None),
        ("a string", "not_object", None),
        (None, "not_object", None),
        ({k: v for k, v in call().items() if k != "id"}, "missing_field", None),
        (call(id=None), "missing_field", None),
        (call(id=42), "bad_type", None),
        (call(id=""), "bad_type", None),
        ({k: v for k, v in call().items() if k != "status"}, "missing_field", ID),
        (call(status=None), "missing_field", ID),
        (call(created_at=None), "missing_field", ID),
        ({k: v for k, v in call().items() if k != "updated_at"}, "missing_field", ID),
        (call(status=3), "bad_type", ID),
        (call(status=""), "unknown_status", ID),  # a value outside the docs is a status; an empty one is not
        (call(direction=1), "bad_type", ID),
        (call(duration_seconds="61"), "bad_type", ID),
        (call(duration_seconds=61.5), "bad_type", ID),
        (call(billed_duration_seconds=True), "bad_type", ID),
        (call(billing_amount_milli_cents=[1]), "bad_type", ID),
        (call(hangup_cause=17), "bad_type", ID),
        (call(error_code={"code": 1}), "bad_type", ID),
        (call(webhook_status=False), "bad_type", ID),
        (call(result_status=0), "bad_type", ID),
        (call(reservation_status=1), "bad_type", ID),
        (call(duration_seconds=-1), "bad_value", ID),
        (call(billing_amount_milli_cents=-5), "bad_value", ID),
        (call(created_at="yesterday"), "bad_timestamp", ID),
        (call(updated_at="2023-11-07T05:31:56"), "bad_timestamp", ID),  # no offset
        (call(ended_at=1699335116), "bad_timestamp", ID),
        (call(started_at="2023-13-07T05:31:56Z"), "bad_timestamp", ID),
        (call(answered_at=""), "bad_timestamp", ID),
    ],
)
def test_invalid_record_names_the_reason(obj, reason, call_id):
    assert decode_record(obj) == Invalid(reason, call_id)


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"campaign_id": "spring-24", "tier": "gold"}, ("spring-24", "gold")),
        ({"campaign_id": 42, "tier": True}, ("42", "true")),
        ({"campaign_id": {"nested": 1}, "tier": None}, ("other", None)),
        ({}, (None, None)),
        (None, (None, None)),
        ("not a mapping", (None, None)),
    ],
)
def test_configured_metadata_keys_are_read_as_label_values(metadata, expected):
    record = decode_record(call(metadata=metadata), ("campaign_id", "tier"))
    assert record.extra == expected


def _fast(obj: dict):
    """The element as the list read's fast path decodes it."""
    (decoded,) = msgspec.json.Decoder(list[CallFields]).decode(json.dumps([obj]).encode())
    return decoded


@pytest.mark.parametrize("path", [lambda obj: obj, _fast], ids=["plain", "fast"])
@pytest.mark.parametrize(
    "overrides, status, webhook, result, deviations",
    [
        ({"status": "voicemail"}, "voicemail", "delivered", "completed", {"undocumented_value"}),
        ({"reservation_status": "refunded"}, "completed", "delivered", "completed", {"undocumented_value"}),
        ({"direction": "transfer"}, "completed", "delivered", "completed", {"undocumented_value"}),
        ({"webhook_status": "retrying"}, "completed", "retrying", "completed", {"undocumented_value"}),
        (
            {"webhook_url": None, "webhook_status": "pending"},
            "completed",
            None,
            "completed",
            {"outcome_without_subject"},
        ),
        (
            {"webhook_url": "", "webhook_status": "delivered"},
            "completed",
            None,
            "completed",
            {"outcome_without_subject"},
        ),
        ({"returns": {}, "result_status": "completed"}, "completed", "delivered", None, {"outcome_without_subject"}),
        ({"returns": None, "result_status": "failed"}, "completed", "delivered", None, {"outcome_without_subject"}),
        ({"returns": {}, "result_status": None}, "completed", "delivered", None, set()),
    ],
)
def test_values_outside_the_docs_are_kept_and_outcomes_without_subject_dropped(
    path, overrides, status, webhook, result, deviations
):
    record = decode_record(path(call(**overrides)))
    assert (record.status, record.webhook_status, record.result_status) == (status, webhook, result)
    assert {kind for kind in CONTRACT_DEVIATIONS if record.deviations & DEVIATION_BITS[kind]} == deviations
