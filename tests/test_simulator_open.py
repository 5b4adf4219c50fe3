"""The simulator's truth counts what the API docs leave open (SPEC §1) by SPEC §3/§4's words:
its rules checked on hand-written histories.
"""

from __future__ import annotations

from datetime import datetime

from exporter.simulator.truth import ledger


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# ---- the truth's rules on hand-written histories -------------------------------------------

T0 = "2024-05-01T10:00:00Z"
CALL = {
    "id": "c1", "direction": "outbound", "status": "queued", "created_at": T0, "updated_at": T0,
    "started_at": None, "answered_at": None, "ended_at": None, "hangup_cause": None, "error_code": None,
    "duration_seconds": None, "billed_duration_seconds": None, "billing_amount_milli_cents": None,
    "reservation_status": "reserved", "webhook_url": None, "webhook_status": None, "returns": None,
    "result_status": None,
}
RING = {"status": "ringing", "started_at": "2024-05-01T10:00:02Z", "updated_at": "2024-05-01T10:00:02Z"}
END = {"ended_at": "2024-05-01T10:00:30Z", "updated_at": "2024-05-01T10:00:30Z"}
LATER = {"updated_at": "2024-05-01T10:00:31Z"}


def events(*changes: dict) -> list[tuple]:
    """Every event of a call whose versions apply `changes` in turn, as (date, name, labels, value),
    told, as the simulator tells it, whether a hangup cause is still to come."""
    found, versions, counted = [], [], None
    for change in changes:
        versions.append({**(versions[-1] if versions else CALL), **change})
    for i, version in enumerate(versions):
        coming = any(v.get("hangup_cause") for v in changes[i + 1:])
        new, counted = ledger(versions[i - 1] if i else None, version, counted, coming)
        found += [(date - ts(T0), name, dict(labels), value) for date, name, labels, value, _ in new]
    return [e for e in found if e[1] != "callingbox_calls_created_total"]


def test_truth_voicemail_is_terminal_with_ended_at_and_dialing_is_not():
    assert events({}, {"status": "dialing"}, RING, {"status": "voicemail", "hangup_cause": "voicemail",
                                                    "duration_seconds": 28, "reservation_status": "released",
                                                    "billing_amount_milli_cents": 0, "billed_duration_seconds": 0,
                                                    **END}) == [
        (30, "callingbox_calls_ended_total", {"direction": "outbound", "status": "voicemail"}, 1),
        (30, "callingbox_call_hangups_total",
         {"direction": "outbound", "status": "voicemail", "hangup_cause": "voicemail"}, 1),
        (30, "callingbox_call_duration_seconds", {"direction": "outbound", "status": "voicemail"}, 28),
        (30, "callingbox_call_setup_delay_seconds", {"direction": "outbound"}, 2.0),
        (30, "callingbox_billed_amount_milli_cents", {"direction": "outbound"}, 0),
        (30, "callingbox_call_billed_duration_seconds", {"direction": "outbound"}, 0),
    ]
    assert events({}, {"status": "voicemail", "updated_at": "2024-05-01T10:00:05Z"}) == []  # no ended_at: active


def test_truth_counts_late_details_once_with_their_values_dated_by_the_end():
    ended = {"status": "completed", "reservation_status": "settled", **END}
    late = {"hangup_cause": "customer_hangup", "answered_at": "2024-05-01T10:00:06Z", "duration_seconds": 28, **LATER}
    bill = {"billing_amount_milli_cents": 9000, "billed_duration_seconds": 24, "updated_at": "2024-05-01T10:00:33Z"}
    found = events(RING, ended, late, bill, {"webhook_status": "pending", "updated_at": "2024-05-01T10:00:40Z"})
    assert [(d, n, lbl.get("hangup_cause"), v) for d, n, lbl, v in found] == [
        (30, "callingbox_calls_ended_total", None, 1),
        (30, "callingbox_call_setup_delay_seconds", None, 2.0),
        (30, "callingbox_call_hangups_total", "customer_hangup", 1),
        (30, "callingbox_call_duration_seconds", None, 28),
        (30, "callingbox_call_answer_delay_seconds", None, 4.0),
        (30, "callingbox_billed_amount_milli_cents", None, 9000),  # settled waited for its amount
        (30, "callingbox_call_billed_duration_seconds", None, 24),
    ]
    # No cause will come: `none` at once. Released without an amount: 0, no billed duration.
    assert [(n, lbl.get("hangup_cause"), v) for _, n, lbl, v in events(
        {"status": "failed", "reservation_status": "released", **END}, {"error_code": "x", **LATER})] == [
        ("callingbox_calls_ended_total", None, 1), ("callingbox_call_hangups_total", "none", 1),
        ("callingbox_billed_amount_milli_cents", None, 0), ("callingbox_call_errors_total", None, 1)]


def test_truth_counts_outcomes_only_with_their_subject():
    outcomes = ({"webhook_status": "pending", "result_status": "pending", **END},
                {"webhook_status": "delivered", "result_status": "completed", **LATER})
    assert [e for e in events({"returns": {}}, *outcomes) if "status" in e[2] and len(e[2]) == 1] == []
    subject = {"webhook_url": "https://hooks.example/cb", "returns": {"ok": "boolean"}}
    assert [(d, n, lbl) for d, n, lbl, _ in events(subject, *outcomes) if len(lbl) == 1] == [
        (31, "callingbox_webhook_deliveries_total", {"status": "delivered"}),
        (31, "callingbox_result_extractions_total", {"status": "completed"}),
    ]
