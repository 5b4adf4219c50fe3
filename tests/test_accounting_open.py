"""The counting core where the API docs leave the behaviour open (SPEC §1; the rules are §4's).

Each test feeds call objects the way production does: JSON bytes through msgspec's fast decoder
(`CallFields`) into a list read of a `Tally`, so the fast path that skips unchanged records is
exercised too, not only plain dicts.
"""

from __future__ import annotations

import json

import msgspec

from exporter.health import summarise
from exporter.ledger import Ledger
from exporter.plan import Plan
from exporter.records import CallFields
from exporter.settings import Settings
from exporter.simulator import format_ts
from exporter.store import Store
from exporter.tally import Tally

NOW = 1_700_000_000.0
BASELINE = NOW - 3000
C = NOW - 600  # created_at of the calls here
GRACE = 300.0
OUT = "outbound"
ENDED, HANGUPS, ERRORS = "callingbox_calls_ended_total", "callingbox_call_hangups_total", "callingbox_call_errors_total"
DURATION = "callingbox_call_duration_seconds"
ANSWER = "callingbox_call_answer_delay_seconds"
MONEY, BILLED = "callingbox_billed_amount_dollars_total", "callingbox_call_billed_duration_seconds"
WEBHOOKS, EXTRACTIONS = "callingbox_webhook_deliveries_total", "callingbox_result_extractions_total"
DEVIATIONS = "callingbox_exporter_contract_deviations_total"
DECODE = msgspec.json.Decoder(list[CallFields])
# A call's fields that stay null until it ends, and the outcomes of its webhook and extraction.
UNSET = (
    "started_at answered_at ended_at duration_seconds billed_duration_seconds billing_amount_milli_cents"
    " webhook_status result_status hangup_cause error_code"
).split()


def tally(baseline: float = BASELINE, label_limit: int = 50) -> Tally:
    settings = Settings(3600.0, 120.0, 7 * 86400.0, end_grace=GRACE)
    return Tally(settings, Ledger(baseline), Store(label_limit=label_limit), now=NOW)


def call(status: str, updated: float, id: str = "a", whole: bool = True, **fields) -> dict:
    """A call object as the API may send it: whole-second timestamps, with a webhook and a schema
    unless `fields` say otherwise, every end detail null unless given."""
    stamp = (lambda t: format_ts(t)[:19] + "Z") if whole else format_ts
    obj = {
        "id": id,
        "status": status,
        "direction": OUT,
        "created_at": stamp(C),
        "updated_at": stamp(updated),
        **dict.fromkeys(UNSET),
        "reservation_status": "reserved",
        "webhook_url": "https://hooks.example/cb",
        "returns": {"ok": "boolean"},
    }
    for key, value in fields.items():
        obj[key] = stamp(value) if key.endswith("_at") and isinstance(value, float) else value
    return obj


def read(t: Tally, now: float, *objects: dict) -> None:
    """One list read of `objects` (newest first), decoded by the fast path as production does."""
    batch = DECODE.decode(json.dumps(list(objects)).encode())
    assert all(type(obj) is CallFields for obj in batch), "the fast path took them"
    r = t.list_read(now, Plan(now - 3600.0, True, [], {}))
    for obj in batch:
        r.take(obj)
    t.settle_read(r.result())


def series(t: Tally, name: str) -> dict:
    family = t.store.counters.get(name) or t.store.histograms.get(name) or {}
    return {labels: value for labels, value in family.items() if (value if not isinstance(value, list) else value[-2])}


def kinds(t: Tally) -> dict[str, int]:
    return {labels[0]: value for labels, value in t.store.counters[DEVIATIONS].items() if value}


END = NOW - 500.0  # when the calls here end
DONE = dict(ended_at=END, started_at=C + 2.0, reservation_status="released", billing_amount_milli_cents=0)


def test_end_details_that_come_a_version_later_count_once_under_their_real_values():
    t = tally()
    read(t, NOW - 540, call("in_progress", NOW - 540, started_at=C + 2.0))
    read(t, NOW - 490, call("completed", END, **DONE))  # the terminal version: no cause, code, duration
    assert series(t, ENDED) == {(OUT, "completed"): 1} and series(t, HANGUPS) == {}, "the cause may still come"
    later = call(
        "completed",
        END + 3,
        **{
            **DONE,
            "hangup_cause": "customer_hangup",
            "error_code": "audio_degraded",
            "duration_seconds": 61,
            "answered_at": C + 5.0,
        },
    )
    for now in (NOW - 480, NOW - 470):  # the same later version read twice
        read(t, now, later)
    assert series(t, ENDED) == {(OUT, "completed"): 1}
    assert series(t, HANGUPS) == {(OUT, "completed", "customer_hangup"): 1}
    assert series(t, ERRORS) == {(OUT, "audio_degraded"): 1}
    assert t.store.histograms[DURATION][(OUT, "completed")][-1] == 61
    assert t.store.histograms[ANSWER][(OUT,)][-1] == 3.0
    assert kinds(t) == {"late_end_detail": 1}
    t.expire(END + GRACE + 1)
    assert series(t, HANGUPS) == {(OUT, "completed", "customer_hangup"): 1}, "never `none` as well"


def test_a_cause_that_never_comes_counts_none_once_nothing_is_open_and_the_grace_has_passed():
    t = tally()
    read(t, NOW - 490, call("completed", END, **{**DONE, "webhook_status": "pending"}))
    assert t.expire(END + GRACE + 1) == 0 and series(t, HANGUPS) == {}, "the pending webhook keeps it open"
    read(t, NOW - 100, call("completed", END + 400, **{**DONE, "webhook_status": "delivered"}))
    assert t.expire(END + GRACE - 1 + 400) == 1, "nothing open, the grace long past"
    assert series(t, HANGUPS) == {(OUT, "completed", "none"): 1}
    assert "a" not in t.ledger.open, "final now"
    read(t, NOW, call("completed", END + 500, **{**DONE, "webhook_status": "delivered", "hangup_cause": "late"}))
    assert t.expire(NOW + GRACE) == 0 and series(t, HANGUPS) == {(OUT, "completed", "none"): 1}, "counted once"


def test_end_details_of_a_call_that_ended_before_the_baseline_never_count():
    t = tally(baseline=END + 1)
    read(t, NOW - 490, call("completed", END, **DONE))
    read(t, NOW - 480, call("completed", END + 5, **{**DONE, "hangup_cause": "customer_hangup", "duration_seconds": 9}))
    t.expire(NOW + GRACE)
    assert series(t, ENDED) == series(t, HANGUPS) == series(t, DURATION) == {}
    assert "a" not in t.ledger.open


def test_a_settled_call_without_its_amount_waits_for_it():
    t = tally()
    settled = {
        **DONE,
        "reservation_status": "settled",
        "billing_amount_milli_cents": None,
        "billed_duration_seconds": 62,
        "hangup_cause": "customer_hangup",
    }
    read(t, NOW - 490, call("completed", END, **settled))
    assert series(t, MONEY) == {} and "a" in t.ledger.open, "not $0 for good: the amount is still to come"
    read(t, NOW - 480, call("completed", END + 2, **{**settled, "billing_amount_milli_cents": 18000}))
    read(t, NOW - 470, call("completed", END + 2, **{**settled, "billing_amount_milli_cents": 18000}))
    assert series(t, MONEY) == {(OUT,): 18000} and t.store.histograms[BILLED][(OUT,)][-1] == 62
    assert kinds(t) == {"settled_without_amount": 1} and "a" not in t.ledger.open


def test_outcomes_without_their_subject_count_nothing_and_hold_nothing_open():
    t = tally()
    bare = {**DONE, "hangup_cause": "customer_hangup", "webhook_url": None, "returns": {}}
    read(t, NOW - 490, call("completed", END, **{**bare, "webhook_status": "pending", "result_status": "pending"}))
    summary = t.sweep(NOW - 490, everything=False)
    assert summary.webhooks_pending == 0 and "a" not in t.ledger.open, "no webhook to wait for"
    read(
        t,
        NOW - 480,
        call("completed", END + 5, **{**bare, "webhook_status": "delivered", "result_status": "completed"}),
    )
    assert series(t, WEBHOOKS) == series(t, EXTRACTIONS) == {}
    assert kinds(t) == {"outcome_without_subject": 1}, "once per call, however many versions say it"
    with_subject = call(
        "completed",
        END + 6,
        id="b",
        **{**DONE, "hangup_cause": "x", "webhook_status": "delivered", "result_status": "failed"},
    )
    read(t, NOW - 470, with_subject)
    assert series(t, WEBHOOKS) == {("delivered",): 1} and series(t, EXTRACTIONS) == {("failed",): 1}


def test_a_status_outside_the_docs_is_active_until_the_call_ends_and_then_a_capped_label_value():
    t = tally(label_limit=2)  # dialing and voicemail take the two places
    read(t, NOW - 550, call("dialing", NOW - 550))
    health = summarise(t, t.sweep(NOW - 550, everything=False), t_status())
    assert health.active == {(OUT, "dialing"): 1}
    assert kinds(t) == {"undocumented_value": 1}
    read(t, NOW - 490, call("voicemail", END, **{**DONE, "hangup_cause": "voicemail"}))
    assert series(t, ENDED) == {(OUT, "voicemail"): 1} and series(t, HANGUPS) == {(OUT, "voicemail", "voicemail"): 1}
    assert summarise(t, t.sweep(NOW - 490, everything=False), t_status()).active == {}
    assert "a" not in t.ledger.open
    read(t, NOW - 480, call("screened", END + 1, id="b", **{**DONE, "hangup_cause": "x"}))
    assert series(t, ENDED)[(OUT, "other")] == 1, "the cap holds for statuses too"
    assert kinds(t) == {"undocumented_value": 2}, "once per call"


def t_status():
    from exporter.health import Status

    return Status(up=True)


def test_versions_sharing_one_updated_at_each_count_once_in_either_order():
    """Whole seconds: the terminal version and the one before it share `updated_at`. Read in order,
    the newer one is news; read newest first (a by-id answer, then a lagging list), the older
    one changes nothing; and either way a re-read of the pair counts nothing again."""
    T = END
    ringing = call("in_progress", T, started_at=C + 2.0, webhook_status=None)
    ended = call("completed", T, **{**DONE, "hangup_cause": "customer_hangup", "webhook_status": "pending"})
    delivered = call("completed", T, **{**DONE, "hangup_cause": "customer_hangup", "webhook_status": "delivered"})
    for order in ((ringing, ended, delivered), (delivered, ended, ringing), (ended, ringing, delivered)):
        t = tally()
        for i, obj in enumerate(order * 2):
            read(t, NOW - 480 + i, obj)
        assert series(t, ENDED) == {(OUT, "completed"): 1}, order
        assert series(t, HANGUPS) == {(OUT, "completed", "customer_hangup"): 1}
        assert series(t, WEBHOOKS) == {("delivered",): 1}, [o["status"] for o in order]
        assert t.ledger.calls["a"].webhook == "delivered"
