"""Whole system: a rotated key ends the back-off at once (SPEC §4, key rotation).

The story: two orgs. One answers 503 for a while, then rejects its key (the key was revoked),
so its back-off has grown long; the operator replaces its key file, atomically as Kubernetes
does with a Secret. The org is up again long before the back-off it announced would have
ended, while the other org never failed.
"""

from __future__ import annotations

import os
import time

from helpers import http_get, log_records, log_seconds, sample_value, wait_until

OLD, NEW, OTHER = "sk_test_old_key_0123456789", "sk_test_new_key_9876543210", "sk_test_other_key_000000"
FAILURES = 5  # 503s in a row before the key is revoked: the back-off doubles each time


def _lines(exporter, msg: str, org: str = "rotated") -> list[dict]:
    return [r for r in log_records(exporter.log()) if r["msg"] == msg and r.get("org") == org]


def test_a_replaced_key_file_ends_the_back_off_of_a_rejected_key(stack, tmp_path):
    rotated, url = stack.simulator(
        seed=61, rate=20, max_calls=400, time_scale=300, webhook_retry_base=0.05, api_key=OLD
    )
    other, other_url = stack.simulator(
        seed=62, rate=20, max_calls=400, time_scale=300, webhook_retry_base=0.05, api_key=OTHER
    )
    key_file, other_key = tmp_path / "rotated.key", tmp_path / "other.key"
    key_file.write_text(OLD + "\n")
    other_key.write_text(OTHER + "\n")
    targets = [
        {"name": "rotated", "api_url": url, "api_key_file": str(key_file)},
        {"name": "other", "api_url": other_url, "api_key_file": str(other_key)},
    ]
    exporter = stack.exporter(
        {"poll_interval": "0.5s", "overlap": "10s", "initial_lookback": "1h", "targets": targets}
    ).start()
    wait_until(exporter.ready, 30, message="both orgs polled once")

    # 503s, then the key is revoked: the back-off grows at each failure, four times faster at the 401.
    rotated.inject("status", count=FAILURES, code=503)
    wait_until(
        lambda: (
            sample_value(exporter.scrape(), "callingbox_exporter_api_requests_total", "rotated", code="503") == FAILURES
        ),
        60,
        message="the 503 streak",
    )
    rotated.api_key = NEW
    rejected = wait_until(lambda: _lines(exporter, "API key rejected"), 60, message="the key rejected")[-1]
    backoff = float(rejected["backoff_s"])
    back_off_ends = log_seconds(rejected["ts"]) + backoff
    assert backoff >= 0.5 * 4 * 2**FAILURES * 0.8, f"a long back-off is what this story ends: {backoff}s"

    # The Secret is rotated: a new file renamed over the old one.
    staged = tmp_path / "rotated.key.new"
    staged.write_text(NEW + "\n")
    os.replace(staged, key_file)
    rotated_at = time.time()
    wait_until(
        lambda: sample_value(exporter.scrape(), "callingbox_up", "rotated") == 1,
        max(1.0, back_off_ends - time.time()),
        message="up again before the announced back-off ended",
    )

    # The order of events, from the exporter's own log: rotation noticed, then recovery, all
    # before the back-off the rejected poll announced would have run out.
    recovered = wait_until(lambda: _lines(exporter, "poll recovered"), 10, message="the recovery line")[-1]
    noticed = _lines(exporter, "API key file changed; the back-off ends")
    reloaded = _lines(exporter, "API key reloaded from its file")
    assert noticed and reloaded, "the wait ended because the file changed, and the new key was read"
    assert log_seconds(noticed[-1]["ts"]) <= log_seconds(reloaded[-1]["ts"]) <= log_seconds(recovered["ts"])
    assert log_seconds(recovered["ts"]) < back_off_ends
    assert int(recovered["failures"]) == FAILURES + 1
    print(
        f"\nback-off announced {backoff:.1f}s; up again {log_seconds(recovered['ts']) - rotated_at:.1f}s "
        f"after the key file was replaced"
    )

    samples = exporter.scrape()
    assert sample_value(samples, "callingbox_exporter_polls_total", "other", result="error") == 0
    assert sample_value(samples, "callingbox_up", "other") == 1


def test_a_revoked_key_makes_the_pod_ready_after_its_first_poll_with_up_0(stack):
    """SPEC §2: /-/ready waits for the first poll to finish, not to succeed; a rejected key shows
    as callingbox_up 0, never as an unready pod that would block a rollout."""
    sim, url = stack.simulator(seed=63, rate=20, max_calls=20, time_scale=300, api_key=NEW)
    exporter = stack.exporter(
        {"api_url": url, "poll_interval": "0.5s", "overlap": "10s"}, env={"CALLINGBOX_API_KEY": OLD}
    ).start()
    wait_until(exporter.ready, 30, message="ready once the first poll has finished")

    samples = exporter.scrape()
    assert sample_value(samples, "callingbox_up", "default") == 0
    assert sample_value(samples, "callingbox_exporter_polls_total", "default", result="success") == 0
    assert sample_value(samples, "callingbox_exporter_polls_total", "default", result="error") >= 1
    assert sample_value(samples, "callingbox_exporter_api_requests_total", "default", code="401") >= 1
    assert _lines(exporter, "API key rejected", org="default"), "the log says the key was rejected"
    assert http_get(exporter.url + "/-/healthy")[0] == 200, "a revoked key is no reason to restart the pod"
