"""The recording rules of a pack by layer, for deploy/prometheus/backfill_rules.py: layer 1 reads
raw series only, layer k reads series recorded in the layers below it. Each layer becomes a rule
file of its own, its groups keeping their intervals. Standard library and PyYAML only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# PromQL text that holds no metric name: strings, label matchers, ranges and subqueries ([1d:1d]
# would read as a name with a colon), comments. A `__name__="..."` matcher names one, kept first.
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)')""")
_NO_NAMES = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`|\{[^}]*\}|\[[^\]]*\]|#[^\n]*""")
_IDENTIFIER = re.compile(r"(?<![\w:.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def names_in(expr: str) -> set[str]:
    """The metric names an expression reads; only those with a colon matter here (recorded series)."""
    named = {a or b for a, b in _NAME_MATCHER.findall(expr)}
    return named | set(_IDENTIFIER.findall(_NO_NAMES.sub(" ", expr)))


@dataclass
class Rule:
    record: str
    group: str
    interval: str | None  # the group's; promtool falls back to --eval-interval, as Prometheus does
    body: dict  # record, expr, labels as written
    reads: set[str] = field(default_factory=set)  # recorded names it reads, itself excepted


def load_rules(paths: list[Path]) -> list[Rule]:
    """The recording rules of `paths`, in order; alerting rules are left out (promtool skips them)."""
    rules = [
        Rule(r["record"], g["name"], g.get("interval"), {k: r[k] for k in ("record", "expr", "labels") if k in r})
        for path in paths
        for g in yaml.safe_load(Path(path).read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    ]
    recorded = {r.record for r in rules}
    for rule in rules:
        rule.reads = (names_in(str(rule.body["expr"])) & recorded) - {rule.record}
    return rules


def self_reading(rules: list[Rule]) -> list[str]:
    """Rules that read their own series (`last_over_time(x[1h])` in x): a backfill cannot give them
    their own past, so they are backfilled from the other series they read only."""
    return sorted({r.record for r in rules if r.record in names_in(str(r.body["expr"]))})


def needed_for(rules: list[Rule], names: list[str]) -> list[Rule]:
    """The rules that record `names` and what those read, and so on down to the raw series."""
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(n for r in rules if r.record == name for n in r.reads)
    unknown = set(names) - {r.record for r in rules}
    if unknown:
        raise SystemExit(f"backfill_rules: no rule records {', '.join(sorted(unknown))}")
    return [r for r in rules if r.record in wanted]


def layers(rules: list[Rule]) -> list[list[Rule]]:
    """Rules by layer: a name's layer is one above the highest layer of what any of its rules reads
    (a name several rules record, with different `labels:`, is one node)."""
    reads: dict[str, set[str]] = {}
    for rule in rules:
        reads.setdefault(rule.record, set()).update(rule.reads)
    level: dict[str, int] = {}

    def of(name: str, path: tuple[str, ...] = ()) -> int:
        if name in path:
            raise ValueError("recording rules read each other in a cycle: " + " -> ".join((*path, name)))
        if name not in level:
            level[name] = 1 + max((of(n, (*path, name)) for n in reads[name]), default=0)
        return level[name]

    grouped: list[list[Rule]] = [[] for _ in range(max((of(r.record) for r in rules), default=0))]
    for rule in rules:
        grouped[level[rule.record] - 1].append(rule)
    return grouped


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as `|` blocks, as in the rule files."""

    def represent_str(self, text: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _Dumper.represent_str)


def layer_document(layer: list[Rule]) -> dict:
    """One layer as a rule file: its rules in their groups, each group with its own interval."""
    groups: dict[str, dict] = {}
    for rule in layer:
        interval = {"interval": rule.interval} if rule.interval else {}
        groups.setdefault(rule.group, {"name": rule.group, **interval, "rules": []})["rules"].append(rule.body)
    return {"groups": list(groups.values())}


def write_layers(grouped: list[list[Rule]], work_dir: Path) -> list[Path]:
    """layer-K/backfill.rules.yml. promtool runs in layer-K/ and reads `backfill.rules.yml`: a
    group's evaluation times are offset by a hash of its name and file name, so the same name in
    every layer puts the shares of callingbox-baselines-days on the instants of the sums they
    read, as in Prometheus, where they run in one group (15 minutes apart, a 5-minute lookback
    would miss two in three)."""
    paths = []
    for number, layer in enumerate(grouped, 1):
        path = work_dir / f"layer-{number}" / "backfill.rules.yml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.dump(layer_document(layer), Dumper=_Dumper, sort_keys=False, width=200))
        paths.append(path)
    return paths
