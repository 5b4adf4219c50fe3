"""`python -m benchmarks [--quick] [--json PATH] [--cases 1,2,3,4,5,6,7]`: run the cases, print one table.

Servers and processes are started per case group and always stopped: the `replay` server of
the ingest window serves cases 1 and 3; two `live` simulators (the window plus a small or a
1M-call history) serve cases 2 and 4; case 6 starts its own two simulators on a virtual clock;
cases 5 and 7 run in this process.
Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import backfill, exposition, history, ingest, memory, persistence, scrape, tiers
from benchmarks.common import FULL, QUICK, Facts, Row
from benchmarks.procs import ROOT, ApiServer
from benchmarks.report import machine, table

CASES = {
    "1": ingest.CASE,
    "2": history.CASE,
    "3": scrape.CASE,
    "4": memory.CASE,
    "5": exposition.CASE,
    "6": tiers.CASE,
    "7": persistence.CASE,
    "8": backfill.CASE,
}
GOALS = (
    "ingest >= 50 % of the parse limit's calls/s; per-poll CPU flat within 1.2x from 10k to 1M old calls "
    "and bytes read bounded by the window; scrape p99 busy <= 2x idle; peak RSS <= 100 MB on the 1.4 GB "
    "history; exposition <= 20 ms median; read tiers vs a full-window read: list bytes per ordinary poll "
    "<= 1/100, API bytes per day <= 1/50, CPU per ordinary poll <= 1/20, every counter exact; "
    "state save CPU per ordinary poll <= 1/30 of the whole-file JSON save; a 30-day backfill of "
    "50 000 calls a day in < 5 min with peak RSS < 300 MB"
)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def exporter_revision() -> str:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
            return done.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes in exporter/" if git("status", "--porcelain", "--", "exporter") else "")


def run(sizes, wanted: set[str], log_dir: Path, facts: Facts) -> list[Row]:
    rows: list[Row] = []
    if "5" in wanted:
        _progress("case 5: exposition")
        rows += exposition.run(sizes, facts)
    if wanted & {"1", "3"}:
        _progress(f"replay server: capturing {sizes.ingest_calls:,} calls from the simulator")
        with ApiServer("replay", sizes.ingest_calls, log_dir) as api:
            if "1" in wanted:
                _progress("case 1: ingest")
                rows += ingest.run(api, sizes, facts)
            if "3" in wanted:
                _progress("case 3: scrape latency")
                rows += scrape.run(api, sizes, facts, log_dir)
    if wanted & {"2", "4"}:
        n = sizes.window_calls
        with (
            ApiServer("live", n + sizes.old_small, log_dir) as small,
            ApiServer("live", n + sizes.old_big, log_dir) as big,
        ):
            _progress("case 2: history scaling (the naive peer reads the whole big history: the longest step)")
            rows += history.run(small, big, sizes, facts, log_dir)
            if "4" in wanted:
                _progress("case 4: memory")
                rows += memory.run(small, big, sizes, facts, log_dir)
    if "6" in wanted:
        _progress(f"case 6: read tiers on a reference org ({sizes.tier_calls:,} calls in the window, a simulated hour)")
        rows += tiers.run(sizes, facts, log_dir, _progress)
    if "7" in wanted:
        _progress(f"case 7: state save ({sizes.state_calls:,} tracked calls, JSON file vs SQLite)")
        rows += persistence.run(sizes, facts, log_dir)
    if "8" in wanted:
        calls = int(sizes.backfill_days * sizes.backfill_per_day)
        _progress(f"case 8: backfill of {sizes.backfill_days:g} days, {calls:,} calls")
        rows += backfill.run(sizes, facts, log_dir)
    return sorted(rows, key=lambda row: row.case[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="callingbox-exporter, measured side by side")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the same code (~1 min)")
    p.add_argument("--json", metavar="PATH", help="also write rows, facts and the machine as JSON")
    p.add_argument("--cases", default="1,2,3,4,5,6,7,8", help="which cases to run (4 needs 2; default all)")
    p.add_argument("--revision", help="how to name the exporter measured (default: the git commit of this checkout)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    wanted = set(args.cases.split(","))
    if "4" in wanted:
        wanted.add("2")
    started = time.monotonic()
    facts = Facts()
    about = {**machine(), "exporter": args.revision or exporter_revision()}
    with tempfile.TemporaryDirectory(prefix="callingbox-bench-") as tmp:
        rows = run(sizes, wanted, Path(tmp), facts)
    elapsed = time.monotonic() - started
    print(f"# callingbox-exporter benchmarks: {sizes.name} run, {elapsed / 60:.1f} min\n")
    for key, value in about.items():
        print(f"- {key}: {value}")
    print(f"- goals: {GOALS}")
    print("- ratios are value ÷ reference: for calls/s higher is better, for ms, MB and x lower is better\n")
    print(table(rows))
    missed = [row for row in rows if row.verdict == "MISS"]
    print(f"\n{sum(row.verdict == 'PASS' for row in rows)} PASS, {len(missed)} MISS")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "sizes": asdict(sizes),
                    "machine": about,
                    "seconds": elapsed,
                    "rows": [asdict(r) for r in rows],
                    "facts": facts.by_case,
                },
                indent=1,
            )
        )
    return 0
