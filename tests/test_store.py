"""The aggregate Store: label caps, buckets, serialisation, today's totals, metadata labels.

Plain calls on a Store, no exposition: what a scrape renders of it is tests/test_metrics.py's.
"""

from __future__ import annotations

import json

import pytest

from exporter.accounting import Billed, Created, Ended, ExtractionOutcome, WebhookOutcome
from exporter.store import Store

OUT, IN = "outbound", "inbound"
HANGUPS = "callingbox_call_hangups_total"
ERRORS = "callingbox_call_errors_total"
OVERFLOW = "callingbox_exporter_label_overflow_total"
DURATION = "callingbox_call_duration_seconds"
TERMINAL = ("completed", "no_answer", "busy", "canceled", "failed")
NOW = 1_700_000_000.0


def ended(
    hangup_cause=None,
    error_code=None,
    direction=OUT,
    status="completed",
    duration=None,
    answer_delay=None,
    setup_delay=None,
) -> Ended:
    return Ended(direction, status, hangup_cause, error_code, duration, answer_delay, setup_delay, "call-id")


# --- Label caps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "causes, counts, folded",
    [
        # values beyond the label limit fold into `other`, and each fold is counted
        (("a", "b", "c", "d", "e", "d", "a"), {"a": 2, "b": 1, "c": 1, "other": 3}, 3),
        # null and empty values export as `none` without using up the cap
        ((None, "", "a", "b", "c", None), {"none": 3, "a": 1, "b": 1, "c": 1}, 0),
    ],
    ids=["beyond_the_limit_fold_into_other", "null_and_empty_are_none_outside_the_cap"],
)
def test_hangup_causes_under_a_cap_of_three(causes, counts, folded):
    store = Store(label_limit=3)
    store.count([ended(cause) for cause in causes])
    assert {k: v for k, v in store.counters[HANGUPS].items() if v} == {
        (OUT, "completed", cause): n for cause, n in counts.items()
    }
    assert store.counters[OVERFLOW] == {("hangup_cause",): folded, ("error_code",): 0, ("status",): 0}


def test_values_already_seen_keep_their_own_label_once_the_cap_is_full():
    store = Store(label_limit=2)
    assert [store.capped("error_code", v) for v in ("x", "y", "z", "x", "y", "z")] == [
        "x",
        "y",
        "other",
        "x",
        "y",
        "other",
    ]
    assert store.counters[OVERFLOW] == {("hangup_cause",): 0, ("error_code",): 2, ("status",): 0}


def test_each_capped_label_has_its_own_cap():
    store = Store(label_limit=1)
    store.count([ended("hang", "err"), ended("hang2", "err2")])
    assert store.counters[HANGUPS] == {(OUT, "completed", "hang"): 1, (OUT, "completed", "other"): 1}
    assert store.counters[ERRORS] == {(OUT, "err"): 1, (OUT, "other"): 1}
    assert store.counters[OVERFLOW] == {("hangup_cause",): 1, ("error_code",): 1, ("status",): 0}


# --- Buckets --------------------------------------------------------------------------------------


def test_an_observation_equal_to_a_bound_goes_in_that_bucket():
    store = Store(buckets={DURATION: (0, 5, 10)})
    for value in (0, 5, 5.5, 10, 11, 3600):
        store.observe(DURATION, (OUT, "completed"), value)
    # per-bucket counts for le=0, le=5, le=10, then +Inf, then the sum
    assert store.histograms[DURATION][(OUT, "completed")] == [1, 1, 2, 2, 3631.5]


def test_default_duration_buckets_are_those_of_the_spec():
    assert Store().buckets[DURATION] == (0, 5, 10, 20, 30, 60, 120, 180, 300, 600, 1200, 1800, 3600)
    assert Store().buckets["callingbox_call_answer_delay_seconds"] == (0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 45, 60)


# --- Serialisation --------------------------------------------------------------------------------


def busy_store() -> Store:
    store = Store(label_limit=3)
    store.count(
        [
            Created(OUT),
            Created(IN),
            ended("normal_clearing", None, duration=61, answer_delay=5.5, setup_delay=2.0),
            ended(None, "invalid_number", status="failed"),
            ended("a"),
            ended("b"),
            ended("c", direction=IN, status="busy", duration=0),
            Billed(OUT, 62, 123_457),
            Billed(IN, None, 1),
            WebhookOutcome("delivered"),
            WebhookOutcome("failed"),
            ExtractionOutcome("completed"),
        ]
    )
    store.inc("callingbox_exporter_api_requests_total", ("200",))
    store.inc("callingbox_exporter_invalid_records_total", ("bad_type",), 2)
    store.observe("callingbox_exporter_poll_duration_seconds", (), 0.3)
    return store


def test_store_round_trips_through_json():
    store = busy_store()
    restored, reset = Store.from_json(json.loads(json.dumps(store.to_json())), label_limit=3)
    assert reset == []
    assert restored.counters == store.counters
    assert restored.histograms == store.histograms
    assert (
        restored.seen
        == store.seen
        == {
            "hangup_cause": {"normal_clearing", "a", "b"},
            "error_code": {"invalid_number"},
            "status": set(),  # only statuses outside the docs take a place under the cap
        }
    )


def test_restored_store_keeps_folding_into_other_where_it_left_off():
    restored, _ = Store.from_json(json.loads(json.dumps(busy_store().to_json())), label_limit=3)
    restored.count([ended("b"), ended("new")])
    assert restored.counters[HANGUPS][(OUT, "completed", "b")] == 2
    assert (
        restored.counters[HANGUPS][(OUT, "completed", "other")] == 1
    )  # "new" folds now; "c" folded under inbound busy
    assert restored.counters[HANGUPS][(IN, "busy", "other")] == 1
    assert restored.counters[OVERFLOW] == {("hangup_cause",): 2, ("error_code",): 0, ("status",): 0}


def test_histograms_whose_buckets_changed_are_reported_and_restart_from_zero():
    saved = json.loads(json.dumps(busy_store().to_json()))
    restored, reset = Store.from_json(saved, buckets={DURATION: (1.0, 2.0, 3.0)})
    assert reset == [DURATION]
    assert restored.histograms[DURATION] == {(d, s): [0, 0, 0, 0, 0.0] for d in (OUT, IN) for s in TERMINAL}
    # the unchanged histograms and all counters are restored
    assert (
        restored.histograms["callingbox_call_answer_delay_seconds"]
        == busy_store().histograms["callingbox_call_answer_delay_seconds"]
    )
    assert restored.counters == busy_store().counters


# --- Today's totals -------------------------------------------------------------------------------


def call(call_id: str, status="completed", duration=None, cause="normal_clearing", error=None) -> Ended:
    return Ended(OUT, status, cause, error, duration, 1.5, 2.5, call_id)


def test_today_totals_count_created_terminal_statuses_and_money_since_midnight_utc():
    store = Store()
    midnight = 20_000 * 86_400.0
    store.count(
        [Created(OUT), Created(IN), call("a"), call("b", status="failed"), Billed(OUT, 60, 2_500, "a")],
        now=midnight + 100,
    )
    store.count([call("c", status="failed")], now=midnight + 86_399)
    assert store.today_totals(midnight + 86_399.5) == {"created": 2, "completed": 1, "failed": 2, "milli_cents": 2_500}
    assert store.today_totals(midnight + 86_400) == {}  # a new day with nothing counted yet
    store.count([call("d", status="busy")], now=midnight + 86_400 + 5)
    assert store.today_totals(midnight + 86_400 + 6) == {"busy": 1}
    assert store.counters["callingbox_calls_ended_total"][(OUT, "failed")] == 2  # the counters never reset


def test_today_totals_survive_the_state_file_round_trip():
    store = Store()
    store.count([Created(OUT), call("a")], now=NOW)
    restored, _ = Store.from_json(json.loads(json.dumps(store.to_json())))
    assert restored.today_totals(NOW + 1) == {"created": 1, "completed": 1}
    legacy = store.to_json()
    del legacy["today"]  # a state file written before today's totals existed
    assert Store.from_json(json.loads(json.dumps(legacy)))[0].today_totals(NOW) == {}


# --- Metadata labels ------------------------------------------------------------------------------


def campaign_call(campaign, status="completed", direction=OUT, call_id="c1") -> list:
    extra = (campaign,)
    return [Created(direction, extra), Ended(direction, status, "normal_clearing", None, 30, 1.0, 2.0, call_id, extra)]


def test_metadata_values_become_a_capped_label_on_call_series_only():
    store = Store(label_limit=2, extra_labels=("campaign",))
    for campaign in ("spring", "autumn", "winter", None, "spring"):
        store.count(campaign_call(campaign))
    assert store.counters["callingbox_calls_created_total"] == {
        (OUT, "none"): 1,
        (IN, "none"): 0,
        (OUT, "spring"): 2,
        (OUT, "autumn"): 1,
        (OUT, "other"): 1,
    }
    assert store.counters["callingbox_calls_ended_total"][(OUT, "completed", "spring")] == 2
    # winter's creation and end folded; the other capped labels exist at 0
    assert store.counters[OVERFLOW] == {("hangup_cause",): 0, ("error_code",): 0, ("status",): 0, ("campaign",): 2}
    # a new campaign's terminal and delivery series exist at 0 from its first call
    assert store.counters["callingbox_calls_ended_total"][(OUT, "failed", "autumn")] == 0
    assert store.counters["callingbox_webhook_deliveries_total"][("failed", "autumn")] == 0
    assert "callingbox_exporter_polls_total" in store.counters and all(
        len(k) == 1 for k in store.counters["callingbox_exporter_polls_total"]
    )


def test_a_restore_under_other_metadata_labels_sums_exactly():
    store = Store(extra_labels=("campaign", "tier"))
    store.count([Created(OUT, ("a", "gold")), Created(OUT, ("a", "silver")), Created(OUT, ("b", "gold"))])
    saved = json.loads(json.dumps(store.to_json()))
    dropped, _ = Store.from_json(saved, extra_labels=("campaign",))
    assert dropped.counters["callingbox_calls_created_total"][(OUT, "a")] == 2
    assert dropped.counters["callingbox_calls_created_total"][(OUT, "b")] == 1
    swapped, _ = Store.from_json(saved, extra_labels=("tier", "region"))
    assert swapped.counters["callingbox_calls_created_total"][(OUT, "gold", "none")] == 2
    none, _ = Store.from_json(saved)
    assert none.counters["callingbox_calls_created_total"][(OUT,)] == 3
    assert dropped.seen["campaign"] == {"a", "b"}


# --- Family names ---------------------------------------------------------------------------------


def test_the_store_refuses_a_family_the_catalogue_does_not_name():
    """A misspelt family name is an error, not a silent new series."""
    store = Store()
    with pytest.raises(KeyError, match="callingbox_calls_endd_total"):
        store.inc("callingbox_calls_endd_total", ("outbound", "completed"))
    with pytest.raises(KeyError, match="callingbox_call_duration"):
        store.observe("callingbox_call_duration", ("outbound", "completed"), 3)
    assert "callingbox_calls_endd_total" not in store.counters
