"""The backfill's series over time (timeline.py): OpenMetrics text with timestamps, a file per UTC
day, every series at every step from the step before its birth (born at zero, SPEC §3)."""

from __future__ import annotations

import re
import shutil
import subprocess
from itertools import accumulate

import pytest
from prometheus_client.utils import floatToGoString

from exporter.store import Store
from exporter.timeline import Timeline

DAY, STEP = 86400.0, 300.0
MIDNIGHT = 19_675 * DAY  # 00:00 UTC, 2023-11-14
STEPS = [MIDNIGHT + k * STEP for k in range(-4, 4)]  # four steps before midnight, four from it
LABELS = {"job": "callingbox-exporter", "instance": "localhost:9860"}
OWN = 'org="default",job="callingbox-exporter",instance="localhost:9860"'  # as a scrape of the target attaches them
HANGUPS, DURATION = "callingbox_call_hangups_total", "callingbox_call_duration_seconds"
ENDED = "callingbox_calls_ended_total"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+) (\S+)$")


def parse(path: str) -> tuple[list[str], list[tuple[str, str, float, float]]]:
    """One file: its family names in order (`# TYPE`) and its samples (name, labels, value, timestamp)."""
    families, samples = [], []
    with open(path) as handle:
        lines = handle.read().splitlines()
    assert lines[-1] == "# EOF", path
    for line in lines[:-1]:
        if line.startswith("# TYPE "):
            families.append(line.split()[2])
        elif not line.startswith("# HELP "):
            match = SAMPLE.match(line)
            assert match, line
            name, labels, value, at = match.groups()
            samples.append((name, labels, float(value), float(at)))
    return families, samples


def by_series(samples) -> dict[tuple[str, str], list[tuple[float, float]]]:
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for name, labels, value, at in samples:
        series.setdefault((name, labels), []).append((at, value))
    return series


def hangup(cause: str) -> tuple[str, str]:
    labels = f'{OWN},direction="outbound",status="completed",hangup_cause="{cause}"'
    return HANGUPS, labels


def timeline_of(tmp_path, changes: dict[int, list]) -> tuple[Store, list[str]]:
    """A timeline over STEPS; before the sample of step k, each of `changes[k]` is applied to the store."""
    store = Store()
    timeline = Timeline(str(tmp_path / "om"), "default", LABELS, store)
    for k, at in enumerate(STEPS):
        for change in changes.get(k, ()):
            change(store)
        timeline.sample(at, store)
    return store, timeline.close()


def hang_up(cause: str, times: int = 1):
    return lambda s: s.inc(HANGUPS, ("outbound", "completed", cause), times)


def last_call(seconds: float):
    return lambda s: s.observe(DURATION, ("outbound", "completed"), seconds)


def test_a_series_born_at_the_first_step_of_a_day_has_its_zero_in_the_day_before(tmp_path):
    _, files = timeline_of(tmp_path, {4: [hang_up("midnight")], 6: [hang_up("morning", 2)]})
    assert [f.rsplit("/", 1)[1] for f in files] == ["2023-11-13.om", "2023-11-14.om"]
    before, after = (by_series(parse(f)[1]) for f in files)
    assert before[hangup("midnight")] == [(STEPS[3], 0)]  # the last step of the day before
    assert after[hangup("midnight")] == [(at, 1) for at in STEPS[4:]]
    assert hangup("morning") not in before
    assert after[hangup("morning")] == [(STEPS[5], 0), (STEPS[6], 2), (STEPS[7], 2)]


def test_every_series_is_written_at_every_step_from_the_step_before_its_birth(tmp_path):
    store, files = timeline_of(tmp_path, {2: [hang_up("early")], 5: [hang_up("late"), last_call(42)]})
    written: dict[tuple[str, str], list[float]] = {}
    for path in files:
        for key, points in by_series(parse(path)[1]).items():
            written.setdefault(key, []).extend(at for at, _ in points)
    assert written[hangup("early")] == STEPS[1:]
    assert written[hangup("late")] == STEPS[4:]
    ended = [key for key in written if key[0] == ENDED]
    assert len(ended) == len(store.counters[ENDED])  # the initial series, each from the first step
    for key in ended:
        assert written[key] == STEPS, key


def test_each_file_ends_with_eof_and_keeps_families_together_and_time_ascending(tmp_path):
    _, files = timeline_of(tmp_path, {1: [hang_up("a"), last_call(3)], 4: [hang_up("b")], 6: [last_call(700)]})
    for path in files:
        families, samples = parse(path)
        assert len(families) == len(set(families)), path
        order = []
        for name, *_ in samples:
            family = re.sub(r"(_total|_bucket|_count|_sum)$", "", name)
            if not order or order[-1] != family:
                order.append(family)
        assert order == families, path  # each family's samples follow its TYPE line, all together
        for key, points in by_series(samples).items():
            times = [at for at, _ in points]
            assert times == sorted(set(times)), key


def test_histograms_are_written_cumulative_with_le_as_the_live_page_writes_it(tmp_path):
    store, files = timeline_of(tmp_path, {1: [last_call(3), last_call(3)], 5: [last_call(45), last_call(5000)]})
    labels_of = (
        'org="default",job="callingbox-exporter",instance="localhost:9860",direction="outbound",status="completed"'
    )
    les = [*map(floatToGoString, store.buckets[DURATION]), "+Inf"]
    counts = store.histograms[DURATION][("outbound", "completed")]
    for path in files:
        series = by_series(parse(path)[1])
        times = [at for at, _ in series[f"{DURATION}_count", labels_of]]
        for i, at in enumerate(times):
            buckets = [dict(series[f"{DURATION}_bucket", f'{labels_of},le="{le}"'])[at] for le in les]
            assert buckets == sorted(buckets), at  # cumulative
            assert series[f"{DURATION}_count", labels_of][i] == (at, buckets[-1])
    final = by_series(parse(files[-1])[1])
    last = STEPS[-1]
    assert [dict(final[f"{DURATION}_bucket", f'{labels_of},le="{le}"'])[last] for le in les] == list(
        accumulate(counts[:-1])
    )
    assert dict(final[f"{DURATION}_sum", labels_of])[last] == counts[-1] == 3 + 3 + 45 + 5000


def test_promtool_turns_the_files_into_blocks(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    hostile = 'a "quoted" \\ cause\nover two lines'  # escaped as OpenMetrics wants
    changes = {0: [last_call(7)], 4: [hang_up("midnight"), last_call(30)], 6: [hang_up(hostile)]}
    _, files = timeline_of(tmp_path, changes)
    blocks = tmp_path / "blocks"
    for path in files:
        done = subprocess.run(
            [promtool, "tsdb", "create-blocks-from", "openmetrics", path, str(blocks)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    assert any(blocks.iterdir())
