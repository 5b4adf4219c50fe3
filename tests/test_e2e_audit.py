"""The self-audit on a real exporter: silent on an honest API, and catching each kind of lie.

The story: calls flow with an 8 s settle window and an audit every 2 s, so each call is audited
once, when it is 6-8 s old and settled. The honest run audits many calls and finds nothing. Then
the simulator lies about settled calls that are about to be audited: a terminal status, a
billing amount, a webhook and an extraction outcome rewritten without bumping `updated_at`; a
call inserted into the past; a call deleted. Each lie is counted once under its own kind and
logged with the call id, and nothing else is.
"""

from __future__ import annotations

import time

from conftest import wait_until
from exporter.records import parse_timestamp
from test_e2e_exact import KEY

KINDS = ("missing", "extra", "status", "billing", "webhook", "extraction")


def mismatches(exporter) -> dict[str, float]:
    samples = exporter.scrape()
    return {kind: samples.get(("callingbox_exporter_audit_mismatches_total",
                               (("kind", kind), ("org", "default"))), -1) for kind in KINDS}


def checked(exporter) -> float:
    return exporter.scrape().get(("callingbox_exporter_audit_calls_checked_total", (("org", "default"),)), 0)


def last_audit(exporter) -> float:
    return exporter.scrape().get(("callingbox_exporter_last_audit_timestamp_seconds", (("org", "default"),)), 0)


def wait_for_audits(exporter, n: int) -> None:
    """Until `n` more audits are done and published (each one interval after the last)."""
    for i in range(n):
        previous = last_audit(exporter)
        wait_until(lambda: last_audit(exporter) > previous, 30, message=f"audit {i + 1} of {n} more")


def final_calls(sim, age_from: float, age_to: float) -> list[dict]:
    """Visible, final calls created between `age_to` and `age_from` seconds ago, oldest first."""
    now = time.time()
    with sim._lock:
        calls = [c for c in sim._calls.values() if c.final(now)]
        records = [c.latest for c in calls]
    return [r for r in records if age_from <= now - parse_timestamp(r["created_at"]) <= age_to]


def test_an_honest_api_audits_clean_and_each_lie_is_caught_once(stack):
    sim, url = stack.simulator(seed=61, rate=25, time_scale=300, webhook_retry_base=0.05, api_key=KEY,
                               outcome_weights={"completed": 70, "no_answer": 10, "busy": 5, "failed": 10,
                                                "canceled": 5})
    exporter = stack.exporter({"api_url": url, "poll_interval": "0.3s", "overlap": "1s", "settle_window": "8s",
                               "audit_interval": "2s", "initial_lookback": "1h"},
                              env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(exporter.ready, 20, message="first poll")

    # Honest: after a few audits, calls were checked and nothing disagrees.
    wait_until(lambda: checked(exporter) >= 100, 40, message="100 calls audited")
    assert mismatches(exporter) == dict.fromkeys(KINDS, 0), exporter.log()[-3000:]

    # The lies, told about settled calls 3-5 s old: audited 1-5 s from now.
    def pick(predicate) -> dict:
        return wait_until(lambda: next((r for r in final_calls(sim, 3, 5) if predicate(r)
                                        and r["id"] not in told.values()), None), 10, message="a call to lie about")

    told: dict[str, str] = {}
    told["status"] = pick(lambda r: r["status"] == "completed")["id"]
    sim.tamper(told["status"], status="failed")
    told["billing"] = pick(lambda r: (r["billing_amount_milli_cents"] or 0) > 0)["id"]
    sim.tamper(told["billing"], billing_amount_milli_cents=999_999)
    told["webhook"] = pick(lambda r: r["webhook_status"] == "delivered")["id"]
    sim.tamper(told["webhook"], webhook_status="failed")
    told["extraction"] = pick(lambda r: r["result_status"] == "completed")["id"]
    sim.tamper(told["extraction"], result_status="failed")
    told["extra"] = pick(lambda r: True)["id"]
    sim.delete(told["extra"])
    told["missing"] = sim.insert_past(4.0)

    wait_until(lambda: min(mismatches(exporter).values()) >= 1, 30,
               message=f"every kind caught: {mismatches(exporter)}")
    wait_for_audits(exporter, 2)
    assert mismatches(exporter) == dict.fromkeys(KINDS, 1), exporter.log()[-3000:]  # nothing counted twice
    log = exporter.log()
    for kind, call_id in told.items():
        assert 'msg="audit mismatch"' in log and f"kind={kind}" in log and call_id in log, (kind, call_id)

    # The ledger stays bounded by the settle window: ~8 s of calls at 25/s, not the whole run.
    tracked = exporter.scrape()[("callingbox_exporter_tracked_calls", (("org", "default"),))]
    assert tracked < 25 * 8 * 2.5, tracked


def test_spot_checks_fetch_tracked_calls_by_id_and_find_a_rewrite(stack):
    """With a settle window of an hour the window audit reaches no call: only spot-checks can."""
    sim, url = stack.simulator(seed=62, rate=20, max_calls=60, time_scale=300, webhook_retry_base=0.05,
                               api_key=KEY)
    exporter = stack.exporter({"api_url": url, "poll_interval": "0.3s", "overlap": "1s", "settle_window": "1h",
                               "audit_interval": "1s", "audit_sample": 1000, "initial_lookback": "1h",
                               "max_requests_per_minute": 100_000},  # every call checked every second
                              env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(sim.all_final, 60, message="all calls final")
    by_id = sim.stats["by_id_requests"]
    wait_until(lambda: sim.stats["by_id_requests"] >= by_id + 120, 30, message="two rounds of spot-checks")
    assert checked(exporter) >= 100
    assert mismatches(exporter) == dict.fromkeys(KINDS, 0), exporter.log()[-3000:]

    victim = next(r for r in final_calls(sim, 0, 3600) if r["status"] == "completed")["id"]
    sim.tamper(victim, status="busy")
    wait_until(lambda: mismatches(exporter)["status"] == 1, 20, message="the rewrite found by a spot-check")
    by_id = sim.stats["by_id_requests"]
    wait_until(lambda: sim.stats["by_id_requests"] >= by_id + 120, 30, message="two more rounds of spot-checks")
    assert mismatches(exporter) == {**dict.fromkeys(KINDS, 0), "status": 1}  # found again, counted once
    assert victim in exporter.log()
