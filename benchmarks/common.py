"""What every case shares: the run's sizes, a table row, statistics and the poller's own report.

A case returns `Row`s for the table and records machine-independent facts (counts, bytes,
calls tracked) in `facts`, which `--json` writes out and tests/test_benchmarks.py asserts on.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Self

MB = 1_000_000
LOOKBACK = 3650 * 86400.0  # initial_lookback/settle_window "10 years": every call counts, none is old


@dataclass(frozen=True)
class Sizes:
    """How big each case is. `FULL` is the documented run; `QUICK` a smoke test of the same code."""

    name: str
    ingest_calls: int  # case 1 and 3: calls in the settle window, one response
    window_calls: int  # case 2 and 4: calls in the settle window ...
    old_small: int  # ... followed by this many settled calls past it
    old_big: int  # ... or this many (the "1M" history, ~1.4 GB)
    repeats: int  # measurements per in-process figure (the median is shown)
    steady_polls: int  # case 2: incremental polls after the first (the median is shown)
    idle_scrapes: int  # case 3: scrapes of an idle exporter
    busy_polls: int  # case 3: scrape until this many polls completed under load
    scrape_rounds: int  # case 3: idle phases and busy phases, in turn (the median ratio is the figure)
    renders: int  # case 5: renders per exposition figure
    tier_calls: int  # case 6: calls in the reference org's 72 h settle window
    state_calls: int  # case 7: tracked calls in the saved state
    state_saves: int  # case 7: ordinary polls' saves measured (the median is shown)
    backfill_days: float = 30  # case 8: days of history backfilled ...
    backfill_per_day: int = 50_000  # ... of an org making this many calls a day


FULL = Sizes(
    "full",
    ingest_calls=100_000,
    window_calls=10_000,
    old_small=10_000,
    old_big=1_000_000,
    repeats=3,
    steady_polls=3,
    idle_scrapes=400,
    busy_polls=3,
    scrape_rounds=5,
    renders=50,
    tier_calls=150_000,
    state_calls=100_000,
    state_saves=20,
)
QUICK = Sizes(
    "quick",
    ingest_calls=10_000,
    window_calls=2_000,
    old_small=2_000,
    old_big=100_000,
    repeats=1,
    steady_polls=2,
    idle_scrapes=100,
    busy_polls=2,
    scrape_rounds=2,
    renders=10,
    tier_calls=10_000,
    state_calls=10_000,
    state_saves=10,
    backfill_days=1,
    backfill_per_day=10_000,
)


@dataclass
class Row:
    """One line of the table. Ratios are value ÷ reference (calls/s: higher is better; ms, MB: lower)."""

    case: str
    figure: str
    value: float | None
    unit: str
    vs_parse: float | None = None
    vs_naive: float | None = None
    goal: str = ""
    verdict: str = ""  # PASS, MISS or empty when the row has no goal


@dataclass
class Facts:
    """Machine-independent results, by case; what the smoke test checks."""

    by_case: dict[str, dict] = field(default_factory=dict)

    def __getitem__(self, case: str) -> dict:
        return self.by_case.setdefault(case, {})


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "PASS" if ok else "MISS"


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: p99 of 400 samples is the 396th smallest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class PollReport(logging.Handler):
    """Catches the poller's own `poll done` debug line: records read and examined, bytes, tracked."""

    FIELDS = ("records", "examined", "events", "invalid", "bytes", "tracked", "duration_s")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: dict = {}
        self._logger = logging.getLogger("exporter.poller")

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "poll done":
            self.last = {key: getattr(record, key, None) for key in self.FIELDS}

    def __enter__(self) -> Self:
        self._saved = (self._logger.level, self._logger.propagate)
        self._logger.addHandler(self)
        self._logger.setLevel(logging.DEBUG)
        self._logger.propagate = False  # keep the benchmark's output to its table
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]
