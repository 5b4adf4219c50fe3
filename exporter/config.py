"""Configuration: YAML file + environment + flags → one validated, frozen `Config`, made by `build`.

Validation runs in two passes: each value's shape and type (configvalues.py), then the checks
across keys and targets (settle windows, names, state files, a key for every target). Every problem
raises `ConfigError`, one line naming the key, the value and what was expected; the CLI prints it
and exits 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .catalogue import END_GRACE, STRAGGLER_GIVE_UP
from .configvalues import (
    ConfigError,
    Secret,
    buckets,
    dollars,
    file_path,
    http_url,
    metadata_labels,
    parse_duration,
    positive_duration,
    read_key_file,
    whole_number,
)

# The names other modules import from here, those of configvalues.py included.
__all__ = [
    "DEFAULT_API_URL",
    "DEFAULT_LISTEN",
    "TARGET_KEYS",
    "Config",
    "ConfigError",
    "Secret",
    "Target",
    "build",
    "load_document",
    "parse_duration",
    "parse_listen_address",
    "positive_duration",
    "read_key_file",
]

DEFAULT_API_URL = "https://api.callingbox.io"
DEFAULT_LISTEN = ":9860"

_TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

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
    full_read_interval: float = 3 * 3600.0  # with each audit: one full read every 3 h (README)
    max_label_values: int = 50
    buckets: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    metadata_labels: tuple[tuple[str, str], ...] = ()  # (metadata key, label name), in config order
    daily_budget_dollars: float | None = None  # exported as callingbox_daily_budget_dollars when set
    audit_interval: float = 3 * 3600.0  # 0: no self-audit
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


def _reject_unknown(raw: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}", "unknown key")


def _target(raw: Mapping[str, Any], where: str, name: str) -> Target:
    """Pass one for a target: each key's shape and type, in the order the file gives them."""
    _reject_unknown(raw, where, TARGET_KEYS | {"name"})
    values: dict[str, Any] = {"name": name}
    for key, value in raw.items():
        path = f"{where}{key}"
        if key in ("poll_interval", "request_timeout", "open_refresh_interval", "label_idle", "straggler_give_up"):
            values[key] = positive_duration(path, value)
        elif key in (
            "initial_lookback",
            "settle_window",
            "overlap",
            "audit_interval",
            "hot_window",
            "full_read_interval",
            "end_grace",
            "new_series_hold",
        ):
            values[key] = parse_duration(path, value)
        elif key == "api_url":
            values[key] = http_url(path, value)
        elif key in ("api_key_file", "state_file"):
            values[key] = file_path(path, value)
        elif key == "audit_sample":
            values[key] = whole_number(path, value, 0)
        elif key in ("max_label_values", "max_requests_per_minute", "straggler_concurrency", "straggler_batch"):
            values[key] = whole_number(path, value, 1)
        elif key == "buckets":
            values[key] = buckets(path, value)
        elif key == "metadata_labels":
            values[key] = metadata_labels(path, value)
        elif key == "daily_budget_dollars":
            values[key] = dollars(path, value)
    # Pass two: checks across this target's keys, then its key file.
    if values.get("settle_window", Target.settle_window) <= 0:
        raise ConfigError(f"{where}settle_window", "must be greater than 0")
    if "straggler_give_up" in values and values["straggler_give_up"] < values.get(
        "settle_window", Target.settle_window
    ):
        raise ConfigError(f"{where}straggler_give_up", f"{raw['straggler_give_up']!r} is shorter than settle_window")
    if values.get("api_key_file"):
        values["api_key"] = read_key_file(f"{where}api_key_file", values["api_key_file"])
    return Target(**values)


def _targets(document: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Target, ...]:
    if "targets" not in document:
        _reject_unknown(document, "", TARGET_KEYS)
        overrides = dict(document)
        if env.get("CALLINGBOX_API_URL"):
            overrides["api_url"] = http_url("CALLINGBOX_API_URL", env["CALLINGBOX_API_URL"])
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
    _reject_unknown(defaults, "", TARGET_KEYS)
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
