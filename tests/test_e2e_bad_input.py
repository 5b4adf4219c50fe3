"""Hostile input, end to end: malformed records, hostile label values, label floods, huge bodies.

The story: the API sends junk among good records, hangup causes that need escaping, ten
thousand distinct hangup causes, and an organization history of hundreds of megabytes. The
exporter skips and counts the junk, keeps the exposition valid and its label sets bounded, reads
only the settle window of a huge body, and its memory follows the calls it tracks, not the body.
"""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from test_e2e_exact import KEY, _config, settle_and_compare

from helpers import (
    differences,
    http_get,
    live_simulator,
    log_records,
    parse_metrics,
    sample_value,
    wait_until,
    wait_while_progressing,
)

# What records.decode_record may name as the reason a record is unreadable.
REASONS = {"not_object", "missing_field", "bad_type", "bad_value", "unknown_status", "bad_timestamp"}
# The simulator's malformed kinds: a string, a number, no id, numeric status, unknown status,
# unparseable created_at, duration_seconds as a string. Seven: each kind once, each distinct.
JUNK = 7
LABEL_CAP = 50  # SPEC §3: distinct values per free-text label by default; the rest are `other`
HANGUPS = "callingbox_call_hangups_total"
MIB = 1024 * 1024


def _series(samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """One metric's samples of org default, keyed by their other labels."""
    result = {}
    for (sample_name, labels), value in samples.items():
        if sample_name == name and dict(labels).get("org") == "default":
            result[tuple(kv for kv in labels if kv[0] != "org")] = value
    return result


def _total(samples, name: str) -> float:
    return sum(_series(samples, name).values())


def _polls(samples, result: str = "success") -> float:
    return sample_value(samples, "callingbox_exporter_polls_total", result=result)


def _slowest_scrape_until(exporter, predicate, progress, stall: float, message: str) -> float:
    """Scrape in a loop until `predicate` holds; every scrape must answer 200. The slowest one.

    Fails only once `progress()` has not changed for `stall` seconds: the work may take as long
    as the machine needs.
    """
    slowest = 0.0

    def scraped_until() -> bool:
        nonlocal slowest
        if predicate():
            return True
        started = time.monotonic()
        status, _ = http_get(exporter.url + "/metrics")
        slowest = max(slowest, time.monotonic() - started)
        assert status == 200
        return False

    wait_while_progressing(scraped_until, progress, stall, interval=0.05, message=message)
    return slowest


def _poll_durations(exporter) -> list[float]:
    """Seconds each poll took so far, from the `poll done` log lines."""
    return [float(r["duration_s"]) for r in log_records(exporter.log()) if r["msg"] == "poll done"]


def _more_polls(exporter, count: int, timeout: float) -> None:
    start = _polls(exporter.scrape())
    wait_until(lambda: _polls(exporter.scrape()) >= start + count, timeout, message=f"{count} more polls")


# ---- malformed records ---------------------------------------------------------------------


def test_malformed_records_are_counted_by_reason_and_skipped_while_the_rest_counts_exactly(stack):
    sim, url = stack.simulator(seed=31, rate=60, max_calls=90, time_scale=300, webhook_retry_base=0.01, api_key=KEY)
    exporter = stack.exporter(_config(url), env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(lambda: _total(exporter.scrape(), "callingbox_calls_created_total") > 0, 20, message="calls flowing")

    sim.inject("malformed", count=1, n=JUNK)
    wait_until(
        lambda: _total(exporter.scrape(), "callingbox_exporter_invalid_records_total") >= JUNK,
        20,
        message="the malformed records counted",
    )
    assert settle_and_compare(sim, exporter) == [], "the good records of that poll and all others count exactly"

    samples = exporter.scrape()
    invalid = {
        dict(labels)["reason"]: v for labels, v in _series(samples, "callingbox_exporter_invalid_records_total").items()
    }
    assert sum(invalid.values()) == JUNK, invalid
    assert set(invalid) <= REASONS, invalid
    assert sample_value(samples, "callingbox_up") == 1
    assert _polls(samples, "error") == 0, "a malformed record never fails the poll"
    skipped = [line for line in exporter.log().splitlines() if 'msg="invalid record skipped"' in line]
    assert len(skipped) == JUNK and all("org=default" in line and "reason=" in line for line in skipped), skipped


# ---- label values that need escaping -------------------------------------------------------

HOSTILE_CAUSES = [
    'caller said "goodbye"',
    "C:\\dial\\out",
    "line one\nline two",
    'all of it: \\" \n \\n "quoted\\"',
    "trailing backslash \\",
    "ünïcödé ☎ \t tab",
]


def test_hangup_causes_with_quotes_backslashes_and_newlines_round_trip_through_the_exposition(stack):
    sim, url = live_simulator(stack, KEY, seed=32, rate=60, retry=0.01, max_calls=90, hangup_causes=HOSTILE_CAUSES)
    exporter = stack.exporter(_config(url), env={"CALLINGBOX_API_KEY": KEY}).start()

    # Exactness compares the parsed label values with the simulator's raw strings.
    assert settle_and_compare(sim, exporter) == []

    truth_causes = {dict(labels)["hangup_cause"] for (name, labels) in sim.truth(0).counters if name == HANGUPS}
    assert truth_causes == set(HOSTILE_CAUSES), "every hostile cause occurred"
    status, text = http_get(exporter.url + "/metrics")
    assert status == 200
    exported = {dict(labels)["hangup_cause"] for labels, v in _series(parse_metrics(text), HANGUPS).items() if v}
    assert exported == truth_causes

    # The same values through OpenMetrics, the whole page read by the strict parser.
    request = urllib.request.Request(
        exporter.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read().decode()
    in_openmetrics = {
        sample.labels["hangup_cause"]
        for parsed in openmetrics_families(body)  # raises on anything the format forbids
        for sample in parsed.samples
        if sample.name == HANGUPS and sample.labels["org"] == "default" and sample.value
    }
    assert in_openmetrics == truth_causes


# ---- a flood of distinct label values ------------------------------------------------------


def test_ten_thousand_hangup_causes_are_capped_at_fifty_plus_other_and_nothing_is_lost(stack):
    causes = [f"carrier-cause-{i:05d}" for i in range(10_000)]
    sim, url = stack.simulator(
        seed=33, rate=200, max_calls=300, time_scale=300, webhook_retry_base=0.01, hangup_causes=causes, api_key=KEY
    )
    exporter = stack.exporter(_config(url), env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(sim.all_final, 60, message="simulator calls final")
    truth = sim.truth(0)

    def other_differences():
        return [p for p in differences(exporter.scrape(), truth) if not p.startswith(f"('{HANGUPS}'")]

    wait_until(lambda: not other_differences(), 30, message="exporter caught up with truth")
    _more_polls(exporter, 3, 20)
    assert other_differences() == [], "every family but the capped one equals truth exactly"

    samples = exporter.scrape()
    got = {labels: v for labels, v in _series(samples, HANGUPS).items() if v}
    want = {labels: v for (name, labels), v in truth.counters.items() if name == HANGUPS}
    truth_causes = {dict(labels)["hangup_cause"] for labels in want}
    kept = {dict(labels)["hangup_cause"] for labels in got} - {"other"}
    assert len(kept) == min(LABEL_CAP, len(truth_causes)) and kept <= truth_causes
    assert {dict(labels)["hangup_cause"] for labels in got} == kept | {"other"}, "no `none`: every call had a cause"

    # Kept causes are exact per series; `other` holds exactly the rest of each (direction, status).
    for labels, value in want.items():
        if dict(labels)["hangup_cause"] in kept:
            assert got.get(labels) == value, labels
    folded: dict[tuple, float] = {}
    for labels, value in want.items():
        if dict(labels)["hangup_cause"] not in kept:
            key = tuple(kv if kv[0] != "hangup_cause" else ("hangup_cause", "other") for kv in labels)
            folded[key] = folded.get(key, 0) + value
    assert {labels: v for labels, v in got.items() if dict(labels)["hangup_cause"] == "other"} == folded

    ended = _total(samples, "callingbox_calls_ended_total")
    assert ended == truth.total("callingbox_calls_ended_total") == sum(got.values()), "no hangup lost"
    overflow = sample_value(samples, "callingbox_exporter_label_overflow_total", label="hangup_cause")
    assert overflow == sum(folded.values()), "overflow counts each hangup exported as other"


# ---- huge bodies ---------------------------------------------------------------------------


def _history_bytes_per_call(seed: int, stack) -> float:
    """Average size of one history call in the list body, from a small twin of the simulator."""
    twin, url = stack.simulator(seed=seed, rate=0, history=300)
    with urllib.request.urlopen(url + "/v1/calls", timeout=10) as response:
        body = response.read()
    return len(body) / twin.history


def test_a_history_of_hundreds_of_megabytes_is_read_only_to_the_settle_window(stack):
    history = 400_000
    sim, url = stack.simulator(
        seed=34, rate=40, max_calls=120, time_scale=300, webhook_retry_base=0.01, history=history, api_key=KEY
    )
    after = time.time() - 1  # every live event follows; every history event is 30 days older
    history_bytes = history * _history_bytes_per_call(34, stack)
    exporter = stack.exporter(_config(url), env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(exporter.ready, 30, message="a first successful poll")

    wait_until(sim.all_final, 60, message="simulator calls final")
    truth = sim.truth(after)
    wait_until(lambda: not differences(exporter.scrape(), truth), 30, message="exporter caught up with truth")
    _more_polls(exporter, 5, 30)
    samples = exporter.scrape()
    assert differences(samples, truth) == []
    assert sample_value(samples, "callingbox_up") == 1 and _polls(samples, "error") == 0

    stats = dict(sim.stats)
    answered = stats["client_closed_early"]  # every list request so far was cut short by the exporter
    assert stats["list_requests"] - answered <= 1, f"only an in-flight request may be open: {stats}"
    per_request = stats["bytes_sent"] / answered
    read = [
        int(line.split(" bytes=")[1].split()[0]) for line in exporter.log().splitlines() if 'msg="poll done"' in line
    ]
    rss_mib = exporter.rss_peak_kib() / 1024
    print(
        f"\nhistory {history} calls ≈ {history_bytes / MIB:.0f} MiB; {answered} list requests cut short, "
        f"server sent {per_request / MIB:.2f} MiB each on average, exporter read at most {max(read) / MIB:.2f} MiB "
        f"per poll; peak RSS {rss_mib:.1f} MiB"
    )
    assert answered >= 5
    assert per_request < 0.05 * history_bytes, "the server stopped sending once the exporter closed"
    assert max(read) < 0.01 * history_bytes, "the exporter read only the settle window"
    # A Python process with aiohttp and prometheus-client idles at ~40-60 MiB; a poll holds one
    # 64 KiB chunk and the calls of the window. 150 MiB is a quarter of the body: holding it
    # (or its decoded records, several times larger) could not fit.
    assert rss_mib < 150, f"peak RSS {rss_mib:.1f} MiB"


def test_a_history_inside_a_huge_settle_window_is_streamed_and_memory_follows_tracked_calls(stack):
    history = 100_000
    sim, url = stack.simulator(
        seed=35, rate=40, max_calls=60, time_scale=300, webhook_retry_base=0.01, history=history, api_key=KEY
    )
    after = time.time() - 1
    history_bytes = history * _history_bytes_per_call(35, stack)
    # Each poll reads the whole window (~5 s here): let the live calls finish first, so the
    # first poll already sees everything and one more proves re-reading counts nothing twice.
    wait_until(sim.all_final, 60, message="simulator calls final")
    truth = sim.truth(after)
    live = truth.total("callingbox_calls_created_total")
    exporter = stack.exporter(
        _config(url, settle_window="3650d", poll_interval="1s"), env={"CALLINGBOX_API_KEY": KEY}
    ).start()
    # The first poll reads and tracks the whole history, as fast as the machine allows: it is
    # waited for while the exporter's memory still grows with the calls it tracks.
    slowest = _slowest_scrape_until(exporter, exporter.ready, exporter.rss_kib, 60, "a first successful poll")
    # Every scrape answered 200 during the poll; its latency is printed, not asserted.
    assert differences(exporter.scrape(), truth) == [], "history before the baseline is tracked, not counted"
    # The next poll starts as long after the first as the first took (a slow read slows the
    # polls), then reads the same body again: a few times the first poll's length, and then some.
    first = wait_until(lambda: _poll_durations(exporter), 30, message="the first poll's log line")[0]
    _more_polls(exporter, 1, 30 + 4 * first)

    status, text = http_get(exporter.url + "/metrics")
    assert status == 200
    samples = parse_metrics(text)  # the exposition parses
    assert differences(samples, truth) == []
    tracked = sample_value(samples, "callingbox_exporter_tracked_calls")
    assert tracked == history + live, "every call inside the settle window is tracked"
    assert sample_value(samples, "callingbox_up") == 1 and _polls(samples, "error") == 0

    rss_mib = exporter.rss_peak_kib() / 1024
    read = [
        int(line.split(" bytes=")[1].split()[0]) for line in exporter.log().splitlines() if 'msg="poll done"' in line
    ]
    print(
        f"\nhistory {history} calls ≈ {history_bytes / MIB:.0f} MiB inside the window; exporter read "
        f"{max(read) / MIB:.0f} MiB per poll in {len(read)} polls; tracked {tracked:.0f}; peak RSS {rss_mib:.1f} MiB; "
        f"slowest scrape during the first poll {slowest * 1000:.0f} ms"
    )
    assert max(read) >= 0.99 * history_bytes, "the whole window was read"
    # Tracking a call costs ~450 B of Python objects (its state, id, timestamps and the ledger's
    # dict entry); the process idles at ~40 MiB (the test above). Allow 60 MiB for the process
    # and 1 KiB per tracked call: ~160 MiB here. Holding the ~130 MiB body as text on top of
    # the process would not fit, let alone its decoded records (several times the text).
    bound = 60 + tracked / 1024
    assert rss_mib < bound, f"peak RSS {rss_mib:.1f} MiB over {bound:.0f} MiB"
