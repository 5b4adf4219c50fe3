"""Structured logs: `logfmt` or `json`, stable messages, fields passed as `extra={...}`.

Secrets are kept out at the source (the API client scrubs what it raises); `redact` adds a
last guard at the handler so no line can ever carry a registered key.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_secrets: set[str] = set()


def redact(secret: str) -> None:
    """Never let `secret` reach a log line."""
    if secret:
        _secrets.add(secret)


def _fields(record: logging.LogRecord) -> dict:
    fields = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": "warn" if record.levelno == logging.WARNING else record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    fields.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD and v is not None)
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info)
    return fields


def _logfmt_value(value: object) -> str:
    if isinstance(value, (int, float)):
        return str(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\n\\'):
        return text
    return json.dumps(text)


class _Formatter(logging.Formatter):
    def __init__(self, style: str):
        super().__init__()
        self.style = style

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        if self.style == "json":
            line = json.dumps(fields, default=str)
        else:
            line = " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())
        for secret in _secrets:
            line = line.replace(secret, "***")
        return line


def setup(level: str = "info", style: str = "logfmt", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(style))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # aiohttp's access log would add a line per scrape; the exporter's own lines are enough.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
