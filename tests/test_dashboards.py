"""The Grafana dashboards and provisioning files under grafana/, checked as committed (no servers).

Each dashboard must be something Grafana loads and an on-call engineer can trust: valid JSON in
the Grafana 10/11 model, unique panel ids, a grid without overlaps, every panel and query on the
`datasource` variable, every `$variable` defined, every panel described and given a unit, every
metric one the exporter exports or the recording rules record, every query filtered by the
selected org (and direction), exemplars asked for where the exporter exposes them, and, where an
alert compares a series with a constant, the panel showing that series draws a threshold at that
very constant, read from the alert rules file. tests/test_e2e_dashboards.py runs every query on a
real Prometheus fed by the exporter.
"""

from __future__ import annotations

import json
import math
import re
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from exporter.cli import registry_for
from exporter.catalogue import EXEMPLAR_FAMILIES, FAMILIES
from exporter.metrics import Collector, Snapshot
from exporter.store import Store
from exporter.tally import Health

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
BUILTINS = frozenset({
    "__rate_interval", "__rate_interval_ms", "__range", "__range_s", "__range_ms", "__interval", "__interval_ms",
    "__from", "__to", "__now", "__dashboard", "__org", "__user", "__name", "__url_time_range", "__timeFilter",
    "__all",
})
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


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")

# ---- reading PromQL: which series an expression selects ----------------------------------------

_TOKEN = re.compile(r"""
    (?P<braces>\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<range>\[[^\]]*\])
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[a-z]*)
  | (?P<space>\s+)
  | (?P<other>.)""", re.VERBOSE)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})
_AGGREGATORS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, op, value), ...]) for every vector selector in a PromQL expression."""
    tokens = [(kind, text) for m in _TOKEN.finditer(expr) for kind, text in m.groupdict().items()
              if text is not None and kind != "space"]
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


@pytest.mark.parametrize("expr, expected", [
    ('sum by (org, le) (rate(a_bucket{org=~"$org", le=~"1|2"}[5m])) / on (org) group_left b',
     [("a_bucket", [("org", "=~", "$org"), ("le", "=~", "1|2")]), ("b", [])]),
    ('histogram_quantile(0.9, sum without (instance) (rate(x[$__rate_interval])))', [("x", [])]),
    ("max by (instance) (p and on (instance, job) up{org!=\"a\"}) > bool 0", [("p", []), ("up", [("org", "!=", "a")])]),
    ("org:x:ratio_rate5m{org=~\"$org\"} offset 1d * 1e-3", [("org:x:ratio_rate5m", [("org", "=~", "$org")])]),
    ('sort_desc(topk(10, sum(increase(c_total{s="{}"}[1m]))))', [("c_total", [("s", "=", "{}")])]),
])
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
    collector.publish("default", Snapshot(Store(), Health()))
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
    r"(?P<value>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?![\w.])(?!\s*[-+*/%^])")


def comparisons(expr: str) -> list[tuple[str, str, float]]:
    return [(m["series"], m["op"], float(m["value"])) for m in COMPARISON.finditer(expr)
            if m["series"] not in _KEYWORDS]


@pytest.mark.parametrize("expr, expected", [
    ("a:b:ratio_rate5m > 0.2\nand\n(a:b:ratio_rate5m > 2 * a:b:ratio_rate7d)", [("a:b:ratio_rate5m", ">", 0.2)]),
    ("x > 1.5 * y or (z > 0.1 unless on (org) y)", [("z", ">", 0.1)]),
    ('g{org="a"} > 1800 and on (org) (delta(h[30m]) >= 3 or g > 7200)', [("g", ">", 1800.0), ("g", ">", 7200.0)]),
    ('sum by (org) (increase(c{code="401"}[15m])) > 0 and on (org) up == 0', []),
    ("n >= 20", [("n", ">=", 20.0)]),
])
def test_comparisons_finds_series_compared_with_a_constant(expr, expected):
    assert comparisons(expr) == expected


def alert_thresholds() -> list[tuple[str, str, str, float]]:
    """(alert, series, op, constant) for every `<series> > <constant>` in the alert rules."""
    rules = [r for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]]
    return [(r["alert"], series, op, value) for r in rules if "alert" in r for series, op, value in comparisons(r["expr"])]


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
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def _check_grid(panels: list[dict], where: str) -> None:
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh"), f"{where} {panel['title']!r}: {grid}"
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] >= 1 and grid["h"] >= 1, f"{panel['title']!r}: {grid}"
        assert grid["x"] + grid["w"] <= 24, f"{where} {panel['title']!r} is wider than 24 columns: {grid}"
        if panel["type"] == "row":
            assert (grid["x"], grid["w"], grid["h"]) == (0, 24, 1), f"row {panel['title']!r}: {grid}"
    for a, b in combinations(panels, 2):
        assert not _overlap(a["gridPos"], b["gridPos"]), \
            f"{where}: {a['title']!r} {a['gridPos']} overlaps {b['title']!r} {b['gridPos']}"


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
        assert names == ["datasource", "org", "direction"]
        assert LABEL_VALUES.match(variable_query(defined["direction"]))["label"] == "direction"
        assert 'org=~"$org"' in variable_query(defined["direction"]), "directions of the chosen org"
    for variable in names[1:]:
        v = defined[variable]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], variable
        assert LABEL_VALUES.match(variable_query(v)), f"{variable}: {variable_query(v)}"


@dashboard_uids
def test_every_variable_used_is_defined_or_built_in(uid):
    dashboard = load(uid)
    defined = set(variables(dashboard)) | BUILTINS
    texts = [(p["title"], s) for p in all_panels(dashboard)
             for s in [p["title"], p.get("description", ""), *(link["url"] for link in p.get("links", []))]]
    texts += [(f"{title} {t['refId']}", t.get(k, "")) for title, _, t in queries(dashboard)
              for k in ("expr", "legendFormat")]
    texts += [(a["name"], a["expr"]) for a in annotation_queries(dashboard)]
    texts += [(f"variable {name}", variable_query(v)) for name, v in variables(dashboard).items() if v["type"] == "query"]
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
        readers = [(uid, p) for uid, p in panels
                   if any(series in metric_names(t["expr"]) for t in p["targets"])]
        if op == ">":  # a threshold (>= ones are volume guards: drawn wherever the series is shown)
            assert readers, f"{alert} compares {series} > {value}, but no panel shows {series}"
        for uid, panel in readers:
            where = f"{uid} {panel['title']!r} ({alert}: {series} {op} {value:g})"
            defaults = panel["fieldConfig"]["defaults"]
            steps = defaults.get("thresholds", {}).get("steps", [])
            assert any(s["value"] is not None and math.isclose(s["value"], value, rel_tol=0, abs_tol=1e-12)
                       and "red" in s["color"] for s in steps), f"{where}: no red threshold step at {value:g}: {steps}"
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


# ---- provisioning -------------------------------------------------------------------------------


def test_provisioned_datasource_is_the_default_prometheus_the_dashboards_expect():
    document = yaml.safe_load((GRAFANA / "provisioning/datasources/callingbox.yml").read_text())
    assert document["apiVersion"] == 1
    sources = document["datasources"]
    uids = [s["uid"] for s in sources]
    assert len(uids) == len(set(uids)), uids
    source = next(s for s in sources if s["uid"] == "prometheus")
    assert (source["type"], source["url"], source["access"], source["isDefault"]) == (
        "prometheus", "http://prometheus:9090", "proxy", True)
    assert [s["uid"] for s in sources if s.get("isDefault")] == ["prometheus"], "one default datasource"
    assert "prometheus" not in DASHBOARDS, "datasource and dashboard uids must not collide"
    for uid in DASHBOARDS:
        variable = variables(load(uid))["datasource"]
        assert variable["query"] == source["type"]
        assert variable["current"].get("value") in (None, source["uid"]), f"{uid}: {variable['current']}"


def test_provisioned_dashboards_load_from_the_mounted_folder():
    document = yaml.safe_load((GRAFANA / "provisioning/dashboards/callingbox.yml").read_text())
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "CallingBox"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/callingbox"
    assert Path(provider["options"]["path"]).is_absolute()
    assert provider.get("folderUid", "callingbox") not in DASHBOARDS
