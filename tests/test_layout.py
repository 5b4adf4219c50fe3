"""The package's shape: data flows one way, so a module imports only modules above it.

The order is the one a call record takes, from the names and the config to the scrape and the
command line (README, Architecture). The simulator imports nothing from the exporter, so it
cannot share a bug with the code it checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"
FLOW = (
    "catalogue",
    "logs",
    "configvalues",
    "config",
    "keyfile",
    "settings",
    "budget",
    "deadline",
    "jsonstream",
    "api",
    "records",
    "accounting",
    "ledger",
    "waits",
    "audit",
    "migrate",
    "plan",
    "visibility",
    "document",
    "counting",
    "store",
    "selfmetrics",
    "findings",
    "tally",
    "tables",
    "health",
    "statefile",
    "state",
    "replay",
    "spill",
    "timeline",
    "metrics",
    "exposition",
    "stragglers",
    "liveness",
    "backoff",
    "persist",
    "poller",
    "supervisor",
    "webschema",
    "webconfig",
    "web",
    "explain",
    "backfill",
    "cli",
)
COMPUTED = "<computed>"  # an import_module or __import__ whose name is not a literal: no checker can place it
IMPORTERS = ("import_module", "__import__")


def is_module(name: str, package: Path = PACKAGE) -> bool:
    return (package / f"{name}.py").exists() or (package / name / "__init__.py").exists()


def _resolved(level: int, dotted: str, names: list[str], depth: int, package: Path) -> set[str]:
    """The exporter modules that `from <level dots><dotted> import names` reaches, in a file `depth`
    packages below the top (1 for exporter/x.py, 2 for exporter/simulator/x.py); level 0 is absolute."""
    if level:
        if level != depth:  # a sibling inside the same subpackage, or something outside the exporter
            return set()
        parts = dotted.split(".") if dotted else []
    else:
        parts = dotted.split(".")
        if parts[0] != "exporter":
            return set()
        parts = parts[1:]
    if parts:
        return {parts[0]}
    return {name if is_module(name, package) else "__init__" for name in names} or {"__init__"}


def _string_import(call: ast.Call) -> tuple[int, str] | None:
    """`import_module("exporter.x")`, `import_module(".x", __package__)`, `__import__("exporter.x")`,
    `__import__("x", globals(), level=1)`: the level and dotted name, None for another call."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if name not in IMPORTERS or not call.args:
        return None
    first = call.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return -1, COMPUTED
    dotted = first.value
    if name == "__import__":
        level = next((k.value for k in call.keywords if k.arg == "level"), call.args[4] if len(call.args) > 4 else None)
        level = level.value if isinstance(level, ast.Constant) else 0
        return level, dotted
    stripped = dotted.lstrip(".")
    return len(dotted) - len(stripped), stripped


def imports_of_source(source: str, depth: int = 1, package: Path = PACKAGE) -> set[str]:
    """The exporter modules a source file imports, in every form: `from .x import`, `from . import x`,
    `import exporter.x`, `from exporter import x`, `importlib.import_module("exporter.x")`, `__import__`.
    `__init__` stands for the package itself; COMPUTED for a name only known at run time."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found |= _resolved(node.level, node.module or "", [a.name for a in node.names], depth, package)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found |= _resolved(0, alias.name, [], depth, package)
        elif isinstance(node, ast.Call) and (named := _string_import(node)) is not None:
            level, dotted = named
            if dotted == COMPUTED:
                found.add(COMPUTED)
            else:
                found |= _resolved(level, dotted, [], depth, package)
    return found


def imports_of(path: Path) -> set[str]:
    """The exporter modules `path` (a module of the exporter package) imports."""
    return imports_of_source(path.read_text())


@pytest.mark.parametrize(
    "source, imported",
    [
        ("from .state import read", {"state"}),
        ("from .state.inner import read", {"state"}),
        ("from . import state", {"state"}),
        ("from . import __version__", {"__init__"}),
        ("from . import simulator", {"simulator"}),  # a subpackage is a module too
        ("import exporter.state", {"state"}),
        ("import exporter.state as saved", {"state"}),
        ("import exporter", {"__init__"}),
        ("from exporter import state", {"state"}),
        ("from exporter import __version__", {"__init__"}),
        ("from exporter.state import read", {"state"}),
        ("import importlib\nimportlib.import_module('exporter.state')", {"state"}),
        ("from importlib import import_module\nimport_module('.state', __package__)", {"state"}),
        ("__import__('exporter.state')", {"state"}),
        ("__import__('state', globals(), locals(), ['read'], 1)", {"state"}),
        ("__import__('state', globals(), level=1)", {"state"}),
        ("import importlib\nimportlib.import_module(name)", {COMPUTED}),
        ("def later():\n    from .state import read", {"state"}),  # inside a function still counts
        ("import os\nfrom collections import Counter\nimportlib.import_module('json')", set()),
    ],
)
def test_the_checker_catches_every_import_form(source, imported):
    assert imports_of_source(source) == imported


@pytest.mark.parametrize(
    "source, imported",
    [
        ("from .. import state", {"state"}),
        ("from ..state import read", {"state"}),
        ("import exporter.state", {"state"}),
        ("from exporter import state", {"state"}),
        ("import importlib\nimportlib.import_module('..state', __package__)", {"state"}),
        ("from . import clock", set()),  # the simulator's own modules
        ("from .clock import Clock", set()),
    ],
)
def test_the_checker_reads_a_subpackage_one_level_down(source, imported):
    assert imports_of_source(source, depth=2) == imported


def test_every_module_has_its_place_in_the_flow():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(FLOW), "a new module needs its place in FLOW (and the README's architecture)"


def test_no_module_imports_one_below_it():
    backwards = []
    for name in FLOW:
        for imported in imports_of(PACKAGE / f"{name}.py") - {"__init__", "simulator"}:
            if imported not in FLOW or FLOW.index(imported) >= FLOW.index(name):
                backwards.append(f"{name} imports {imported}")
    assert backwards == []


def test_only_the_command_line_starts_the_simulator():
    assert [name for name in FLOW if "simulator" in imports_of(PACKAGE / f"{name}.py")] == ["cli"]


def test_the_simulator_imports_nothing_from_the_exporter():
    found = {path.name: imports_of_source(path.read_text(), depth=2) for path in (PACKAGE / "simulator").glob("*.py")}
    assert {name: modules for name, modules in found.items() if modules} == {}
