"""Every dashboard query on a real Prometheus: simulator → exporter → Prometheus → the panels' PromQL.

The story: two simulators place calls fast enough that every status, webhook and extraction
failures, errors and billing happen within seconds; one exporter polls them as two orgs with a
small label cap (so hangup causes fold into `other`; the three error codes fit under it):
`default` with `metadata_labels: {campaign: campaign}`, `plain` with none. A real Prometheus
scrapes it every second with the shipped recording rules, as they are (a 5m or 1h window over
half a minute of data still yields a value), and stores exemplars. First, on that healthy run,
each variable's query must list the org, direction and campaign (and, for `plain`, no campaign:
Grafana then offers only All), and every target of every panel of both dashboards, with the
variables substituted as Grafana would (a chosen org, direction and campaign; "All"; and the org
without metadata labels with campaign All), must succeed and return a number; each target that
asks for exemplars must find some, each carrying the `call_id` label the provisioned datasource
links to the call; the per-org table must have a row for each org in every column; the panels
about trouble (invalid records, label overflow, API error ratio, audit mismatches) must read 0,
not "No data" (SPEC §3); and the API cost panels must show a series for each endpoint, code and
refresh path, with the list's bytes and the read depth above 0 (SPEC §4).

The previous-week overlays (a KPI's recorded series `offset 7d`) cannot show data on a Prometheus
a minute old. They are not skipped: each must be its panel's twin target with `offset 7d`, run
without error, and return an empty result (data would mean the offset is not applied), while the
twin, run as any other target, returns data.

Then malformed records and a 503 are injected, and the invalid-records and API-error panels must
rise above 0. A panel that stays empty names its dashboard, title and expression.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request

from test_dashboards import (
    DASHBOARDS,
    LABEL_VALUES,
    ORG_TABLE,
    RECORDING_RULES,
    annotation_queries,
    exemplar_link,
    is_previous_week,
    load,
    queries,
    substitute,
    this_week,
    variable_query,
    variables,
)

from helpers import http_get, wait_until
from servers import Server, require, start_prometheus

KEYS = {"default": "sk_test_e2e_dashboards_0123456789", "plain": "sk_test_e2e_dashboards_plain_01234"}
# Grafana's built-ins as a 1 s scrape interval would give them, over a short range.
BUILTINS = {
    "__rate_interval": "20s",
    "__range": "1m",
    "__range_s": "60",
    "__range_ms": "60000",
    "__interval": "5s",
    "__interval_ms": "5000",
}
CHOSEN = {"org": "default", "direction": "outbound"}  # a concrete selection; instance: the exporter's own
PLAIN = {"org": "plain", "direction": "outbound"}  # the org without metadata labels
ALL = ".*"  # each multi-value variable's allValue
WINDOW, STEP = 30, 5  # query_range over the last 30 s, a point every 5 s
DEADLINE = 40.0  # seconds after the rate window has filled for every panel to show data
# Panels that read 0, not "No data", while nothing is wrong: (dashboard, title) → the labels of
# the series that must be there, each at 0 at every point of the range.
ZERO_WHEN_HEALTHY = {
    ("callingbox-exporter", "Invalid records by reason"): {"org": "default"},
    ("callingbox-exporter", "Label overflow"): {"org": "default", "label": "error_code"},
    ("callingbox-exporter", "API error ratio (15m)"): {"org": "default"},
    ("callingbox-exporter", "Audit mismatches over the range by kind"): {"org": "default"},
}
# Of those, the panels the injected faults (malformed records, a 503) must lift above 0.
RAISED_BY_FAULTS = (
    ("callingbox-exporter", "Invalid records by reason"),
    ("callingbox-exporter", "API error ratio (15m)"),
)
# The API cost panels (SPEC §4, read only what can have changed): (dashboard, title) → the series
# each must show at the end of the range, and whether it must be above 0 (else any number). Polls
# read the list, so its bytes and the depth are positive; by-id reads and open calls may be 0.
SHOWN_WHEN_HEALTHY = {
    ("callingbox-exporter", "API bytes read per second by endpoint"): [
        ({"org": "default", "endpoint": "list"}, True),
        ({"org": "default", "endpoint": "call"}, False),
    ],
    ("callingbox-exporter", "API bytes read over 24h"): [
        ({"org": "default", "endpoint": "list"}, True),
        ({"org": "default", "endpoint": "call"}, False),
    ],
    ("callingbox-exporter", "Read depth of the last list read"): [({"org": "default"}, True)],
    ("callingbox-exporter", "Time since last full read"): [({"org": "default"}, False)],
    ("callingbox-exporter", "Open calls by refresh path"): [
        ({"org": "default", "path": "list"}, False),
        ({"org": "default", "path": "by_id"}, False),
    ],
    ("callingbox-exporter", "API requests over 24h by code"): [({"org": "default", "code": "200"}, True)],
    ("callingbox-exporter", "Poll back-off"): [({"org": "default"}, False)],
    ("callingbox-exporter", "Time to next poll"): [({"org": "default"}, False)],
}
ERROR_CODES = ["insufficient_credits", "invalid_number", "carrier_error"]  # as many as max_label_values


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


def api_campaigns(sim_url: str, key: str) -> set[str]:
    """The `campaign` metadata of the calls the API lists: the truth the campaign variable must offer."""
    request = urllib.request.Request(f"{sim_url}/v1/calls", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        calls = json.loads(response.read())
    return {c["metadata"]["campaign"] for c in calls if (c.get("metadata") or {}).get("campaign")}


def label_values(prometheus: Server, query: str, values: dict[str, str]) -> tuple[list[str], str]:
    """What Grafana's `label_values(selector, label)` lists: /api/v1/label/<label>/values?match[]=selector.
    The label may be a variable (`$metadata_label`), substituted first as Grafana does."""
    match = LABEL_VALUES.match(query)
    assert match, f"not a label_values() query: {query}"
    now = time.time()
    data, error = _api(
        prometheus,
        f"/api/v1/label/{substitute(match['label'], values)}/values",
        [("match[]", substitute(match["selector"], values)), ("start", str(now - 300)), ("end", str(now))],
    )
    return (data or []), error


def _run(prometheus: Server, target: dict, expr: str, now: float) -> tuple[dict | None, str]:
    """A panel target as Grafana runs it: an instant query, or a range over the last WINDOW seconds."""
    if target.get("instant") and not target.get("range"):
        return _api(prometheus, "/api/v1/query", [("query", expr), ("time", str(now))])
    return _api(
        prometheus,
        "/api/v1/query_range",
        [("query", expr), ("start", str(now - WINDOW)), ("end", str(now)), ("step", str(STEP))],
    )


def _run_panel(
    prometheus: Server, uid: str, title: str, target: dict, values: dict[str, str], selection: str, now: float
) -> tuple[str, str, dict | None, str]:
    """A panel target run under a selection's variable values: where it is (for messages), its query, and
    `_run`'s data and error."""
    expr = substitute(target["expr"], values)
    where = f"{uid} / {title!r} / {target['refId']} ({selection}): {expr}"
    return (where, expr, *_run(prometheus, target, expr, now))


def _series_values(data: dict) -> list[tuple[dict[str, str], list[float]]]:
    """(labels, values) of each series of a vector or matrix result."""
    if data["resultType"] == "matrix":
        return [(series["metric"], [float(v) for _, v in series["values"]]) for series in data["result"]]
    return [(series["metric"], [float(series["value"][1])]) for series in data["result"]]


def panel_targets(uid: str, title: str) -> list[dict]:
    targets = [target for panel_title, _, target in queries(load(uid)) if panel_title == title]
    assert targets, f"{uid} has no panel {title!r}"
    return targets


def previous_week_problem(panel: dict, target: dict, data: dict) -> str:
    """What is wrong with a previous-week overlay on a Prometheus younger than a week ('' if nothing):
    it must be the twin of another target of its panel, and find nothing a week ago."""
    twins = [t for t in panel["targets"] if not is_previous_week(t) and t["expr"] == this_week(target["expr"])]
    if not twins:
        return "no twin target without the offset in its panel"
    if data["result"]:
        return f"returns {len(data['result'])} series a week back on a fresh Prometheus: is the offset applied?"
    return ""


def problems(prometheus: Server, values: dict[str, str], selection: str) -> list[str]:
    """Every target of every panel that fails or shows nothing, as `dashboard / panel / refId: expr: why`.
    A previous-week overlay must instead succeed with nothing (see the module docstring)."""
    found, now = [], time.time()
    link_label = exemplar_link()["name"]
    for uid in DASHBOARDS:
        dashboard = load(uid)
        for title, panel, target in queries(dashboard):
            where, expr, data, error = _run_panel(prometheus, uid, title, target, values, selection, now)
            if data is None:
                found.append(f"{where}: {error}")
                continue
            if is_previous_week(target):
                why = previous_week_problem(panel, target, data)
                found += [f"{where}: previous-week overlay {why}"] if why else []
                continue
            if not any(math.isfinite(v) for v in _numbers(data)):
                found.append(f"{where}: no data ({len(data['result'])} series, none with a finite value)")
            if target.get("exemplar"):
                exemplars, error = _api(
                    prometheus,
                    "/api/v1/query_exemplars",
                    [("query", expr), ("start", str(now - WINDOW)), ("end", str(now))],
                )
                if not exemplars:
                    found.append(f"{where}: no exemplars {error}")
                unlinked = [
                    e["labels"]
                    for series in exemplars or []
                    for e in series["exemplars"]
                    if link_label not in e["labels"]
                ]
                if unlinked:
                    found.append(f"{where}: exemplars without the {link_label} the datasource links: {unlinked[:3]}")
        for annotation in annotation_queries(dashboard):  # alerts may not fire here: it must only run
            expr = substitute(annotation["expr"], values)
            data, error = _api(
                prometheus,
                "/api/v1/query_range",
                [("query", expr), ("start", str(now - WINDOW)), ("end", str(now)), ("step", "60")],
            )
            if data is None:
                found.append(f"{uid} / annotation {annotation['name']!r} ({selection}): {expr}: {error}")
    return found


def selected_org(values: dict[str, str]) -> str:
    """The org whose series a selection's checks look for: the chosen one, or `default` under All."""
    return "default" if values["org"] == ALL else values["org"]


def zero_panels(prometheus: Server, values: dict[str, str], selection: str) -> tuple[list[str], list[str]]:
    """The ZERO_WHEN_HEALTHY panels: the series still missing ("No data"), and those reading anything but 0."""
    missing, wrong, now = [], [], time.time()
    for (uid, title), wanted in ZERO_WHEN_HEALTHY.items():
        wanted = {**wanted, "org": selected_org(values)}
        for target in panel_targets(uid, title):
            where, _, data, error = _run_panel(prometheus, uid, title, target, values, selection, now)
            if data is None:
                missing.append(f"{where}: {error}")
                continue
            series = [(labels, vs) for labels, vs in _series_values(data) if wanted.items() <= labels.items()]
            if not any(vs for _, vs in series):
                missing.append(f"{where}: no series {wanted}, only {[labels for labels, _ in _series_values(data)]}")
            wrong.extend(f"{where}: {labels} reads {vs}, not 0" for labels, vs in series if any(v != 0 for v in vs))
    return missing, wrong


def unshown(prometheus: Server, values: dict[str, str], selection: str) -> list[str]:
    """The SHOWN_WHEN_HEALTHY series missing at the end of the range, or not above 0 where they must be."""
    found, now = [], time.time()
    for (uid, title), wanted in SHOWN_WHEN_HEALTHY.items():
        exprs, latest, errors = [], [], []
        for target in panel_targets(uid, title):
            exprs.append(substitute(target["expr"], values))
            data, error = _run(prometheus, target, exprs[-1], now)
            latest += [(labels, vs[-1]) for labels, vs in (_series_values(data) if data else []) if vs]
            errors += [error] if error else []
        for labels, positive in wanted:
            labels = {**labels, "org": selected_org(values)}
            read = [v for got, v in latest if labels.items() <= got.items() and math.isfinite(v)]
            if not read or (positive and not any(v > 0 for v in read)):
                found.append(
                    f"{uid} / {title!r} ({selection}): {' ; '.join(exprs)}: {labels} reads {read}"
                    f"{' (must be > 0)' if positive else ''}; shown: {latest} {' '.join(errors)}"
                )
    return found


def missing_table_rows(prometheus: Server, values: dict[str, str], orgs: list[str]) -> list[str]:
    """Each column of the per-org table that lacks a row (a series) for one of `orgs`."""
    found, now = [], time.time()
    for target in panel_targets("callingbox-overview", ORG_TABLE):
        expr = substitute(target["expr"], values)
        data, error = _run(prometheus, target, expr, now)
        rows = {labels.get("org") for labels, vs in (_series_values(data) if data else []) if vs}
        lacking = [org for org in orgs if org not in rows]
        if lacking or set(rows) - set(orgs):
            found.append(
                f"{ORG_TABLE} / {target['refId']}: {expr}: rows {sorted(map(str, rows))}, "
                f"expected one per org {orgs} {error}"
            )
    return found


def raised(prometheus: Server, uid: str, title: str, values: dict[str, str]) -> str:
    """'' once the panel reads above 0 for the org at the end of the range, else what it reads."""
    for target in panel_targets(uid, title):
        expr = substitute(target["expr"], values)
        data, error = _run(prometheus, target, expr, time.time())
        series = _series_values(data) if data else []
        latest = [vs[-1] for labels, vs in series if labels.get("org") == "default" and vs]
        if not any(v > 0 for v in latest):
            return f"{uid} / {title!r} / {target['refId']}: {expr}: reads {latest} {error}"
    return ""


def settle(check, what: str, diagnostics) -> float:
    """Run `check` (→ a list of problems) until it finds none; fail after DEADLINE seconds. Returns the wait."""
    began = time.monotonic()
    while True:
        found = check()
        if not found:
            return time.monotonic() - began
        if time.monotonic() - began > DEADLINE:
            raise AssertionError(f"{len(found)} {what} after {DEADLINE:.0f} s:\n" + "\n".join(found) + diagnostics())
        time.sleep(1)


def test_every_dashboard_query_shows_data_on_a_real_prometheus(stack, launch, tmp_path):
    require("prometheus")
    assert RECORDING_RULES.exists(), RECORDING_RULES
    # time_scale 300 and fast webhook retries: every outcome, failed webhooks and extractions within
    # seconds. max_label_values 3: the simulator's ten hangup causes overflow the cap, its three
    # error codes do not (label_overflow{label="error_code"} stays 0).
    # `plain`: a second simulator, fewer calls a second, and no metadata labels.
    sims, targets = {}, []
    for seed, (org, rate) in enumerate((("default", 20), ("plain", 10)), start=17):
        sims[org] = stack.simulator(
            seed=seed,
            rate=rate,
            inbound_share=0.3,
            time_scale=300,
            webhook_retry_base=0.05,
            error_codes=ERROR_CODES,
            api_key=KEYS[org],
        )
        key_file = tmp_path / f"{org}.key"
        key_file.write_text(KEYS[org] + "\n")
        targets.append({"name": org, "api_url": sims[org][1], "api_key_file": str(key_file)})
    targets[0]["metadata_labels"] = {"campaign": "campaign"}  # the simulator's metadata key, as a label
    sim, sim_url = sims["default"]
    exporter = stack.exporter(
        {"poll_interval": "0.5s", "overlap": "10s", "max_label_values": 3, "targets": targets}
    ).start()
    wait_until(exporter.ready, 20, message=f"exporter ready ({exporter.log_path})")
    prometheus = start_prometheus(
        launch, tmp_path, exporter.url, [RECORDING_RULES], flags=["--enable-feature=exemplar-storage"]
    )

    def diagnostics() -> str:
        return (
            f"\n--- prometheus log ({prometheus.log_path}):\n{prometheus.log(2000)}"
            f"\n--- exporter log ({exporter.log_path}):\n{exporter.log()[-2000:]}"
        )

    wait_until(prometheus.ready, 30, interval=0.25, message=f"prometheus ready{diagnostics()}")

    def scraped() -> bool:
        targets = prometheus.api("/api/v1/targets")["activeTargets"]
        return bool(targets) and all(t["health"] == "up" for t in targets)

    wait_until(scraped, 15, interval=0.25, message=f"Prometheus scraping the exporter{diagnostics()}")

    # Data must cover the panels' rate window ($__rate_interval) before an empty panel means anything.
    rate_window = int(BUILTINS["__rate_interval"].rstrip("s"))

    def filled() -> bool:
        data = prometheus.api("/api/v1/query", query=f'count_over_time(callingbox_up{{org="default"}}[{rate_window}s])')
        return bool(data["result"]) and float(data["result"][0]["value"][1]) >= rate_window - 2

    wait_until(filled, rate_window + 20, interval=0.5, message=f"{rate_window} s of scrapes{diagnostics()}")

    # The variables, as Grafana resolves them: each lists what the dashboards are about. A constant
    # (metadata_label) is substituted as it is; the campaign variable lists the default org's
    # campaigns, and nothing for the org without metadata labels, where Grafana offers only All.
    chosen, constants = dict(BUILTINS), {}
    for uid in DASHBOARDS:
        for name, variable in variables(load(uid)).items():
            if variable["type"] == "constant":
                constants[name] = chosen[name] = variable["query"]
            if variable["type"] != "query":
                continue
            query = variable_query(variable)
            listed, error = label_values(prometheus, query, chosen | CHOSEN | {"instance": ALL})
            assert listed, f"{uid} variable {name}: {query} lists nothing {error}{diagnostics()}"
            if name in CHOSEN:
                assert CHOSEN[name] in listed, f"{uid} variable {name}: {query} lists {listed}"
            elif name == "instance":
                assert exporter.url.split("://")[1] in listed, f"{uid} variable instance: {listed}"
            elif name == "campaign":  # the API's campaigns, `none` (series known at 0) and `other` (over the cap)
                campaigns = api_campaigns(sim_url, KEYS["default"])
                assert set(listed) & campaigns and set(listed) <= campaigns | {"none", "other"}, (
                    f"{query} lists {listed}; the API's calls have {sorted(campaigns)}"
                )
                unlabelled, error = label_values(prometheus, query, chosen | PLAIN)
                assert unlabelled == [], f"{query} for the org without metadata labels: {unlabelled} {error}"
                listed = sorted(set(listed) & campaigns)
            chosen[name] = CHOSEN.get(name, listed[0])
    everything = {**BUILTINS, **{name: ALL for name in chosen if name not in BUILTINS}, **constants}
    plain = {**everything, **PLAIN}  # campaign: All, the only choice without metadata labels

    # A healthy run: every panel shows a number, and the panels about trouble read 0.
    selections = ((chosen, "chosen"), (everything, "All"), (plain, "no metadata labels"))
    waited = settle(
        lambda: [p for values, name in selections for p in problems(prometheus, values, name)],
        "dashboard queries show nothing on a healthy run",
        diagnostics,
    )
    settle(
        lambda: missing_table_rows(prometheus, everything, ["default", "plain"]),
        "per-org table rows missing on a healthy run",
        diagnostics,
    )
    settle(
        lambda: [m for values, name in selections for m in zero_panels(prometheus, values, name)[0]],
        'panels read "No data" instead of 0 on a healthy run',
        diagnostics,
    )
    wrong = [w for values, name in selections for w in zero_panels(prometheus, values, name)[1]]
    assert not wrong, "panels about trouble do not read 0 on a healthy run:\n" + "\n".join(wrong) + diagnostics()
    settle(
        lambda: [u for values, name in selections for u in unshown(prometheus, values, name)],
        "API cost panels miss a series on a healthy run",
        diagnostics,
    )

    # Trouble: the zeros were live, not stuck.
    sim.inject("malformed", count=2)  # → callingbox_exporter_invalid_records_total{reason}
    # Three failed polls, backing off 0.5 s then 1 s: the new code="503" series rises between two
    # scrapes (increase() ignores a series' first sample, so a single 503 would never show).
    sim.inject("status", count=3, code=503)
    waiting = set(RAISED_BY_FAULTS)  # a rate falls back to 0 once its window has passed: each is seen once

    def still_zero() -> list[str]:
        found = {panel: raised(prometheus, *panel, chosen) for panel in waiting}
        waiting.difference_update(panel for panel, why in found.items() if not why)
        return [why for why in found.values() if why]

    settle(still_zero, "panels do not rise above 0 after the faults", diagnostics)
    settle(
        lambda: problems(prometheus, chosen, "chosen") + problems(prometheus, everything, "All"),
        "dashboard queries show nothing after the faults",
        diagnostics,
    )
    checked = sum(len(queries(load(uid))) for uid in DASHBOARDS)
    overlays = sum(is_previous_week(t) for uid in DASHBOARDS for _, _, t in queries(load(uid)))
    print(
        f"\ndashboards e2e: {checked} targets ({overlays} previous-week overlays, empty as they must be) "
        f"x {len(selections)} selections showed data "
        f"{waited:.1f} s after the rate window filled; chosen: "
        f"{ {k: v for k, v in chosen.items() if k not in BUILTINS} }"
    )
