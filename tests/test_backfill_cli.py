"""`callingbox-exporter backfill`, end to end: the real CLI as a subprocess against the simulator on
loopback. The history becomes OpenMetrics files whose last samples are the state's values (the
live exporter goes on from them without a reset), equal to the simulator's truth; bad input
stops it with one line and leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client.utils import floatToGoString

from exporter.catalogue import BILLED_DOLLARS, FAMILIES, MILLI_CENTS_PER_DOLLAR
from exporter.state import StateDB
from exporter.timeline import WRITTEN
from helpers import ROOT, differences, wait_until, write_exporter_config

KEY = "backfill-key"
HISTORY = 300  # calls, 4 s apart: 20 minutes of history
HOUR = 3600.0
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+) (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Key = tuple[str, tuple[tuple[str, str], ...]]


def backfill(tmp_path: Path, url: str, out: Path, *extra: str, key: str = KEY) -> subprocess.CompletedProcess:
    """The CLI's backfill of the simulator at `url` into `out`, the last two hours in 5-minute steps."""
    config = write_exporter_config(tmp_path / "backfill.yml", {"api_url": url})
    argv = [sys.executable, "-m", "exporter", "backfill", "--config.file", str(config)]
    argv += ["--since", "2h", "--step", "5m", "--output", str(out), *extra]
    env = {**os.environ, "CALLINGBOX_API_KEY": key}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def manifest(out: Path) -> dict:
    return json.loads((out / "backfill.json").read_text())


def final_samples(files: list[str]) -> dict[Key, tuple[float, float]]:
    """Each series' last sample in the files, (timestamp, value), keyed without job and instance."""
    last: dict[Key, tuple[float, float]] = {}
    for path in files:
        for line in Path(path).read_text().splitlines():
            match = SAMPLE.match(line)
            if match is None:
                continue
            name, labels, value, at = match.groups()
            pairs = tuple(sorted((k, v) for k, v in LABEL.findall(labels) if k not in ("job", "instance")))
            last[name, pairs] = (float(at), float(value))
    return last


def store_samples(store, org: str) -> dict[Key, float]:
    """The samples a scrape of `store` shows for the written families, keyed as `final_samples`."""
    samples: dict[Key, float] = {}
    for name in WRITTEN:
        names = (*FAMILIES[name].labels, *store.extra_labels)
        if FAMILIES[name].kind == "counter":
            for labels, value in store.counters.get(name, {}).items():
                scale = MILLI_CENTS_PER_DOLLAR if name == BILLED_DOLLARS else 1
                samples[name, tuple(sorted([("org", org), *zip(names, labels)]))] = value / scale
            continue
        for labels, counts in store.histograms.get(name, {}).items():
            pairs = [("org", org), *zip(names, labels)]
            running = 0
            for bound, count in zip((*store.buckets[name], float("inf")), counts[:-1]):
                running += count
                samples[f"{name}_bucket", tuple(sorted([*pairs, ("le", floatToGoString(bound))]))] = running
            samples[f"{name}_count", tuple(sorted(pairs))] = running
            samples[f"{name}_sum", tuple(sorted(pairs))] = counts[-1]
    return samples


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file under `directory`: its mtime and a hash of its content."""
    return {
        str(path.relative_to(directory)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_a_backfill_writes_the_history_and_the_state_the_live_exporter_goes_on_from(stack, tmp_path):
    # The history lies an hour back: every event of it happened before the backfill starts.
    sim, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    out = tmp_path / "out"
    done = backfill(tmp_path, url, out)
    assert done.returncode == 0, done.stderr
    [target] = manifest(out)["targets"]
    assert (target["calls"], target["invalid"], target["after_cutoff"]) == (HISTORY, 0, 0)
    assert target["until"] - target["since"] == 2 * HOUR
    assert not (out / ".incomplete").exists()

    db, restored = StateDB.open(target["state"], "default")
    db.close()
    assert restored is not None
    assert restored.ledger.baseline == restored.ledger.watermark == target["until"]
    last = final_samples(target["files"])
    expected = store_samples(restored.store, "default")
    assert last.keys() == expected.keys()
    for key, (at, value) in last.items():
        assert at == target["until"], key
        assert value == expected[key], key
    # ... and those values are the simulator's truth for everything after the baseline.
    samples = {key: value for key, (_, value) in last.items()}
    assert differences(samples, sim.truth(target["since"])) == []
    assert sum(v for (n, _), v in samples.items() if n == "callingbox_calls_created_total") == HISTORY


def test_an_output_holding_a_state_is_left_alone_unless_forced(stack, tmp_path):
    _, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    out = tmp_path / "out"
    first = backfill(tmp_path, url, out)
    assert first.returncode == 0, first.stderr
    before, until = snapshot(out), manifest(out)["targets"][0]["until"]

    refused = backfill(tmp_path, url, out)
    assert refused.returncode == 2
    assert len(refused.stderr.splitlines()) == 1 and f"{out} already holds" in refused.stderr, refused.stderr
    assert snapshot(out) == before

    forced = backfill(tmp_path, url, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert manifest(out)["targets"][0]["until"] > until


def test_a_state_alone_is_enough_to_refuse(stack, tmp_path):
    sim, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    out = tmp_path / "out"
    (out / "state").mkdir(parents=True)
    (out / "state" / "default.db").write_bytes(b"kept")
    refused = backfill(tmp_path, url, out)
    assert refused.returncode == 2
    assert len(refused.stderr.splitlines()) == 1 and f"{out} already holds" in refused.stderr, refused.stderr
    assert sim.stats["list_requests"] == 0  # refused before reading anything
    assert (out / "state" / "default.db").read_bytes() == b"kept"
    assert not (out / "backfill.json").exists()


def test_a_rejected_key_stops_with_one_line_and_writes_nothing(stack, tmp_path):
    _, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    out = tmp_path / "out"
    done = backfill(tmp_path, url, out, key="not-the-key")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "rejected the key" in done.stderr, done.stderr
    assert "not-the-key" not in done.stderr + done.stdout
    assert not (out / "backfill.json").exists()
    assert not (out / "state").exists()


def test_malformed_records_are_skipped_and_counted_in_the_manifest(stack, tmp_path):
    sim, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    junk = 7  # one of each kind the simulator makes, spread over the history
    sim.inject("malformed", n=junk)
    out = tmp_path / "out"
    done = backfill(tmp_path, url, out)
    assert done.returncode == 0, done.stderr
    [target] = manifest(out)["targets"]
    assert (target["invalid"], target["calls"]) == (junk, HISTORY)
    samples = {key: value for key, (_, value) in final_samples(target["files"]).items()}
    assert differences(samples, sim.truth(target["since"])) == []


def test_an_interrupted_backfill_leaves_nothing_complete_and_a_rerun_succeeds(stack, tmp_path):
    sim, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    sim.inject("trickle", every=0.2, duration=60)  # the list's first bytes, slowly
    out = tmp_path / "out"
    config = write_exporter_config(tmp_path / "backfill.yml", {"api_url": url})
    argv = [sys.executable, "-m", "exporter", "backfill", "--config.file", str(config)]
    argv += ["--since", "2h", "--output", str(out)]
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, "CALLINGBOX_API_KEY": KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: (out / ".incomplete").exists() and sim.stats["list_requests"] >= 1, 60, "the read under way")
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert not (out / "backfill.json").exists()
    assert not (out / "state").exists()

    done = backfill(tmp_path, url, out)
    assert done.returncode == 0, done.stderr
    assert manifest(out)["targets"][0]["calls"] == HISTORY
    assert not (out / ".incomplete").exists()


def test_a_rerun_after_a_run_interrupted_while_moving_its_files_into_place_succeeds(stack, tmp_path):
    """`finish` moves the files, then the blocks, then the state, the manifest last: a run killed
    between two moves leaves files without a state or a manifest, which a rerun replaces."""
    _, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    out = tmp_path / "out"
    assert backfill(tmp_path, url, out).returncode == 0
    os.unlink(out / "backfill.json")
    shutil.rmtree(out / "state")  # what a kill after the blocks were moved leaves
    done = backfill(tmp_path, url, out)
    assert done.returncode == 0, done.stderr
    [target] = manifest(out)["targets"]
    assert sorted(os.listdir(out / "openmetrics" / "default")) == sorted(os.path.basename(f) for f in target["files"])


def test_calls_created_before_the_baseline_count_only_their_events_after_it(stack, tmp_path):
    # The history's 20 minutes straddle the baseline, two hours back: half its calls were created
    # before it, some of those ended or delivered their webhook after it.
    sim, url = stack.simulator(history=HISTORY, history_age=2 * HOUR - 600, rate=0, api_key=KEY)
    out = tmp_path / "out"
    done = backfill(tmp_path, url, out)
    assert done.returncode == 0, done.stderr
    [target] = manifest(out)["targets"]
    assert target["calls"] == HISTORY  # read down to the baseline minus the settle window
    samples = {key: value for key, (_, value) in final_samples(target["files"]).items()}
    truth = sim.truth(target["since"])
    assert 0 < truth.total("callingbox_calls_created_total") < HISTORY
    assert differences(samples, truth) == []


def test_records_listed_twice_count_once(stack, tmp_path):
    sim, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    sim.inject("duplicates", n=10)
    out = tmp_path / "out"
    done = backfill(tmp_path, url, out)
    assert done.returncode == 0, done.stderr
    [target] = manifest(out)["targets"]
    samples = {key: value for key, (_, value) in final_samples(target["files"]).items()}
    assert differences(samples, sim.truth(target["since"])) == []


def test_the_live_exporter_started_on_the_state_goes_on_without_a_reset_and_counts_the_rest_once(stack, tmp_path):
    # The history ends now: the last calls' ends and webhooks come after the cut-off, for the live
    # exporter to count.
    sim, url = stack.simulator(history=HISTORY, history_age=0, rate=0, api_key=KEY)
    out = tmp_path / "out"
    done = backfill(tmp_path, url, out)
    assert done.returncode == 0, done.stderr
    [target] = manifest(out)["targets"]
    assert target["after_cutoff"] > 0
    backfilled = {key: value for key, (_, value) in final_samples(target["files"]).items()}
    assert sum(v for (name, _), v in backfilled.items() if name == "callingbox_calls_ended_total") > 0
    state_file = tmp_path / "live.db"
    shutil.copyfile(target["state"], state_file)

    config = {"api_url": url, "poll_interval": "0.3s", "overlap": "10s", "state_file": str(state_file)}
    exporter = stack.exporter(config, env={"CALLINGBOX_API_KEY": KEY}).start()
    first = exporter.scrape()
    for key, value in backfilled.items():  # served at once, at least the backfilled values
        assert first.get(key, 0) >= value, key
    truth = sim.truth(target["since"])
    wait_until(lambda: not differences(exporter.scrape(), truth), 60, message="the live exporter caught up")
    assert differences(exporter.scrape(), truth) == []


def test_a_list_read_cut_short_is_read_again_from_the_start(stack, tmp_path):
    sim, url = stack.simulator(history=HISTORY, history_age=HOUR, rate=0, api_key=KEY)
    sim.inject("truncate")  # the first read's body ends halfway, mid-array
    out = tmp_path / "out"
    done = backfill(tmp_path, url, out)
    assert done.returncode == 0, done.stderr
    assert sim.stats["list_requests"] == 2
    [target] = manifest(out)["targets"]
    assert target["calls"] == HISTORY  # the first attempt's half is not kept
    samples = {key: value for key, (_, value) in final_samples(target["files"]).items()}
    assert differences(samples, sim.truth(target["since"])) == []
