"""A faithful fake of the CallingBox HTTP API (SPEC §1), with faults on demand and a ground truth.

`callingbox-exporter --demo` serves it in-process; tests serve it on loopback and compare the
exporter's metrics with `Simulator.truth()`. Stdlib and aiohttp only: it imports nothing of ours.
Modules, top to bottom: call → lifecycle → contract (what the docs leave open) → truth → player
(steps the calls to `now`) → past (days of calls before the start) → clock (the ticking task,
freeze / thaw) → faults → handlers → app (`Simulator`).
"""

from .app import Simulator, serve_in_thread
from .clock import TICK
from .contract import DOCS_OPEN, Contract
from .faults import FAULT_KINDS
from .lifecycle import (
    API_VERSION,
    HISTORY_LIFETIME,
    HISTORY_SPACING,
    NOW,
    OUTCOME_WEIGHTS,
    PRICE_PER_MINUTE,
    TERMINAL,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_FIRST_RETRY,
    _seconds,
    format_ts,
)
from .truth import Truth, ledger

# What code outside the package imports (tests, benchmarks, cli) and the old module's public names.
__all__ = [
    "API_VERSION",
    "Contract",
    "DOCS_OPEN",
    "FAULT_KINDS",
    "HISTORY_LIFETIME",
    "HISTORY_SPACING",
    "NOW",
    "OUTCOME_WEIGHTS",
    "PRICE_PER_MINUTE",
    "TERMINAL",
    "TICK",
    "WEBHOOK_ATTEMPTS",
    "WEBHOOK_FIRST_RETRY",
    "Simulator",
    "Truth",
    "_seconds",
    "format_ts",
    "ledger",
    "serve_in_thread",
]
