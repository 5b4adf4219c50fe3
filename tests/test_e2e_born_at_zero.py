"""Born at zero and label churn on a real Prometheus (SPEC §3): nothing counted is lost to increase().

The story: the exporter (`max_label_values: 5`, a `campaign` metadata label, `label_idle: 3s`,
`new_series_hold: 2s`) polls the simulator, and a real Prometheus scrapes it every second. Calls
come in three phases with their own campaigns, hangup causes and error codes, the simulator
quiet between them until the values of the last phase have gone idle and left /metrics:
A (3 of each), B (5 new ones: the cap is full of active values, so only the idle A values'
places let them in), C (two A values return, one new). Every series Prometheus sees, new or
returning, starts at its kept value (0 for a new one), so at the end, per series,
`max_over_time - min_over_time` over the run equals the exporter's own total (its state file:
the idle values' counts are no longer on /metrics), which folded over `campaign` equals the
simulator's truth; and `label_overflow_total` never left 0, as at most 5 values were active.

The same run with `new_series_hold: 0s` is the control: there Prometheus misses the first
events of every new series, so the check above must fail. Both print what they measured: the
counted events invisible to Prometheus, and the delay the hold adds to a new series' first events.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.health import Health, Snapshot
from exporter.metrics import Collector, View
from exporter.state import read
from helpers import (
    COUNTERS,
    HISTOGRAMS,
    MILLI_CENTS_PER_DOLLAR,
    Samples,
    differences,
    exporter_of,
    live_simulator,
    parse_metrics,
    same_value,
    wait_until,
)
from servers import Server, require, start_prometheus

KEY = "sk_test_e2e_born_at_zero_0123456"
CAP, IDLE, HOLD = 5, 3.0, 2.0
OVERFLOW = "callingbox_exporter_label_overflow_total"
DOLLARS = "callingbox_billed_amount_dollars_total"
# Phase → (campaigns, hangup causes, error codes): never more than CAP of each active at once.
PHASES = {
    "A": (["c1", "c2", "c3"], ["h1", "h2", "h3"], ["e1", "e2", "e3"]),
    "B": (["c4", "c5", "c6", "c7", "c8"], ["h4", "h5", "h6", "h7", "h8"], ["e4", "e5", "e6", "e7", "e8"]),
    "C": (["c1", "c2", "c9"], ["h1", "h2", "h9"], ["e1", "e2", "e9"]),
}
CAPPED = ("campaign", "hangup_cause", "error_code")
PHASE_CALLS = 60
FLOAT_SUMS = tuple(h + "_sum" for h in HISTOGRAMS) + (DOLLARS,)
# What the comparison covers: every counter family, and each histogram's count, sum and buckets.
CHECKED = COUNTERS + (DOLLARS,) + tuple(h + suffix for h in HISTOGRAMS for suffix in ("_count", "_sum", "_bucket"))
EVENTS = COUNTERS + tuple(h + "_count" for h in HISTOGRAMS)  # one sample value per counted event
# Families whose series an event creates (a new cause, code or campaign): their first sample is
# the birth of their first event, so the wait before it moves is the delay the hold adds.
BORN_BY_AN_EVENT = ("callingbox_call_hangups_total", "callingbox_call_errors_total", "callingbox_calls_created_total")


def own_totals(state_file) -> Samples:
    """The exporter's own totals, every series (idle ones too), as its state file holds them,
    rendered by its own Collector."""
    restored = read(str(state_file), extra_labels=("campaign",))
    collector = Collector("test")
    collector.view = View.of({"default": Snapshot(restored.store, Health())})
    registry = CollectorRegistry()
    registry.register(collector)
    return parse_metrics(generate_latest(registry).decode())


def folded(samples: Samples, label: str = "campaign") -> Samples:
    """`samples` summed over `label`, as the simulator's truth has no metadata labels."""
    result: Samples = {}
    for (name, labels), value in samples.items():
        key = (name, tuple(pair for pair in labels if pair[0] != label))
        if name == DOLLARS:  # money adds up exactly in integer milli-cents, as the exporter sums it
            value = round(value * MILLI_CENTS_PER_DOLLAR)
        result[key] = result.get(key, 0) + value
    return {key: value / MILLI_CENTS_PER_DOLLAR if key[0] == DOLLARS else value for key, value in result.items()}


def nonzero(samples: Samples) -> Samples:
    return {key: value for key, value in samples.items() if key[0] in CHECKED and value}


def raw_samples(prometheus: Server, name: str, seconds: int, matchers: str = "") -> dict[tuple, list[tuple]]:
    """Every sample (time, value) Prometheus stored of `name` over the last `seconds`, per series."""
    selector = f'{name}{{org="default"{matchers}}}[{seconds}s]'
    result = prometheus.api("/api/v1/query", query=selector)["result"]
    return {
        tuple(sorted((k, v) for k, v in series["metric"].items() if k not in ("__name__", "job", "instance"))): [
            (float(t), float(v)) for t, v in series["values"]
        ]
        for series in result
    }


def increases(prometheus: Server, seconds: int) -> Samples:
    """Per series, `max_over_time - min_over_time` over the run: what increase() can ever see of it."""
    samples: Samples = {}
    for name in CHECKED:
        selector = f'{name}{{org="default"}}[{seconds}s]'
        query = f"max_over_time({selector}) - min_over_time({selector})"
        for series in prometheus.api("/api/v1/query", query=query)["result"]:
            labels = tuple(sorted((k, v) for k, v in series["metric"].items() if k not in ("job", "instance")))
            samples[(name, labels)] = float(series["value"][1])
    return samples


def mismatches(seen: Samples, own: Samples) -> list[str]:
    problems = []
    for key in sorted(set(seen) | set(own)):
        have, want = seen.get(key, 0), own.get(key, 0)
        if not same_value(key[0], have, want, FLOAT_SUMS):
            problems.append(f"{key}: Prometheus {have} != exporter {want}")
    return problems


def play_phases(sim, exporter) -> list[float]:
    """Each phase's calls, then quiet until its values have gone idle and left /metrics (freeing
    their places); returns label_overflow_total after each phase."""

    def shown_values() -> set[str]:
        return {value for (_, labels), _ in exporter.scrape().items() for label, value in labels if label in CAPPED}

    overflow = []
    for phase, (campaigns, causes, codes) in PHASES.items():
        sim.campaigns, sim.hangup_causes, sim.error_codes = campaigns, causes, codes
        created = sim.truth(0).total("callingbox_calls_created_total")
        sim.resume()
        wait_until(lambda: set(campaigns) <= shown_values(), 30, message=f"phase {phase}'s campaigns on /metrics")
        wait_until(
            lambda: sim.truth(0).total("callingbox_calls_created_total") >= created + PHASE_CALLS,
            30,
            message=f"phase {phase}'s calls",
        )
        sim.pause()
        wait_until(sim.all_final, 60, message=f"phase {phase}'s calls final")
        values = set(campaigns) | set(causes) | set(codes)
        wait_until(lambda: not values & shown_values(), 30, message=f"phase {phase}'s values idle and gone")
        overflow.append(sum(v for (n, _), v in exporter.scrape().items() if n == OVERFLOW))
    return overflow


def first_move_delays(prometheus: Server, seconds: int) -> list[float]:
    """For each series born by an event and first seen at 0: seconds from that first sample to the
    first that moved, what the hold adds to the first events of a new series."""
    delays = []
    for name in BORN_BY_AN_EVENT:
        for points in raw_samples(prometheus, name, seconds).values():
            moved = [t for t, v in points if v > points[0][1]]
            if points[0][1] == 0 and moved:
                delays.append(moved[0] - points[0][0])
    return delays


@pytest.mark.parametrize("hold", [HOLD, 0.0], ids=["hold", "control-no-hold"])
def test_every_counted_event_reaches_increase_through_new_idle_and_returning_label_values(
    stack, launch, tmp_path, hold
):
    require("prometheus")
    weights = {"completed": 4, "failed": 3, "no_answer": 1, "busy": 1, "canceled": 1}
    sim, url = live_simulator(stack, KEY, seed=22, rate=25, retry=0.03, outcome_weights=weights)
    sim.pause()  # calls come in phases, once Prometheus scrapes the exporter
    state_file = tmp_path / "state.db"
    settings = {
        "state_file": str(state_file),
        "max_label_values": CAP,
        "metadata_labels": {"campaign": "campaign"},
        "label_idle": f"{IDLE}s",
        "new_series_hold": f"{hold}s",
    }
    exporter = exporter_of(stack, KEY, url, poll_interval="0.3s", overlap="10s", initial_lookback="1h", **settings)
    prometheus = start_prometheus(launch, tmp_path, exporter.url)  # scraping before the exporter's first publish
    started = time.time()
    wait_until(prometheus.ready, 30, message="prometheus ready")
    exporter.start()
    wait_until(
        lambda: prometheus.api("/api/v1/query", query='callingbox_up{org="default"} == 1')["result"],
        30,
        message="Prometheus scraping the exporter",
    )

    overflow_seen = play_phases(sim, exporter)

    truth = sim.truth(0)
    try:
        wait_until(lambda: not differences(folded(own_totals(state_file)), truth), 30, message="every event counted")
    except AssertionError:
        problems = differences(folded(own_totals(state_file)), truth)
        raise AssertionError(f"the exporter differs from the truth: {problems[:8]}") from None
    counted_at = time.time()
    wait_until(
        lambda: (
            float(
                prometheus.api("/api/v1/query", query='timestamp(callingbox_up{org="default"})')["result"][0]["value"][
                    1
                ]
            )
            > counted_at + hold + 2
        ),
        30,
        message="Prometheus scraped past the last release",
    )

    def run() -> int:
        """Seconds back to before Prometheus started: the whole run, whenever the query comes."""
        return int(time.time() - started) + 5

    own = nonzero(own_totals(state_file))
    if hold:  # the released increments reach Prometheus within a scrape or two more
        with contextlib.suppress(AssertionError):  # if not, the assertions below say what differs
            wait_until(
                lambda: not mismatches(nonzero(increases(prometheus, run())), own),
                20,
                message="Prometheus's increases equal to the exporter's totals",
            )
    seen = nonzero(increases(prometheus, run()))

    events = sum(v for (n, _), v in own.items() if n in EVENTS)
    invisible = events - sum(v for (n, _), v in seen.items() if n in EVENTS)
    delays = first_move_delays(prometheus, run())
    delay = (
        f"{statistics.median(delays):.2f} s (median, max {max(delays):.2f} s, over {len(delays)} series)"
        if delays
        else "0 s (none shown at 0 first)"
    )
    print(
        f"\nnew_series_hold {hold}s: {events} counted events, {invisible} invisible to increase() "
        f"({100 * invisible / events:.1f} %); a new series' first events reached Prometheus {delay} "
        f"after the series did"
    )

    overflow = prometheus.api("/api/v1/query", query=f'max_over_time({OVERFLOW}{{org="default"}}[{run()}s])')["result"]
    assert overflow_seen == [0, 0, 0] and {s["metric"]["label"]: float(s["value"][1]) for s in overflow} == {
        label: 0.0 for label in (*CAPPED, "status")
    }, "no value folded into other while at most 5 were active"
    assert differences(folded(own_totals(state_file)), truth) == [], "the exporter's totals are the truth"
    returning = raw_samples(prometheus, "callingbox_calls_created_total", run(), ',campaign="c1"')
    assert returning
    for points in returning.values():
        gaps = [i for i in range(1, len(points)) if points[i][0] - points[i - 1][0] > 1.5]
        assert gaps, "c1 left /metrics while idle"
        if hold:
            assert points[gaps[0]][1] == points[gaps[0] - 1][1], "back first at the value it left with"
    if hold:
        assert mismatches(seen, own) == [], "\n".join(mismatches(seen, own)[:20])
        assert invisible == 0
    else:  # the control: without the hold the check above has something to catch
        assert invisible > 0 and mismatches(seen, own)
