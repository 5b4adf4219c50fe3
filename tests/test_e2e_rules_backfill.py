"""Day one: after the layered rules backfill, the baselines the critical call alerts read have values.

The story of docs/runbook.md ("Day one"): 9 days of raw counters become TSDB blocks (as
`callingbox-exporter backfill` writes them), a real Prometheus starts on them with the rule
pack, and deploy/prometheus/backfill_rules.py backfills the recording rules layer by layer with
the real promtool. Before it, the pack finds no baseline (the alerts would take their
no-baseline path, a warning at most); after it, the first evaluation records all six.

Two liberties, both for time: the live copy of the pack runs its 15- and 5-minute groups every
2 s (the expressions are the shipped ones), and Prometheus is restarted after each layer instead
of waiting for its once-a-minute reread of the data directory (the tool's `load` hook; the
command line's default waits). Only the series the baselines need are backfilled (`--only`),
from 8 days back: the 7-day sums of the last day read the 1h increases 7 days before it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

from helpers import ROOT, wait_until
from servers import require, start_prometheus

TOOL = ROOT / "deploy" / "prometheus" / "backfill_rules.py"
RULES = ROOT / "deploy" / "prometheus" / "callingbox-recording.rules.yml"
BASELINES = (
    "org_direction:callingbox_failed:ratio_baseline",
    "org_direction:callingbox_no_answer:ratio_baseline",
    "org_direction:callingbox_asr:ratio_baseline",
    "org_direction:callingbox_short_calls:ratio_baseline",
    "org:callingbox_extraction_failures:ratio_baseline",
    "org:callingbox_billed_amount_dollars:increase1h_baseline",
)
STEP, DAY = 300, 86400
# Calls per 5 minutes and direction that end in each status: calling hours (08-20 UTC), then night.
DAYTIME = {"completed": 12, "no_answer": 4, "busy": 1, "failed": 1, "canceled": 2}
NIGHT = {"completed": 2, "no_answer": 2, "busy": 0, "failed": 1, "canceled": 1}
SHORT = {True: 3, False: 1}  # answered calls of at most 10 s, by day and by night
LABELS = 'job="callingbox",instance="exporter:9860",org="acme"'


def tool():
    """backfill_rules.py as a module: it lives with the rule files, not in a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("backfill_rules", TOOL)
    module = sys.modules["backfill_rules"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def history(end: int, days: int) -> str:
    """Raw counters of one org as OpenMetrics, every 5 minutes for `days` days up to `end`."""
    times = range(end - days * DAY, end + 1, STEP)
    by_day = [8 <= time.gmtime(t).tm_hour < 20 for t in times]
    families: dict[str, list[str]] = {}

    def add(family: str, sample: str, labels: str, per_step) -> None:
        total, lines = 0.0, families.setdefault(family, [])
        for t, day in zip(times, by_day):
            total += per_step(day)
            lines.append(f"{family}{sample}{{{labels}}} {round(total, 2)} {t}")

    def answered(day: bool) -> int:
        return (DAYTIME if day else NIGHT)["completed"]

    for direction in ("inbound", "outbound"):
        where = f'{LABELS},direction="{direction}"'
        for status in DAYTIME:
            ended = lambda day, s=status: (DAYTIME if day else NIGHT)[s]  # noqa: E731
            add("callingbox_calls_ended", "_total", f'{where},status="{status}"', ended)
        done = f'{where},status="completed"'
        add("callingbox_call_duration_seconds", "_bucket", f'{done},le="10.0"', lambda day: SHORT[day])
        add("callingbox_call_duration_seconds", "_bucket", f'{done},le="+Inf"', answered)
        add("callingbox_call_duration_seconds", "_count", done, answered)
        add("callingbox_call_duration_seconds", "_sum", done, lambda day: 60 * answered(day))
        add("callingbox_billed_amount_dollars", "_total", where, lambda day: 0.15 * answered(day))
    for status, per_step in (("completed", 8), ("failed", 2)):
        add("callingbox_result_extractions", "_total", f'{LABELS},status="{status}"', lambda day, n=per_step: n)

    text = []
    for family, lines in families.items():
        kind = "histogram" if family == "callingbox_call_duration_seconds" else "counter"
        text += [f"# TYPE {family} {kind}", *lines]
    return "\n".join([*text, "# EOF", ""])


def live_rule_files(tmp: Path) -> list[Path]:
    """The shipped rule files with every group `interval:` at 2 s: their first evaluation after a
    start comes within seconds instead of within 15 minutes. Expressions are untouched."""
    paths = []
    for source in (RULES, RULES.with_name("callingbox-alerts.rules.yml")):
        document = yaml.safe_load(source.read_text())
        for group in document["groups"]:
            if "interval" in group:
                group["interval"] = "2s"
        paths.append(tmp / f"live-{source.name}")
        paths[-1].write_text(yaml.safe_dump(document, sort_keys=False))
    return paths


def evaluated_since(prometheus, group: str, since: float) -> bool:
    """Whether `group` has been evaluated after `since` (Unix seconds)."""
    (found,) = [g for g in prometheus.api("/api/v1/rules", type="record")["groups"] if g["name"] == group]
    last = found["lastEvaluation"]
    return last[:4] != "0001" and datetime.fromisoformat(last[:26].rstrip("Z") + "+00:00").timestamp() > since


def baselines_after(prometheus, since: float) -> dict[str, int]:
    """Series per baseline whose newest sample is from an evaluation after `since`."""
    found = {}
    for name in BASELINES:
        result = prometheus.api("/api/v1/query", query=f"timestamp({name}) > {since}")["result"]
        found[name] = len(result)
    return found


def quarters_with_values(prometheus, name: str, end: int) -> int:
    """Quarter hours of the day before `end` at which `name` has values (it is recorded every 15 minutes)."""
    query = f"count(last_over_time({name}[15m]))"
    result = prometheus.api("/api/v1/query_range", query=query, start=str(end - DAY), end=str(end), step="900")[
        "result"
    ]
    return len(result[0]["values"]) if result else 0


def test_baselines_have_values_on_the_first_evaluation_after_the_rules_backfill(tmp_path, launch):
    require("prometheus", "promtool")
    end = int(time.time()) // STEP * STEP
    raw = tmp_path / "history.om"
    raw.write_text(history(end, days=9))
    data = tmp_path / "prometheus-data"
    created = subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=24h", str(raw), str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    prometheus = start_prometheus(launch, tmp_path, "http://127.0.0.1:9", rule_files=live_rule_files(tmp_path))
    wait_until(prometheus.ready, 30, message=f"Prometheus ready ({prometheus.log_path})")

    # Without the rules backfill: the raw history is there, yet the pack finds no baseline.
    started = time.time()
    wait_until(lambda: evaluated_since(prometheus, "callingbox-baselines", started + 2), 20, message="evaluations")
    assert prometheus.api("/api/v1/query", query="count(callingbox_calls_ended_total)")["result"]
    assert baselines_after(prometheus, 0) == {name: 0 for name in BASELINES}

    def restart() -> None:
        prometheus.restart()
        wait_until(prometheus.ready, 30, message=f"Prometheus ready again ({prometheus.log_path})")

    backfill = tool()
    only = [f"--only={name}" for name in BASELINES]
    options = backfill.parse_args(
        [f"--start={end - 8 * DAY}", f"--end={end}", f"--url={prometheus.url}", f"--data-dir={data}"]
        + [f"--work-dir={tmp_path / 'rules-backfill'}", "--run", "--timeout=60", *only, str(RULES)]
    )
    layers = backfill.write_layers(
        backfill.layers(backfill.needed_for(backfill.load_rules([RULES]), BASELINES)), options.work_dir
    )
    assert len(layers) == 5
    backfill.run(options, layers, log=print, load=restart)

    done = time.time()
    found = wait_until(
        lambda: all(baselines_after(prometheus, done).values()) and baselines_after(prometheus, done),
        30,
        message="the six baselines evaluated after the backfill",
    )
    assert found == {name: 1 if name.startswith("org:") else 2 for name in BASELINES}  # per org (and direction)
    # ... and the 7-day sums and shares they come from cover the whole last day, every quarter hour.
    same_hour = sorted({r.record for r in backfill.load_rules([RULES]) if r.record.endswith("_same_hour_7d")})
    covered = {name: quarters_with_values(prometheus, name, end) for name in same_hour}
    assert covered == {name: 97 for name in same_hour}


def test_the_pack_splits_into_five_layers_each_reading_only_those_below():
    backfill = tool()
    rules = backfill.load_rules([RULES, RULES.with_name("callingbox-alerts.rules.yml")])
    layers = backfill.layers(rules)
    below: set[str] = set()
    for layer in layers:
        assert all(rule.reads <= below for rule in layer), [r.record for r in layer if not r.reads <= below]
        below |= {rule.record for rule in layer}
    assert len(layers) == 5 and sum(map(len, layers)) == len(rules)
    assert [r.record for r in layers[-1]] == list(BASELINES[:3])  # the shares' shares of the shares
    assert backfill.self_reading(rules) == ["job_instance_org:callingbox_up:known"]


def test_names_are_read_from_expressions_not_from_strings_ranges_or_matchers():
    backfill = tool()
    expr = 'label_replace(last_over_time(a:b:c[1d:1d]) offset 1d23h, "x", "y:z", "", "") or {__name__="d:e:f", s="g:h"}'
    assert {n for n in backfill.names_in(expr) if ":" in n} == {"a:b:c", "d:e:f"}


def test_without_run_it_prints_every_layers_commands(tmp_path, capsys):
    backfill = tool()
    backfill.main(["--start=35d", "--end=2026-12-01T00:00:00Z", f"--work-dir={tmp_path}", str(RULES)])
    printed = capsys.readouterr().out
    # 35 days before the end, from the start of promtool's 18-hour chunk that holds it.
    start = 1793059200 - 1793059200 % (18 * 3600)
    assert printed.count(f"promtool tsdb create-blocks-from rules --start={start} --end=1796083200") == 5
    assert printed.count("mv ") == 5 and printed.count("until curl") == 5


def test_day_long_blocks_only_where_the_range_queries_stay_under_11000_points(tmp_path):
    backfill = tool()
    (rule_file,) = backfill.write_layers([backfill.load_rules([RULES])[:1]], tmp_path)  # a group without interval
    for interval, long_blocks in (("1m", True), ("6s", True), ("5s", False)):
        options = backfill.parse_args(["--start=1d", "--end=86400", f"--eval-interval={interval}", str(RULES)])
        command = backfill.promtool_command(options, rule_file, tmp_path / "blocks")
        assert ("--max-block-duration=24h" in command) is long_blocks, interval  # 18 h / 5 s = 12 960 points
