"""Faults of the CallingBox API, end to end: each one drops `callingbox_up`, and the exporter recovers.

The story: calls flow while the simulator answers polls with 5xx, timeouts, connection resets,
truncated and non-JSON bodies and a rejected key, each twice in a row. Every fault shows as
`callingbox_up 0`, is counted by its code, logged once per failed poll and backed off
exponentially (a rejected key four times slower); a 429 is waited out inside the poll. /metrics
answers every scrape throughout, and once the simulator is quiet the counts equal its truth.
"""

from __future__ import annotations

import calendar
import json
import re
import time

from conftest import http_get, parse_metrics
from test_e2e_exact import KEY, _config, settle_and_compare

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


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"org": "default", **labels}.items()))), 0)


def _up(samples) -> float:
    return _value(samples, "callingbox_up")


def _polls(samples, result: str) -> float:
    return _value(samples, "callingbox_exporter_polls_total", result=result)


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
    return _value(samples, name + "_count") - _value(samples, name + "_bucket", le="1.0")


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


_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def log_records(text: str) -> list[dict]:
    """The exporter's logfmt lines as dicts (quoted values unquoted), in order."""
    records = []
    for line in text.splitlines():
        fields = {key: json.loads(value) if value.startswith('"') else value for key, value in _FIELD.findall(line)}
        if "msg" in fields and "ts" in fields:
            records.append(fields)
    return records


def _seconds(ts: str) -> float:
    """`2024-05-01T12:00:00.123Z` → Unix seconds."""
    whole, millis = ts.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000


def _failure_streaks(records: list[dict]) -> list[list[dict]]:
    """Failed polls' log lines grouped into streaks, each with `waited`: the sleep that followed.

    A failed poll logs its failure line, then its `poll done` line. The sleep is read from the
    log itself: from that `poll done` to the start of the next poll (its `poll done` time minus
    its `duration_s`).
    """
    streaks: list[list[dict]] = []
    current: list[dict] = []
    failure: dict | None = None
    previous: tuple[float, dict | None] | None = None  # the last poll's end and its failure entry
    for record in records:
        if record["msg"] in ("poll failed", "API key rejected"):
            failure = dict(record)
        if record["msg"] != "poll done":
            continue
        end = _seconds(record["ts"])
        if previous is not None and previous[1] is not None:
            previous[1]["waited"] = end - float(record["duration_s"]) - previous[0]
        entry = None
        if record["result"] == "success":
            if current:
                streaks.append(current)
            current = []
        else:
            entry = failure if failure is not None else {"msg": "(no failure line before this poll done)"}
            current.append(entry)
        failure, previous = None, (end, entry)
    if current:
        streaks.append(current)
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
        lambda s: _requests(s) + hidden_retries == sim.stats["list_requests"], 5, "requests counted = requests served"
    )
    # Latency is a benchmark figure, not an assertion (shared machines are noisy): printed only.
    print(f"\n{scraper.count} scrapes, all 200, slowest {scraper.slowest * 1000:.0f} ms; "
          f"{sim.stats['list_requests']} list requests")

    records = log_records(exporter.log())
    streaks = _failure_streaks(records)
    assert len(streaks) == len(FAULTS), [[r["msg"] for r in s] for s in streaks]
    for streak, (kind, params, _, _, log_codes) in zip(streaks, FAULTS):
        rejected = kind == "unauthorized"
        assert len(streak) == FAILURES, f"{kind}: one log line per failed poll"
        base = POLL_INTERVAL * (4 if rejected else 1)
        for attempt, line in enumerate(streak):
            assert line["msg"] == ("API key rejected" if rejected else "poll failed"), line
            assert line["level"] == ("error" if rejected else "warn"), line
            assert line["org"] == "default", line
            assert line.get("code") in log_codes, line
            backoff = float(line["backoff_s"])
            low, high = (base * 2**attempt * j for j in JITTER)
            assert low - 0.005 <= backoff <= high + 0.005, f"{kind} failure {attempt + 1}: backoff {backoff}s"
            assert backoff - 0.01 <= line["waited"] <= backoff + 0.25, f"{kind}: waited {line['waited']}s for {backoff}s"

    rate_limited = [r for r in records if r["msg"] == "rate limited"]
    assert len(rate_limited) == 1 and float(rate_limited[0]["retry_after_s"]) == 1, rate_limited
    assert all(r["org"] == "default" for r in rate_limited)
