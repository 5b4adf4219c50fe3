"""Real Prometheus and Alertmanager processes on loopback ports, for the end-to-end tests.

A missing binary fails the test, never skips it: `make test` installs the Debian packages.
The `launch` fixture of conftest.py starts them and stops them at teardown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import yaml

from helpers import answers, free_port, http_get, stop


class Server:
    """A real Prometheus or Alertmanager process on a loopback port, its output in a log file."""

    def __init__(self, tmp: Path, name: str, command: list[str]):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.tmp = tmp / f"{name}.log", tmp
        self.command = [*command, f"--web.listen-address=127.0.0.1:{self.port}"]
        self._start("wb")

    def _start(self, mode: str) -> None:
        with open(self.log_path, mode) as log:
            self.process = subprocess.Popen(self.command, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)

    def restart(self) -> None:
        """Stop, then start again on the same port (Prometheus opens the blocks of its data directory)."""
        self.stop()
        self._start("ab")

    def ready(self) -> bool:
        return answers(self.process, self.url + "/-/ready", self.name, log=self.log_path)

    def api(self, path: str, **params: str) -> dict:
        status, body = http_get(f"{self.url}{path}?{urllib.parse.urlencode(params)}")
        assert status == 200, f"{self.name} {path}: HTTP {status} {body}"
        return json.loads(body)["data"]

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self) -> None:
        stop(self.process, timeout=10)


def require(*binaries: str) -> None:
    """Fail (not skip) when a server binary is missing: unproven is not proven."""
    missing = [binary for binary in binaries if shutil.which(binary) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not on PATH: `make test` installs them (apt-get install prometheus "
            "prometheus-alertmanager chromium)",
            pytrace=False,
        )


def write_yaml(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def start_prometheus(
    start,
    tmp: Path,
    exporter_url: str,
    rule_files=(),
    alertmanager: Server | None = None,
    flags=(),
    job: str = "callingbox",
) -> Server:
    """Prometheus scraping the exporter every second, with the given rule files and flags."""
    document = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [exporter_url.split("://")[1]]}]}],
    }
    if alertmanager is not None:
        document["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager.port}"]}]}]
        }
    config = write_yaml(tmp / "prometheus.yml", document)
    return start(
        "prometheus",
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'prometheus-data'}", *flags],
    )
