"""The printed output: the machine, then one Markdown table (it pastes into BENCHMARKS.md as is)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from benchmarks import parse_limit
from benchmarks.common import Row

COLUMNS = ("case", "figure", "value", "unit", "vs parse limit", "vs naive peer", "goal", "PASS/MISS")


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return {
        "cpu": f"{model}, {os.cpu_count()} cores (load average at start {', '.join(f'{x:.2f}' for x in load)})",
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "libraries": ", ".join(f"{d} {version(d)}" for d in ("callingbox-exporter", "prometheus-client", "aiohttp"))
        + f", msgspec {parse_limit.version() or 'not installed'}",
    }


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == int(value) and abs(value) >= 1:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"


def _ratio(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [
        (
            r.case,
            r.figure,
            f"{r.value:.2f}" if r.unit == "x" and r.value is not None else _number(r.value),
            r.unit,
            _ratio(r.vs_parse),
            _ratio(r.vs_naive),
            r.goal,
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    right = {2, 4, 5}

    def line(row) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])
