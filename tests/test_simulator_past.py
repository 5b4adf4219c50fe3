"""The simulator's past (`past=`, `past_rate=`): days of calls created before it started, played
through the ordinary lifecycles with their own past timestamps, so a backfill has a whole history
to read; and `freeze()` / `thaw()`, which hold the list still for a consistent snapshot.
Everything is read over loopback HTTP, and compared with `truth()` or with SPEC §1's words.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter

import pytest

from exporter.simulator import TERMINAL, Simulator, serve_in_thread
from helpers import api_get, iso_seconds, list_calls, wait_until

DAY = 86400.0


def post_call(url: str) -> str:
    request = urllib.request.Request(
        f"{url}/v1/calls", data=json.dumps({"to_number": "+15550100"}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())["id"]


def ended(records: list[dict]) -> Counter:
    """SPEC §4's recount of terminal transitions: every terminal version carries `ended_at`."""
    return Counter((r["direction"], r["status"]) for r in records if r["ended_at"] is not None)


def counted(truth, name: str, *labels: str) -> Counter:
    return Counter(
        {tuple(dict(key)[label] for label in labels): value for (n, key), value in truth.counters.items() if n == name}
    )


def test_ten_days_of_past_hold_every_lifecycle_with_past_timestamps():
    before = time.time()
    sim = Simulator(
        seed=11, rate=0, past=10 * DAY, past_rate=0.005, replay_share=0.3, history=20, history_age=10.5 * DAY
    )
    after = time.time()
    with serve_in_thread(sim) as url:
        records = list_calls(url)
        read_at = time.time()
    past, history = records[: sim.past_calls], records[sim.past_calls :]
    created = [iso_seconds(r["created_at"]) for r in records]

    assert sim.past_calls > 4000 and len(history) == 20
    assert created == sorted(created, reverse=True)  # the past sits between the live calls and the history
    assert before - 10 * DAY <= min(created[: sim.past_calls]) < before - 10 * DAY + 3600
    assert after - 3600 < max(created) < after
    assert all(iso_seconds(r["updated_at"]) <= read_at for r in records)
    assert {r["status"] for r in past} >= TERMINAL
    # Each step is stamped when it was due: the timestamps keep the lifecycle's spacing.
    answered = [r for r in past if r["status"] == "completed"]
    assert answered and all(
        abs(iso_seconds(r["ended_at"]) - iso_seconds(r["started_at"]) - r["duration_seconds"]) <= 1 for r in answered
    )
    assert any(r["result_status"] == "completed" for r in past) and any(r["result_status"] == "failed" for r in past)
    # Settled after the end: with no webhook and no extraction, only the settlement can come later.
    late = [r for r in past if r["ended_at"] and not r["webhook_url"] and not r["returns"]]
    assert any(r["updated_at"] > r["ended_at"] and r["reservation_status"] != "reserved" for r in late)
    assert any(r["updated_at"] == r["ended_at"] for r in late)  # and settled in the terminal update
    assert any((r["webhook_error"] or "").startswith("giving up after 8 attempts") for r in past)
    assert any(r["webhook_status"] == "pending" and "attempt" in (r["webhook_error"] or "") for r in past)
    assert any(r["webhook_error"] == "replay failed: HTTP 410" for r in past)
    truth = sim.truth(before - 10 * DAY - 1)
    outcomes = sum(r["webhook_status"] in ("delivered", "failed") for r in past if r["webhook_url"])
    assert truth.total("callingbox_webhook_deliveries_total") > outcomes  # a replay counts its outcome again
    assert truth.total("callingbox_calls_created_total") == sim.past_calls
    assert sim.truth(after).total("callingbox_calls_created_total") == 0  # no live calls at rate 0


@pytest.mark.parametrize("docs_open", [False, True])
def test_the_truth_of_a_frozen_past_is_a_recount_of_the_list(docs_open):
    sim = Simulator(seed=12, rate=5, past=2 * DAY, past_rate=0.01, time_scale=60, replay_share=0.2, docs_open=docs_open)
    start = time.time() - 2 * DAY - 1
    frozen_at = sim.freeze()  # before the start: no live call arrives either
    with serve_in_thread(sim) as url:
        records = list_calls(url)
    truth = sim.truth(start)

    assert len(records) == sim.past_calls > 1500
    assert counted(truth, "callingbox_calls_created_total", "direction") == Counter((r["direction"],) for r in records)
    assert counted(truth, "callingbox_calls_ended_total", "direction", "status") == ended(records)
    assert truth.total("callingbox_result_extractions_total") == sum(
        r["result_status"] in ("completed", "failed") for r in records if r["returns"]
    )
    assert sim.truth(frozen_at).counters == {}  # nothing is dated after the instant it stopped at
    if docs_open:  # the open behaviours are in the past too
        assert all(len(r["created_at"]) == 20 for r in records)  # whole seconds
        assert {"voicemail"} <= {r["status"] for r in records}
        assert any(r["webhook_status"] == "pending" and not r["webhook_url"] for r in records)


def test_superseded_versions_of_past_calls_are_dropped():
    sim = Simulator(seed=13, rate=0, past=3 * DAY, past_rate=0.01, time_scale=60, late_commit=2.0)
    cutoff = time.time() - DAY  # by then every older call is final and its last version shows
    old = [c for c in sim._calls.values() if iso_seconds(c.versions[0][1]["created_at"]) < cutoff]
    assert len(old) > 1000 and all(len(c.versions) == 1 and not c.steps for c in old)


def test_a_past_leaves_the_live_calls_as_they_were():
    ids = []
    for past in (0, 3600):
        sim = Simulator(seed=14, rate=500, max_calls=5, past=past, past_rate=0.1, time_scale=1000)
        with serve_in_thread(sim) as url:
            wait_until(lambda: len(list_calls(url)) == 5 + sim.past_calls, 5, "5 live calls")
            ids.append([r["id"] for r in list_calls(url)[:5]])
    assert ids[0] == ids[1]


@pytest.mark.parametrize(
    "options", [{"past": -1}, {"past_rate": -0.1}, {"past": 2 * DAY, "history": 5, "history_age": DAY}]
)
def test_a_past_that_cannot_be_is_refused(options):
    with pytest.raises(ValueError):
        Simulator(**options)
    Simulator(history=5, history_age=0.0)  # no past: any history age will do, as before


def test_thaw_moves_what_was_to_come_later_by_the_time_spent_frozen():
    sim = Simulator(seed=16, rate=0, late_commit=5.0)
    with serve_in_thread(sim) as url:
        call_id = post_call(url)
        call = sim._calls[call_id]
        frozen_at = sim.freeze()
        due, visible = [step.due for step in call.steps], [v for v, _ in call.versions]
        wait_until(lambda: time.time() > frozen_at + 0.3, 5, "wall time to pass", interval=0.05)
        delay = sim.thaw()
        assert [step.due for step in call.steps] == pytest.approx([d + delay for d in due], abs=1e-6)
        assert [v for v, _ in call.versions] == pytest.approx([v + delay for v in visible], abs=1e-6)
        assert api_get(f"{url}/v1/calls/{call_id}")[0] == 404  # still committed late, not yet shown


def test_freeze_holds_every_answer_still_and_thaw_resumes_without_dating_anything_inside():
    sim = Simulator(seed=15, rate=40, time_scale=100, webhook_retry_base=0.05, late_commit=0.2, past=600, past_rate=0.5)
    with serve_in_thread(sim) as url:
        wait_until(lambda: len(list_calls(url)) > sim.past_calls + 10, 5, "live calls")
        frozen_at = sim.freeze()
        listed, truth = api_get(f"{url}/v1/calls")[2], sim.truth(0).counters
        newest = list_calls(url)[0]["id"]
        one = api_get(f"{url}/v1/calls/{newest}")[2]
        wait_until(lambda: time.time() > frozen_at + 0.5, 5, "wall time to pass", interval=0.05)
        assert api_get(f"{url}/v1/calls")[2] == listed
        assert api_get(f"{url}/v1/calls/{newest}")[2] == one
        assert sim.truth(0).counters == truth and sim.freeze() == frozen_at

        delay = sim.thaw()
        assert delay >= 0.5 and sim.thaw() == 0.0
        wait_until(lambda: api_get(f"{url}/v1/calls")[2] != listed, 5, "the list to move again")
        wait_until(lambda: sim.truth(0).counters != truth, 5, "the truth to move again")
    # Stamps are floored to the millisecond: an event just after the thaw may read 1 ms early.
    assert sim.truth(frozen_at).counters == sim.truth(frozen_at + delay - 0.002).counters
