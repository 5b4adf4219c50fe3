"""Config values: one raw value from the YAML file or the environment → a checked Python value.

Durations in seconds, URLs, bucket lists, dollars, metadata labels, whole numbers and the API key
read from its file; each problem is a `ConfigError` naming the key. `config.py`, below, puts the
values together into targets and a `Config`. The API key is held in a `Secret` that never prints itself.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any
from urllib.parse import urlsplit

from .catalogue import DEFAULT_BUCKETS

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_HISTOGRAMS = {name.removeprefix("callingbox_"): name for name in DEFAULT_BUCKETS}
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Labels the exporter already uses, and those Prometheus attaches at scrape time.
RESERVED_LABELS = frozenset(
    {
        "org",
        "direction",
        "status",
        "hangup_cause",
        "error_code",
        "le",
        "code",
        "result",
        "reason",
        "label",
        "version",
        "call_id",
        "job",
        "instance",
    }
)
MAX_METADATA_LABELS = 5


class ConfigError(Exception):
    """One line: `key: what is wrong`."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key


class Secret:
    """An API key that shows as *** in every repr, log line and error message."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_duration(key: str, value: Any) -> float:
    """`15s`, `2m`, `1h30m`, `72h` or plain seconds → seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not a duration (e.g. 15s, 2m)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        seconds = float(value)
    elif isinstance(value, str) and value and _DURATION.sub("", value.strip()) == "":
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(value))
    else:
        raise ConfigError(key, f"{value!r} is not a duration (e.g. 15s, 2m)")
    if not math.isfinite(seconds):
        raise ConfigError(key, f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ConfigError(key, f"{value!r} must not be negative")
    return seconds


def positive_duration(key: str, value: Any) -> float:
    seconds = parse_duration(key, value)
    if seconds <= 0:
        raise ConfigError(key, f"{value!r} must be greater than 0")
    return seconds


def whole_number(key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(key, f"{value!r} is not a whole number of at least {least}")
    return value


def file_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"{value!r} is not a file path")
    return value


def http_url(key: str, value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
        raise ConfigError(key, f"{value!r} is not an http(s) URL")
    return value.rstrip("/")


def buckets(key: str, value: Any) -> dict[str, tuple[float, ...]]:
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a mapping of histogram name to a list of bucket bounds")
    result = {}
    for name, bounds in value.items():
        full = _HISTOGRAMS.get(str(name).removeprefix("callingbox_"))
        if full is None:
            raise ConfigError(f"{key}.{name}", f"unknown histogram (one of {', '.join(sorted(_HISTOGRAMS))})")
        if (
            not isinstance(bounds, list)
            or not bounds
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            or sorted(set(bounds)) != bounds
        ):
            raise ConfigError(f"{key}.{name}", f"{bounds!r} is not a non-empty increasing list of numbers")
        result[full] = tuple(float(b) for b in bounds)
    return result


def dollars(key: str, value: Any) -> float:
    """An amount of US dollars greater than 0, e.g. `250` or `99.50`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"{value!r} is not a number of dollars (e.g. 250 or 99.50)")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"{value!r} must be a finite number greater than 0")
    return float(value)


def metadata_labels(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """`{metadata key: label name}`: which call metadata become labels on the call metrics."""
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a mapping of metadata key to label name, e.g. {campaign_id: campaign}")
    if len(value) > MAX_METADATA_LABELS:
        raise ConfigError(key, f"{len(value)} labels: at most {MAX_METADATA_LABELS}, each multiplies the series count")
    pairs, names = [], set()
    for meta_key, label in value.items():
        where = f"{key}.{meta_key}"
        if not isinstance(meta_key, str) or not meta_key:
            raise ConfigError(key, f"{meta_key!r} is not a metadata key")
        if not isinstance(label, str) or not _LABEL_NAME.match(label) or label.startswith("__"):
            raise ConfigError(where, f"{label!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)")
        if label in RESERVED_LABELS:
            raise ConfigError(where, f"{label!r} is a label the exporter or Prometheus already uses")
        if label in names:
            raise ConfigError(where, f"{label!r} is given to another metadata key")
        names.add(label)
        pairs.append((meta_key, label))
    return tuple(pairs)


def _shown_path(path: str) -> str:
    """The path for an error message, unless it is likely the key itself pasted by mistake."""
    if path.startswith("sk_") or (os.sep not in path and "." not in path and len(path) >= 20):
        return "the value (it looks like an API key, not a file path)"
    return path


def read_key_file(key: str, path: str) -> Secret:
    try:
        with open(path, encoding="utf-8") as handle:
            value = handle.read().strip()
    except OSError as error:
        raise ConfigError(key, f"cannot read {_shown_path(path)}: {error.strerror}") from None
    if not value:
        raise ConfigError(key, f"{_shown_path(path)} is empty")
    return Secret(value)
