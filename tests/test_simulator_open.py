"""The simulator plays what the API docs leave open (SPEC §1) on demand, and its truth counts it
by SPEC §3/§4's words: each option is served over loopback HTTP and seen there, then the truth
is checked against the records served and against hand-written histories.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter

import pytest

from exporter.simulator import Simulator, serve_in_thread
from exporter.simulator.contract import Contract
from exporter.simulator.truth import is_terminal, ledger
from helpers import api_get, iso_seconds, list_calls, wait_until

FAST = {"time_scale": 1000.0, "webhook_retry_base": 0.01}  # a call's whole life in a few seconds
STAMP_FIELDS = ("created_at", "started_at", "answered_at", "ended_at", "updated_at")


class Recording(Simulator):
    """The simulator keeping every version it commits: the API shows only the latest."""

    def __init__(self, **options):
        super().__init__(**options)
        self.versions: dict[str, list[dict]] = {}

    def _commit(self, call, record, visible_at, now):
        self.versions.setdefault(call.id, []).append(record)
        super()._commit(call, record, visible_at, now)


def watch(sim: Simulator, url: str, timeout: float = 20) -> dict[str, list[dict]]:
    """Read the list until every call is final: the distinct versions a fast reader saw, per call."""
    seen: dict[str, list[dict]] = {}
    deadline = time.monotonic() + timeout
    while True:
        done = sim.all_final()  # before the read, so the last read shows every call final
        for record in list_calls(url):
            versions = seen.setdefault(record["id"], [])
            if not versions or versions[-1] != record:
                versions.append(record)
        if done:
            return seen
        assert time.monotonic() < deadline, f"calls not final after {timeout}s"
        time.sleep(0.02)


def first_terminal(versions: list[dict]) -> dict:
    return next(v for v in versions if is_terminal(v))


def tally(truth, name: str, *labels: str) -> Counter:
    """A truth counter summed by some of its labels."""
    found: Counter = Counter()
    for (metric, pairs), value in truth.counters.items():
        if metric == name:
            found[tuple(dict(pairs)[label] for label in labels)] += value
    return found


def observations(truth, name: str) -> list[float]:
    return sorted(v for (metric, _), values in truth.observations.items() if metric == name for v in values)


def hangups(truth) -> Counter:
    return tally(truth, "callingbox_call_hangups_total", "status", "hangup_cause")


def test_late_end_details_come_after_the_terminal_version_and_count_their_real_values():
    sim = Recording(seed=21, rate=200, max_calls=30, late_end_details=1.0, late_detail_delay=1.0, **FAST)
    with serve_in_thread(sim) as url:
        seen = watch(sim, url)
    final = {call_id: versions[-1] for call_id, versions in seen.items()}
    # A reader sees calls ended without their cause, and the cause later.
    assert any(first_terminal(v)["hangup_cause"] is None for v in seen.values() if any(map(is_terminal, v)))
    for call_id, versions in sim.versions.items():
        end = first_terminal(versions)
        assert all(
            end[k] is None
            for k in (
                "hangup_cause",
                "error_code",
                "duration_seconds",
                "answered_at",
                "billed_duration_seconds",
                "billing_amount_milli_cents",
            )
        )
        complete = next(
            v for v in versions if v["hangup_cause"] is not None and v["billing_amount_milli_cents"] is not None
        )
        assert versions.index(complete) > versions.index(end)
        assert (
            iso_seconds(complete["updated_at"]) - iso_seconds(end["updated_at"]) <= 1.0 + 1.0
        )  # within the delay (+ a stalled tick)
        assert final[call_id]["hangup_cause"] is not None
    # Sometimes all at once, sometimes the cause first and the bill in a later version.
    cause_first = [
        any(v["hangup_cause"] and v["billed_duration_seconds"] is None for v in vs) for vs in sim.versions.values()
    ]
    assert 0 < sum(cause_first) < len(cause_first)
    answered = [r for r in final.values() if r["status"] == "completed"]
    assert answered and all(r["answered_at"] for r in answered)

    truth = sim.truth(0)
    assert hangups(truth) == Counter((r["status"], r["hangup_cause"]) for r in final.values())
    assert truth.total("callingbox_call_errors_total") == sum(r["error_code"] is not None for r in final.values())
    assert truth.total("callingbox_billed_amount_milli_cents") == sum(
        r["billing_amount_milli_cents"] for r in final.values()
    )
    delays = observations(truth, "callingbox_call_answer_delay_seconds")
    assert sorted(delays) == sorted(iso_seconds(r["answered_at"]) - iso_seconds(r["started_at"]) for r in answered)


def test_outcomes_without_their_subject_are_served_but_never_counted():
    sim = Recording(seed=22, rate=200, max_calls=40, subjectless_outcomes=True, **FAST)
    with serve_in_thread(sim) as url:
        seen = watch(sim, url)
    records = [versions[-1] for versions in seen.values()]
    unhooked = [call_id for call_id, vs in sim.versions.items() if vs[0]["webhook_url"] is None]
    assert unhooked and all(v["webhook_status"] == "pending" for i in unhooked for v in sim.versions[i])
    assert all(r["returns"] is not None for r in records)
    empty = Counter(r["result_status"] for r in records if r["returns"] == {})
    assert empty["completed"] > 0 and set(empty) <= {"completed", "failed"}

    truth = sim.truth(0)
    for status in ("delivered", "failed"):
        assert truth.total("callingbox_webhook_deliveries_total", status=status) == sum(
            r["webhook_status"] == status for r in records if r["webhook_url"]
        )
    for status in ("completed", "failed"):
        assert truth.total("callingbox_result_extractions_total", status=status) == sum(
            r["result_status"] == status for r in records if r["returns"]
        )


def test_undocumented_statuses_are_terminal_with_ended_at_and_active_without():
    sim = Recording(
        seed=23,
        rate=200,
        max_calls=60,
        undocumented_status=1.0,
        outcome_weights={"no_answer": 1, "completed": 1},
        **FAST,
    )
    with serve_in_thread(sim) as url:
        seen = watch(sim, url)
    records = [versions[-1] for versions in seen.values()]
    assert Counter(r["status"] for r in records).keys() == {"voicemail", "completed"}
    assert all(r["ended_at"] and r["hangup_cause"] == "voicemail" for r in records if r["status"] == "voicemail")
    paths = [[v["status"] for v in vs] for vs in sim.versions.values()]
    dialing = [p for p in paths if "dialing" in p]
    assert dialing and all(
        p[p.index("dialing") - 1 : p.index("dialing") + 2] == ["initiated", "dialing", "ringing"] for p in dialing
    )
    assert all(v["ended_at"] is None for vs in sim.versions.values() for v in vs if v["status"] == "dialing")

    truth = sim.truth(0)
    ended = tally(truth, "callingbox_calls_ended_total", "status")
    assert ended == Counter((r["status"],) for r in records)  # voicemail counted, dialing never
    assert hangups(truth)[("voicemail", "voicemail")] == ended[("voicemail",)]
    assert truth.total("callingbox_billed_amount_milli_cents") == sum(r["billing_amount_milli_cents"] for r in records)


def test_whole_second_timestamps_have_no_fraction_and_are_shared_by_versions():
    sim = Recording(seed=24, rate=200, max_calls=20, history=5, whole_seconds=True, **FAST)
    with serve_in_thread(sim) as url:
        seen = watch(sim, url)
    records = [versions[-1] for versions in seen.values()]
    assert len(records) == 25
    whole = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
    assert all(whole.match(r[k]) for r in records for k in STAMP_FIELDS if r[k] is not None)
    assert any(a["updated_at"] == b["updated_at"] for vs in sim.versions.values() for a, b in zip(vs, vs[1:]))
    # The truth dates events by the stamps as written: a call created in the second `after`
    # names is not after it, though it happened a fraction later.
    live = [r for r in records if r["id"] in sim.versions]
    after = iso_seconds(live[len(live) // 2]["created_at"])
    assert sim.truth(after).total("callingbox_calls_created_total") == sum(
        iso_seconds(r["created_at"]) > after for r in live
    )


def test_a_settled_call_may_lack_its_amount_which_counts_once_when_it_comes():
    sim = Recording(seed=25, rate=200, max_calls=20, amount_lag=1.0, outcome_weights={"completed": 1}, **FAST)
    with serve_in_thread(sim) as url:
        seen = watch(sim, url)
    assert any(
        v["reservation_status"] == "settled" and v["billing_amount_milli_cents"] is None
        for vs in seen.values()
        for v in vs
    ), "a reader sees a settled call without its amount"
    for versions in sim.versions.values():
        settled = next(v for v in versions if v["reservation_status"] == "settled")
        priced = next(v for v in versions if v["billing_amount_milli_cents"] is not None)
        assert settled["billing_amount_milli_cents"] is None and settled["billed_duration_seconds"] is not None
        assert versions.index(priced) > versions.index(settled)

    records = [versions[-1] for versions in seen.values()]
    truth = sim.truth(0)
    assert truth.total("callingbox_billed_amount_milli_cents") == sum(r["billing_amount_milli_cents"] for r in records)
    billed = observations(truth, "callingbox_call_billed_duration_seconds")
    assert sorted(billed) == sorted(r["billed_duration_seconds"] for r in records)


def test_by_id_reads_lag_the_list_and_fail_while_the_list_answers():
    sim = Simulator(seed=26, rate=200, max_calls=5, by_id_not_found=1.0, **FAST)
    with serve_in_thread(sim) as url:
        ids = [r["id"] for r in wait_until(lambda: len(list_calls(url)) == 5 and list_calls(url), 5)]
        for call_id in ids:
            status, _, body = api_get(f"{url}/v1/calls/{call_id}")
            assert (status, json.loads(body)) == (404, {"error": f"call {call_id} not found"})
        assert sim.stats["by_id_lagged"] == 5

    sim = Simulator(seed=27, rate=200, max_calls=5, by_id_faults=1.0, **FAST)
    with serve_in_thread(sim) as url:
        call_id = wait_until(lambda: list_calls(url), 5)[0]["id"]
        answers = [api_get(f"{url}/v1/calls/{call_id}") for _ in range(30)]
        assert {status for status, _, _ in answers} == {429, 503}
        assert all(headers["Retry-After"] == "1" for status, headers, _ in answers if status == 429)
        assert api_get(f"{url}/v1/calls")[0] == 200  # the list is unaffected

    sim = Simulator(seed=28, rate=200, max_calls=5, by_id_not_found=0.5, **FAST)
    with serve_in_thread(sim) as url:
        call_id = wait_until(lambda: list_calls(url), 5)[0]["id"]
        assert {api_get(f"{url}/v1/calls/{call_id}")[0] for _ in range(40)} == {200, 404}


def test_docs_open_turns_everything_on_and_explicit_options_override():
    assert Simulator().contract == Contract()
    sim = Simulator(docs_open=True, whole_seconds=False, amount_lag=0.0, late_detail_delay=2.0)
    assert sim.contract == Contract(
        late_end_details=0.4,
        late_detail_delay=2.0,
        subjectless_outcomes=True,
        undocumented_status=0.05,
        whole_seconds=False,
        amount_lag=0.0,
        by_id_not_found=0.1,
        by_id_faults=0.05,
    )
    for bad in ({"late_end_details": 1.5}, {"by_id_faults": -0.1}, {"late_detail_delay": -1}, {"whole_seconds": 1}):
        with pytest.raises(ValueError):
            Simulator(**bad)


def test_docs_open_truth_matches_what_the_api_finally_shows():
    sim = Recording(
        seed=29, rate=300, max_calls=150, docs_open=True, late_end_details=0.6, undocumented_status=0.5, **FAST
    )
    with serve_in_thread(sim) as url:
        seen = watch(sim, url, timeout=30)
    records = [versions[-1] for versions in seen.values()]
    truth = sim.truth(0)
    assert truth.total("callingbox_calls_created_total") == 150
    ended = tally(truth, "callingbox_calls_ended_total", "direction", "status")
    assert ended == Counter((r["direction"], r["status"]) for r in records) and ended.keys() >= {
        ("outbound", "voicemail")
    }
    assert hangups(truth) == Counter((r["status"], r["hangup_cause"]) for r in records)
    assert truth.total("callingbox_billed_amount_milli_cents") == sum(r["billing_amount_milli_cents"] for r in records)
    assert truth.total("callingbox_webhook_deliveries_total") == sum(
        r["webhook_status"] in ("delivered", "failed") for r in records if r["webhook_url"]
    )
    assert truth.total("callingbox_result_extractions_total") == sum(
        r["result_status"] in ("completed", "failed") for r in records if r["returns"]
    )


def test_what_the_truth_counts_does_not_hang_on_which_versions_a_reader_sees():
    """An exporter polls: it misses versions. Played by SPEC's rules over any subset that keeps each
    outcome change (which the lifecycles hold long enough to be seen), the events are the truth's."""
    shares = {"late_end_details": 0.5, "undocumented_status": 0.3, "amount_lag": 0.5}
    sim = Recording(seed=30, rate=300, max_calls=600, time_scale=300, webhook_retry_base=0.05, docs_open=True, **shares)
    sim._next_arrival = start = 1_700_000_000.0
    for tick in range(4000):  # 100 s on a fake clock, no server needed
        sim._advance(start + tick * 0.025)
    assert sim.all_final() and len(sim.versions) == 600
    rng, truth = random.Random(30), Counter(map(repr, sim._events))
    for _ in range(5):
        seen: list = []
        for versions in sim.versions.values():
            prev = counted = None
            for i, version in enumerate(versions):
                outcome = ("webhook_status", "result_status")
                kept = i == len(versions) - 1 or i > 0 and any(version[k] != versions[i - 1][k] for k in outcome)
                if not kept and rng.random() < 0.7:
                    continue  # a poll missed it
                coming = version["hangup_cause"] is None and versions[-1]["hangup_cause"] is not None
                events, counted = ledger(prev, version, counted, coming)
                seen += events
                prev = version
        assert Counter(map(repr, seen)) == truth


# ---- the truth's rules on hand-written histories -------------------------------------------

T0 = "2024-05-01T10:00:00Z"
CALL = {
    "id": "c1",
    "direction": "outbound",
    "status": "queued",
    "created_at": T0,
    "updated_at": T0,
    "started_at": None,
    "answered_at": None,
    "ended_at": None,
    "hangup_cause": None,
    "error_code": None,
    "duration_seconds": None,
    "billed_duration_seconds": None,
    "billing_amount_milli_cents": None,
    "reservation_status": "reserved",
    "webhook_url": None,
    "webhook_status": None,
    "returns": None,
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
        coming = any(v.get("hangup_cause") for v in changes[i + 1 :])
        new, counted = ledger(versions[i - 1] if i else None, version, counted, coming)
        found += [(date - iso_seconds(T0), name, dict(labels), value) for date, name, labels, value, _ in new]
    return [e for e in found if e[1] != "callingbox_calls_created_total"]


def test_truth_voicemail_is_terminal_with_ended_at_and_dialing_is_not():
    assert events(
        {},
        {"status": "dialing"},
        RING,
        {
            "status": "voicemail",
            "hangup_cause": "voicemail",
            "duration_seconds": 28,
            "reservation_status": "released",
            "billing_amount_milli_cents": 0,
            "billed_duration_seconds": 0,
            **END,
        },
    ) == [
        (30, "callingbox_calls_ended_total", {"direction": "outbound", "status": "voicemail"}, 1),
        (
            30,
            "callingbox_call_hangups_total",
            {"direction": "outbound", "status": "voicemail", "hangup_cause": "voicemail"},
            1,
        ),
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
    assert [
        (n, lbl.get("hangup_cause"), v)
        for _, n, lbl, v in events(
            {"status": "failed", "reservation_status": "released", **END}, {"error_code": "x", **LATER}
        )
    ] == [
        ("callingbox_calls_ended_total", None, 1),
        ("callingbox_call_hangups_total", "none", 1),
        ("callingbox_billed_amount_milli_cents", None, 0),
        ("callingbox_call_errors_total", None, 1),
    ]


def test_truth_counts_outcomes_only_with_their_subject():
    outcomes = (
        {"webhook_status": "pending", "result_status": "pending", **END},
        {"webhook_status": "delivered", "result_status": "completed", **LATER},
    )
    assert [e for e in events({"returns": {}}, *outcomes) if "status" in e[2] and len(e[2]) == 1] == []
    subject = {"webhook_url": "https://hooks.example/cb", "returns": {"ok": "boolean"}}
    assert [(d, n, lbl) for d, n, lbl, _ in events(subject, *outcomes) if len(lbl) == 1] == [
        (31, "callingbox_webhook_deliveries_total", {"status": "delivered"}),
        (31, "callingbox_result_extractions_total", {"status": "completed"}),
    ]
