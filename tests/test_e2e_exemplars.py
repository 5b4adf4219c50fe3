"""Exemplars end to end: the exporter's OpenMetrics exposition → a real Prometheus → its API.

The story: calls flow from the simulator; the OpenMetrics exposition names, on each terminal
call counter and on the bucket each observation fell in, the id of a real call, and that call
(fetched from the simulator by id) has the series' status and a value inside the bucket; a
Prometheus started with exemplar storage scrapes the exporter and returns the same kind of
exemplars from /api/v1/query_exemplars, which is what a Grafana panel reads to link a spike to
one call.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.request

from helpers import wait_until
from servers import require, start_prometheus

KEY = "sk_test_e2e_exemplars_0123456789"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# name{labels} value # {call_id="..."} exemplar-value timestamp
EXEMPLAR_LINE = re.compile(
    r'^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} \S+ # \{call_id="(?P<id>[^"]+)"\} (?P<value>\S+) \S+$'
)
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def openmetrics(url: str) -> str:
    request = urllib.request.Request(url + "/metrics", headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text"), response.headers
        return response.read().decode()


def exemplars(text: str) -> list[tuple[str, dict[str, str], str, float]]:
    """(sample name, labels, call id, exemplar value) for each exemplar in an exposition."""
    found = []
    for line in text.splitlines():
        match = EXEMPLAR_LINE.match(line)
        if match:
            labels = dict(re.findall(r'([a-z_]+)="([^"]*)"', match["labels"]))
            found.append((match["name"], labels, match["id"], float(match["value"])))
    return found


def fetch_call(sim_url: str, call_id: str) -> dict:
    request = urllib.request.Request(f"{sim_url}/v1/calls/{call_id}", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def assert_exemplar_is_that_call(sim_url: str, name: str, labels: dict[str, str], call_id: str, value: float):
    """The call named by an exemplar exists and belongs in the series (and bucket) carrying it."""
    assert UUID.match(call_id), f"{name}{labels}: exemplar {call_id!r} is not a call id"
    call = fetch_call(sim_url, call_id)  # raises on 404: the call must exist
    where = f"{name}{labels} exemplar {call_id}"
    if "status" in labels:
        assert call["status"] == labels["status"], f"{where}: the call is {call['status']}"
    if "direction" in labels:
        assert call["direction"] == labels["direction"], f"{where}: the call is {call['direction']}"
    if name.startswith("callingbox_call_duration_seconds"):
        assert value == call["duration_seconds"], f"{where}: value {value}, call lasted {call['duration_seconds']}"
    if name.startswith("callingbox_call_billed_duration_seconds"):
        assert value == call["billed_duration_seconds"], where
    if name == "callingbox_billed_amount_dollars_total":
        assert value == call["billing_amount_milli_cents"] / 100_000, where
    if name.endswith("_bucket"):
        assert value <= float(labels["le"]), f"{where}: value {value} above its bucket"


def test_openmetrics_exemplars_name_real_calls_and_prometheus_stores_them(stack, launch, tmp_path):
    require("prometheus")
    sim, sim_url = stack.simulator(seed=5, rate=20, time_scale=120, webhook_retry_base=0.05, api_key=KEY)
    exporter = stack.exporter(
        {"api_url": sim_url, "poll_interval": "0.5s", "overlap": "10s"}, env={"CALLINGBOX_API_KEY": KEY}
    ).start()

    def enough() -> list:
        found = exemplars(openmetrics(exporter.url))
        names = {name for name, *_ in found}
        return (
            found
            if {
                "callingbox_calls_ended_total",
                "callingbox_call_duration_seconds_bucket",
                "callingbox_billed_amount_dollars_total",
            }
            <= names
            else []
        )

    found = wait_until(enough, 30, interval=0.5, message="exemplars on calls, duration buckets and money")
    for name, labels, call_id, value in found:
        assert labels["org"] == "default"
        assert_exemplar_is_that_call(sim_url, name, labels, call_id, value)
    names = {name for name, *_ in found}
    assert names <= {
        "callingbox_calls_ended_total",
        "callingbox_call_hangups_total",
        "callingbox_call_errors_total",
        "callingbox_billed_amount_dollars_total",
        "callingbox_call_duration_seconds_bucket",
        "callingbox_call_answer_delay_seconds_bucket",
        "callingbox_call_setup_delay_seconds_bucket",
        "callingbox_call_billed_duration_seconds_bucket",
    }, names

    # The classic text format, which carries no exemplars, is unchanged by them.
    with urllib.request.urlopen(exporter.url + "/metrics", timeout=5) as response:
        assert "call_id" not in response.read().decode()

    began = time.time()
    prometheus = start_prometheus(launch, tmp_path, exporter.url, flags=["--enable-feature=exemplar-storage"])
    wait_until(prometheus.ready, 30, interval=0.25, message=f"prometheus ready ({prometheus.log_path})")

    def stored(query: str) -> list[dict]:
        data = prometheus.api("/api/v1/query_exemplars", query=query, start=str(began - 60), end=str(time.time() + 60))
        return [(series["seriesLabels"], e) for series in data for e in series["exemplars"]]

    for query in (
        'callingbox_calls_ended_total{org="default"}',
        'callingbox_call_duration_seconds_bucket{org="default"}',
    ):
        got = wait_until(lambda: stored(query), 30, interval=0.5, message=f"Prometheus exemplars of {query}")
        for series, exemplar in got[:20]:
            value = float(exemplar["value"])
            assert not math.isnan(value)
            assert set(exemplar["labels"]) == {"call_id"}, exemplar
            assert_exemplar_is_that_call(sim_url, series["__name__"], series, exemplar["labels"]["call_id"], value)
