"""The package's shape: data flows one way, so a module imports only modules above it.

The order is the one a call record takes, from the names and the config to the scrape and the
command line (README, Architecture). The simulator imports nothing from the exporter, so it
cannot share a bug with the code it checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"
FLOW = (
    "catalogue", "logs", "config", "keyfile", "settings", "budget", "deadline", "jsonstream", "api", "records",
    "accounting", "ledger", "audit", "plan", "visibility", "store", "selfmetrics", "tally", "health", "state",
    "metrics", "exposition", "stragglers", "liveness", "backoff", "poller", "supervisor", "webconfig", "web",
    "explain", "cli",
)


def imports_of(path: Path) -> set[str]:
    """The exporter modules `path` imports (relative imports, and `from . import x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # `from . import state` names a module; `from . import __version__`, the package
                found.update(alias.name if (PACKAGE / f"{alias.name}.py").exists() else "__init__"
                             for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("exporter"):
            found.add((node.module.split(".") + [""])[1] or "__init__")
    return found


def test_every_module_has_its_place_in_the_flow():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(FLOW), "a new module needs its place in FLOW (and the README's architecture)"


def test_no_module_imports_one_below_it():
    backwards = []
    for name in FLOW:
        for imported in imports_of(PACKAGE / f"{name}.py") - {"__init__", "simulator"}:
            if FLOW.index(imported) >= FLOW.index(name):
                backwards.append(f"{name} imports {imported}")
    assert backwards == []


def test_only_the_command_line_starts_the_simulator():
    assert [name for name in FLOW if "simulator" in imports_of(PACKAGE / f"{name}.py")] == ["cli"]


def test_the_simulator_imports_nothing_from_the_exporter():
    for path in (PACKAGE / "simulator").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("exporter"), \
                    f"{path.name} imports {'.' * node.level}{node.module}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("exporter") for alias in node.names), path.name
