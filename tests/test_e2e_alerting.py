"""Whole alerting path: simulator → exporter → real Prometheus → real Alertmanager → a webhook.

The story: normal traffic flows long enough to fill the 1 h windows and nothing pages; then the
simulator's outcome mix turns to mostly `failed`, CallingBoxFailedCallsSpike fires in
Prometheus, goes through Alertmanager and reaches the test's webhook receiver for org="default";
the mix goes back to normal and the receiver gets the `resolved` notification. The exporter
never looks down or absent meanwhile.

Why the rules run time-compressed: the production rules speak in 5 m and 1 h windows, baselines
at the same hour of earlier days (hourly increases `offset 1d` to `offset 7d`, in a group
evaluated every `interval: 5m`) and `for: 10m`; played in real time this story would take hours. The promtool
unit tests (tests/test_alerting_rules.py) prove the production thresholds and windows exactly,
in simulated time. This test proves what promtool cannot: the plumbing (exposition scraped by a
real Prometheus, rules loaded from the shipped files, notifications through a real Alertmanager
and webhook, resolution sent) and the rules' logic on live, noisy traffic. So it loads the
shipped rule files with every window, subquery step, offset, `for:` and group `interval:`
divided by FACTOR (5m → 5s, 10m → 10s, 1h → 1m, offset 23h → offset 23m, offset 6d23h30m →
offset 2h47m30s, interval: 5m → 5s) and checks the result with `promtool check rules` before use. Durations
written as plain numbers in comparisons (a pending age > 1800) are thresholds, not windows, and
stay as they are: the alerts built on them are the promtool tests' to prove.

Which path of the spike alert this exercises: the no-baseline one. Compressed, the baseline
reads data older than 23 minutes, and this Prometheus is a few minutes old, so the org has no
baseline series during the whole test (asserted) and the alert fires on its absolute threshold
(> 20 % failed), volume guard and `for:` alone, as a new org's would: as a warning with
`baseline="none"` (asserted), the rule that may not page. The baseline path (the page; a high
but normal org stays silent, a sustained outage keeps firing for hours) is proven by promtool in
deploy/prometheus/tests/baselines.test.yml and history.test.yml, with days of simulated history.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from exporter.simulator import OUTCOME_WEIGHTS
from helpers import ROOT, live_simulator, wait_until
from servers import Server, require, start_prometheus, write_yaml

KEY = "sk_test_e2e_alerting_0123456789"
RULE_FILES = (
    ROOT / "deploy/prometheus/callingbox-recording.rules.yml",
    ROOT / "deploy/prometheus/callingbox-alerts.rules.yml",
)
BINARIES = ("prometheus", "promtool", "prometheus-alertmanager")
# Production minutes play as test seconds. The shortest window, 5m, becomes 5 s: five scrapes,
# ten polls. The baselines' nearest hour, `offset 23h`, becomes `offset 23m`: it ends 23 minutes
# ago, before this test's Prometheus started, so no baseline exists during the test, as on a new
# org's first day in production.
FACTOR = 60
JOB = "callingbox"  # any name: the rules find the exporter by its callingbox_up, not by job
SPIKE = {"completed": 20, "no_answer": 5, "busy": 2, "failed": 70, "canceled": 3}
# Wall seconds of normal traffic before the spike: six times the spike alert's `for:` (10 s here),
# long enough for the 1 h windows (1 min) to fill. With no baseline, what keeps the normal mix
# (~11 % failed) silent meanwhile is the absolute threshold (20 %).
NORMAL_PHASE = 60.0
SPIKE_ALERT = "CallingBoxFailedCallsSpike"
# Must not fire in this story. CallingBoxExtractionsFailing may: with no baseline it compares
# with 10 % alone, and about half of the simulator's extractions fail normally (its unanswered
# calls have nothing to extract), as on a real new org's first day.
# Nor may the exporter look stale or stuck, nor any alert that needs a baseline or a week of
# history (there is none here), nor calls look stuck while they ring by the dozen, nor a budget
# that the demo does not set.
NEVER = re.compile(
    r"CallingBox(ExporterDown|ExporterStuck|.*Absent.*|NoAnswerSpike|DataStale|AnsweredCallsDrop"
    r"|CampaignStalled|SpendSpike|SpendOverBudget|CallsStuckBeforeRinging)"
)
BASELINE = re.compile(r":ratio_baseline$")  # the recorded baselines the spike alert compares with

# ---- time compression of rule files -----------------------------------------------------------

_DURATION = r"(?:\d+(?:ms|[smhdwy]))+"
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def duration_seconds(text: str) -> float:
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in re.findall(r"(\d+)(ms|[smhdwy])", text))


def format_duration(seconds: float) -> str:
    """Seconds as a Prometheus duration: 1440 → 24m, 90 → 1m30s, 1.5 → 1s500ms."""
    ms, parts = round(seconds * 1000), []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(parts) or "0s"


def compress_rules(text: str, factor: float, minimum: float = 1.0) -> str:
    """Rule file text with every range `[...]` (subquery steps too), `offset`, `for:` and group
    `interval:` duration divided by `factor`.

    A result below `minimum` seconds becomes `minimum`. Names (`...:rate5m`) are left alone: they
    still say which production window the series stands for.
    """

    def short(duration: str) -> str:
        return format_duration(max(minimum, duration_seconds(duration) / factor))

    def range_(match: re.Match) -> str:  # [5m] and subqueries [1h:1m] / [1h:]
        step = f":{short(match[2]) if match[2] else ''}" if ":" in match[0] else ""
        return f"[{short(match[1])}{step}]"

    text = re.sub(rf"\[\s*({_DURATION})\s*(?::\s*({_DURATION})?\s*)?\]", range_, text)
    text = re.sub(rf"\boffset(\s+)({_DURATION})\b", lambda m: f"offset{m[1]}{short(m[2])}", text)
    return re.sub(
        rf"^(\s*(?:for|keep_firing_for|interval):\s*)(['\"]?)({_DURATION})\2(\s*(?:#.*)?)$",
        lambda m: f"{m[1]}{m[2]}{short(m[3])}{m[2]}{m[4]}",
        text,
        flags=re.MULTILINE,
    )


@pytest.mark.parametrize(
    "production, compressed",
    [
        ("rate(x[5m])", "rate(x[5s])"),
        ("increase(x[1h]) / increase(x[1d])", "increase(x[1m]) / increase(x[24m])"),
        ("avg_over_time(r[1d:5m]) and x offset 1h", "avg_over_time(r[24m:5s]) and x offset 1m"),
        ("increase(x[7d] offset 1d)", "increase(x[2h48m] offset 24m)"),
        ("sum_over_time(r:increase1h[7d:1h] offset 1d)", "sum_over_time(r:increase1h[2h48m:1m] offset 24m)"),
        (
            'label_replace(r:increase1h offset 6d23h30m, "day", "7", "", "")',  # the baselines
            'label_replace(r:increase1h offset 2h47m30s, "day", "7", "", "")',
        ),
        ("last_over_time(x[1d:1d])", "last_over_time(x[24m:24m])"),  # midnight, for today's spend
        ("    interval: 5m\n", "    interval: 5s\n"),
        ("x offset 1w", "x offset 2h48m"),
        ("    interval: 1m\n", "    interval: 1s\n"),  # a group's evaluation interval
        ("max_over_time(r[1h:])", "max_over_time(r[1m:])"),
        ("rate(x[30s])", "rate(x[1s])"),  # the minimum
        ("rate(x[1h30m])", "rate(x[1m30s])"),
        ("rate(x[90s])", "rate(x[1s500ms])"),
        ('x{status=~"[a-z]+"} > 0.5', 'x{status=~"[a-z]+"} > 0.5'),  # not a duration: untouched
        ("    for: 10m\n", "    for: 10s\n"),
        ("    for: '1h'  # ride out a bad hour\n", "    for: '1m'  # ride out a bad hour\n"),
        ("  - record: org:callingbox_failed:ratio_rate5m\n", "  - record: org:callingbox_failed:ratio_rate5m\n"),
    ],
)
def test_compress_rules_divides_every_window_offset_and_for(production, compressed):
    assert compress_rules(production, 60) == compressed


# ---- the servers -------------------------------------------------------------------------------


class Receiver:
    """An Alertmanager webhook endpoint on loopback that records every notification."""

    def __init__(self):
        self.notifications: list[tuple[float, dict]] = []  # (monotonic time received, payload)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.notifications.append((time.monotonic(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self.thread.start()

    def alerts(self, name_pattern: str = ".*", status: str | None = None, **labels: str) -> list[tuple[float, dict]]:
        """(time received, alert) for every notified alert matching name, status and labels."""
        with self._lock:
            notifications = list(self.notifications)
        return [
            (at, alert)
            for at, payload in notifications
            for alert in payload["alerts"]
            if re.fullmatch(name_pattern, alert["labels"].get("alertname", ""))
            and (status is None or alert["status"] == status)
            and all(alert["labels"].get(k) == v for k, v in labels.items())
        ]

    def states(self, name_pattern: str, **labels: str) -> dict[tuple[tuple[str, str], ...], str]:
        """The last notified status (firing, resolved) of each matching alert, by its labels."""
        return {
            tuple(sorted(alert["labels"].items())): alert["status"] for _, alert in self.alerts(name_pattern, **labels)
        }

    def summary(self) -> str:
        with self._lock:
            return "\n".join(f"  {a['status']} {a['labels']}" for _, p in self.notifications for a in p["alerts"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def servers(launch):
    """Start Prometheus, Alertmanager and the webhook receiver; all are stopped at the end."""
    receiver = Receiver()
    try:
        yield launch, receiver
    finally:
        receiver.close()


def compressed_rule_files(tmp: Path) -> list[Path]:
    """The shipped rule files time-compressed into `tmp`, each checked by promtool."""
    missing = [str(p.relative_to(ROOT)) for p in RULE_FILES if not p.exists()]
    assert not missing, f"the shipped rule files are missing: {missing}"
    paths = []
    for source in RULE_FILES:
        path = tmp / f"compressed-{source.name}"
        path.write_text(compress_rules(source.read_text(), FACTOR))
        check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"promtool rejects the compressed {source.name}:\n{check.stdout}{check.stderr}"
        paths.append(path)
    return paths


def start_alertmanager(start, tmp: Path, webhook_url: str) -> Server:
    config = write_yaml(
        tmp / "alertmanager.yml",
        {
            "route": {
                "receiver": "test",
                "group_by": ["alertname", "org"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1m",
            },
            "receivers": [{"name": "test", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
        },
    )
    return start(
        "alertmanager",
        [
            "prometheus-alertmanager",
            f"--config.file={config}",
            f"--storage.path={tmp / 'alertmanager-data'}",
            "--cluster.listen-address=",  # empty: no gossip port, no peers
        ],
    )


# ---- the story -----------------------------------------------------------------------------------


def _prometheus_alerts(prometheus: Server, name: str, state: str, **labels: str) -> list[dict]:
    return [
        a
        for a in prometheus.api("/api/v1/alerts")["alerts"]
        if a["labels"].get("alertname") == name
        and a["state"] == state
        and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


def _alert_series(prometheus: Server, rule_files: list[Path], name: str) -> dict[str, int]:
    """For each recorded series the alert `name` reads (any of its rules): how many series it has
    for org="default"."""
    groups = [g for p in rule_files for g in yaml.safe_load(p.read_text())["groups"]]
    rules = [r for g in groups for r in g["rules"]]
    expr = "\n".join(r["expr"] for r in rules if r.get("alert") == name)
    records = sorted(
        {r["record"] for r in rules if "record" in r and re.search(rf"\b{re.escape(r['record'])}\b", expr)}
    )
    return {
        record: len(prometheus.api("/api/v1/query", query=f'{record}{{org="default"}}')["result"]) for record in records
    }


def test_failed_call_spike_fires_reaches_the_webhook_and_resolves(stack, servers, tmp_path):
    require(*BINARIES)
    start, receiver = servers
    rule_files = compressed_rule_files(tmp_path)
    # 15 calls/s each way: a 5 s window ("5m") holds ~70 seizures per direction, so normal noise
    # never reaches the 20 % threshold; the volume guard counts per window, so compressed windows
    # need FACTOR times the production volume to pass it.
    sim, url = live_simulator(stack, KEY, seed=11, rate=30, inbound_share=0.5, outcome_weights=OUTCOME_WEIGHTS)
    exporter = stack.exporter(
        {"api_url": url, "poll_interval": "0.5s", "overlap": "10s"}, env={"CALLINGBOX_API_KEY": KEY}
    ).start()
    running: dict[str, Server] = {}

    def diagnostics() -> str:
        text = f"\nreceiver got:\n{receiver.summary()}"
        if "prometheus" in running:
            try:
                alerts = [
                    (a["labels"]["alertname"], a["state"])
                    for a in running["prometheus"].api("/api/v1/alerts")["alerts"]
                ]
            except (AssertionError, OSError) as error:
                alerts = [f"unavailable: {error}"]
            text += f"\nPrometheus alerts now: {alerts}"
        for server in running.values():
            text += f"\n--- {server.name} log ({server.log_path}):\n{server.log()}"
        return text + f"\n--- exporter log ({exporter.log_path}):\n{exporter.log()[-2000:]}"

    def wait(predicate, timeout: float, what: str):
        try:
            return wait_until(predicate, timeout, interval=0.25, message=what)
        except AssertionError as error:
            raise AssertionError(f"{error}{diagnostics()}") from None

    wait(exporter.ready, 20, "exporter ready")
    alertmanager = running["alertmanager"] = start_alertmanager(start, tmp_path, receiver.url)
    wait(alertmanager.ready, 30, "alertmanager ready")
    prometheus = running["prometheus"] = start_prometheus(start, tmp_path, exporter.url, rule_files, alertmanager)
    wait(prometheus.ready, 30, "prometheus ready")
    began = time.monotonic()

    def scraped() -> bool:
        targets = prometheus.api("/api/v1/targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    wait(scraped, 15, "Prometheus scraping the exporter")

    def no_baseline() -> dict[str, int]:
        """The series the spike alert reads: the baseline absent (the no-baseline path), the rest present."""
        reads = _alert_series(prometheus, rule_files, SPIKE_ALERT)
        baselines = {record: n for record, n in reads.items() if BASELINE.search(record)}
        current = {record: n for record, n in reads.items() if not BASELINE.search(record)}
        assert baselines and current, f"{SPIKE_ALERT} reads {sorted(reads)}: no baseline, or nothing else"
        assert all(current.values()), f"series {SPIKE_ALERT} reads, without data: {current}"
        assert not any(baselines.values()), (
            f"a baseline exists, so the no-baseline path is not the one tested: {baselines}{diagnostics()}"
        )
        return reads

    # Normal traffic: the 1 h windows fill, nothing pages.
    time.sleep(max(0.0, NORMAL_PHASE - (time.monotonic() - began)))
    no_baseline()
    assert _prometheus_alerts(prometheus, SPIKE_ALERT, "firing") == [], diagnostics()
    assert _prometheus_alerts(prometheus, SPIKE_ALERT, "pending") == [], diagnostics()
    assert receiver.alerts(SPIKE_ALERT) == [], diagnostics()

    # The spike: most new calls fail.
    sim.set_outcome_weights(SPIKE)
    spiked = time.monotonic()
    wait(
        lambda: _prometheus_alerts(prometheus, SPIKE_ALERT, "firing", org="default"),
        60,
        f"{SPIKE_ALERT} firing in Prometheus",
    )
    fired = time.monotonic()
    no_baseline()  # it fired through the no-baseline path
    wait(lambda: receiver.alerts(SPIKE_ALERT, "firing", org="default"), 20, f"{SPIKE_ALERT} firing at the webhook")
    notified = time.monotonic()
    # Without a baseline the org is judged on the threshold alone: a warning, never a page.
    assert {
        (a["labels"]["severity"], a["labels"].get("baseline"), a["labels"]["audience"])
        for _, a in receiver.alerts(SPIKE_ALERT, org="default")
    } == {("warning", "none", "platform")}, diagnostics()

    # Recovery: the normal mix again, and the page resolves.
    sim.set_outcome_weights(OUTCOME_WEIGHTS)
    restored = time.monotonic()
    # Every direction that paged resolves (they need not resolve at the same evaluation).
    wait(
        lambda: set(receiver.states(SPIKE_ALERT, org="default").values()) == {"resolved"},
        60,
        f"every {SPIKE_ALERT} resolved at the webhook",
    )
    resolved = time.monotonic()
    no_baseline()  # still none at the end: the whole story ran on the no-baseline path
    assert _prometheus_alerts(prometheus, SPIKE_ALERT, "firing") == [], diagnostics()
    paged = sorted(dict(labels)["direction"] for labels in receiver.states(SPIKE_ALERT, org="default"))

    # Paged for the right reason only: the exporter was up throughout, no_answer did not spike.
    assert receiver.alerts(NEVER.pattern) == [], diagnostics()
    window = format_duration(time.monotonic() - began + 5)
    ever = prometheus.api("/api/v1/query", query=f'max_over_time(ALERTS{{alertstate="firing"}}[{window}])')["result"]
    names = sorted({series["metric"]["alertname"] for series in ever})
    assert not [n for n in names if NEVER.fullmatch(n)], f"fired: {names}{diagnostics()}"
    print(
        f"\nalerting e2e (factor {FACTOR}): normal phase {spiked - began:.1f}s, spike → Prometheus firing "
        f"{fired - spiked:.1f}s, → webhook {notified - spiked:.1f}s; restore → webhook resolved "
        f"{resolved - restored:.1f}s; total {resolved - began:.1f}s; directions paged: {paged}; "
        f"alerts that fired: {names}"
    )
