"""`python -m benchmarks.dayone`: the day-one sequence end to end, and what the dashboards show of it.

A simulated org with 10 days of past calls; `callingbox-exporter backfill --since 10d`; a real
Prometheus started on the blocks with the rule pack; the whole pack backfilled layer by layer
(deploy/prometheus/backfill_rules.py, Prometheus restarted after each layer); then every query
of the overview dashboard run over the backfilled range, one point an hour. Prints, per panel
target, the share of the hours since the first full day that have data. Not a test: the
evidence behind "Day one" in BENCHMARKS.md (about 5 minutes).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from benchmarks.procs import ROOT, fetch, stop, wait_until
from benchmarks.rule_cost import start_prometheus
from exporter.simulator import Simulator, serve_in_thread

DAY, KEY, JOB = 86400.0, "sk_dayone", "callingbox"
RULES = ROOT / "deploy/prometheus/callingbox-recording.rules.yml"
DASHBOARD = ROOT / "grafana/dashboards/callingbox-overview.json"
VALUES = {
    "org": "default",
    "direction": ".*",
    "campaign": ".*",
    "metadata_label": "campaign",
    "__rate_interval": "10m",  # two backfill steps: what Grafana gives a 5-minute scrape
    "__range": "1h",
}
VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)")


def targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of the overview dashboard."""
    found = []

    def walk(panel: dict) -> None:
        for target in panel.get("targets", []):
            found.append((panel["title"], VARIABLE.sub(lambda m: VALUES[m[1] or m[2]], target["expr"])))
        for inner in panel.get("panels", []):
            walk(inner)

    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        walk(panel)
    return found


def coverage(url: str, expr: str, start: float, end: float) -> float:
    """The share of the hours in [start, end] at which `expr` has a value."""
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 3600})
    status, body = fetch(f"{url}/api/v1/query_range?{query}", timeout=60)
    if status != 200:
        return float("nan")
    hours = {t for series in json.loads(body)["data"]["result"] for t, _ in series["values"]}
    return len(hours) / (int((end - start) // 3600) + 1)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="callingbox-dayone-"))
    sim = Simulator(seed=25, past=10.5 * DAY, past_rate=0.02, rate=0.0, time_scale=20, webhook_retry_base=0.5)
    with serve_in_thread(sim) as url:
        (work / "exporter.yml").write_text(f"api_url: {url}\n")
        started = time.monotonic()
        argv = [sys.executable, "-m", "exporter", "backfill", "--config.file", str(work / "exporter.yml")]
        argv += ["--since", "10d", "--output", str(work / "out"), "--job", JOB, "--instance", "exporter:9860"]
        subprocess.run(argv, cwd=ROOT, env={"CALLINGBOX_API_KEY": KEY, "PATH": _path()}, check=True)
        backfill_s = time.monotonic() - started
    manifest = json.loads((work / "out/backfill.json").read_text())
    (target,) = manifest["targets"]
    since, until = target["since"], target["until"]
    data = work / "data"
    shutil.copytree(work / "out/blocks", data)
    config = {"global": {"evaluation_interval": "1m"}, "rule_files": [str(RULES)]}
    port, process = start_prometheus(data, work, "prometheus", config)

    def load() -> None:
        """(Re)start Prometheus on the data directory and wait until it serves."""
        nonlocal process
        stop(process, 15)
        with (work / "prometheus.log").open("ab") as log:
            argv = [f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={data}"]
            argv += [f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d"]
            process = subprocess.Popen(["prometheus", *argv], stdout=log, stderr=subprocess.STDOUT)
        _ready(port)

    _ready(port)
    tool = _tool()
    options = tool.parse_args(
        [f"--start={math.ceil(since / 300) * 300}", f"--end={math.ceil(until)}"]
        + [f"--url=http://127.0.0.1:{port}", f"--data-dir={data}"]
        + [f"--work-dir={work / 'rules'}", "--run", "--timeout=120", str(RULES)]
    )
    started = time.monotonic()
    layers = tool.write_layers(tool.layers(tool.load_rules([RULES])), options.work_dir)
    tool.run(options, layers, log=lambda line: print(line, file=sys.stderr), load=load)
    rules_s = time.monotonic() - started
    first = (since // DAY + 1) * DAY
    calls = target["calls"]
    print(f"# day one: {calls} calls (10.5 days simulated), backfill {backfill_s:.0f} s, rules {rules_s:.0f} s")
    print(f"# overview dashboard, every target, hours with data from {_iso(first)} to {_iso(until)}\n")
    print("| panel | share of hours with data |\n|---|---:|")
    for title, expr in targets():
        print(f"| {title} | {coverage(f'http://127.0.0.1:{port}', expr, first, until):.0%} |")
    stop(process, 15)
    if os.environ.get("DAYONE_KEEP"):
        print(f"# kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _ready(port: int) -> None:
    def ready() -> bool:
        try:
            return fetch(f"http://127.0.0.1:{port}/-/ready")[0] == 200
        except OSError:
            return False

    wait_until(ready, 60, "prometheus ready")


def _tool():
    spec = importlib.util.spec_from_file_location("backfill_rules", ROOT / "deploy/prometheus/backfill_rules.py")
    module = sys.modules["backfill_rules"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _path() -> str:
    return os.environ["PATH"]


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(at))


if __name__ == "__main__":
    sys.exit(main())
