"""Faults of the CallingBox API, end to end: each one drops `callingbox_up`, and the exporter recovers.

The story: calls flow while the simulator answers polls with 5xx, timeouts, connection resets,
truncated and non-JSON bodies and a rejected key, each twice in a row. Every fault shows as
`callingbox_up 0`, is counted by its code and backed off exponentially (a rejected key four
times slower). A streak of failures is logged at warn (error for a rejected key) when it starts
and when its kind changes, its repeats at debug, and its end once at info with its length; a
429 is waited out inside the poll. /metrics
answers every scrape throughout, and once the simulator is quiet the counts equal its truth.
A body that trickles a byte every 3 s, each gap under request_timeout, fails its poll at the
read's deadline, not never.
"""

from __future__ import annotations

import time

from test_e2e_exact import KEY, _config, settle_and_compare

from exporter.deadline import FLOOR
from helpers import http_get, log_records, log_seconds, parse_metrics, sample_value

POLL_INTERVAL = 0.3  # seconds, as _config sets it; the first backoff of a failure streak
REQUEST_TIMEOUT = 0.5  # seconds; the "timeout" fault holds its answer back four times longer
FAILURES = 2  # consecutive failed polls per fault: backoffs of 1× and 2× the base
JITTER = (0.8, 1.2)

# kind, parameters, requests one failed poll takes, the code api_requests_total counts for
# them, the codes the log line may give.
FAULTS = (
    ("status", {"code": 500}, 1, "500", ("500",)),
    ("status", {"code": 502}, 1, "502", ("502",)),
    ("status", {"code": 503}, 1, "503", ("503",)),
    ("timeout", {"delay": 4 * REQUEST_TIMEOUT}, 1, "error", ("error",)),
    # aiohttp retries an idempotent request once, transparently, after a connection reset
    # (RFC 9112 §9.3.1.1): a lone reset costs nothing; a poll fails on the second in a row,
    # and the exporter counts its one request.
    ("reset", {}, 2, "error", ("error",)),
    # A 200 whose body breaks: the response is counted as 200, the poll still fails. The
    # contract leaves the log line's code open here: the status, or `error` for the unusable body.
    ("truncate", {}, 1, "200", ("200", "error")),
    ("non_json", {}, 1, "200", ("200", "error")),
    ("unauthorized", {}, 1, "401", ("401",)),
)


def _up(samples) -> float:
    return sample_value(samples, "callingbox_up")


def _polls(samples, result: str) -> float:
    return sample_value(samples, "callingbox_exporter_polls_total", result=result)


def _requests(samples, code: str | None = None) -> float:
    """API requests counted with `code`, or with any code."""
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "callingbox_exporter_api_requests_total"
        and dict(labels).get("org") == "default"
        and (code is None or dict(labels)["code"] == code)
    )


def _polls_over_a_second(samples) -> float:
    name = "callingbox_exporter_poll_duration_seconds"
    return sample_value(samples, name + "_count") - sample_value(samples, name + "_bucket", le="1.0")


class Scraper:
    """Scrapes /metrics in a bounded loop; every answer must be a 200 that parses, and quickly."""

    def __init__(self, exporter):
        self.exporter = exporter
        self.count = 0
        self.slowest = 0.0
        self.ups: list[float] = []  # callingbox_up as every scrape saw it, in order

    def scrape(self):
        started = time.monotonic()
        status, text = http_get(self.exporter.url + "/metrics")
        elapsed = time.monotonic() - started
        assert status == 200, f"scrape #{self.count + 1} answered {status}: {text[:300]}"
        samples = parse_metrics(text)
        self.count += 1
        self.slowest = max(self.slowest, elapsed)
        self.ups.append(_up(samples))
        return samples

    def until(self, predicate, timeout: float, message: str):
        deadline = time.monotonic() + timeout
        while True:
            samples = self.scrape()
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {message}")
            time.sleep(0.02)


FAILURE_LINES = ("poll failed", "API key rejected")


def _failure_streaks(records: list[dict]) -> list[dict]:
    """Failed polls' log lines grouped into streaks, in order, each with the line that ended it.

    A poll logs its failure (or recovery) line, then its `poll done` line. Each failure line gets
    `waited`: the sleep that followed its poll, read from the log itself: from that `poll done`
    to the start of the next poll (its `poll done` time minus its `duration_s`). A streak is
    `{"failures": [...], "recovered": the "poll recovered" line or None}`.
    """
    streaks: list[dict] = []
    current: list[dict] = []
    pending: dict | None = None  # the failure or recovery line of the poll in progress
    previous: tuple[float, dict | None] | None = None  # the last poll's end and its failure entry
    for record in records:
        if record.get("org") != "default":
            continue
        if record["msg"] in FAILURE_LINES + ("poll recovered",):
            assert pending is None, f"two failure or recovery lines for one poll: {pending}, {record}"
            pending = dict(record)
        if record["msg"] != "poll done":
            continue
        end = log_seconds(record["ts"])
        if previous is not None and previous[1] is not None:
            previous[1]["waited"] = end - float(record["duration_s"]) - previous[0]
        entry = None
        if record["result"] == "success":
            if current:
                assert pending is not None and pending["msg"] == "poll recovered", (
                    f"the poll ending a streak of {len(current)} logged {pending}"
                )
                streaks.append({"failures": current, "recovered": pending})
            else:
                assert pending is None, f"a poll after a success logged {pending}"
            current = []
        else:
            assert pending is not None and pending["msg"] in FAILURE_LINES, f"a failed poll logged {pending}"
            entry = pending
            current.append(entry)
        pending, previous = None, (end, entry)
    if current:
        streaks.append({"failures": current, "recovered": None})
    return streaks


def test_every_fault_drops_up_backs_off_and_recovers_with_exact_counts(stack):
    sim, url = stack.simulator(seed=21, rate=25, time_scale=300, webhook_retry_base=0.02, api_key=KEY)
    exporter = stack.exporter(
        _config(url, request_timeout=f"{REQUEST_TIMEOUT}s"), env={"CALLINGBOX_API_KEY": KEY}
    ).start()
    scraper = Scraper(exporter)
    scraper.until(lambda s: _up(s) == 1, 20, "a first successful poll")

    hidden_retries = 0  # requests the simulator served that aiohttp made on the exporter's behalf
    for kind, params, per_poll, code, _ in FAULTS:
        before = scraper.scrape()
        sim.inject(kind, count=FAILURES * per_poll, **params)
        hidden_retries += FAILURES * (per_poll - 1)
        scraper.until(lambda s: _up(s) == 0, 15, f"callingbox_up 0 after {kind} {params}")
        after = scraper.until(lambda s: _up(s) == 1, 30, f"callingbox_up 1 again after {kind} {params}")

        failed = _polls(after, "error") - _polls(before, "error")
        succeeded = _polls(after, "success") - _polls(before, "success")
        assert failed == FAILURES, f"{kind} {params}: {failed} failed polls"
        if code != "200":
            assert _requests(after, code) - _requests(before, code) == FAILURES, f"{kind} {params}"
        extra_200 = FAILURES if code == "200" else 0
        assert _requests(after, "200") - _requests(before, "200") == succeeded + extra_200, f"{kind} {params}"
        assert _requests(after) - _requests(before) == failed + succeeded, f"{kind}: one request per poll"
        assert exporter.ready(), "a target that has polled once stays ready through faults"

    # A streak whose kind changes: news again (warn), then a repeat of the new kind (debug).
    before = scraper.scrape()
    sim.inject("status", count=1, code=503)
    sim.inject("status", count=2, code=500)
    scraper.until(
        lambda s: _polls(s, "error") - _polls(before, "error") == 3 and _up(s) == 1,
        30,
        "three failed polls, then a good one",
    )

    # 429: waited out inside the poll, which then succeeds; callingbox_up never drops.
    before = scraper.scrape()
    ups_seen = len(scraper.ups)
    sim.inject("429", count=1, retry_after=1)
    after = scraper.until(
        lambda s: _requests(s, "429") > _requests(before, "429"), 15, "the rate-limited poll to finish"
    )
    assert _requests(after, "429") - _requests(before, "429") == 1
    assert _polls(after, "error") == _polls(before, "error"), "a 429 within the retry budget fails no poll"
    assert set(scraper.ups[ups_seen:]) == {1}, "callingbox_up stays 1 through a 429"
    # At least the rate-limited poll took over a second; a slow machine may add others.
    assert _polls_over_a_second(after) - _polls_over_a_second(before) >= 1, "the poll waited Retry-After (1 s)"

    sim.pause()
    assert settle_and_compare(sim, exporter) == []

    # Every list request the simulator answered is counted once, by its code (read between polls).
    scraper.until(
        lambda s: _requests(s) + hidden_retries == sim.stats["list_requests"], 20, "requests counted = requests served"
    )
    # Latency is a benchmark figure, not an assertion (shared machines are noisy): printed only.
    print(
        f"\n{scraper.count} scrapes, all 200, slowest {scraper.slowest * 1000:.0f} ms; "
        f"{sim.stats['list_requests']} list requests"
    )

    records = log_records(exporter.log())
    streaks = _failure_streaks(records)
    assert len(streaks) == len(FAULTS) + 1, [[r["msg"] for r in s["failures"]] for s in streaks]
    mixed = streaks.pop()
    assert [(line["code"], line["level"]) for line in mixed["failures"]] == [
        ("503", "warn"),
        ("500", "warn"),
        ("500", "debug"),
    ], mixed
    assert (mixed["recovered"]["level"], int(mixed["recovered"]["failures"])) == ("info", 3), mixed
    for streak, (kind, _, _, _, log_codes) in zip(streaks, FAULTS):
        rejected = kind == "unauthorized"
        failures = streak["failures"]
        assert len(failures) == FAILURES, f"{kind}: {len(failures)} failed polls logged"
        base = POLL_INTERVAL * (4 if rejected else 1)
        # The first failure of a streak is news (warn; error for a rejected key), the same
        # failure again is not (debug); the exporter runs at debug level, so all are here.
        first_level = "error" if rejected else "warn"
        assert [line["level"] for line in failures] == [first_level] + ["debug"] * (FAILURES - 1), (kind, failures)
        assert len({line["code"] for line in failures}) == 1, f"{kind}: one kind of failure, one code"
        for attempt, line in enumerate(failures):
            assert line["msg"] == ("API key rejected" if rejected else "poll failed"), line
            assert line["org"] == "default", line
            assert line.get("code") in log_codes, line
            backoff = float(line["backoff_s"])
            low, high = (base * 2**attempt * j for j in JITTER)
            assert low - 0.005 <= backoff <= high + 0.005, f"{kind} failure {attempt + 1}: backoff {backoff}s"
            # The poll after waits out the back-off (at least; a busy machine may add to it).
            assert line["waited"] >= backoff - 0.01, f"{kind}: waited {line['waited']}s for {backoff}s"
        backoffs = [float(line["backoff_s"]) for line in failures]
        assert backoffs == sorted(backoffs) and len(set(backoffs)) == FAILURES, f"{kind}: back-off grows: {backoffs}"
        # One line ends the streak: how many polls failed, and for how long the target was down
        # (at least the back-offs it waited out).
        recovered = streak["recovered"]
        assert (recovered["level"], recovered["org"], int(recovered["failures"])) == ("info", "default", FAILURES), (
            kind,
            recovered,
        )
        # (down_s is rounded to a tenth of a second, backoff_s to a hundredth.)
        assert float(recovered["down_s"]) >= sum(backoffs) - 0.06, (kind, recovered, backoffs)

    rate_limited = [r for r in records if r["msg"] == "rate limited"]
    assert len(rate_limited) == 1 and float(rate_limited[0]["retry_after_s"]) == 1, rate_limited
    assert all(r["org"] == "default" for r in rate_limited)


def test_a_list_body_that_trickles_fails_the_poll_at_its_deadline_while_metrics_answer(stack):
    """SPEC §4: a byte every 3 s never trips the 5 s between-bytes timeout. The read's deadline
    (request_timeout + the floor, for an org this small) ends it: callingbox_up 0, /metrics and
    /-/healthy answering throughout, then recovery and exact counts."""
    timeout = 5.0
    sim, url = stack.simulator(seed=24, rate=5, max_calls=60, time_scale=300, webhook_retry_base=0.02, api_key=KEY)
    exporter = stack.exporter(_config(url, request_timeout=f"{timeout:g}s"), env={"CALLINGBOX_API_KEY": KEY}).start()
    scraper = Scraper(exporter)
    scraper.until(lambda s: _up(s) == 1 and _polls(s, "success") >= 2, 20, "two successful polls")

    before = scraper.scrape()
    sim.inject("trickle", every=3, duration=60)  # without a deadline the poll would end after 60 s
    injected, deadline = time.monotonic(), timeout + FLOOR
    scrapes = scraper.count
    while _up(samples := scraper.scrape()) == 1:
        assert http_get(exporter.url + "/-/healthy")[0] == 200, "a trickle is the API's fault: no restart"
        assert time.monotonic() - injected < deadline + 10, "callingbox_up 0 within the read's deadline"
        time.sleep(0.1)
    took = time.monotonic() - injected
    assert took >= deadline, f"the deadline ended the read, not something sooner ({took:.1f}s)"
    assert scraper.count - scrapes >= 20, "/metrics answered scrape after scrape while the body trickled"
    assert _polls(samples, "error") - _polls(before, "error") == 1
    assert (
        _requests(samples, "200") - _requests(before, "200")
        == _polls(samples, "success") - _polls(before, "success") + 1
    ), "the trickle's answer began as a 200"
    failed = [r for r in log_records(exporter.log()) if r["msg"] == "poll failed"]
    assert [(r["code"], "deadline" in r["error"]) for r in failed] == [("error", True)], failed

    scraper.until(lambda s: _up(s) == 1, 20, "callingbox_up 1 after the trickle")
    sim.pause()
    assert settle_and_compare(sim, exporter) == []
    print(
        f"\ncallingbox_up 0 {took:.1f}s after the trickle began (deadline {deadline:g}s); "
        f"{scraper.count} scrapes, slowest {scraper.slowest * 1000:.0f} ms"
    )
