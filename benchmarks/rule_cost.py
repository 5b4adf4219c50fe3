"""What the rule pack costs a real Prometheus: the same history, the rules of two commits.

For each set of rule files (the working tree's and an earlier commit's, 41f30d9 by default):

1. writes the same synthetic history, as OpenMetrics with timestamps: the series of ORGS orgs as
   the exporter exposes them (its own Collector names them; hangup causes, error codes and API
   codes added), scraped every 30 s for the last 26 hours (with the recorded target memory that
   CallingBoxExporterAbsent reads a day of), and the hourly increases the rules record
   (`...:increase1h`, every 30 s) for the 9 days before, which is all that any baseline reads
   further back than a day;
2. turns it into TSDB blocks with `promtool tsdb create-blocks-from openmetrics`, and lets a
   Prometheus without rules compact them as it would over the days it kept them (`compact`);
3. starts Prometheus on those blocks (one per rule set, side by side, so both see the same load) with the
   rule files, scraping a live target that carries the same series on (every counter grows at its own
   rate), scrapes and evaluations every 30 s
   (kube-prometheus-stack's defaults, and deploy/compose's);
4. for WAIT seconds reads Prometheus' own `prometheus_rule_group_last_duration_seconds` (from its
   /metrics, with each group's last evaluation time, so each evaluation counts once) every 10 s,
   and keeps each group's median over its evaluations after the first (which warms caches up);
   WAIT is long enough for the 15-minute group to run four times; then queries every rule's expression
   once with `stats=all`, for the samples each group reads per evaluation (a count, not a time:
   the same on a busy machine as on an idle one).

It prints, per rule set, for the baseline groups and for all groups: the sum of the groups' last
durations (the work of one evaluation of each group) and the work per minute (each group's
duration times its evaluations a minute); and each group's figure. BENCHMARKS.md, "Rule
evaluation cost", holds a run.

    python -m benchmarks.rule_cost [--commit 41f30d9] [--orgs 3] [--wait 2900]

Needs `prometheus` and `promtool` (Debian's, as `make test` installs). About 55 minutes: not a
part of `make bench` or the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from benchmarks.procs import free_port
from exporter.health import Health, Snapshot
from exporter.metrics import Collector
from exporter.store import Store

ROOT = Path(__file__).resolve().parent.parent
RULES = ("deploy/prometheus/callingbox-recording.rules.yml", "deploy/prometheus/callingbox-alerts.rules.yml")
SCRAPE, EVALUATION = 30, 30  # seconds: kube-prometheus-stack's defaults, and deploy/compose's
RAW_HISTORY, RECORDED_HISTORY = 26 * 3600, 9 * 86400  # seconds before the start
DIRECTIONS = ("outbound", "inbound")
TERMINAL = ("completed", "no_answer", "busy", "canceled", "failed")


def exporter_series(org: str) -> list[tuple[str, dict[str, str]]]:
    """(name, labels) of every series the exporter exposes for `org`, as its own Collector names
    them at start, plus what a running org adds: hangup causes, error codes, API status codes."""
    collector = Collector("bench")
    asyncio.run(collector.publish(org, Snapshot(Store(), Health())))
    series = [
        (s.name, dict(s.labels)) for family in collector.collect() for s in family.samples if s.labels.get("org") == org
    ]
    for direction in DIRECTIONS:
        for status in TERMINAL:
            for cause in ("normal_clearing", "no_answer", "user_busy"):
                series.append(
                    (
                        "callingbox_call_hangups_total",
                        {"org": org, "direction": direction, "status": status, "hangup_cause": cause},
                    )
                )
        for code in ("invalid_number", "carrier_error", "insufficient_credits"):
            series.append(("callingbox_call_errors_total", {"org": org, "direction": direction, "error_code": code}))
    for code in ("200", "429", "error"):
        series.append(("callingbox_exporter_api_requests_total", {"org": org, "code": code}))
    series.append(("callingbox_daily_budget_dollars", {"org": org}))
    return series


def rate(name: str, labels: dict[str, str]) -> float:
    """Per second, stable per series: counters grow, histogram buckets cumulatively by `le`."""
    key = json.dumps([name.rsplit("_", 1)[0], {k: v for k, v in labels.items() if k != "le"}], sort_keys=True)
    base = 0.02 + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF * 0.3
    if name.endswith("_bucket"):
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        return base * (1.0 if le == float("inf") else min(1.0, (1 + le) / 61))
    return base * (60 if name.endswith("_sum") else 1)


def value(name: str, labels: dict[str, str], t: float, epoch: float) -> float:
    if name == "callingbox_up":
        return 1.0
    if name == "callingbox_daily_budget_dollars":
        return 1e9
    if name.endswith("_timestamp_seconds"):
        return t - 5
    if name.endswith(("_total", "_bucket", "_count", "_sum")):
        return round(rate(name, labels) * (t - epoch), 3)
    return 3.0  # gauges: active calls, pending webhooks, back-off, depth...


def label_text(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def recorded(orgs: list[str], series: list[tuple[str, dict]]) -> list[tuple[str, dict, float]]:
    """The hourly increases the 1h group records that baselines read: (name, labels, per hour)."""
    hourly: dict[tuple[str, str], float] = {}
    out = []
    for name, labels in series:
        r = rate(name, labels) * 3600
        org, direction = labels["org"], labels.get("direction", "")
        if name == "callingbox_calls_ended_total":
            out.append(
                (
                    "org_direction_status:callingbox_calls_ended:increase1h",
                    {"org": org, "direction": direction, "status": labels["status"]},
                    r,
                )
            )
        elif name == "callingbox_calls_created_total":
            out.append(("org_direction:callingbox_calls_created:increase1h", {"org": org, "direction": direction}, r))
        elif name == "callingbox_call_duration_seconds_count" and labels.get("status") == "completed":
            out.append(
                ("org_direction:callingbox_answered_durations:increase1h", {"org": org, "direction": direction}, r)
            )
        elif (
            name == "callingbox_call_duration_seconds_bucket"
            and labels.get("status") == "completed"
            and labels["le"] in ("10", "10.0")
        ):
            out.append(("org_direction:callingbox_short_calls:increase1h", {"org": org, "direction": direction}, r))
        elif name == "callingbox_result_extractions_total":
            hourly[(org, "all")] = hourly.get((org, "all"), 0) + r
            if labels["status"] == "failed":
                hourly[(org, "failed")] = r
        elif name == "callingbox_billed_amount_dollars_total":
            hourly[(org, "billed")] = hourly.get((org, "billed"), 0) + r
    for org in orgs:
        out.append(("org:callingbox_result_extractions:increase1h", {"org": org}, hourly[(org, "all")]))
        out.append(("org:callingbox_extraction_failures:increase1h", {"org": org}, hourly[(org, "failed")]))
        out.append(("org:callingbox_billed_amount_dollars:increase1h", {"org": org}, hourly[(org, "billed")]))
    return out


def write_history(path: Path, orgs: list[str], target: dict[str, str], start: float) -> int:
    """OpenMetrics with timestamps up to `start` (exclusive); returns the samples written."""
    series = [s for org in orgs for s in exporter_series(org)]
    epoch = start - RECORDED_HISTORY
    samples = 0
    with path.open("w") as out:
        raw_times = [start - RAW_HISTORY + i * SCRAPE for i in range(RAW_HISTORY // SCRAPE)]
        for name, labels in series:
            text = name + label_text({**labels, **target})
            out.writelines(f"{text} {value(name, labels, t, epoch)} {t:.0f}\n" for t in raw_times)
            samples += len(raw_times)
        # Which target served which org (CallingBoxExporterAbsent reads a day of it).
        for org in orgs:
            text = "job_instance_org:callingbox_up:known" + label_text({"org": org, **target})
            out.writelines(f"{text} 1 {t:.0f}\n" for t in raw_times)
            samples += len(raw_times)
        rec_times = [start - RECORDED_HISTORY + i * EVALUATION for i in range(RECORDED_HISTORY // EVALUATION)]
        for name, labels, per_hour in recorded(orgs, series):
            text = name + label_text(labels)
            # A gentle daily cycle, so the hours of a day differ as they do in life.
            out.writelines(
                f"{text} {per_hour * (1.5 if 8 <= (t % 86400) / 3600 < 20 else 0.5):.3f} {t:.0f}\n" for t in rec_times
            )
            samples += len(rec_times)
        out.write("# EOF\n")
    return samples


class LiveTarget:
    """The same series, now: what Prometheus scrapes after the history ends."""

    def __init__(self, orgs: list[str], epoch: float):
        series = [s for org in orgs for s in exporter_series(org)]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler(series, epoch))
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def _handler(series, epoch):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                t = time.time()
                body = "".join(
                    f"{name}{label_text(labels)} {value(name, labels, t, epoch)}\n" for name, labels in series
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.server.shutdown()


def rule_group_metrics(port: int) -> dict[str, dict[str, float]]:
    """Prometheus' own rule-group gauges from its /metrics: {metric: {group name: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    found: dict[str, dict[str, float]] = {}
    for name, group, number in re.findall(
        r"^(prometheus_rule_group_(?:last_duration|interval|last_evaluation_timestamp)_seconds)"
        r'\{rule_group="[^;"]*;([^"]+)"\} (\S+)$',
        text,
        re.MULTILINE,
    ):
        found.setdefault(name, {})[group] = float(number)
    return found


def start_prometheus(data: Path, work: Path, name: str, config: dict) -> tuple[int, subprocess.Popen]:
    """Prometheus on `data` with `config`, its log in `work/NAME.log`; returns (port, process)."""
    port, path = free_port(), work / f"{name}.yml"
    path.write_text(json.dumps(config))
    with (work / f"{name}.log").open("wb") as log:
        argv = [f"--config.file={path}", f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}"]
        process = subprocess.Popen(
            ["prometheus", *argv, "--storage.tsdb.retention.time=30d"], stdout=log, stderr=subprocess.STDOUT
        )
    return port, process


def compact(data: Path, work: Path, settle: float = 120.0, limit: float = 900.0) -> int:
    """Let Prometheus compact the backfilled blocks before anything is measured; returns the blocks left.

    `promtool tsdb create-blocks-from openmetrics` writes 2-hour blocks (9 days: 108 of them), which
    a running Prometheus compacts into blocks of up to a tenth of its retention in the background.
    Measured on the raw blocks, the first evaluations would open every one of them and share the
    CPU with that compaction: a week-old history that has lived in Prometheus is a few large
    blocks. So Prometheus runs here alone (no rules, no scrapes) until its block count has not
    changed for `settle` seconds (at most `limit`).
    """
    port, prometheus = start_prometheus(data, work, "compact", {"global": {"scrape_interval": "1h"}})
    try:
        blocks, since, deadline = None, time.time(), time.time() + limit
        while time.time() < deadline and time.time() - since < settle:
            time.sleep(5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    found = re.search(rb"^prometheus_tsdb_blocks_loaded (\S+)$", response.read(), re.MULTILINE)
            except OSError:
                continue  # not listening yet
            if found and float(found[1]) != blocks:
                blocks, since = float(found[1]), time.time()
        return int(blocks or 0)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=60)


def samples_read(port: int, rule_dir: Path) -> dict[str, int]:
    """Samples each group's rules read in one evaluation, now: every rule's expression queried with
    `stats=all` (Prometheus' own count, `totalQueryableSamples`). Unlike a duration it does not
    depend on the machine's load, so it says whether a difference in time is a difference in work."""
    read: dict[str, int] = {}
    for path in sorted(rule_dir.iterdir()):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                query = urllib.parse.urlencode({"query": rule["expr"], "stats": "all"})
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=60) as response:
                    stats = json.load(response)["data"]["stats"]["samples"]
                read[group["name"]] = read.get(group["name"], 0) + stats["totalQueryableSamples"]
    return read


def measure(rule_dir: Path, orgs: list[str], wait: float, work: Path) -> dict:
    work.mkdir(parents=True)
    start = time.time()
    live = LiveTarget(orgs, start - RECORDED_HISTORY)
    target = {"job": "callingbox", "instance": f"127.0.0.1:{live.port}"}
    history = work / "history.om"
    samples = write_history(history, orgs, target, start)
    data = work / "data"
    subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(history), str(data)],
        check=True,
        capture_output=True,
    )
    history.unlink()
    blocks = compact(data, work)
    port, prometheus = start_prometheus(
        data,
        work,
        "prometheus",
        {
            "global": {"scrape_interval": f"{SCRAPE}s", "evaluation_interval": f"{EVALUATION}s"},
            "rule_files": [str(rule_dir / Path(r).name) for r in RULES],
            "scrape_configs": [{"job_name": "callingbox", "static_configs": [{"targets": [target["instance"]]}]}],
        },
    )
    try:
        deadline = time.time() + wait
        evaluations: dict[str, dict[float, float]] = {}  # group -> {evaluation time: its duration}
        intervals: dict[str, float] = {}
        while time.time() < deadline:
            time.sleep(10)
            metrics = rule_group_metrics(port)
            intervals.update(metrics.get("prometheus_rule_group_interval_seconds", {}))
            for group, at in metrics.get("prometheus_rule_group_last_evaluation_timestamp_seconds", {}).items():
                if at > 0:
                    evaluations.setdefault(group, {})[at] = metrics["prometheus_rule_group_last_duration_seconds"][
                        group
                    ]
        # Each group's first evaluation warms caches up: the steady state is the ones after it.
        readings = {g: [d for _, d in sorted(evals.items())[1:]] for g, evals in evaluations.items()}
        readings = {g: v for g, v in readings.items() if v}
        if not readings:
            raise SystemExit(
                f"Prometheus reported no rule groups; its log:\n{(work / 'prometheus.log').read_text()[-3000:]}"
            )
        groups = {g: statistics.median(v) for g, v in readings.items()}
        if set(intervals) - set(groups):
            raise SystemExit(f"not evaluated within --wait: {sorted(set(intervals) - set(groups))}")
        read = samples_read(port, rule_dir)
        return {
            "blocks": blocks,
            "samples": samples,
            "groups": groups,
            "intervals": intervals,
            "read": read,
            "read_per_minute": sum(n * 60 / intervals[g] for g, n in read.items()),
            "evaluations": {g: len(v) for g, v in readings.items()},
            "per_evaluation": sum(groups.values()),
            "per_minute": sum(d * 60 / intervals[g] for g, d in groups.items()),
        }
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        live.close()


def rules_of(commit: str | None, directory: Path) -> Path:
    directory.mkdir(parents=True)
    for path in RULES:
        text = (
            (ROOT / path).read_text()
            if commit is None
            else subprocess.run(
                ["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        )
        (directory / Path(path).name).write_text(text)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="41f30d9", help="the rules to compare with (default %(default)s)")
    parser.add_argument("--orgs", type=int, default=3)
    parser.add_argument("--wait", type=float, default=2900, help="seconds each Prometheus runs (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed")
    orgs = [f"org{i}" for i in range(args.orgs)]
    runs = ((args.commit, args.commit), ("working tree", None))
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(len(runs)) as pool:
        # Side by side, not one after the other: on a shared machine both see the same load.
        futures = {
            label: pool.submit(
                measure, rules_of(commit, Path(tmp) / f"rules-{i}"), orgs, args.wait, Path(tmp) / f"run-{i}"
            )
            for i, (label, commit) in enumerate(runs)
        }
        results = {label: future.result() for label, future in futures.items()}
    before, after = results[args.commit], results["working tree"]
    for r in results.values():
        baselines = {g: d for g, d in r["groups"].items() if g.startswith("callingbox-baselines")}
        r["baselines_per_evaluation"] = sum(baselines.values())
        r["baselines_per_minute"] = sum(d * 60 / r["intervals"][g] for g, d in baselines.items())
        r["baselines_read_per_minute"] = sum(
            n * 60 / r["intervals"][g] for g, n in r["read"].items() if g.startswith("callingbox-baselines")
        )
    print(
        "| rule files | groups | history samples | blocks | baselines: per evaluation | baselines: per minute "
        "| all groups: per evaluation | all groups: per minute |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(
            f"| {label} | {len(r['groups'])} | {r['samples']:,} | {r['blocks']} "
            f"| {r['baselines_per_evaluation'] * 1000:.1f} ms "
            f"| {r['baselines_per_minute'] * 1000:.1f} ms | {r['per_evaluation'] * 1000:.1f} ms "
            f"| {r['per_minute'] * 1000:.1f} ms |"
        )
    print(
        f"| before ÷ after | | | | {before['baselines_per_evaluation'] / after['baselines_per_evaluation']:.1f}x "
        f"| {before['baselines_per_minute'] / after['baselines_per_minute']:.1f}x "
        f"| {before['per_evaluation'] / after['per_evaluation']:.1f}x "
        f"| {before['per_minute'] / after['per_minute']:.1f}x |"
    )
    print()
    print("| rule files | baselines: samples read per minute | all groups: samples read per minute |")
    print("|---|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['baselines_read_per_minute']:,.0f} | {r['read_per_minute']:,.0f} |")
    print(
        f"| before ÷ after | {before['baselines_read_per_minute'] / after['baselines_read_per_minute']:.1f}x "
        f"| {before['read_per_minute'] / after['read_per_minute']:.1f}x |"
    )
    print()
    for label, r in results.items():
        print(f"{label}:")
        for group, seconds in sorted(r["groups"].items(), key=lambda item: -item[1]):
            print(
                f"  {group:32} {seconds * 1000:8.2f} ms every {r['intervals'][group]:.0f} s, "
                f"median of {r['evaluations'][group]} evaluations, {r['read'].get(group, 0):,} samples read"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
