"""Case 8, day-one backfill: 30 days of an org making 50 000 calls a day (1.5 M calls, issue 25).

`callingbox-exporter backfill --since 30d` runs as its own process against the `live` simulator
(history generated as it streams, spaced so the 30 days hold the calls), promtool building the
blocks as it goes. Measured: the command's wall time, start to exit, with its phases from the
manifest, and the peak RSS of the backfill process itself (VmHWM sampled until it exits;
promtool's memory is its own). The reference figure is the list read alone: what any client
pays to read the history, against which the replay's share is shown. The simulator shares the
machine's two cores during the read, as it does in every case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import MB, Facts, Row, ratio, verdict
from benchmarks.procs import BENCH_KEY, ROOT, ApiServer, memory

CASE = "8 backfill"
GOAL_SECONDS, GOAL_MB = 300.0, 300.0
DAY = 86400.0


def measure(url: str, days: float, log_dir: Path) -> dict:
    """Run the backfill of `days` against `url`; its wall time, peak RSS and manifest."""
    config = log_dir / "backfill.yml"
    config.write_text(f"api_url: {url}\n")
    output = log_dir / "backfill-out"
    argv = [sys.executable, "-m", "exporter", "backfill", "--config.file", str(config), "--since", f"{days}d"]
    argv += ["--output", str(output), "--force"]
    started = time.monotonic()
    with open(log_dir / "backfill.log", "wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={"CALLINGBOX_API_KEY": BENCH_KEY, "PATH": os.environ.get("PATH", "")},
            stdout=log,
            stderr=log,
        )
        peak = 0
        while process.poll() is None:
            try:
                peak = max(peak, memory(process.pid)["VmHWM"])
            except (OSError, KeyError):
                pass  # it is exiting
            time.sleep(0.2)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"backfill exited {process.returncode}: {(log_dir / 'backfill.log').read_text()[-2000:]}")
    manifest = json.loads((output / "backfill.json").read_text())
    files = [Path(f) for t in manifest["targets"] for f in t["files"]]
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "manifest": manifest,
        "openmetrics_bytes": sum(f.stat().st_size for f in files),
        "blocks_bytes": sum(f.stat().st_size for f in (output / "blocks").rglob("*") if f.is_file()),
    }


def run(sizes, facts: Facts, log_dir: Path) -> list[Row]:
    days, per_day = sizes.backfill_days, sizes.backfill_per_day
    calls = int(days * per_day)
    with ApiServer("live", calls, log_dir, history_spacing=DAY / per_day) as api:
        found = measure(api.url, days, log_dir)
    (target,) = found["manifest"]["targets"]
    seconds, peak_mb = found["seconds"], found["peak_bytes"] / MB
    facts[CASE].update(calls=target["calls"], samples=target["samples"], invalid=target["invalid"])
    read = target["read_seconds"]
    return [
        Row(
            CASE,
            f"backfill of {days:g} days × {per_day:,} calls, wall",
            seconds,
            "s",
            goal="≤ 300 s",
            verdict=verdict(seconds <= GOAL_SECONDS) if sizes.name == "full" else "",
        ),
        Row(CASE, "  calls backfilled per second", target["calls"] / seconds, "calls/s"),
        Row(CASE, "  list read (the reference: any client pays it)", read, "s"),
        Row(
            CASE,
            "  sort, replay and OpenMetrics, vs the read",
            target["replay_seconds"],
            "s",
            vs_naive=ratio(target["replay_seconds"], read),
        ),
        Row(CASE, "  promtool left after the replay", found["manifest"]["blocks_wait_seconds"], "s"),
        Row(
            CASE,
            "  peak RSS of the backfill",
            peak_mb,
            "MB",
            goal="≤ 300 MB",
            verdict=verdict(peak_mb <= GOAL_MB) if sizes.name == "full" else "",
        ),
        Row(CASE, "  OpenMetrics written", found["openmetrics_bytes"] / MB, "MB"),
        Row(CASE, "  TSDB blocks", found["blocks_bytes"] / MB, "MB"),
    ]


def main() -> None:
    """`python -m benchmarks.backfill [DAYS PER_DAY]`: this case alone, as JSON."""
    import tempfile
    from types import SimpleNamespace

    days = float(sys.argv[1]) if len(sys.argv) > 1 else 30
    per_day = int(sys.argv[2]) if len(sys.argv) > 2 else 50_000
    sizes = SimpleNamespace(name="full", backfill_days=days, backfill_per_day=per_day)
    with tempfile.TemporaryDirectory(prefix="callingbox-bench-") as tmp:
        rows = run(sizes, Facts(), Path(tmp))
    for row in rows:
        print(json.dumps(row.__dict__))


if __name__ == "__main__":
    main()
