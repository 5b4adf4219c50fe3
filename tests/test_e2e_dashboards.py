"""Every dashboard query on a real Prometheus: simulator → exporter → Prometheus → the panels' PromQL.

The story: the simulator places calls fast enough that every status, webhook and extraction
failures, errors and billing happen within seconds; the exporter polls it with a small label
cap (so values fold into `other`); a real Prometheus scrapes it every second with the shipped
recording rules, as they are (a 5m or 1h window over half a minute of data still yields a
value), and stores exemplars. Malformed records and a 503 are injected once it scrapes, so the
invalid-records and API-error panels have data. Then each variable's query must list the org
and direction, and every target of every panel of both dashboards, with the variables
substituted as Grafana would (a chosen org and direction, then "All"), must succeed and return
a number; each target that asks for exemplars must find some. A panel that stays empty on live
traffic names its dashboard, title and expression.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse

from conftest import http_get, wait_until
from servers import Server, require, start_prometheus
from test_dashboards import (
    DASHBOARDS, LABEL_VALUES, RECORDING_RULES, annotation_queries, load, queries, substitute, variable_query,
    variables,
)

KEY = "sk_test_e2e_dashboards_0123456789"
# Grafana's built-ins as a 1 s scrape interval would give them, over a short range.
BUILTINS = {"__rate_interval": "20s", "__range": "1m", "__range_s": "60", "__range_ms": "60000",
            "__interval": "5s", "__interval_ms": "5000"}
CHOSEN = {"org": "default", "direction": "outbound"}  # a concrete selection; instance: the exporter's own
ALL = ".*"  # each multi-value variable's allValue
WINDOW, STEP = 30, 5  # query_range over the last 30 s, a point every 5 s
DEADLINE = 40.0  # seconds after the rate window has filled for every panel to show data


def _api(prometheus: Server, path: str, params: list[tuple[str, str]]) -> tuple[dict | None, str]:
    """Prometheus's `data`, or None and why not (a bad expression answers 400: reported, not raised)."""
    status, body = http_get(f"{prometheus.url}{path}?{urllib.parse.urlencode(params)}")
    try:
        document = json.loads(body)
    except ValueError:
        return None, f"HTTP {status}: {body[:300]}"
    if status != 200 or document.get("status") != "success":
        return None, f"HTTP {status}: {document.get('errorType')}: {document.get('error')}"
    return document["data"], ""


def _numbers(data: dict) -> list[float]:
    if data["resultType"] == "matrix":
        return [float(v) for series in data["result"] for _, v in series["values"]]
    if data["resultType"] == "vector":
        return [float(series["value"][1]) for series in data["result"]]
    return [float(data["result"][1])]  # scalar


def label_values(prometheus: Server, query: str, values: dict[str, str]) -> tuple[list[str], str]:
    """What Grafana's `label_values(selector, label)` lists: /api/v1/label/<label>/values?match[]=selector."""
    match = LABEL_VALUES.match(query)
    assert match, f"not a label_values() query: {query}"
    now = time.time()
    data, error = _api(prometheus, f"/api/v1/label/{match['label']}/values",
                       [("match[]", substitute(match["selector"], values)), ("start", str(now - 300)), ("end", str(now))])
    return (data or []), error


def problems(prometheus: Server, values: dict[str, str], selection: str) -> list[str]:
    """Every target of every panel that fails or shows nothing, as `dashboard / panel / refId: expr: why`."""
    found, now = [], time.time()
    for uid in DASHBOARDS:
        dashboard = load(uid)
        for title, panel, target in queries(dashboard):
            expr = substitute(target["expr"], values)
            where = f"{uid} / {title!r} / {target['refId']} ({selection}): {expr}"
            if target.get("instant") and not target.get("range"):
                data, error = _api(prometheus, "/api/v1/query", [("query", expr), ("time", str(now))])
            else:
                data, error = _api(prometheus, "/api/v1/query_range", [
                    ("query", expr), ("start", str(now - WINDOW)), ("end", str(now)), ("step", str(STEP))])
            if data is None:
                found.append(f"{where}: {error}")
                continue
            if not any(math.isfinite(v) for v in _numbers(data)):
                found.append(f"{where}: no data ({len(data['result'])} series, none with a finite value)")
            if target.get("exemplar"):
                exemplars, error = _api(prometheus, "/api/v1/query_exemplars", [
                    ("query", expr), ("start", str(now - WINDOW)), ("end", str(now))])
                if not exemplars:
                    found.append(f"{where}: no exemplars {error}")
        for annotation in annotation_queries(dashboard):  # alerts may not fire here: it must only run
            expr = substitute(annotation["expr"], values)
            data, error = _api(prometheus, "/api/v1/query_range", [
                ("query", expr), ("start", str(now - WINDOW)), ("end", str(now)), ("step", "60")])
            if data is None:
                found.append(f"{uid} / annotation {annotation['name']!r} ({selection}): {expr}: {error}")
    return found


def test_every_dashboard_query_shows_data_on_a_real_prometheus(stack, launch, tmp_path):
    require("prometheus")
    assert RECORDING_RULES.exists(), RECORDING_RULES
    # time_scale 300 and fast webhook retries: every outcome, failed webhooks and extractions within
    # seconds. max_label_values 3: the simulator's ten hangup causes overflow the cap.
    sim, url = stack.simulator(seed=17, rate=20, inbound_share=0.3, time_scale=300, webhook_retry_base=0.05,
                               api_key=KEY)
    exporter = stack.exporter({"api_url": url, "poll_interval": "0.5s", "overlap": "10s", "max_label_values": 3},
                              env={"CALLINGBOX_API_KEY": KEY}).start()
    wait_until(exporter.ready, 20, message=f"exporter ready ({exporter.log_path})")
    prometheus = start_prometheus(launch, tmp_path, exporter.url, [RECORDING_RULES],
                                  flags=["--enable-feature=exemplar-storage"])

    def diagnostics() -> str:
        return (f"\n--- prometheus log ({prometheus.log_path}):\n{prometheus.log(2000)}"
                f"\n--- exporter log ({exporter.log_path}):\n{exporter.log()[-2000:]}")

    wait_until(prometheus.ready, 30, interval=0.25, message=f"prometheus ready{diagnostics()}")

    def scraped() -> bool:
        targets = prometheus.api("/api/v1/targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    wait_until(scraped, 15, interval=0.25, message=f"Prometheus scraping the exporter{diagnostics()}")
    sim.inject("malformed", count=2)  # → callingbox_exporter_invalid_records_total{reason}
    sim.inject("status", count=1, code=503)  # → api_requests_total{code="503"}, a failed poll

    # Data must cover the panels' rate window ($__rate_interval) before an empty panel means anything.
    rate_window = int(BUILTINS["__rate_interval"].rstrip("s"))

    def filled() -> bool:
        data = prometheus.api("/api/v1/query", query=f'count_over_time(callingbox_up{{org="default"}}[{rate_window}s])')
        return bool(data["result"]) and float(data["result"][0]["value"][1]) >= rate_window - 2

    wait_until(filled, rate_window + 20, interval=0.5, message=f"{rate_window} s of scrapes{diagnostics()}")

    # The variables, as Grafana resolves them: each lists what the dashboards are about.
    chosen = dict(BUILTINS)
    for uid in DASHBOARDS:
        for name, variable in variables(load(uid)).items():
            if variable["type"] != "query":
                continue
            query = variable_query(variable)
            listed, error = label_values(prometheus, query, chosen | CHOSEN | {"instance": ALL})
            assert listed, f"{uid} variable {name}: {query} lists nothing {error}{diagnostics()}"
            if name in CHOSEN:
                assert CHOSEN[name] in listed, f"{uid} variable {name}: {query} lists {listed}"
            elif name == "instance":
                assert exporter.url.split("://")[1] in listed, f"{uid} variable instance: {listed}"
            chosen[name] = CHOSEN.get(name, listed[0])
    everything = {**BUILTINS, **{name: ALL for name in chosen if name not in BUILTINS}}

    began = time.monotonic()
    deadline = began + DEADLINE
    while True:
        found = problems(prometheus, chosen, "chosen") + problems(prometheus, everything, "All")
        if not found:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} dashboard queries show nothing after {DEADLINE:.0f} s:\n"
                                 + "\n".join(found) + diagnostics())
        time.sleep(1)
    checked = sum(len(queries(load(uid))) for uid in DASHBOARDS)
    print(f"\ndashboards e2e: {checked} targets x 2 selections showed data "
          f"{time.monotonic() - began:.1f} s after the rate window filled; chosen: "
          f"{ {k: v for k, v in chosen.items() if k not in BUILTINS} }")
