"""Configuration: YAML file + environment + flags → frozen dataclasses, validated before start.

Every problem raises `ConfigError` whose message is one line naming the key, the value and
what was expected; the CLI prints it and exits 2. The API key is held in a `Secret` that
never prints itself. Past 300 lines because it is one schema: each key's default, check
and message stand together, which is what a reader of a config error looks for.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from .catalogue import DEFAULT_BUCKETS, END_GRACE, STRAGGLER_GIVE_UP

DEFAULT_API_URL = "https://api.callingbox.io"
DEFAULT_LISTEN = ":9860"

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HISTOGRAMS = {name.removeprefix("callingbox_"): name for name in DEFAULT_BUCKETS}

TARGET_KEYS = {
    "api_url",
    "api_key_file",
    "poll_interval",
    "request_timeout",
    "state_file",
    "initial_lookback",
    "settle_window",
    "straggler_give_up",
    "straggler_concurrency",
    "straggler_batch",
    "overlap",
    "end_grace",
    "hot_window",
    "full_read_interval",
    "open_refresh_interval",
    "max_label_values",
    "buckets",
    "metadata_labels",
    "daily_budget_dollars",
    "audit_interval",
    "audit_sample",
    "max_requests_per_minute",
    "new_series_hold",
    "label_idle",
}
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Labels the exporter already uses, and those Prometheus attaches at scrape time.
RESERVED_LABELS = frozenset({"org", "direction", "status", "hangup_cause", "error_code", "le", "code", "result",
                             "reason", "label", "version", "call_id", "job", "instance"})
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


@dataclass(frozen=True)
class Target:
    name: str = "default"
    api_url: str = DEFAULT_API_URL
    api_key: Secret | None = None
    api_key_file: str | None = None
    poll_interval: float = 15.0
    request_timeout: float = 30.0
    state_file: str | None = None
    initial_lookback: float = 0.0
    settle_window: float = 72 * 3600.0
    straggler_give_up: float = STRAGGLER_GIVE_UP  # after creation; stragglers are refreshed by id until then
    straggler_concurrency: int = 4  # GET /v1/calls/{id} in flight at once
    straggler_batch: int = 100  # refreshes per poll at most
    overlap: float = 120.0
    end_grace: float = END_GRACE  # after a call's end, a hangup cause still unknown counts as `none`
    # Read tiers (SPEC §4, read only what can have changed): each poll reads the list this deep,
    # older open calls are refreshed by id (or by reading deeper, whichever costs less) at most
    # this far apart, and the whole settle window is read this often (0: every poll).
    hot_window: float = 1800.0
    open_refresh_interval: float = 300.0
    full_read_interval: float = 3600.0
    max_label_values: int = 50
    buckets: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    metadata_labels: tuple[tuple[str, str], ...] = ()  # (metadata key, label name), in config order
    daily_budget_dollars: float | None = None  # exported as callingbox_daily_budget_dollars when set
    audit_interval: float = 3600.0  # 0: no self-audit
    audit_sample: int = 10  # tracked calls fetched by id at each audit (spot-checks); 0: none
    max_requests_per_minute: int = 600  # per API key, shared by every target using that key
    # Born at zero (SPEC §3): a new series is published at its starting value, and its increments
    # follow once a scrape has read it and this long has passed since (0: at once, no hold).
    new_series_hold: float = 60.0
    label_idle: float = 7 * 86400.0  # a capped label value not counted this long leaves /metrics, freeing its place


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...]
    listen_host: str | None = None
    listen_port: int = 9860
    telemetry_path: str = "/metrics"
    log_level: str = "info"
    log_format: str = "logfmt"
    demo: bool = False
    once: bool = False


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


def _positive(key: str, value: Any) -> float:
    seconds = parse_duration(key, value)
    if seconds <= 0:
        raise ConfigError(key, f"{value!r} must be greater than 0")
    return seconds


def _url(key: str, value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).netloc:
        raise ConfigError(key, f"{value!r} is not an http(s) URL")
    return value.rstrip("/")


def _buckets(key: str, value: Any) -> dict[str, tuple[float, ...]]:
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


def _dollars(key: str, value: Any) -> float:
    """An amount of US dollars greater than 0, e.g. `250` or `99.50`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"{value!r} is not a number of dollars (e.g. 250 or 99.50)")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"{value!r} must be a finite number greater than 0")
    return float(value)


def _metadata_labels(key: str, value: Any) -> tuple[tuple[str, str], ...]:
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


def _target(raw: Mapping[str, Any], where: str, name: str) -> Target:
    unknown = sorted(set(raw) - TARGET_KEYS - {"name"})
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}", "unknown key")
    values: dict[str, Any] = {"name": name}
    for key, value in raw.items():
        path = f"{where}{key}"
        if key in ("poll_interval", "request_timeout", "open_refresh_interval", "label_idle"):
            values[key] = _positive(path, value)
        elif key in ("initial_lookback", "settle_window", "overlap", "audit_interval", "hot_window",
                     "full_read_interval", "end_grace", "new_series_hold"):
            values[key] = parse_duration(path, value)
        elif key == "api_url":
            values[key] = _url(path, value)
        elif key in ("api_key_file", "state_file"):
            if not isinstance(value, str) or not value:
                raise ConfigError(path, f"{value!r} is not a file path")
            values[key] = value
        elif key == "audit_sample":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(path, f"{value!r} is not a whole number of at least 0")
            values[key] = value
        elif key in ("max_label_values", "max_requests_per_minute"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(path, f"{value!r} is not a whole number of at least 1")
            values[key] = value
        elif key == "buckets":
            values[key] = _buckets(path, value)
        elif key == "metadata_labels":
            values[key] = _metadata_labels(path, value)
        elif key == "daily_budget_dollars":
            values[key] = _dollars(path, value)
        elif key == "straggler_give_up":
            values[key] = _positive(path, value)
        elif key in ("straggler_concurrency", "straggler_batch"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(path, f"{value!r} is not a whole number of at least 1")
            values[key] = value
    if values.get("settle_window", Target.settle_window) <= 0:
        raise ConfigError(f"{where}settle_window", "must be greater than 0")
    if "straggler_give_up" in values and values["straggler_give_up"] < values.get("settle_window", Target.settle_window):
        raise ConfigError(f"{where}straggler_give_up", f"{raw['straggler_give_up']!r} is shorter than settle_window")
    if values.get("api_key_file"):
        values["api_key"] = read_key_file(f"{where}api_key_file", values["api_key_file"])
    return Target(**values)


def _targets(document: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Target, ...]:
    if "targets" not in document:
        unknown = sorted(set(document) - TARGET_KEYS)
        if unknown:
            raise ConfigError(unknown[0], "unknown key")
        overrides = dict(document)
        if env.get("CALLINGBOX_API_URL"):
            overrides["api_url"] = _url("CALLINGBOX_API_URL", env["CALLINGBOX_API_URL"])
        if env.get("CALLINGBOX_API_KEY_FILE"):
            overrides["api_key_file"] = env["CALLINGBOX_API_KEY_FILE"]
        target = _target(overrides, "", "default")
        if env.get("CALLINGBOX_API_KEY"):
            # The variable wins over any key file, for good: rotation then means a restart.
            target = dataclasses.replace(target, api_key=Secret(env["CALLINGBOX_API_KEY"].strip()), api_key_file=None)
        return (target,)

    entries = document["targets"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError("targets", "expected a non-empty list of targets")
    defaults = {k: v for k, v in document.items() if k != "targets"}
    unknown = sorted(set(defaults) - TARGET_KEYS)
    if unknown:
        raise ConfigError(unknown[0], "unknown key")
    _target(defaults, "", "defaults")  # a bad default is named as the top-level key it is
    targets, names, state_files = [], set(), set()
    for index, entry in enumerate(entries):
        where = f"targets[{index}]."
        if not isinstance(entry, dict):
            raise ConfigError(f"targets[{index}]", "expected a mapping")
        name = entry.get("name")
        if not isinstance(name, str) or not _TARGET_NAME.match(name):
            raise ConfigError(f"{where}name", f"{name!r} is not a name (letters, digits, _ . -)")
        if name in names:
            raise ConfigError(f"{where}name", f"{name!r} is used by another target")
        names.add(name)
        target = _target({**defaults, **entry}, where, name)
        if target.state_file and target.state_file in state_files:
            raise ConfigError(f"{where}state_file", f"{target.state_file!r} is used by another target")
        state_files.add(target.state_file)
        targets.append(target)
    return tuple(targets)


def load_document(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError("config.file", f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("config.file", f"{path} is not valid YAML{where}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError("config.file", f"{path} must hold a mapping of keys")
    return document


def parse_listen_address(value: str) -> tuple[str | None, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("web.listen-address", f"{value!r} is not [HOST]:PORT")
    return (host.strip("[]") or None), int(port)


def build(
    *,
    config_file: str | None = None,
    listen_address: str = DEFAULT_LISTEN,
    telemetry_path: str = "/metrics",
    log_level: str = "info",
    log_format: str = "logfmt",
    demo: bool = False,
    once: bool = False,
    env: Mapping[str, str] | None = None,
) -> Config:
    """The one place a Config is made: everything is validated before the service starts."""
    env = os.environ if env is None else env
    targets = _targets(load_document(config_file), env)
    if not demo:
        for index, target in enumerate(targets):
            if target.api_key is None:
                key = "api_key_file" if len(targets) == 1 else f"targets[{index}].api_key_file"
                raise ConfigError(key, "no API key: set api_key_file, CALLINGBOX_API_KEY or CALLINGBOX_API_KEY_FILE")
    host, port = parse_listen_address(listen_address)
    if not telemetry_path.startswith("/") or telemetry_path in ("/", "/-/healthy", "/-/ready"):
        raise ConfigError("web.telemetry-path", f"{telemetry_path!r} must be a path like /metrics")
    return Config(targets, host, port, telemetry_path, log_level, log_format, demo, once)
