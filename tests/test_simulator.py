"""The simulator is the yardstick for every end-to-end test, so it is tested on its own:
the API shape of SPEC §1, lifecycles that end, faults as documented, and a truth that matches
what the API serves. Everything runs over real loopback HTTP against `serve_in_thread`.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter

import aiohttp
import pytest

from exporter.simulator import TERMINAL, Simulator, serve_in_thread
from helpers import api_get, iso_seconds, list_calls, wait_until

# The fields of SPEC §1's call object, written out here rather than taken from the exporter.
SPEC_FIELDS = set(
    """
    id to_number from_number status direction prompt context returns result result_status result_error
    language webhook_url webhook_status webhook_error created_at started_at answered_at ended_at
    duration_seconds billed_duration_seconds billing_amount_milli_cents reservation_status error_code
    error_message hangup_cause metadata updated_at
    """.split()
)
STATUSES = TERMINAL | {"queued", "initiated", "ringing", "in_progress"}
FAST = {"time_scale": 1000.0, "webhook_retry_base": 0.01}  # a call's whole life in a few seconds


def post(url: str, body: object) -> tuple[int, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def aiohttp_list(url: str, timeout: float = 5.0) -> bytes:
    """Read the list as the exporter would; raises what aiohttp raises."""

    async def fetch() -> bytes:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(f"{url}/v1/calls") as response:
                return await response.read()

    return asyncio.run(fetch())


def is_call(item: object) -> bool:
    try:
        return (
            isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and item.get("status") in STATUSES
            and isinstance(iso_seconds(item["created_at"]), float)
            and (item["duration_seconds"] is None or isinstance(item["duration_seconds"], int))
        )
    except (ValueError, TypeError, AttributeError):
        return False


def test_list_is_a_descending_array_of_complete_records():
    sim = Simulator(seed=1, rate=200, max_calls=30, time_scale=50)
    with serve_in_thread(sim) as url:
        wait_until(lambda: len(list_calls(url)) == 30, 5, "30 calls listed")
        status, headers, body = api_get(f"{url}/v1/calls")
    records = json.loads(body)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert all(SPEC_FIELDS | {"api_version", "voicemail_detected", "cost_breakdown"} <= set(r) for r in records)
    created = [iso_seconds(r["created_at"]) for r in records]
    assert created == sorted(created, reverse=True)
    assert all(r["created_at"].endswith("Z") and len(r["created_at"]) == 24 for r in records)
    assert 700 < len(body) / len(records) < 2000  # about 1 KB a record


def test_every_call_becomes_final_and_truth_matches_what_the_api_shows():
    odd_causes = ['say "hi"', "back\\slash", "new\nline", ""]
    sim = Simulator(seed=2, rate=200, max_calls=40, replay_share=0.5, hangup_causes=odd_causes, **FAST)
    with serve_in_thread(sim) as url:
        wait_until(sim.all_final, 15, "every call final")
        records = list_calls(url)
    truth = sim.truth(0)

    assert len(records) == 40 and truth.total("callingbox_calls_created_total") == 40
    assert all(r["status"] in TERMINAL and r["reservation_status"] != "reserved" for r in records)
    assert all(r["webhook_status"] != "pending" and r["result_status"] != "pending" for r in records)
    by_status = Counter((r["direction"], r["status"]) for r in records)
    assert {
        (dict(k[1])["direction"], dict(k[1])["status"]): v
        for k, v in truth.counters.items()
        if k[0] == "callingbox_calls_ended_total"
    } == by_status
    causes = {dict(k[1])["hangup_cause"] for k in truth.counters if k[0] == "callingbox_call_hangups_total"}
    assert causes <= {'say "hi"', "back\\slash", "new\nline", "none"}
    billed = sum(r["billing_amount_milli_cents"] for r in records)
    assert truth.total("callingbox_billed_amount_milli_cents") == billed
    for status in ("completed", "failed"):
        assert truth.total("callingbox_result_extractions_total", status=status) == sum(
            r["result_status"] == status for r in records
        )
    # A replayed delivery counts again, so deliveries can only exceed the final states.
    finished = sum(r["webhook_status"] in ("delivered", "failed") for r in records)
    assert truth.total("callingbox_webhook_deliveries_total") >= finished > 0
    assert sim.truth(time.time()).counters == {}


def test_same_seed_gives_the_same_calls():
    ids = []
    for _ in range(2):
        sim = Simulator(seed=3, rate=500, max_calls=5, **FAST)
        with serve_in_thread(sim) as url:
            wait_until(lambda: len(list_calls(url)) == 5, 5, "5 calls")
            ids.append([r["id"] for r in list_calls(url)])
    assert ids[0] == ids[1]


@pytest.mark.parametrize(
    "kind, params, code, content_type",
    [
        ("status", {"code": 502}, 502, "application/json"),
        ("429", {"retry_after": 3}, 429, "application/json"),
        ("unauthorized", {}, 401, "application/json"),
        ("non_json", {}, 200, "text/html"),
    ],
)
def test_response_faults_answer_as_documented(kind, params, code, content_type):
    sim = Simulator(rate=0)
    with serve_in_thread(sim) as url:
        sim.inject(kind, **params)
        status, headers, body = api_get(f"{url}/v1/calls")
        assert (status, headers["Content-Type"].split(";")[0]) == (code, content_type)
        if content_type == "application/json":
            assert "error" in json.loads(body)
        if kind == "429":
            assert headers["Retry-After"] == "3"
        assert list_calls(url) == []  # one request only


def test_faults_queue_fifo_and_hit_only_list_requests():
    sim = Simulator(rate=0)
    with serve_in_thread(sim) as url:
        sim.inject("status", 2, code=503)
        sim.inject("429")
        assert api_get(f"{url}/v1/calls/nope")[0] == 404
        assert [api_get(f"{url}/v1/calls")[0] for _ in range(4)] == [503, 503, 429, 200]


def test_reset_and_truncate_are_connection_errors_for_the_client():
    sim = Simulator(rate=0, history=2000)
    with serve_in_thread(sim) as url:
        # aiohttp (>= 3.9) silently retries an idempotent GET once on a dropped connection,
        # so it takes two resets for the client to see one.
        sim.inject("reset", count=2)
        with pytest.raises(aiohttp.ClientConnectionError):
            aiohttp_list(url)
        assert sim.stats["list_requests"] == 2
        with pytest.raises(ConnectionError):  # http.client: RemoteDisconnected or reset
            sim.inject("reset")
            urllib.request.urlopen(f"{url}/v1/calls", timeout=5)
        sim.inject("truncate")
        with pytest.raises(aiohttp.ClientPayloadError):
            aiohttp_list(url)
        assert 0 < sim.stats["last_list_bytes"] < 2000 * 1500 * 0.75
        assert len(json.loads(aiohttp_list(url))) == 2000


def test_timeout_holds_the_answer_past_the_client_deadline():
    sim = Simulator(rate=0)
    with serve_in_thread(sim) as url:
        sim.inject("timeout", delay=2.0)
        with pytest.raises(asyncio.TimeoutError):
            aiohttp_list(url, timeout=0.3)  # the client gives up first
        sim.inject("timeout", delay=1.0)
        started = time.monotonic()
        assert json.loads(aiohttp_list(url, timeout=60)) == []  # a patient client gets the answer, late
        assert time.monotonic() - started >= 1.0
        assert json.loads(aiohttp_list(url)) == []  # the fault is spent
        assert sim.stats["list_requests"] == 3


def test_trickle_dribbles_the_list_start_a_byte_at_a_time_then_drops_the_connection():
    """Each gap is shorter than a between-bytes timeout; the whole is bounded by `duration`."""
    sim = Simulator(rate=0, history=5)
    with serve_in_thread(sim) as url:
        whole = api_get(f"{url}/v1/calls")[2]
        sim.inject("trickle", every=0.2, duration=1.0)

        async def dribbled() -> tuple[bytes, list[float]]:
            received, gaps = b"", []
            timeout = aiohttp.ClientTimeout(total=10, sock_read=0.5)  # never silent for 0.5 s
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(f"{url}/v1/calls") as response:
                    assert response.status == 200
                    last = time.monotonic()
                    with pytest.raises(aiohttp.ClientPayloadError):  # dropped before the end
                        while chunk := await response.content.read(1024):
                            received += chunk
                            gaps.append(time.monotonic() - last)
                            last = time.monotonic()
            return received, gaps

        started = time.monotonic()
        received, gaps = asyncio.run(dribbled())
        assert time.monotonic() - started < 3.0, "bounded by its duration"
        assert 3 <= len(received) <= 6 and whole.startswith(received) and received.startswith(b"[{")
        assert max(gaps[1:]) < 0.5 and min(gaps[1:]) >= 0.15, gaps
        assert json.loads(aiohttp_list(url)) == json.loads(whole)  # the fault is spent


def test_malformed_records_sit_among_real_ones_and_stay_out_of_truth():
    sim = Simulator(seed=4, rate=500, max_calls=20, **FAST)
    with serve_in_thread(sim) as url:
        wait_until(sim.all_final, 10, "every call final")
        sim.inject("malformed", n=7)
        items = list_calls(url)
        assert len(list_calls(url)) == 20  # the next response is clean
    assert len(items) == 27 and sum(map(is_call, items)) == 20
    assert {type(i).__name__ for i in items if not is_call(i)} == {"str", "int", "dict"}
    assert sim.truth(0).total("callingbox_calls_created_total") == 20


def test_duplicates_repeat_records_right_after_themselves():
    sim = Simulator(seed=5, rate=500, max_calls=20, **FAST)
    with serve_in_thread(sim) as url:
        wait_until(lambda: len(list_calls(url)) == 20, 5, "20 calls")
        sim.inject("duplicates", n=4)
        ids = [r["id"] for r in list_calls(url)]
    assert len(ids) == 24 and len(set(ids)) == 20
    assert sum(a == b for a, b in zip(ids, ids[1:])) == 4


def test_a_key_is_required_when_configured():
    sim = Simulator(rate=0, api_key="sk_test_123")
    with serve_in_thread(sim) as url:
        status, _, body = api_get(f"{url}/v1/calls")
        assert (status, json.loads(body)) == (401, {"error": "invalid api key"})
        assert api_get(f"{url}/v1/calls", {"Authorization": "Bearer sk_wrong"})[0] == 401
        assert api_get(f"{url}/v1/calls", {"Authorization": "Bearer sk_test_123"})[0] == 200


def test_calls_by_id_post_and_delete():
    sim = Simulator(rate=0)
    with serve_in_thread(sim) as url:
        assert post(f"{url}/v1/calls", {"prompt": "hi"}) == (400, {"error": "to_number is required"})
        status, created = post(f"{url}/v1/calls", {"to_number": "+15550100", "webhook_url": None})
        assert status == 201 and created["status"] == "queued" and created["to_number"] == "+15550100"
        status, _, body = api_get(f"{url}/v1/calls/{created['id']}")
        assert status == 200 and json.loads(body)["id"] == created["id"]
        assert sim.delete(created["id"])
        status, _, body = api_get(f"{url}/v1/calls/{created['id']}")
        assert (status, json.loads(body)) == (404, {"error": f"call {created['id']} not found"})
        assert sim.stats["by_id_requests"] == 2


def test_history_calls_are_old_final_and_counted_in_truth():
    sim = Simulator(seed=6, rate=0, history=50, history_age=86400.0)
    with serve_in_thread(sim) as url:
        records = list_calls(url)
    assert len(records) == 50 and all(is_call(r) for r in records)
    assert all(r["status"] == "completed" and r["reservation_status"] == "settled" for r in records)
    assert all(r["webhook_status"] in (None, "delivered") for r in records)
    created = [iso_seconds(r["created_at"]) for r in records]
    assert created == sorted(created, reverse=True) and max(created) < time.time() - 86400
    assert sim.truth(0).total("callingbox_calls_created_total") == 50
    assert sim.truth(time.time() - 3600).counters == {}


def test_a_client_that_stops_reading_stops_the_stream():
    sim = Simulator(rate=0, history=100_000)  # ~120 MB if read whole
    with serve_in_thread(sim) as url:
        with urllib.request.urlopen(f"{url}/v1/calls", timeout=5) as response:
            head = response.read(8192)
        assert head.startswith(b'[{"id":')
        wait_until(lambda: sim.stats["client_closed_early"] == 1, 10, "the server to notice the close")
        assert sim.stats["bytes_sent"] < 30_000_000


def test_late_commit_hides_each_change_for_a_while():
    sim = Simulator(seed=7, rate=0, late_commit=1.0)
    with serve_in_thread(sim) as url:
        status, created = post(f"{url}/v1/calls", {"to_number": "+15550100"})
        posted = time.monotonic()
        assert api_get(f"{url}/v1/calls/{created['id']}")[0] == 404
        wait_until(lambda: api_get(f"{url}/v1/calls/{created['id']}")[0] == 200, 3, "the call to show")
        assert time.monotonic() - posted > 0.4

    sim = Simulator(seed=7, rate=100, max_calls=30, time_scale=100, late_commit=1.0)
    with serve_in_thread(sim) as url:
        reads, seen = 0, set()

        def changes_seen() -> bool:
            nonlocal reads
            records = list_calls(url)
            answered = time.time()
            # Every version a reader sees was written at least late_commit / 2 before.
            assert all(iso_seconds(r["updated_at"]) <= answered - 0.5 for r in records)
            reads += 1
            seen.update(r["status"] for r in records)
            return reads >= 6 and bool(seen - {"queued"})

        wait_until(changes_seen, 15, "a change past queued")  # changes do arrive, just late


def test_outcome_weights_set_the_mix_and_change_at_run_time():
    with pytest.raises(ValueError):
        Simulator(outcome_weights={"on_hold": 1})
    sim = Simulator(seed=8, rate=1000, max_calls=200, outcome_weights={"completed": 1}, **FAST)
    with pytest.raises(ValueError):
        sim.set_outcome_weights({"failed": 0})
    with serve_in_thread(sim) as url:
        wait_until(lambda: len(list_calls(url)) == 200, 5, "200 calls created")
        sim.set_outcome_weights({"failed": 3, "busy": 1})  # only calls created from now on
        for _ in range(100):
            post(f"{url}/v1/calls", {"to_number": "+15550100"})
        wait_until(sim.all_final, 15, "every call final")
        records = list_calls(url)
    later, first = Counter(r["status"] for r in records[:100]), Counter(r["status"] for r in records[100:])
    assert first == {"completed": 200}
    assert set(later) == {"failed", "busy"} and later["failed"] > later["busy"]


def test_campaigns_are_drawn_from_the_given_list_and_it_can_change_at_run_time():
    sim = Simulator(seed=9, rate=1000, max_calls=60, campaigns=["spring", "summer"], **FAST)
    with serve_in_thread(sim) as url:
        wait_until(lambda: len(list_calls(url)) == 60, 5, "60 calls created")
        sim.campaigns = ["autumn"]  # calls created from now on
        for _ in range(10):
            post(f"{url}/v1/calls", {"to_number": "+15550100"})
        records = list_calls(url)
    later, first = (
        Counter(r["metadata"]["campaign"] for r in records[:10]),
        Counter(r["metadata"]["campaign"] for r in records[10:]),
    )
    assert set(first) == {"spring", "summer"} and later == {"autumn": 10}
