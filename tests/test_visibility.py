"""What Prometheus may see of a store (visibility.py): series born at zero, label values gone idle.

Each story drives a Store by hand with explicit times, publishing as the poller does (`publish`).
"""

from __future__ import annotations

import json
import random

from exporter.accounting import Created, Ended, WebhookOutcome
from exporter.store import Store

T0 = 28_333_333 * 60.0  # on a whole minute, as last uses are rounded
HOLD = 60.0
DAY = 86400.0
OUT = "outbound"
ENDED = "callingbox_calls_ended_total"
CREATED = "callingbox_calls_created_total"
HANGUPS = "callingbox_call_hangups_total"
ERRORS = "callingbox_call_errors_total"
DURATION = "callingbox_call_duration_seconds"
WEBHOOKS = "callingbox_webhook_deliveries_total"
OVERFLOW = "callingbox_exporter_label_overflow_total"


def ended(cause=None, code=None, status="completed", duration=None, extra=()) -> Ended:
    return Ended(OUT, status, cause, code, duration, None, None, "call-1", extra)


def held_store(hold: float = HOLD, idle: float = 7 * DAY, **kwargs) -> Store:
    store = Store(**kwargs)
    store.configure_visibility(hold, idle)
    return store


def shown(store: Store, name: str, labels: tuple) -> object:
    """The value a published copy shows for a series; None when it is not there."""
    return {**store.counters.get(name, {}), **store.histograms.get(name, {})}.get(labels)


def publish(store: Store, now: float, read_at: float | None = None) -> Store:
    """A poll's end, as the poller does it: release what a scrape has read (before the save), then
    the copy the snapshot shows. `read_at`: when the snapshot that the last scrape served was published."""
    store.births.release(now, read_at)
    return store.published(now)


def restarted(store: Store, hold: float = HOLD, idle: float = 7 * DAY, **kwargs) -> Store:
    """The store as a restart restores it from its state (the same document the state file keeps)."""
    restored, _ = Store.from_json(json.loads(json.dumps(store.to_json())), **kwargs)
    restored.configure_visibility(hold, idle)
    return restored


# ---- born at zero ----------------------------------------------------------------------------


def test_a_new_series_is_published_at_zero_until_a_scrape_has_read_it_and_the_hold_has_passed():
    store = held_store()
    publish(store, T0, None)  # the start: the series known to exist, at 0
    store.count([ended("busy_signal")], T0 + 1)
    cause = (OUT, "completed", "busy_signal")

    first = publish(store, T0 + 2, None)
    assert shown(first, HANGUPS, cause) == 0 and shown(first, ENDED, (OUT, "completed")) == 0
    assert store.counters[HANGUPS][cause] == 1, "the true value is kept (and saved)"
    assert shown(publish(store, T0 + 100, None), HANGUPS, cause) == 0, "held long enough, but never read"
    assert shown(publish(store, T0 + 30, T0 + 2), HANGUPS, cause) == 0, "read, but held too briefly"

    released = publish(store, T0 + 2 + HOLD, T0 + 2)
    assert shown(released, HANGUPS, cause) == 1 and shown(released, ENDED, (OUT, "completed")) == 1
    store.count([ended("busy_signal")], T0 + 70)
    assert shown(publish(store, T0 + 71, None), HANGUPS, cause) == 2, "once seen, increments show at once"


def test_a_scrape_of_an_older_snapshot_releases_only_what_that_snapshot_showed():
    store = held_store()
    publish(store, T0, None)
    store.count([ended("a")], T0 + 1)
    publish(store, T0 + 10, None)  # `a` born here
    store.count([ended("b")], T0 + 11)
    publish(store, T0 + 20, None)  # `b` born here
    later = publish(store, T0 + 100, T0 + 10)  # the last scrape served the snapshot of T0 + 10
    assert shown(later, HANGUPS, (OUT, "completed", "a")) == 1
    assert shown(later, HANGUPS, (OUT, "completed", "b")) == 0


def test_a_new_histogram_series_is_published_empty_and_without_exemplars_until_released():
    store = held_store()
    publish(store, T0, None)
    store.count([ended("x", status="voicemail", duration=42)], T0 + 1)  # an undocumented status: a new series
    first = publish(store, T0 + 2, None)
    assert shown(first, DURATION, (OUT, "voicemail")) == [0] * 14 + [0.0]
    assert not [key for key in first.exemplars if key[1] == (OUT, "voicemail")]
    assert [key for key in store.exemplars if key[1] == (OUT, "voicemail")], "kept for the release"
    released = publish(store, T0 + 2 + HOLD, T0 + 2)
    assert sum(shown(released, DURATION, (OUT, "voicemail"))[:-1]) == 1
    assert [key for key in released.exemplars if key[1] == (OUT, "voicemail")]


def test_with_no_hold_every_series_is_published_at_its_true_value_at_once():
    store = held_store(hold=0.0)
    publish(store, T0, None)
    store.count([ended("busy_signal")], T0 + 1)
    assert shown(publish(store, T0 + 2, None), HANGUPS, (OUT, "completed", "busy_signal")) == 1
    assert store.births.to_json(store) == [], "nothing to hold after a restart either"


def test_series_restored_from_the_state_are_published_at_once_with_their_values():
    before = held_store(hold=0.0)
    before.count([ended("busy_signal"), Created(OUT)], T0)
    store = restarted(before)
    store.count([ended("busy_signal"), ended("new_cause")], T0 + 100)
    first = publish(store, T0 + 101, None)
    assert shown(first, HANGUPS, (OUT, "completed", "busy_signal")) == 2
    assert shown(first, CREATED, (OUT,)) == 1
    assert shown(first, HANGUPS, (OUT, "completed", "new_cause")) == 0, "a series new since is born at 0"


def test_a_series_held_at_a_restart_is_held_again_at_its_birth_value():
    store = held_store()
    publish(store, T0, None)
    store.count([ended("busy_signal")], T0 + 1)  # counted and saved; a crash before any scrape read it
    restored = restarted(store)
    cause = (OUT, "completed", "busy_signal")
    assert restored.counters[HANGUPS][cause] == 1
    assert shown(publish(restored, T0 + 200, None), HANGUPS, cause) == 0
    assert shown(publish(restored, T0 + 300, T0 + 200), HANGUPS, cause) == 1


def test_the_published_view_never_loses_nor_doubles_an_increment():
    """Any order of counts, publishes and scrapes: each series is first shown at 0, never goes
    down, and shows its true value once read and held long enough."""
    rng = random.Random(7)
    for _ in range(20):
        store, now, last_read, history = held_store(hold=5.0), T0, None, {}
        for _ in range(60):
            now += rng.choice((0.5, 1.0, 3.0))
            if rng.random() < 0.5:
                store.count([ended(rng.choice("abcdef"), rng.choice((None, "e1", "e2")))], now)
            view = publish(store, now, last_read)
            for name in (HANGUPS, ERRORS, ENDED):
                for labels, value in view.counters.get(name, {}).items():
                    values = history.setdefault((name, labels), [])
                    first = not values
                    assert (value == 0) if first else value >= values[-1], (name, labels, values, value)
                    values.append(value)
            if rng.random() < 0.4:
                last_read = now
        final = publish(store, now + 5.0, now)
        final = publish(store, now + 10.0, now + 5.0)
        for name in (HANGUPS, ERRORS, ENDED):
            assert final.counters.get(name) == store.counters.get(name)


# ---- label values gone idle --------------------------------------------------------------------


def test_a_value_idle_for_longer_than_label_idle_leaves_metrics_and_frees_its_place():
    store = held_store(hold=0.0, idle=3600.0, label_limit=2)
    store.count([ended("a"), ended("b")], T0)
    store.count([ended("b")], T0 + 1800)
    assert shown(publish(store, T0 + 3700), HANGUPS, (OUT, "completed", "a")) == 1, "idle, until a scrape read that"
    view = publish(store, T0 + 3701, T0 + 3700)
    assert shown(view, HANGUPS, (OUT, "completed", "a")) is None, "idle: gone from /metrics"
    assert shown(view, HANGUPS, (OUT, "completed", "b")) == 2
    assert store.counters[HANGUPS][(OUT, "completed", "a")] == 1, "its count is kept"
    store.count([ended("c")], T0 + 3700)
    assert store.counters[HANGUPS][(OUT, "completed", "c")] == 1, "a's place went to c"
    assert store.counters[OVERFLOW][("hangup_cause",)] == 0


def test_an_idle_value_frees_its_place_between_publishes_too():
    store = held_store(hold=0.0, idle=3600.0, label_limit=1)
    store.count([ended("a")], T0)
    store.count([ended("b")], T0 + 4000)  # no publish between: the cap looks for an idle place itself
    assert store.counters[HANGUPS][(OUT, "completed", "b")] == 1
    assert store.counters[OVERFLOW][("hangup_cause",)] == 0


def test_a_returning_value_is_published_at_its_kept_value_before_its_increments():
    store = held_store(idle=3600.0, label_limit=1)
    publish(store, T0, None)
    store.count([ended("a"), ended("a")], T0 + 1)
    publish(store, T0 + 2, None)
    publish(store, T0 + 100, T0 + 2)  # `a` read and released: shown at 2
    publish(store, T0 + 5000, T0 + 100)  # idle
    store.count([ended("b")], T0 + 5001)  # took the place: b is now the one value
    assert shown(publish(store, T0 + 5002, T0 + 5000), HANGUPS, (OUT, "completed", "a")) == 2, "for the hold"
    assert shown(publish(store, T0 + 5060, T0 + 5002), HANGUPS, (OUT, "completed", "a")) is None
    publish(store, T0 + 8900, T0 + 5060)  # b idle
    store.count([ended("a")], T0 + 9000)  # b idle by now: a gets the place back
    cause = (OUT, "completed", "a")
    back = publish(store, T0 + 9001, T0 + 8900)
    assert shown(back, HANGUPS, cause) == 2, "first at the value Prometheus last saw"
    assert shown(back, HANGUPS, (OUT, "completed", "b")) is None
    assert shown(publish(store, T0 + 9001 + HOLD, T0 + 9001), HANGUPS, cause) == 3
    assert store.counters[OVERFLOW][("hangup_cause",)] == 0


def test_a_returning_value_without_a_free_place_folds_into_other_and_stays_hidden():
    store = held_store(hold=0.0, idle=3600.0, label_limit=1)
    store.count([ended("a")], T0)
    publish(store, T0 + 4000, None)
    store.count([ended("b")], T0 + 4000)
    store.count([ended("a")], T0 + 4100)  # b is active: no place for a
    view = publish(store, T0 + 4101, T0 + 4000)
    assert shown(view, HANGUPS, (OUT, "completed", "a")) is None
    assert shown(view, HANGUPS, (OUT, "completed", "other")) == 1
    assert store.counters[OVERFLOW][("hangup_cause",)] == 1


def test_an_idle_metadata_value_leaves_every_family_that_carries_it():
    store = held_store(hold=0.0, idle=3600.0, extra_labels=("campaign",), label_limit=5)
    store.count(
        [
            Created(OUT, ("spring",)),
            ended("a", extra=("spring",)),
            WebhookOutcome("delivered", ("spring",)),
            Created(OUT, ("summer",)),
        ],
        T0,
    )
    store.count([Created(OUT, ("summer",))], T0 + 3000)
    publish(store, T0 + 3700)
    view = publish(store, T0 + 3701, T0 + 3700)
    spring = [
        (name, labels)
        for families in (view.counters, view.histograms)
        for name, series in families.items()
        for labels in series
        if "spring" in labels
    ]
    assert spring == []
    assert shown(view, CREATED, (OUT, "summer")) == 2 and shown(view, WEBHOOKS, ("delivered", "summer")) == 0
    assert store.counters[WEBHOOKS][("delivered", "spring")] == 1


def test_calls_in_progress_keep_their_metadata_values_and_gauges_follow_the_cap():
    store = held_store(hold=0.0, idle=3600.0, extra_labels=("campaign",), label_limit=1)
    store.count([Created(OUT, ("spring",))], T0)
    store.count([], T0 + 3000)
    assert store.peek_extra(("spring",)) == ("spring",), "its call still in progress: in use"
    publish(store, T0 + 5000, None)
    assert store.peek_extra(("summer",)) == ("other",), "spring holds the only place"
    assert store.counters[OVERFLOW][("campaign",)] == 0, "a gauge never counts a fold"
    publish(store, T0 + 7000, None)  # no call of spring in progress since T0 + 3000: idle
    assert store.peek_extra(("summer",)) == ("summer",)


def test_last_uses_are_rounded_up_to_the_minute():
    store = held_store(label_limit=3)
    store.count([ended("a")], T0 + 1)
    store.count([ended("a")], T0 + 50)
    assert store.label_use.to_json() == {"hangup_cause": {"a": T0 + 60}}
    short = held_store(idle=5.0)
    short.count([ended("a")], T0 + 0.1)
    assert short.label_use.to_json() == {"hangup_cause": {"a": T0 + 0.5}}, "a few seconds of label_idle: finer"


def test_a_restart_neither_revives_idle_values_nor_forgets_active_ones():
    store = held_store(hold=0.0, idle=3600.0, label_limit=2)
    store.count([ended("a"), ended("b")], T0)
    store.count([ended("b")], T0 + 3000)
    restored = restarted(store, hold=0.0, idle=3600.0, label_limit=2)
    view = publish(restored, T0 + 3700, None)
    assert shown(view, HANGUPS, (OUT, "completed", "a")) is None
    assert shown(view, HANGUPS, (OUT, "completed", "b")) == 2
    publish(restored, T0 + 6700)
    assert shown(publish(restored, T0 + 6701, T0 + 6700), HANGUPS, (OUT, "completed", "b")) is None


def test_a_state_saved_without_last_uses_counts_every_value_as_used_at_the_restore():
    store = held_store(hold=0.0, idle=3600.0, label_limit=2)
    store.count([ended("a")], T0)
    document = store.to_json()
    del document["label_use"], document["births"]
    restored, _ = Store.from_json(document, label_limit=2)
    restored.configure_visibility(0.0, 3600.0)
    assert shown(publish(restored, T0 + 90_000, None), HANGUPS, (OUT, "completed", "a")) == 1
    publish(restored, T0 + 90_000 + 3700)
    assert shown(publish(restored, T0 + 90_000 + 3701, T0 + 93_700), HANGUPS, (OUT, "completed", "a")) is None


def test_a_series_released_before_a_save_is_restored_at_its_true_value_never_its_birth_value():
    """A restart that showed it at 0 again would read as a counter reset: increase() would count it twice."""
    store = held_store()
    publish(store, T0)
    store.count([ended("busy_signal")], T0 + 1)
    publish(store, T0 + 2)
    store.births.release(T0 + 2 + HOLD, T0 + 2)  # the poll that releases it saves, then publishes
    restored = restarted(store)
    assert shown(publish(restored, T0 + 100), HANGUPS, (OUT, "completed", "busy_signal")) == 1


def test_an_idle_value_stays_on_metrics_until_a_scrape_has_read_its_last_counts():
    """A label_idle shorter than the hold and a scrape: hiding earlier would lose the held counts."""
    store = held_store(hold=60.0, idle=5.0)
    publish(store, T0)
    store.count([ended("a")], T0 + 1)
    cause = (OUT, "completed", "a")
    assert shown(publish(store, T0 + 2), HANGUPS, cause) == 0
    assert shown(publish(store, T0 + 30, T0 + 2), HANGUPS, cause) == 0, "idle, but held: it stays"
    assert shown(publish(store, T0 + 62, T0 + 30), HANGUPS, cause) == 1, "released, shown moving"
    assert shown(publish(store, T0 + 63, T0 + 30), HANGUPS, cause) == 1, "not read moving yet: it stays"
    assert shown(publish(store, T0 + 64, T0 + 62), HANGUPS, cause) == 1, "read, but other scrapers may not have"
    assert shown(publish(store, T0 + 122, T0 + 62), HANGUPS, cause) is None, "read at 1, and held: now it leaves"
