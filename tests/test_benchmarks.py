"""The benchmark suite, smoke-tested: `python -m benchmarks --quick` runs every case end to end.

Only what holds on any machine is asserted: every case has its rows, a poll reads as much with
a 50x larger history past the window as with a small one, an unchanged second poll examines
only the overlap, the exporter tracks exactly the calls in its window, a state save writes the
rows of the calls that changed, not the ledger, and the pages /metrics serves show the samples of
the live render. Never timings.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exporter.exposition import CACHED
from helpers import ROOT

CASES = (
    "1 ingest",
    "2 history",
    "3 scrape",
    "4 memory",
    "5 exposition",
    "6 read tiers",
    "7 state save",
    "8 backfill",
)
META_ROWS = 6  # the meta rows every state save writes (exporter.state._meta)
ONE_READ = 64 * 1024  # the client reads at most this much at a time (exporter.api.CHUNK_BYTES)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"table": done.stdout, **json.loads(out.read_text())}


def test_the_table_has_rows_for_every_case(report):
    assert {row["case"] for row in report["rows"]} == set(CASES)
    table_cases = {line.split("|")[1].strip() for line in report["table"].splitlines() if line.startswith("| ")}
    assert set(CASES) <= table_cases
    assert all(row["verdict"] in ("", "PASS", "MISS") for row in report["rows"])


def test_bytes_read_per_poll_do_not_grow_with_the_history_past_the_window(report):
    history = report["facts"]["2 history"]
    small, big, n = history["small"], history["big"], history["window_calls"]
    # The first poll reads the window; each later one stops at its hot depth, at most the window:
    # the same calls whatever lies past it, so the same bytes, give or take where the last read
    # of the body happened to end.
    assert set(small["records_first"]) == set(big["records_first"]) == {n + 1}
    assert set(small["records_steady"]) == set(big["records_steady"])
    assert max(big["records_steady"]) <= n + 1
    assert max(big["bytes_steady"]) - min(small["bytes_steady"]) <= ONE_READ
    assert max(big["bytes_steady"]) < history["naive"]["small"]["bytes"]  # not even the small body whole
    assert history["naive"]["big"]["calls"] == n + history["old"]["big"]  # the peer reads it all


def test_an_unchanged_second_poll_examines_only_the_overlap(report):
    ingest = report["facts"]["1 ingest"]
    assert ingest["examined_first_http"] == ingest["examined_first_memory"] == ingest["calls"]
    assert ingest["examined_second_http"] == ingest["examined_second_memory"] == ingest["overlap_calls"]
    assert ingest["overlap_calls"] < ingest["calls"] / 100
    history = report["facts"]["2 history"]
    assert set(history["small"]["examined_first"]) == set(history["big"]["examined_first"]) == {history["window_calls"]}
    assert set(history["small"]["examined_steady"]) == set(history["big"]["examined_steady"])
    assert max(history["big"]["examined_steady"]) < history["window_calls"] / 100


def test_the_exporter_tracks_exactly_the_calls_in_its_window(report):
    ingest, history = report["facts"]["1 ingest"], report["facts"]["2 history"]
    assert ingest["tracked_http"] == ingest["tracked_memory"] == ingest["calls"]
    n = history["window_calls"]
    for size in ("small", "big"):
        assert set(history[size]["tracked_first"]) == set(history[size]["tracked_steady"]) == {n}
    assert report["facts"]["3 scrape"]["idle_tracked"] == report["sizes"]["ingest_calls"]


def test_scrape_latency_is_measured_in_rounds_of_an_idle_phase_then_a_busy_one(report):
    scrape, sizes = report["facts"]["3 scrape"], report["sizes"]
    rounds = scrape["rounds"]
    assert len(rounds) == sizes["scrape_rounds"] >= 2
    assert all(r["idle_scrapes"] >= sizes["idle_scrapes"] and r["busy_scrapes"] > 0 for r in rounds)
    assert scrape["scrapes"]["idle"] == sum(r["idle_scrapes"] for r in rounds)
    assert scrape["busy_polls"] >= sizes["busy_polls"]


def test_read_tiers_count_exactly_and_an_ordinary_poll_reads_a_sliver_of_the_window(report):
    tiers = report["facts"]["6 read tiers"]
    # Exact against the simulator's truth after ordinary polls only, after the hourly full read,
    # and for the full-window read; the audits found nothing either.
    assert tiers["differences"] == {"tiers_before_full_read": [], "tiers_after_full_read": [], "full_window": []}
    assert tiers["audit_mismatches"] == {"tiers": 0, "full": 0}
    assert tiers["list_bytes"]["tiers"] * 20 < tiers["list_bytes"]["full"]
    assert tiers["day_bytes"]["tiers"] * 20 < tiers["day_bytes"]["full"]


def test_an_ordinary_state_save_writes_the_changed_calls_not_the_ledger(report):
    saves = report["facts"]["7 state save"]
    changed = saves["changed_per_poll"]
    for poll in saves["polls"]:
        # Rows inserted, updated or deleted: one per changed call and series, plus the meta rows.
        assert poll["changed_calls"] == changed
        # The label_use row too when a value's last use moved to the next minute: here each poll
        # spans two minutes of calls (exporter.visibility.LabelUse).
        assert poll["rows"] - changed - poll["series_rows"] in (META_ROWS, META_ROWS + 1)
        assert poll["series_rows"] < changed
    assert saves["calls"] == report["sizes"]["state_calls"] > 50 * changed
    written = sorted(poll["bytes"] for poll in saves["polls"] if poll["bytes"] is not None)
    if written:  # /proc/self/io: Linux only. At most two 4 KiB pages (a row's, an index entry's) per changed call:
        assert written[len(written) // 2] <= changed * 2 * 4096  # the ledger's size does not come into it
    assert saves["restored_exactly"]


def test_the_served_pages_show_the_samples_of_the_live_render(report):
    exposition = report["facts"]["5 exposition"]
    for orgs in (1, 10):
        for label in ("text", "OpenMetrics"):
            identity, gzip = exposition[f"served {label} {orgs} identity"], exposition[f"served {label} {orgs} gzip"]
            assert identity["same_samples_as_live"] and gzip["same_samples_as_live"]
            assert gzip["bytes_sent"] * 5 < identity["bytes_sent"]
        # a publish whose call families changed renders those and the health gauges, not every family
        assert 0 < exposition[f"publish {orgs}"]["families_rendered"] < len(CACHED)


def test_the_backfill_replays_every_call_of_its_history(report):
    backfill, sizes = report["facts"]["8 backfill"], report["sizes"]
    assert backfill["calls"] == int(sizes["backfill_days"] * sizes["backfill_per_day"])
    assert backfill["invalid"] == 0 and backfill["samples"] > 0
