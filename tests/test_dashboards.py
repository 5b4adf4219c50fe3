"""The Grafana dashboards and provisioning files under grafana/, checked as committed (no servers).

Each dashboard must be something Grafana loads and an on-call engineer can trust: valid JSON in
the Grafana 10/11 model, unique panel ids, a grid without overlaps, every panel and query on the
`datasource` variable, every `$variable` defined, every panel described and given a unit, every
metric one the exporter exports or the recording rules record, every query filtered by the
selected org (and direction), exemplars asked for where the exporter exposes them, and, where an
alert compares a series with a constant, the panel showing that series draws a threshold at that
very constant, read from the alert rules file.

The overview shows the KPI pack the recording rules record (ASR, ABR, NER, ACD, ALOC, short-call
ratio, carried Erlangs, cost per billed minute and per answered call), each read from its recorded
series (no panel divides raw call counters: one definition per KPI) and drawn against the org's
previous week (the same expression `offset 7d`, dashed); a table with one row per org and every
column; a `campaign` variable over a metadata label that filters every raw call series and no
recorded one. The exporter dashboard shows API bytes and requests, the self-audit and the back-off;
the provisioned datasource links an exemplar's `call_id` to the call.
tests/test_e2e_dashboards.py runs every query on a real Prometheus fed by the exporter.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from exporter.catalogue import CALL_FAMILIES, EXEMPLAR_FAMILIES, FAMILIES
from exporter.cli import registry_for
from exporter.health import Health, Snapshot
from exporter.metrics import Collector
from exporter.store import Store
from helpers import ROOT

GRAFANA = ROOT / "grafana"
DASHBOARDS = {
    "callingbox-overview": GRAFANA / "dashboards/callingbox-overview.json",
    "callingbox-exporter": GRAFANA / "dashboards/callingbox-exporter.json",
}
RECORDING_RULES = ROOT / "deploy/prometheus/callingbox-recording.rules.yml"
ALERT_RULES = ROOT / "deploy/prometheus/callingbox-alerts.rules.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
OVERVIEW_ROWS = ["Volume and outcomes", "Conversation", "Why calls end", "Delivery", "Money"]
# Grafana's own variables, usable in any query or title.
BUILTINS = frozenset(
    {
        "__rate_interval",
        "__rate_interval_ms",
        "__range",
        "__range_s",
        "__range_ms",
        "__interval",
        "__interval_ms",
        "__from",
        "__to",
        "__now",
        "__dashboard",
        "__org",
        "__user",
        "__name",
        "__url_time_range",
        "__timeFilter",
        "__all",
    }
)
# Series Prometheus itself makes, with their labels (ALERTS: the alert annotation).
PROMETHEUS_SERIES = {"ALERTS": frozenset({"alertname", "alertstate", "severity", "org"})}
NEEDS_UNIT = frozenset({"timeseries", "stat", "gauge", "bargauge"})
SHOWS_EXEMPLARS = frozenset({"timeseries", "heatmap"})
# Panels the issue names for exemplars: jump from a spike to one real call.
EXEMPLAR_PANELS = {
    "callingbox_calls_ended_total": "callingbox-overview",
    "callingbox_call_duration_seconds_bucket": "callingbox-overview",
    "callingbox_call_answer_delay_seconds_bucket": "callingbox-overview",
}
# The telephony KPI pack of the recording rules: KPI → the middle of its recorded name,
# org_direction:callingbox_<middle>:<operation><window>. Each is drawn from that series on the overview.
KPI_PACK = {
    "ASR": "asr",
    "ABR": "abr",
    "NER": "ner",
    "ACD": "acd_seconds",
    "ALOC": "aloc_seconds",
    "short-call ratio": "short_calls",
    "carried Erlangs": "carried_erlangs",
    "cost per billed minute": "cost_per_billed_minute_dollars",
    "cost per answered call": "cost_per_answered_call_dollars",
}
PREVIOUS_WEEK = "offset 7d"  # a KPI's overlay: the org's previous week
# The per-org table: its title, and each column with the series its query must read.
ORG_TABLE = "Orgs today"
ORG_TABLE_COLUMNS = {
    "Calls ended today": {"callingbox_calls_ended_total"},
    "ASR (last hour)": {"org_direction:callingbox_answered:increase1h", "org_direction:callingbox_seizures:increase1h"},
    "Failed % (last hour)": {
        "org_direction_status:callingbox_calls_ended:increase1h",
        "org_direction:callingbox_seizures:increase1h",
    },
    "Webhook failures today": {"callingbox_webhook_deliveries_total"},
    "Spend today": {"callingbox_billed_amount_dollars_total"},
}
# Series that carry the configured metadata labels (exporter/metrics.py): the call families and the
# active-calls gauge. Each selector of one of them takes the campaign matcher; recorded series have none.
METADATA_SERIES = frozenset(CALL_FAMILIES | {"callingbox_calls_active"})
CAMPAIGN_MATCHER = ("metadata_label", "=~", "$campaign")  # `$metadata_label=~"$campaign"` as selectors() reads it
# The exporter dashboard: each series it must show, and the label it breaks the series down by.
EXPORTER_SHOWS = {
    "callingbox_exporter_api_response_bytes_total": "endpoint",
    "callingbox_exporter_api_requests_total": "code",
    "callingbox_exporter_audit_mismatches_total": "kind",
    "callingbox_exporter_contract_deviations_total": "kind",
    "callingbox_exporter_audit_calls_checked_total": "org",
    "callingbox_exporter_last_audit_timestamp_seconds": "org",
    "callingbox_exporter_backoff_seconds": "org",
    "callingbox_exporter_next_poll_timestamp_seconds": "org",
}

# ---- reading dashboards (also used by test_e2e_dashboards.py) ---------------------------------


def load(uid: str) -> dict:
    return json.loads(DASHBOARDS[uid].read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows included, with the panels nested in collapsed rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []) if panel["type"] == "row" else [])
    return found


def data_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def queries(dashboard: dict) -> list[tuple[str, dict, dict]]:
    """(panel title, panel, target) for every target of every panel."""
    return [(p["title"], p, t) for p in data_panels(dashboard) for t in p.get("targets", [])]


def annotation_queries(dashboard: dict) -> list[dict]:
    return [a for a in dashboard["annotations"]["list"] if not a.get("builtIn")]


VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)")


def variable_names(text: str) -> set[str]:
    return {braced or bare for braced, bare in VARIABLE.findall(text)}


def substitute(text: str, values: dict[str, str]) -> str:
    """`text` with each `$var` / `${var}` / `${var:format}` replaced; an unknown one raises KeyError."""
    return VARIABLE.sub(lambda m: values[m[1] or m[2]], text)


# The label may be a variable (`$metadata_label`): Grafana substitutes it before it runs the query.
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\$?\w+)\s*\)\s*$")


def is_previous_week(target: dict) -> bool:
    """A KPI's previous-week overlay: its twin, the same expression, `offset 7d`."""
    return PREVIOUS_WEEK in target["expr"]


def this_week(expr: str) -> str:
    """The twin of a previous-week overlay: the expression without its `offset 7d`."""
    return re.sub(r"\s+" + PREVIOUS_WEEK + r"\b", "", expr)


# ---- reading PromQL: which series an expression selects ----------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<braces>\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<range>\[[^\]]*\])
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[a-z]*)
  | (?P<space>\s+)
  | (?P<other>.)""",
    re.VERBOSE,
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})
_AGGREGATORS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value), ...]) for every vector selector in a PromQL expression."""
    tokens = [
        (kind, text)
        for m in _TOKEN.finditer(expr)
        for kind, text in m.groupdict().items()
        if text is not None and kind != "space"
    ]
    found, i = [], 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in _GROUPING and following == ("other", "("):
            depth, i = 0, i + 1
            while i < len(tokens):  # skip the label list
                depth += {"(": 1, ")": -1}.get(tokens[i][1], 0) if tokens[i][0] == "other" else 0
                if depth == 0:
                    break
                i += 1
        elif kind == "ident" and text not in _GROUPING | _KEYWORDS | _AGGREGATORS and following != ("other", "("):
            matchers = _MATCHER.findall(following[1]) if following[0] == "braces" else []
            found.append((text, matchers))
        elif kind == "braces" and (i == 0 or tokens[i - 1][0] != "ident"):
            found.append(("", _MATCHER.findall(text)))  # {__name__=...}: a selector without a name
        i += 1
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


# `/` followed by a series or a function (not a number): one series divided by another.
SERIES_DIVISION = re.compile(r"/[\s(]*[A-Za-z_:]")


def shown_series(expr: str) -> set[str]:
    """The series an expression draws: all it reads, less the denominators of a ratio (a panel of
    answered ÷ seizures shows a share, not the seizures, and draws no seizure threshold)."""
    division = SERIES_DIVISION.search(expr)
    return metric_names(expr[: division.start()] if division else expr)


def family_of(series: str) -> str:
    """The exporter family a sample name belongs to (a histogram's _bucket, _sum, _count → the histogram)."""
    base = re.sub(r"_(bucket|sum|count)$", "", series)
    return base if base in FAMILIES and FAMILIES[base].kind == "histogram" else series


@pytest.mark.parametrize(
    "expr, expected",
    [
        (
            'sum by (org, le) (rate(a_bucket{org=~"$org", le=~"1|2"}[5m])) / on (org) group_left b',
            [("a_bucket", [("org", "=~", "$org"), ("le", "=~", "1|2")]), ("b", [])],
        ),
        ("histogram_quantile(0.9, sum without (instance) (rate(x[$__rate_interval])))", [("x", [])]),
        (
            'max by (instance) (p and on (instance, job) up{org!="a"}) > bool 0',
            [("p", []), ("up", [("org", "!=", "a")])],
        ),
        ('org:x:ratio_rate5m{org=~"$org"} offset 1d * 1e-3', [("org:x:ratio_rate5m", [("org", "=~", "$org")])]),
        (
            'sum(c_total{org=~"$org", $metadata_label=~"$campaign"}[1m])',
            [("c_total", [("org", "=~", "$org"), ("metadata_label", "=~", "$campaign")])],
        ),
        ('sort_desc(topk(10, sum(increase(c_total{s="{}"}[1m]))))', [("c_total", [("s", "=", "{}")])]),
    ],
)
def test_selectors_finds_every_series_an_expression_reads(expr, expected):
    assert selectors(expr) == expected


# ---- what exists: exported series, recorded series, alert thresholds ---------------------------


def exported_series() -> dict[str, frozenset[str]]:
    """Every sample name the exporter serves, with its labels: the families of FAMILIES (histograms
    as _bucket, _sum, _count), and what the real registry renders (gauges, build info, process_*)."""
    series: dict[str, frozenset[str]] = {}
    for name, family in FAMILIES.items():
        labels = frozenset({"org", *family.labels})
        if family.kind == "histogram":
            series.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels})
        else:
            series[name] = labels
    collector = Collector("test")
    asyncio.run(collector.publish("default", Snapshot(Store(), Health())))
    for family in registry_for(collector).collect():
        for sample in family.samples:
            series.setdefault(sample.name, frozenset(sample.labels))
    return series


def recorded_series() -> dict[str, frozenset[str]]:
    """Each `record:` of the recording rules, with the labels its level names (org_direction → org, direction)."""
    rules = [r for g in yaml.safe_load(RECORDING_RULES.read_text())["groups"] for r in g["rules"]]
    return {r["record"]: frozenset(r["record"].split(":")[0].split("_")) for r in rules if "record" in r}


# `<series> > <number>` (or >=) where the number is the whole right-hand side, not `2 * <series>`.
COMPARISON = re.compile(
    r"(?<![\w:])(?P<series>[A-Za-z_:][\w:]*)\s*(?:\{[^}]*\})?\s*(?P<op>>=|>)\s*"
    r"(?P<value>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?![\w.])(?!\s*[-+*/%^])"
)


def comparisons(expr: str) -> list[tuple[str, str, float]]:
    return [
        (m["series"], m["op"], float(m["value"])) for m in COMPARISON.finditer(expr) if m["series"] not in _KEYWORDS
    ]


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("a:b:ratio_rate5m > 0.2\nand\n(a:b:ratio_rate5m > 2 * a:b:ratio_rate7d)", [("a:b:ratio_rate5m", ">", 0.2)]),
        ("x > 1.5 * y or (z > 0.1 unless on (org) y)", [("z", ">", 0.1)]),
        ('g{org="a"} > 1800 and on (org) (delta(h[30m]) >= 3 or g > 7200)', [("g", ">", 1800.0), ("g", ">", 7200.0)]),
        ('sum by (org) (increase(c{code="401"}[15m])) > 0 and on (org) up == 0', []),
        ("n >= 20", [("n", ">=", 20.0)]),
    ],
)
def test_comparisons_finds_series_compared_with_a_constant(expr, expected):
    assert comparisons(expr) == expected


def alert_thresholds() -> list[tuple[str, str, str, float]]:
    """(alert, series, op, constant) for every `<series> > <constant>` in the alert rules."""
    rules = [r for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]
    return [
        (r["alert"], series, op, value) for r in rules if "alert" in r for series, op, value in comparisons(r["expr"])
    ]


@pytest.fixture(scope="module")
def known_series() -> dict[str, frozenset[str]]:
    return {**exported_series(), **recorded_series(), **PROMETHEUS_SERIES}


# ---- the dashboards ----------------------------------------------------------------------------

dashboard_uids = pytest.mark.parametrize("uid", sorted(DASHBOARDS))


@dashboard_uids
def test_dashboard_is_valid_json_in_the_house_model(uid):
    dashboard = load(uid)
    assert dashboard["uid"] == uid
    assert dashboard["schemaVersion"] == 39
    assert dashboard["tags"] == ["callingbox"]
    assert dashboard["refresh"] == "30s"
    assert dashboard["time"] == {"from": "now-6h", "to": "now"}
    assert dashboard.get("id") is None, "a committed dashboard carries no database id"
    assert dashboard["title"] and dashboard["panels"]


def test_dashboard_uids_and_titles_are_distinct():
    dashboards = [load(uid) for uid in DASHBOARDS]
    assert len({d["uid"] for d in dashboards}) == len({d["title"] for d in dashboards}) == len(DASHBOARDS)
    on_disk = sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json"))
    assert on_disk == sorted(p.name for p in DASHBOARDS.values()), "the provisioned folder holds exactly these"


@dashboard_uids
def test_panel_ids_are_unique_rows_included(uid):
    ids = [p["id"] for p in all_panels(load(uid))]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"


def test_overview_rows_are_the_campaign_story_and_each_holds_panels():
    dashboard = load("callingbox-overview")
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == OVERVIEW_ROWS
    assert dashboard["panels"][0]["type"] == "row", "every panel sits under a row"
    for row, after in zip(rows, rows[1:] + [None]):
        start = dashboard["panels"].index(row) + 1
        end = dashboard["panels"].index(after) if after else len(dashboard["panels"])
        assert row["panels"] or end > start, f"row {row['title']!r} is empty"


def _overlap(a: dict, b: dict) -> bool:
    return (
        a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
    )


def _check_grid(panels: list[dict], where: str) -> None:
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh"), f"{where} {panel['title']!r}: {grid}"
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] >= 1 and grid["h"] >= 1, f"{panel['title']!r}: {grid}"
        assert grid["x"] + grid["w"] <= 24, f"{where} {panel['title']!r} is wider than 24 columns: {grid}"
        if panel["type"] == "row":
            assert (grid["x"], grid["w"], grid["h"]) == (0, 24, 1), f"row {panel['title']!r}: {grid}"
    for a, b in combinations(panels, 2):
        assert not _overlap(a["gridPos"], b["gridPos"]), (
            f"{where}: {a['title']!r} {a['gridPos']} overlaps {b['title']!r} {b['gridPos']}"
        )


@dashboard_uids
def test_grid_is_24_columns_without_overlaps(uid):
    dashboard = load(uid)
    _check_grid(dashboard["panels"], uid)
    for row in (p for p in dashboard["panels"] if p["type"] == "row"):
        if row.get("collapsed"):  # nested panels keep their expanded positions, below the row
            _check_grid(row["panels"], f"{uid} row {row['title']!r}")
            assert all(p["gridPos"]["y"] > row["gridPos"]["y"] for p in row["panels"])
        else:
            assert not row.get("panels"), f"expanded row {row['title']!r} must not nest panels"


@dashboard_uids
def test_every_panel_target_and_annotation_uses_the_datasource_variable(uid):
    dashboard = load(uid)
    for panel in data_panels(dashboard):
        assert panel.get("datasource") == DATASOURCE, f"{panel['title']!r}: {panel.get('datasource')}"
        assert panel.get("targets"), f"{panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, f"{panel['title']!r} {target['refId']}"
    for annotation in annotation_queries(dashboard):
        assert annotation["datasource"] == DATASOURCE, annotation["name"]
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


@dashboard_uids
def test_variables_are_datasource_then_org_from_callingbox_up(uid):
    dashboard = load(uid)
    defined = variables(dashboard)
    names = list(defined)
    assert names[:2] == ["datasource", "org"], names
    datasource, org = defined["datasource"], defined["org"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    assert variable_query(org) == "label_values(callingbox_up, org)"
    if uid == "callingbox-overview":
        assert names == ["datasource", "org", "direction", "metadata_label", "campaign"]
        assert LABEL_VALUES.match(variable_query(defined["direction"]))["label"] == "direction"
        assert 'org=~"$org"' in variable_query(defined["direction"]), "directions of the chosen org"
    for variable in names[1:]:
        v = defined[variable]
        if v["type"] == "constant":  # a name for the queries (metadata_label), hidden
            assert v["hide"] == 2 and re.fullmatch(r"[A-Za-z_]\w*", v["query"]), v
            continue
        assert v["type"] == "query" and v["multi"] and v["includeAll"], variable
        assert LABEL_VALUES.match(variable_query(v)), f"{variable}: {variable_query(v)}"


@dashboard_uids
def test_every_variable_used_is_defined_or_built_in(uid):
    dashboard = load(uid)
    defined = set(variables(dashboard)) | BUILTINS
    texts = [
        (p["title"], s)
        for p in all_panels(dashboard)
        for s in [p["title"], p.get("description", ""), *(link["url"] for link in p.get("links", []))]
    ]
    texts += [
        (f"{title} {t['refId']}", t.get(k, "")) for title, _, t in queries(dashboard) for k in ("expr", "legendFormat")
    ]
    texts += [(a["name"], a["expr"]) for a in annotation_queries(dashboard)]
    texts += [
        (f"variable {name}", variable_query(v)) for name, v in variables(dashboard).items() if v["type"] == "query"
    ]
    for where, text in texts:
        unknown = variable_names(text) - defined
        assert not unknown, f"{uid} {where}: undefined {sorted(unknown)} in {text!r}"


@dashboard_uids
def test_every_panel_says_what_it_shows_and_in_what_unit(uid):
    for panel in data_panels(load(uid)):
        title = panel["title"]
        assert len(panel.get("description", "").strip()) >= 40, f"{title!r} needs a description"
        if panel["type"] not in NEEDS_UNIT:
            continue
        unit = panel["fieldConfig"]["defaults"].get("unit")
        assert unit, f"{title!r} has no unit"
        names = {n for t in panel["targets"] for n in metric_names(t["expr"])}
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if any("dollars" in n for n in names):
            assert unit == "currencyUSD", f"{title!r} shows money in {unit}"
        elif any(":ratio_" in n for n in names):
            assert unit == "percentunit", f"{title!r} shows a 0-1 ratio in {unit}"
        elif "histogram_quantile" in exprs and all(n.endswith("_seconds_bucket") for n in names):
            assert unit == "s", f"{title!r} shows seconds in {unit}"


@dashboard_uids
def test_every_metric_is_exported_or_recorded(uid, known_series):
    dashboard = load(uid)
    exprs = [(f"{title} {t['refId']}", t["expr"]) for title, _, t in queries(dashboard)]
    exprs += [(a["name"], a["expr"]) for a in annotation_queries(dashboard)]
    exprs += [(f"variable {n}", variable_query(v)) for n, v in variables(dashboard).items() if v["type"] == "query"]
    for where, expr in exprs:
        match = LABEL_VALUES.match(expr)
        names = metric_names(match["selector"] if match else expr)
        assert names, f"{uid} {where}: no metric in {expr!r}"
        unknown = names - set(known_series)
        assert not unknown, f"{uid} {where}: {sorted(unknown)} is neither exported nor recorded: {expr}"


@dashboard_uids
def test_every_query_filters_by_the_selected_org_and_direction(uid, known_series):
    dashboard = load(uid)
    defined = variables(dashboard)
    recorded = recorded_series()
    exprs = [(f"{title} {t['refId']}", t["expr"]) for title, _, t in queries(dashboard)]
    exprs += [(a["name"], a["expr"]) for a in annotation_queries(dashboard)]
    for where, expr in exprs:
        assert 'org=~"$org"' in expr, f"{uid} {where}: not filtered by org: {expr}"
        for name, matchers in selectors(expr):
            labels = known_series[name]
            wanted = {("org", "=~", "$org")} if "org" in labels else set()
            if "direction" in defined and "direction" in labels and name not in PROMETHEUS_SERIES:
                wanted.add(("direction", "=~", "$direction"))
            if "instance" in defined and name not in recorded and name not in PROMETHEUS_SERIES:
                wanted.add(("instance", "=~", "$instance"))
            missing = wanted - set(matchers)
            assert not missing, f"{uid} {where}: {name} lacks {sorted(missing)}: {expr}"


def test_alert_thresholds_are_drawn_on_the_series_the_alerts_evaluate():
    thresholds = alert_thresholds()
    assert thresholds, f"no `<series> > <number>` found in {ALERT_RULES.name}"
    panels = [(uid, p) for uid in DASHBOARDS for p in data_panels(load(uid))]
    for alert, series, op, value in thresholds:
        readers = [(uid, p) for uid, p in panels if any(series in shown_series(t["expr"]) for t in p["targets"])]
        if op == ">":  # a threshold (>= ones are volume guards: drawn wherever the series is shown)
            assert readers, f"{alert} compares {series} > {value}, but no panel shows {series}"
        for uid, panel in readers:
            where = f"{uid} {panel['title']!r} ({alert}: {series} {op} {value:g})"
            defaults = panel["fieldConfig"]["defaults"]
            steps = defaults.get("thresholds", {}).get("steps", [])
            assert any(
                s["value"] is not None
                and math.isclose(s["value"], value, rel_tol=0, abs_tol=1e-12)
                and "red" in s["color"]
                for s in steps
            ), f"{where}: no red threshold step at {value:g}: {steps}"
            assert defaults.get("thresholds", {}).get("mode") == "absolute", where
            if panel["type"] == "timeseries":
                style = defaults["custom"]["thresholdsStyle"]["mode"]
                assert style in ("line", "line+area", "dashed", "line+dashed"), f"{where}: threshold style {style}"


def _exemplar_series() -> set[str]:
    return {f"{n}_bucket" if FAMILIES[n].kind == "histogram" else n for n in EXEMPLAR_FAMILIES}


def test_exemplars_are_asked_for_where_the_exporter_exposes_them():
    exemplar_series = _exemplar_series()
    asked: dict[str, set[str]] = {}
    for uid in DASHBOARDS:
        for title, panel, target in queries(load(uid)):
            names = metric_names(target["expr"])
            where = f"{uid} {title!r} {target['refId']}"
            if panel["type"] not in SHOWS_EXEMPLARS:
                assert not target.get("exemplar"), f"{where}: a {panel['type']} panel cannot show exemplars"
            elif names & exemplar_series and "/" not in target["expr"]:
                assert target.get("exemplar") is True, f"{where} reads {sorted(names & exemplar_series)}: set exemplar"
            if target.get("exemplar"):
                assert names & exemplar_series, f"{where}: exemplar set on series without exemplars"
                for name in names:
                    asked.setdefault(name, set()).add(uid)
    for name, uid in EXEMPLAR_PANELS.items():
        assert uid in asked.get(name, set()), f"no {uid} panel reads {name} with exemplars"


# ---- the KPI pack, the per-org table, the campaign variable, the exporter's own cost ---------------


def test_overview_draws_every_kpi_of_the_pack_from_its_recorded_series_against_the_previous_week():
    recorded = set(recorded_series())
    panels = data_panels(load("callingbox-overview"))
    for kpi, middle in KPI_PACK.items():
        prefix = f"org_direction:callingbox_{middle}:"
        assert any(r.startswith(prefix) for r in recorded), f"the recording rules record no {kpi} ({prefix}*)"
        drawing = [
            p
            for p in panels
            if p["type"] == "timeseries"
            and any(n.startswith(prefix) for t in p["targets"] for n in metric_names(t["expr"]))
        ]
        assert drawing, f"no overview timeseries draws {kpi} from its recorded series {prefix}*"
        for panel in drawing:
            where = f"{panel['title']!r} ({kpi})"
            names = {n for t in panel["targets"] for n in metric_names(t["expr"])}
            assert names <= recorded, f"{where} reads {sorted(names - recorded)}: a KPI panel reads recorded series"
            overlays = [t for t in panel["targets"] if is_previous_week(t) and prefix in t["expr"]]
            assert overlays, f"{where} has no previous-week overlay ({PREVIOUS_WEEK}) of {prefix}*"


@dashboard_uids
def test_no_panel_derives_a_ratio_from_raw_call_counters(uid):
    """A ratio of call counters is a KPI: the recording rules define it once, and panels read that."""
    for title, _, target in queries(load(uid)):
        raw = {n for n in metric_names(target["expr"]) if family_of(n) in CALL_FAMILIES}
        if raw and SERIES_DIVISION.search(target["expr"]):
            pytest.fail(
                f"{uid} {title!r} {target['refId']} divides raw call series {sorted(raw)}: read the KPI's "
                f"recorded series instead: {target['expr']}"
            )


@dashboard_uids
def test_previous_week_overlays_are_their_twin_offset_by_7d_and_drawn_dashed(uid):
    for panel in data_panels(load(uid)):
        lines = [t["expr"] for t in panel["targets"] if not is_previous_week(t)]
        styles = {
            o["matcher"]["options"]: {prop["id"]: prop["value"] for prop in o["properties"]}
            for o in panel["fieldConfig"]["overrides"]
            if o["matcher"]["id"] == "byFrameRefID"
        }
        for target in filter(is_previous_week, panel["targets"]):
            where, expr = f"{uid} {panel['title']!r} {target['refId']}", target["expr"]
            twin = this_week(expr)
            assert twin in lines, f"{where}: {expr} is not a line of the panel with {PREVIOUS_WEEK}: {lines}"
            if len(selectors(twin)) == 1:
                assert expr == f"{twin} {PREVIOUS_WEEK}", f"{where}: {expr}"
            assert expr.count(PREVIOUS_WEEK) == len(selectors(twin)), f"{where}: every selector is offset: {expr}"
            assert target["legendFormat"].endswith("previous week"), f"{where}: legend {target['legendFormat']!r}"
            assert target["range"] and not target["instant"] and not target["exemplar"], where
            style = styles.get(target["refId"], {})
            assert style.get("custom.lineStyle", {}).get("fill") == "dash", f"{where}: not drawn dashed: {style}"


def test_org_table_is_one_row_per_org_with_every_column():
    (panel,) = [p for p in data_panels(load("callingbox-overview")) if p["title"] == ORG_TABLE]
    assert panel["type"] == "table"
    assert panel["timeFrom"] == "now/d", "today so far: the range of the increases is since midnight"
    assert [t["id"] for t in panel["transformations"]] == ["merge", "organize"], "merge on org, then name the columns"
    organize = panel["transformations"][1]["options"]
    assert organize["excludeByName"] == {"Time": True}
    assert organize["renameByName"]["org"] == "Org" and organize["indexByName"]["org"] == 0
    columns = {organize["renameByName"].get(f"Value #{t['refId']}"): t for t in panel["targets"]}
    assert set(columns) == set(ORG_TABLE_COLUMNS), f"{sorted(map(str, columns))}, want {sorted(ORG_TABLE_COLUMNS)}"
    for name, target in columns.items():
        expr, where = target["expr"], f"{ORG_TABLE} column {name!r}"
        assert target["instant"] and target["format"] == "table", f"{where}: an instant table query"
        groupings = re.findall(r"\bby\s*\(([^)]*)\)", expr)
        assert groupings and {g.replace(" ", "") for g in groupings} == {"org"}, f"{where}: one row per org: {expr}"
        assert ORG_TABLE_COLUMNS[name] <= metric_names(expr), f"{where} reads {sorted(metric_names(expr))}"
    units = {
        o["matcher"]["options"]: {prop["id"]: prop["value"] for prop in o["properties"]}
        for o in panel["fieldConfig"]["overrides"]
    }
    assert units["Spend today"]["unit"] == "currencyUSD"
    assert units["ASR (last hour)"]["unit"] == units["Failed % (last hour)"]["unit"] == "percentunit"


def test_campaign_variable_lists_the_values_of_the_configured_metadata_label():
    defined = variables(load("callingbox-overview"))
    label, campaign = defined["metadata_label"], defined["campaign"]
    assert (label["type"], label["query"]) == ("constant", "campaign"), "README's example: {campaign_id: campaign}"
    match = LABEL_VALUES.match(variable_query(campaign))
    assert match and match["label"] == "$metadata_label", variable_query(campaign)
    assert metric_names(match["selector"]) == {"callingbox_calls_created_total"} <= METADATA_SERIES
    assert 'org=~"$org"' in match["selector"], "the campaigns of the chosen orgs"
    assert campaign["includeAll"] and campaign["multi"]
    assert campaign["allValue"] == ".*", "All must match series without the label too (no metadata labels)"
    assert "without metadata_labels" in campaign["description"].lower(), "say what happens without them"


def test_campaign_filters_every_raw_call_series_and_no_recorded_one():
    filtered = 0
    for title, _, target in queries(load("callingbox-overview")):
        for name, matchers in selectors(target["expr"]):
            where = f"{title!r} {target['refId']} {name}"
            if family_of(name) in METADATA_SERIES:
                assert CAMPAIGN_MATCHER in matchers, f'{where} lacks $metadata_label=~"$campaign": {target["expr"]}'
                filtered += 1
            else:
                assert CAMPAIGN_MATCHER not in matchers, f"{where} has no metadata label: {target['expr']}"
    assert filtered, "no panel reads a raw call family"


def test_exporter_dashboard_shows_api_cost_audit_and_backoff():
    targets = queries(load("callingbox-exporter"))
    for series, label in EXPORTER_SHOWS.items():
        shown = [t for _, _, t in targets if series in metric_names(t["expr"])]
        assert shown, f"no panel of the exporter dashboard shows {series}"
        assert any("{{" + label + "}}" in t["legendFormat"] for t in shown), f"{series}: no panel by {label}"


# ---- provisioning -------------------------------------------------------------------------------


def test_provisioned_datasource_is_the_prometheus_the_dashboards_expect_and_no_default():
    """The dashboards find it by uid through their `datasource` variable; made the default, it would
    clash with the default a Grafana has already (provisioning fails on a second one)."""
    document = yaml.safe_load((GRAFANA / "provisioning/datasources/callingbox.yml").read_text())
    assert document["apiVersion"] == 1
    sources = document["datasources"]
    uids = [s["uid"] for s in sources]
    assert len(uids) == len(set(uids)), uids
    source = next(s for s in sources if s["uid"] == "prometheus")
    assert (source["type"], source["url"], source["access"], source["isDefault"]) == (
        "prometheus",
        "http://prometheus:9090",
        "proxy",
        False,
    )
    assert [s["uid"] for s in sources if s.get("isDefault")] == [], "no default datasource"
    assert "prometheus" not in DASHBOARDS, "datasource and dashboard uids must not collide"
    for uid in DASHBOARDS:
        variable = variables(load(uid))["datasource"]
        assert variable["query"] == source["type"]
        assert variable["current"].get("value") in (None, source["uid"]), f"{uid}: {variable['current']}"


def exemplar_link() -> dict:
    """The provisioned datasource's exemplar link: which exemplar label opens which URL."""
    document = yaml.safe_load((GRAFANA / "provisioning/datasources/callingbox.yml").read_text())
    source = next(s for s in document["datasources"] if s["uid"] == "prometheus")
    (link,) = source["jsonData"]["exemplarTraceIdDestinations"]
    return link


def test_exemplar_links_open_the_call_named_by_call_id():
    """The exporter's exemplars carry `call_id` (tests/test_e2e_dashboards.py checks them on Prometheus)."""
    link = exemplar_link()
    assert link["name"] == "call_id"
    assert "datasourceUid" not in link, "an external link to the call, not a tracing datasource"
    # Provisioning expands $VAR and ${VAR} from the environment: `$$` keeps Grafana's own ${__value.raw}.
    assert link["url"].startswith("https://") and link["url"].endswith("/$${__value.raw}"), link["url"]
    assert link["urlDisplayLabel"]


def test_provisioned_dashboards_load_from_the_mounted_folder():
    document = yaml.safe_load((GRAFANA / "provisioning/dashboards/callingbox.yml").read_text())
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "CallingBox"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/callingbox"
    assert Path(provider["options"]["path"]).is_absolute()
    assert provider.get("folderUid", "callingbox") not in DASHBOARDS
