"""Several organizations in one process, each polled on its own.

The story: three orgs, each with its own simulator, key file and interval. One of them goes
through 500s, then a revoked key (401), then an API that takes 8 s to answer. Meanwhile the two
others keep polling (they complete polls while the troubled one is stuck in its slow request)
and never fail; the troubled one fails exactly as its faults say and recovers from each; at the
end, all three organizations' numbers equal their simulators' truth exactly.
"""

from __future__ import annotations

import re
import time

from helpers import assert_orgs_exact, log_records, log_seconds, sample_value, wait_until

KEYS = {"alpha": "sk_test_alpha_0123456789", "bravo": "sk_test_bravo_0123456789", "flaky": "sk_test_flaky_0123456789"}
HEALTHY = ("alpha", "bravo")
STALL = 8.0  # seconds the slow API holds its answer; the request timeout is 12 s


def _lines(exporter, org: str, msg: str) -> list[dict]:
    """One org's log lines with message `msg`, in order."""
    return [r for r in log_records(exporter.log()) if r["msg"] == msg and r.get("org") == org]


def _polls_done(exporter, org: str) -> list[dict]:
    """`poll done` lines of one org, in order: each with its result and duration."""
    return _lines(exporter, org, "poll done")


def _results(polls: list[dict]) -> str:
    """The polls' results as a string: `S` success, `E` error (e.g. `SSEEEES`)."""
    return "".join("S" if p["result"] == "success" else "E" for p in polls)


def _until_next_poll(exporter, org: str) -> float:
    """Seconds until `org`'s next poll as the exporter announces it (a back-off included)."""
    next_poll = sample_value(exporter.scrape(), "callingbox_exporter_next_poll_timestamp_seconds", org)
    return max(0.0, next_poll - time.time())


def test_one_org_failing_in_every_way_never_delays_or_corrupts_the_others(stack, tmp_path):
    sims, targets = {}, []
    for seed, (org, key) in enumerate(KEYS.items(), start=31):
        sim, url = stack.simulator(
            seed=seed, rate=30, max_calls=600, time_scale=300, webhook_retry_base=0.05, api_key=key
        )
        key_file = tmp_path / f"{org}.key"
        key_file.write_text(key + "\n")
        sims[org] = sim
        targets.append(
            {
                "name": org,
                "api_url": url,
                "api_key_file": str(key_file),
                "state_file": str(tmp_path / f"{org}.state.json"),
            }
        )
    targets[1]["poll_interval"] = "0.4s"  # each target its own interval
    exporter = stack.exporter(
        {
            "poll_interval": "0.3s",
            "overlap": "10s",
            "initial_lookback": "1h",
            "request_timeout": "12s",
            "targets": targets,
        }
    ).start()
    wait_until(exporter.ready, 30, message="all three orgs polled once")
    flaky = sims["flaky"]

    def flaky_value(name: str, **labels: str) -> float:
        return sample_value(exporter.scrape(), name, "flaky", **labels)

    def flaky_since(first: int) -> str:
        return _results(_polls_done(exporter, "flaky")[first:])

    # 1. Server errors: four failed polls in a row, one per 500, then a success.
    before = len(_polls_done(exporter, "flaky"))
    flaky.inject("status", count=4, code=500)
    phase = wait_until(
        lambda: re.fullmatch(r"S*E+S+", flaky_since(before)), 30, message="failed polls, then a good one"
    )[0]
    assert phase.strip("S") == "EEEE", phase
    assert flaky_value("callingbox_exporter_api_requests_total", code="500") == 4
    assert flaky_value("callingbox_exporter_polls_total", result="error") == 4

    # 2. The key is revoked: failed polls, slower and slower; then it is given back.
    before = len(_polls_done(exporter, "flaky"))
    flaky.api_key = "sk_test_revoked_key_000000"
    wait_until(
        lambda: flaky_value("callingbox_exporter_api_requests_total", code="401") >= 2, 30, message="two rejected polls"
    )
    assert flaky_value("callingbox_up") == 0
    flaky.api_key = KEYS["flaky"]
    # The next poll comes after the back-off the exporter announces: wait that long, and then some.
    phase = wait_until(
        lambda: re.fullmatch(r"S*E+S+", flaky_since(before)),
        _until_next_poll(exporter, "flaky") + 30,
        message="flaky polling again once the key is back",
    )[0]
    rejected = flaky_value("callingbox_exporter_api_requests_total", code="401")
    assert phase.count("E") == rejected >= 2, f"one failed poll per 401 ({rejected:.0f}), in a row: {phase}"
    assert flaky_value("callingbox_up") == 1
    assert flaky_value("callingbox_exporter_polls_total", result="error") == 4 + rejected
    backoffs = [float(r["backoff_s"]) for r in _lines(exporter, "flaky", "API key rejected")]
    assert len(backoffs) == rejected and backoffs == sorted(backoffs), f"slower and slower: {backoffs}"
    # Each streak ended with one line saying how many polls it lasted.
    recoveries = wait_until(
        lambda: len(_lines(exporter, "flaky", "poll recovered")) >= 2 and _lines(exporter, "flaky", "poll recovered"),
        10,
        message="two recoveries logged",
    )
    assert [int(r["failures"]) for r in recoveries] == [4, rejected], recoveries

    # 3. A slow API: the next list request stalls 8 s, then answers; the poll succeeds, slowly.
    before = len(_polls_done(exporter, "flaky"))
    flaky.inject("timeout", count=1, delay=STALL)
    slow = wait_until(
        lambda: next((p for p in _polls_done(exporter, "flaky")[before:] if float(p["duration_s"]) >= STALL), None),
        STALL + 30,
        message="the slow poll done",
    )
    assert slow["result"] == "success", slow
    assert set(_results(_polls_done(exporter, "flaky")[before:])) == {"S"}, "a slow answer fails no poll"
    assert flaky_value("callingbox_exporter_polls_total", result="error") == 4 + rejected

    # While flaky's poll was stuck, the others went on polling: each completed several polls
    # between its start and its end (a shared loop or lock would have let none through).
    slow_end = log_seconds(slow["ts"])
    slow_start = slow_end - float(slow["duration_s"])
    for org in HEALTHY:
        polls = _polls_done(exporter, org)
        assert _results(polls) == "S" * len(polls), f"{org} failed a poll while flaky was troubled"
        during = [
            p
            for p in polls
            if slow_start < log_seconds(p["ts"]) - float(p["duration_s"]) and log_seconds(p["ts"]) < slow_end
        ]
        assert len(during) >= 2, f"{org} completed {len(during)} polls during flaky's {STALL:.0f} s stall"

    samples = exporter.scrape()
    assert sample_value(samples, "callingbox_up", "flaky") == 1, exporter.log()[-2000:]
    assert len(_lines(exporter, "flaky", "poll recovered")) == 2, "no third streak"
    for org in HEALTHY:
        assert sample_value(samples, "callingbox_exporter_polls_total", org, result="error") == 0, org
        assert sample_value(samples, "callingbox_up", org) == 1, org
        assert _lines(exporter, org, "poll recovered") == [], org

    assert_orgs_exact(exporter, sims)
