"""What the tests share, defined once: waits, the exporter as a process, scrapes, truth comparison, logs.

Only pytest fixtures live in conftest.py; test files import these with `from helpers import ...`.
Ports, waits, probes and the exporter's command line come from benchmarks/procs.py, so the tests
and the benchmarks start and stop the exporter the same way.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

# The tests import these from helpers too (stop only from here: noqa F401).
from benchmarks.procs import (  # noqa: F401
    CALL_COUNTERS,
    CALL_HISTOGRAMS,
    ROOT,
    answers,
    exporter_argv,
    fetch,
    free_port,
    memory,
    responds,
    stop,
    wait_until,
    write_exporter_config,
)
from exporter.records import Record


def wait_while_progressing(predicate, progress, stall: float, interval: float = 0.1, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail only once `progress()` stops changing.

    For work whose length depends on the machine (a poll reading a 100 MB body): the deadline is
    `stall` seconds without any change of `progress()`, so a slow machine makes the wait longer,
    and only a stuck one makes it fail.
    """
    last, since = progress(), time.monotonic()
    while True:
        value = predicate()
        if value:
            return value
        now, current = time.monotonic(), progress()
        if current != last:
            last, since = current, now
        elif now - since > stall:
            raise AssertionError(f"no progress for {stall}s ({current!r}) waiting for {message}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET `url`: the status and the body as text; OSError when nothing answers."""
    status, body = fetch(url, timeout)
    return status, body.decode()


def api_get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """GET `url` (the simulator's API): status, headers and body, an HTTP error's too."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def list_calls(url: str, key: str | None = None) -> list[dict]:
    """The simulator's whole list, `GET /v1/calls`, decoded (with `key`, as a client with that key)."""
    status, _, body = api_get(f"{url}/v1/calls", {"Authorization": f"Bearer {key}"} if key else None)
    assert status == 200
    return json.loads(body)


def iso_seconds(value: str) -> float:
    """An API timestamp (`2023-11-07T05:31:56.5Z`) as Unix seconds, read without the exporter's parser."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample_value(samples: Samples, name: str, org: str = "default", **labels: str) -> float:
    """One sample of one org (0 when absent): `sample_value(exporter.scrape(), "callingbox_up", "a")`."""
    return samples.get((name, tuple(sorted({"org": org, **labels}.items()))), 0)


class Exporter:
    """The exporter as a real subprocess."""

    def __init__(self, tmp: Path, config: dict | None, env: dict | None = None, name: str = "exporter"):
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp / f"{name}.yml"
        if config is not None:
            write_exporter_config(self.config_path, config)
        self.log_path = tmp / f"{name}.log"
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.process: subprocess.Popen | None = None

    def start(self, *extra: str, wait_healthy: bool = True) -> Exporter:
        # A test may write or replace the config file itself before (re)starting.
        config = self.config_path if self.config_path.exists() else None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                exporter_argv(self.port, config, *extra), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait_healthy:
            wait_until(self._healthy, 20, message=f"exporter healthy (log: {self.log_path})")
        return self

    def _healthy(self) -> bool:
        return answers(self.process, self.url + "/-/healthy", "exporter", log=self.log_path)

    def ready(self) -> bool:
        return responds(self.url + "/-/ready", timeout=2)

    def scrape(self) -> Samples:
        status, text = http_get(self.url + "/metrics")
        assert status == 200, text
        return parse_metrics(text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=20)

    def rss_peak_kib(self) -> int:
        return memory(self.process.pid)["VmHWM"] // 1024

    def rss_kib(self) -> int:
        return memory(self.process.pid)["VmRSS"] // 1024


def live_simulator(stack, key: str, seed: int, rate: float, retry: float = 0.05, **settings):
    """`stack.simulator` in 300-fold API time, its webhook retries `retry` s apart, answering `key`: (sim, url)."""
    return stack.simulator(seed=seed, rate=rate, time_scale=300, webhook_retry_base=retry, api_key=key, **settings)


def exporter_of(stack, key: str, url: str, **config) -> Exporter:
    """`stack.exporter` reading `url` with `key` from its environment; `config` holds the target's other keys."""
    return stack.exporter({"api_url": url, **config}, env={"CALLINGBOX_API_KEY": key})


def saved_baseline(state_file) -> float:
    """The baseline an exporter saved in its state file, read as `explain` reads it (never written)."""
    from exporter.state import read

    return read(str(state_file)).ledger.baseline


def counters_of(samples: Samples, org: str = "default") -> Samples:
    """Samples of one org with the org label dropped, for comparison with simulator truth."""
    result: Samples = {}
    for (name, labels), value in samples.items():
        labels_dict = dict(labels)
        if labels_dict.pop("org", None) != org:
            continue
        result[(name, tuple(sorted(labels_dict.items())))] = value
    return result


HISTOGRAMS, COUNTERS = CALL_HISTOGRAMS, CALL_COUNTERS  # the families compared with truth, as benchmarks compare


MILLI_CENTS_PER_DOLLAR = 100_000  # SPEC §1: 100 000 milli-cents = 1 USD
# The only sums compared with a tolerance: each delay is a difference of two float timestamps,
# and the exporter adds them up in the order it reads the calls, the truth in the order they
# happened. Float addition is not associative, so the last bits may differ. Everything else is
# exact: counts, buckets, the sums of integer durations, and money (integer milli-cents summed,
# then divided once, by the exporter as here).
FLOAT_SUMS = ("callingbox_call_answer_delay_seconds_sum", "callingbox_call_setup_delay_seconds_sum")


def differences(
    samples: Samples, truth, org: str = "default", buckets: dict | None = None, floats: tuple[str, ...] = FLOAT_SUMS
) -> list[str]:
    """Every way the exporter's numbers differ from the simulator's ground truth (empty: exact;
    the families in `floats` equal but for the last bits)."""
    from exporter.catalogue import DEFAULT_BUCKETS

    got = counters_of(samples, org)
    problems = []
    expected: Samples = {}
    for (name, labels), value in truth.counters.items():
        if name == "callingbox_billed_amount_milli_cents":
            assert isinstance(value, int), f"truth's money is not integer milli-cents: {value!r}"
            expected[("callingbox_billed_amount_dollars_total", labels)] = value / MILLI_CENTS_PER_DOLLAR
        else:
            expected[(name, labels)] = value
    for (name, labels), observations in truth.observations.items():
        bounds = (buckets or {}).get(name, DEFAULT_BUCKETS[name])
        expected[(name + "_count", labels)] = len(observations)
        expected[(name + "_sum", labels)] = sum(observations)
        for bound in (*bounds, float("inf")):
            le = float(bound)
            expected[(name + "_bucket", tuple(sorted(labels + (("le", _le(le)),))))] = sum(
                1 for v in observations if v <= le
            )
    families = (
        COUNTERS
        + ("callingbox_billed_amount_dollars_total",)
        + tuple(h + suffix for h in HISTOGRAMS for suffix in ("_count", "_sum", "_bucket"))
    )
    keys = {k for k in expected} | {k for k in got if k[0] in families}
    for key in sorted(keys):
        want, have = expected.get(key, 0), got.get(key, 0)
        if not same_value(key[0], have, want, floats):
            problems.append(f"{key}: exporter {have} != truth {want}")
    return problems


def same_value(name: str, have: float, want: float, floats: tuple[str, ...] = FLOAT_SUMS) -> bool:
    """Equal, or for a float sum (`floats`) equal but for the last bits."""
    if name in floats:
        return abs(want - have) <= 1e-6 * max(1.0, abs(want))
    return want == have


def _le(bound: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(bound)


_LOGFMT_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def log_records(text: str) -> list[dict]:
    """The exporter's log lines (logfmt or json) as dicts of strings, in order."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                fields = {key: str(value) for key, value in json.loads(line).items()}
            except ValueError:
                continue
        else:
            fields = {
                key: json.loads(value) if value.startswith('"') else value for key, value in _LOGFMT_FIELD.findall(line)
            }
        if "msg" in fields and "ts" in fields:
            records.append(fields)
    return records


def log_seconds(ts: str) -> float:
    """A log line's `ts` (`2024-05-01T12:00:00.123Z`) as Unix seconds."""
    whole, millis = ts.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000


def assert_orgs_exact(exporter: Exporter, sims: dict, timeout: float = 30) -> None:
    """Once every org's simulator is quiet, each org's counters equal its simulator's truth."""
    for org, sim in sims.items():
        wait_until(sim.all_final, 90, message=f"{org}'s calls final")
    for org, sim in sims.items():
        truth = sim.truth(0)
        try:
            wait_until(lambda: not differences(exporter.scrape(), truth, org=org), timeout, message=org)
        except AssertionError:
            raise AssertionError(f"{org} differs from its truth: {differences(exporter.scrape(), truth, org=org)[:5]}")


# ---- things code under test is given: clocks the test moves, decoded call records ----------


class FixedClock:
    """A clock that reads `now` until the test moves it: the `now` of code under test."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class SkippingClock:
    """The wall clock plus whatever time the test has `skipped`: a poller's `now` the test runs ahead."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.time() + self.skipped


def call_record(**fields) -> Record:
    """A decoded call record: outbound, and every field without a default None unless `fields` give it."""
    blank = {name: None for name in Record._fields if name not in Record._field_defaults}
    return Record(**{**blank, "direction": "outbound", **fields})


def settled(ended_at: float, seconds: int, **changes) -> dict:
    """The fields of a completed call once all is done: `seconds` talked until `ended_at`, billed as
    long (1 550 milli-cents, settled), hung up normally, its webhook delivered, its result extracted;
    `changes` replace any of them."""
    return {
        "ended_at": ended_at,
        "duration_seconds": seconds,
        "billed_duration_seconds": seconds,
        "billing_amount_milli_cents": 1550,
        "reservation_status": "settled",
        "webhook_status": "delivered",
        "result_status": "completed",
        "hangup_cause": "normal_clearing",
        **changes,
    }


def call_object(id: str, status: str, created: float, updated: float, **fields) -> dict:
    """A call object as the API sends it: outbound, timestamps as text, and once its status is
    terminal, ended at `updated`; `fields` add to it or replace."""
    from exporter.simulator import format_ts

    ended = format_ts(updated) if is_final(status) else None
    times = {"created_at": format_ts(created), "updated_at": format_ts(updated), "ended_at": ended}
    return {"id": id, "status": status, "direction": "outbound", **times, **fields}


def is_final(status: str) -> bool:
    """Whether a documented status is terminal (no status outside the docs here)."""
    return status not in ("queued", "initiated", "ringing", "in_progress")
