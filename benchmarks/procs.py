"""Processes the benchmarks start: the fake API, the exporter, the naive peer. Loopback only.

Each is a `Child` stopped by its own pid (SIGTERM, then SIGKILL after a deadline). Memory is
read from /proc/<pid>/status: VmHWM is the peak resident set since the process started.
The plumbing above the classes (ports, waits, probes, the exporter's command line) is the one
tests/helpers.py uses too, so the tests and the benchmarks start the exporter the same way.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH_KEY = "sk_bench_not_a_real_key"  # the simulator runs without a key; the exporter insists on one


# A port picked here is bound later, by another process: nothing holds it in between. A port from
# bind(0) lies in the kernel's ephemeral range (32768-60999), where any outgoing connection, or
# another process's bind(0), may take it in that gap. So ports are handed out in turn from a block
# below that range, one block per pytest-xdist worker (gw0, gw1, ...; gw0 without xdist): no client
# connection and no other worker is ever given the same port. Each process starts its turn at its
# own place in the block (a test's child process shares its worker's block).
PORT_BLOCK, FIRST_PORT, BLOCKS = 1000, 20_000, 12


def _port_turns():
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    first, start = FIRST_PORT + worker % BLOCKS * PORT_BLOCK, os.getpid() % PORT_BLOCK
    return (first + (start + n) % PORT_BLOCK for n in itertools.count())


_ports = _port_turns()


def free_port() -> int:
    """A loopback port nothing listens on now, not handed out before by this process."""
    for _ in range(PORT_BLOCK):
        port = next(_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {FIRST_PORT}-{FIRST_PORT + BLOCKS * PORT_BLOCK - 1}")


def memory(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS (now) of a process, in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(rest.split()[0]) * 1024
    return found


def fetch(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET `url`: the status and body, an HTTP error's too; OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """`fetch`, with (0, b"") when nothing answers."""
    try:
        return fetch(url, timeout)
    except OSError:  # urllib.error.URLError is one
        return 0, b""


class WaitTimedOut(AssertionError, TimeoutError):
    """A wait passed its deadline: a failed check to a test, a TimeoutError to a benchmark."""


def wait_until(predicate, timeout: float, message: str = "condition", interval: float = 0.1):
    """Poll `predicate` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimedOut(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class ChildExited(AssertionError, RuntimeError):
    """A process we wait for is gone: a failed check to a test, a RuntimeError to a benchmark."""


def responds(url: str, timeout: float = 1.0) -> bool:
    """Whether `url` answers 200 (nothing answering is a no, not an error)."""
    try:
        return fetch(url, timeout)[0] == 200
    except OSError:
        return False


def answers(process: subprocess.Popen, url: str, what: str, timeout: float = 1.0, log: Path | None = None) -> bool:
    """`responds`, as a readiness probe of `process`: fails at once if the process has exited, with
    the end of its `log`."""
    if process.poll() is not None:
        tail = f":\n{log.read_text(errors='replace')[-4000:]}" if log is not None and log.exists() else ""
        raise ChildExited(f"{what} exited with {process.returncode}{tail}")
    return responds(url, timeout)


def stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if `process` is still there after `timeout` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def exporter_argv(port: int, config_path: Path | None, *extra: str) -> list[str]:
    """`python -m exporter` on a loopback port with debug logs, reading `config_path` if given."""
    config = ("--config.file", str(config_path)) if config_path is not None else ()
    return [
        sys.executable,
        "-m",
        "exporter",
        *config,
        "--web.listen-address",
        f"127.0.0.1:{port}",
        "--log.level",
        "debug",
        *extra,
    ]


def write_exporter_config(path: Path, config: dict) -> Path:
    """The exporter's config file, with the hold of new series (born at zero) off unless `config` sets it.

    Tests and benchmarks read counts from /metrics as soon as they are saved; the hold would only
    delay them (and changes which values a page shows, not its cost). Those about the hold set it.
    """
    path.write_text(yaml.safe_dump({"new_series_hold": "0s", **config}))
    return path


# The call families an exporter's numbers are compared with the simulator's truth on (money apart).
CALL_COUNTERS = (
    "callingbox_calls_created_total",
    "callingbox_calls_ended_total",
    "callingbox_call_hangups_total",
    "callingbox_call_errors_total",
    "callingbox_webhook_deliveries_total",
    "callingbox_result_extractions_total",
)
CALL_HISTOGRAMS = (
    "callingbox_call_duration_seconds",
    "callingbox_call_answer_delay_seconds",
    "callingbox_call_setup_delay_seconds",
    "callingbox_call_billed_duration_seconds",
)


def sample(text: bytes | str, name: str, labels: str = "") -> float | None:
    """One sample's value from a text exposition: `sample(body, "x_total", 'org="a"')`."""
    if isinstance(text, bytes):
        text = text.decode()
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


class Child:
    """A subprocess of ours; JSON lines on its stdout are queued, stderr goes to a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict | None = None):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CALLINGBOX_")}
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        self.pid = self.process.pid
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            if line.startswith(b"{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)  # end of output

    def line(self, timeout: float) -> dict:
        """The next JSON line the child printed."""
        try:
            item = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.log_path.name}: no report within {timeout:.0f}s") from None
        if item is None:
            raise RuntimeError(f"{self.log_path.name}: exited ({self.process.poll()}); see {self.log_path}")
        return item

    def memory(self) -> dict[str, int]:
        return memory(self.pid)

    def stop(self) -> None:
        stop(self.process, timeout=15)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ApiServer(Child):
    """`benchmarks.servers` in its own process: the simulator (live) or its captured response (replay)."""

    def __init__(
        self,
        mode: str,
        history: int,
        log_dir: Path,
        history_age: float = 0.0,
        seed: int = 1,
        history_spacing: float | None = None,
    ):
        spacing = () if history_spacing is None else ("--history-spacing", str(history_spacing))
        argv = [
            sys.executable,
            "-m",
            "benchmarks.servers",
            "--mode",
            mode,
            "--history",
            str(history),
            "--history-age",
            str(history_age),
            "--seed",
            str(seed),
            *spacing,
        ]
        super().__init__(argv, log_dir / f"api-{mode}-{history}.log")
        try:
            hello = self.line(timeout=60 + history / 5000)  # replay generates the whole body first
        except Exception:
            self.stop()
            raise
        self.url, self.top, self.body_bytes = hello["url"], hello["top"], hello.get("body_bytes")

    def stats(self) -> dict:
        status, body = http_get(self.url + "/_bench/stats")
        return json.loads(body) if status == 200 else {}


class ExporterProcess(Child):
    """`python -m exporter` with a config file, debug logs as JSON lines (the poller reports each poll)."""

    def __init__(self, name: str, log_dir: Path, **target):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = write_exporter_config(log_dir / f"{name}.yml", target)
        argv = exporter_argv(self.port, config, "--log.format", "json")
        super().__init__(argv, log_dir / f"{name}.log", env={"CALLINGBOX_API_KEY": BENCH_KEY})

    def wait(self, path: str, timeout: float) -> None:
        what = f"exporter (see {self.log_path})"
        wait_until(lambda: answers(self.process, self.url + path, what, timeout=5), timeout, f"{self.url}{path}")

    def polls(self) -> list[dict]:
        """The `poll done` lines logged so far: records, examined, bytes, tracked, duration_s."""
        done = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{") and b'"poll done"' in line:
                done.append(json.loads(line))
        return done


class NaiveProcess(Child):
    """`benchmarks.naive_peer` as a hand-written exporter would run: serve metrics, poll, sleep."""

    def __init__(self, name: str, log_dir: Path, api_url: str, interval: float, polls: int = 0, serve: bool = True):
        self.port = free_port() if serve else None
        self.url = f"http://127.0.0.1:{self.port}" if serve else None
        argv = [
            sys.executable,
            "-m",
            "benchmarks.naive_peer",
            "--api-url",
            api_url,
            "--interval",
            str(interval),
            "--polls",
            str(polls),
        ]
        if serve:
            argv += ["--listen", f"127.0.0.1:{self.port}"]
        super().__init__(argv, log_dir / f"{name}.log")
