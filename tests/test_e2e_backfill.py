"""Day one (issue 25): ten days of a simulated org's past, backfilled into a real Prometheus, the
recording rules backfilled over it layer by layer (the baselines of the critical call alerts have
values at the first evaluation after), and the live exporter carrying on from the backfill's
state with live traffic: per day, increase() equals the truth; no series resets across the join;
the totals after the live minute equal the truth (nothing counted twice at the join).

The truth comes from two places, neither of them the exporter. For the families dated by the
call's own timestamps (creation, end and its details, billing) it is the simulator's, which
saw every version. For outcomes it is the list as the backfill read it (the simulator frozen
meanwhile): a backfill sees a call once, as it is now, so an outcome is dated by the call's last
update and a webhook delivered then replayed by hand counts once (README, "Day one").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from test_e2e_rules_backfill import BASELINES, RULES, baselines_after, evaluated_since, live_rule_files, tool

from benchmarks.procs import WaitTimedOut
from exporter.simulator import Truth
from helpers import (
    COUNTERS,
    FLOAT_SUMS,
    HISTOGRAMS,
    ROOT,
    differences,
    free_port,
    http_get,
    iso_seconds,
    list_calls,
    parse_metrics,
    wait_until,
)
from servers import require, start_prometheus

DAY = 86400.0
JOB = "callingbox"
KEY = "sk_backfill"
OUTCOMES = {
    "callingbox_webhook_deliveries_total": ("webhook_status", "webhook_url", ("delivered", "failed")),
    "callingbox_result_extractions_total": ("result_status", "returns", ("completed", "failed")),
}
# The families compared with the truth, as the exporter names their samples.
_NAMES = (
    *COUNTERS,
    "callingbox_billed_amount_dollars_total",
    *(h + suffix for h in HISTOGRAMS for suffix in ("_count", "_sum", "_bucket")),
)
# Per day, money is a difference of two float dollar values: equal but for the last bits.
DAILY_FLOATS = (*FLOAT_SUMS, "callingbox_billed_amount_dollars_total")


def _outcomes(calls: list[dict], after: float, until: float) -> dict:
    """Outcome counts as a backfill dates them: each call's outcome as listed, at its updated_at,
    for calls with the outcome's subject (SPEC §4)."""
    counts: dict = {}
    for call in calls:
        at = iso_seconds(call["updated_at"])
        if not after < at <= until:
            continue
        for name, (field, subject, values) in OUTCOMES.items():
            if call.get(subject) and call.get(field) in values:
                key = (name, (("status", call[field]),))
                counts[key] = counts.get(key, 0) + 1
    return counts


def _expected(sim, calls: list[dict], after: float, until: float) -> Truth:
    """What the backfill must show for (after, until]: the simulator's truth, outcomes as listed."""
    truth = sim.truth(after, until)
    counters = {key: value for key, value in truth.counters.items() if key[0] not in OUTCOMES}
    counters.update(_outcomes(calls, after, until))
    return Truth(counters, truth.observations)


def _query(prometheus, expr: str, at: float) -> dict:
    """An instant query: {(name, labels without job and instance): value}."""
    status, body = http_get(f"{prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': expr, 'time': at})}")
    assert status == 200, body
    found = {}
    for row in json.loads(body)["data"]["result"]:
        labels = {k: v for k, v in row["metric"].items() if k not in ("job", "instance", "__name__")}
        found[tuple(sorted(labels.items()))] = float(row["value"][1])
    return found


def _each(prometheus, template: str, at: float, names: tuple[str, ...] = ()) -> dict:
    """`template` (with {name}) queried for every compared family (or `names`): exporter-like samples."""
    samples = {}
    for name in names or _NAMES:
        for labels, value in _query(prometheus, template.format(name=name, job=JOB), at).items():
            samples[(name, labels)] = value
    return samples


def _backfill_rules(prometheus, data: Path, tmp: Path, since: float, until: float) -> None:
    """deploy/prometheus/backfill_rules.py --run for the series the baselines need, Prometheus
    restarted after each layer (instead of waiting for its once-a-minute reread)."""

    def restart() -> None:
        prometheus.restart()
        wait_until(prometheus.ready, 30, f"Prometheus ready again ({prometheus.log_path})")

    backfill = tool()
    options = backfill.parse_args(
        [f"--start={int(since)}", f"--end={int(until)}", f"--url={prometheus.url}", f"--data-dir={data}"]
        + [f"--work-dir={tmp / 'rules-backfill'}", "--run", "--timeout=60", str(RULES)]
        + [f"--only={name}" for name in BASELINES]
    )
    needed = backfill.needed_for(backfill.load_rules([RULES]), BASELINES)
    backfill.run(options, backfill.write_layers(backfill.layers(needed), options.work_dir), log=print, load=restart)


def _backfill(config: Path, output: Path, instance: str) -> dict:
    argv = [sys.executable, "-m", "exporter", "backfill", "--config.file", str(config), "--since", "10d"]
    argv += ["--step", "5m", "--output", str(output), "--job", JOB, "--instance", instance]
    env = {"CALLINGBOX_API_KEY": KEY, "PATH": os.environ["PATH"]}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads((output / "backfill.json").read_text())


def test_ten_days_backfilled_then_carried_on_live_exactly_once_with_no_reset(stack, launch, tmp_path):
    require("prometheus", "promtool")
    sim, url = stack.simulator(
        seed=25,
        past=10.5 * DAY,
        past_rate=0.02,  # ~1 700 calls a day
        rate=1.0,
        time_scale=20,
        webhook_retry_base=0.5,
        replay_share=0.05,
        api_key=KEY,
    )
    exporter_port = free_port()
    instance = f"127.0.0.1:{exporter_port}"
    config = tmp_path / "backfill.yml"
    config.write_text(f"api_url: {url}\n")

    # The backfill reads a still list: what it saw is what the truth of outcomes is built from.
    sim.freeze()
    calls = list_calls(url, KEY)
    manifest = _backfill(config, tmp_path / "backfill", instance)
    assert calls == list_calls(url, KEY), "the list moved while frozen"
    sim.thaw()
    (target,) = manifest["targets"]
    since, until = target["since"], target["until"]
    assert target["invalid"] == 0 and target["calls"] > 10 * 1000

    data = tmp_path / "prometheus-data"
    shutil.copytree(tmp_path / "backfill" / "blocks", data)
    prometheus = start_prometheus(launch, tmp_path, f"http://{instance}", rule_files=live_rule_files(tmp_path), job=JOB)
    wait_until(prometheus.ready, 60, "prometheus ready")

    # The recording rules over the backfilled range, layer by layer (docs/runbook.md, Day one):
    # the baselines the critical call alerts read have values at the first evaluation after.
    started = time.time()
    wait_until(lambda: evaluated_since(prometheus, "callingbox-baselines", started + 2), 30, "a baselines evaluation")
    assert baselines_after(prometheus, 0) == {name: 0 for name in BASELINES}, "baselines before the rules backfill"
    _backfill_rules(prometheus, data, tmp_path, since=since, until=until)  # the range the backfill printed
    # At the cut-off, before Prometheus evaluated anything: values only the backfill can have written.
    at_cutoff = {name: len(_query(prometheus, name, until)) for name in BASELINES}
    assert all(at_cutoff.values()), {name: n for name, n in at_cutoff.items() if not n}
    done = time.time()
    found = wait_until(lambda: all(baselines_after(prometheus, done).values()), 30, "baselines evaluated after it")
    assert found
    state_file = tmp_path / "exporter.db"
    shutil.copy(tmp_path / "backfill" / "state" / "default.db", state_file)
    settings = {"poll_interval": "1s", "new_series_hold": "2s"}
    exporter = stack.exporter(
        {"api_url": url, "state_file": str(state_file), **settings}, env={"CALLINGBOX_API_KEY": KEY}
    )
    exporter.port, exporter.url = exporter_port, f"http://{instance}"
    exporter.start()

    # The join: the live exporter serves the backfill's last values at once, then counts on.
    first = parse_metrics(http_get(exporter.url + "/metrics")[1])
    last_day = _query(prometheus, f'callingbox_calls_created_total{{job="{JOB}"}}', until)
    for labels, value in last_day.items():
        assert first[("callingbox_calls_created_total", labels)] >= value

    # A minute of live traffic, then every call runs to its end.
    deadline = time.monotonic() + 60
    wait_until(lambda: time.monotonic() > deadline, 70, "a minute of live traffic", interval=1)
    sim.pause()
    wait_until(sim.all_final, 120, "every call final")
    live = sim.truth(until)
    expected = _expected(sim, calls, since, until)
    total = Truth(
        {k: expected.counters.get(k, 0) + live.counters.get(k, 0) for k in {*expected.counters, *live.counters}},
        {
            k: expected.observations.get(k, []) + live.observations.get(k, [])
            for k in {*expected.observations, *live.observations}
        },
    )
    off: list[str] = []

    def exact() -> bool:
        off[:] = differences(exporter.scrape(), total)
        return not off

    try:
        wait_until(exact, 60, "the exporter exact after the live minutes")
    except WaitTimedOut:
        raise AssertionError(f"not exact after the live minutes: {off[:10]}") from None

    # Per day of the backfilled range, increase() equals the truth, family by family.
    first_midnight = (since // DAY + 1) * DAY
    days = [d for d in range(int(first_midnight), int(until), int(DAY)) if d + DAY <= until]
    assert len(days) >= 8
    for start in days:
        got = _each(prometheus, 'increase({name}{{job="{job}"}}[1d])', start + DAY)
        problems = differences(got, _expected(sim, calls, start, start + DAY), floats=DAILY_FLOATS)
        assert problems == [], f"day starting {time.strftime('%F', time.gmtime(start))}: {problems[:10]}"

    # No series resets anywhere, across the join included.
    latest = lambda: _each(prometheus, '{name}{{job="{job}"}}', time.time())  # noqa: E731
    wait_until(lambda: not differences(latest(), total), 30, "prometheus has scraped the final values")
    every = (*_NAMES, "callingbox_exporter_contract_deviations_total", "callingbox_exporter_label_overflow_total")
    resets = _each(prometheus, 'resets({name}{{job="{job}"}}[11d])', time.time(), every)
    assert len(resets) > 100 and all(v == 0 for v in resets.values()), {k: v for k, v in resets.items() if v}
