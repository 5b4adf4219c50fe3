"""The Collector's exposition of a store (the Store itself: tests/test_store.py).

The exposition is rendered by prometheus-client in both formats and read back with its
parsers, so the tests see what Prometheus sees.
"""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from test_store import DURATION, ERRORS, HANGUPS, IN, OUT, OVERFLOW, TERMINAL, busy_store, ended

from exporter import records
from exporter.accounting import Billed, Created, Ended, ExtractionOutcome, WebhookOutcome
from exporter.catalogue import INVALID_REASONS
from exporter.health import Health, Snapshot, Status
from exporter.metrics import Collector
from exporter.records import decode_record
from exporter.store import Store

ACTIVE = ("queued", "initiated", "ringing", "in_progress")


# --- Collector: exposition -----------------------------------------------------------------------

NOW = 1_700_000_000.0


def registry_of(store: Store | None = None, health: Health | None = None, org: str = "default", clock=lambda: NOW):
    collector = Collector("1.2.3", clock=clock)
    asyncio.run(collector.publish(org, Snapshot(store or Store(), health or Health())))
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def text_samples(registry) -> dict:
    """(sample name, sorted labels) → value, from the Prometheus text format."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse_text(generate_latest(registry).decode())
        for s in family.samples
    }


def openmetrics_blocks(text: str) -> dict[str, str]:
    """The OpenMetrics exposition cut into one parseable document per family."""
    assert text.endswith("# EOF\n")
    blocks: dict[str, list[str]] = {}
    name = None
    for line in text[: -len("# EOF\n")].splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
        blocks.setdefault(name, []).append(line)
    return {name: "\n".join(lines) + "\n# EOF\n" for name, lines in blocks.items()}


def openmetrics_samples(registry) -> dict:
    """Like text_samples, from the OpenMetrics format, each family parsed on its own."""
    samples = {}
    for block in openmetrics_blocks(generate_openmetrics(registry).decode()).values():
        for family in parse_openmetrics(block):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def labels(**pairs) -> tuple:
    return tuple(sorted(pairs.items()))


@pytest.mark.parametrize("samples_of", [text_samples, openmetrics_samples], ids=["text", "openmetrics"])
@pytest.mark.parametrize("value", ['say "hi"', "back\\slash", "two\nlines", '\\"\n\\n mixed', "ünïcode ✓"])
def test_label_values_round_trip_exactly(samples_of, value):
    store = Store()
    store.count([ended(value, value)])
    samples = samples_of(registry_of(store))
    hangup = labels(org="default", direction=OUT, status="completed", hangup_cause=value)
    assert samples[(HANGUPS, hangup)] == 1
    assert samples[(ERRORS, labels(org="default", direction=OUT, error_code=value))] == 1


@pytest.mark.parametrize("samples_of", [text_samples, openmetrics_samples], ids=["text", "openmetrics"])
def test_money_renders_milli_cents_as_dollars(samples_of):
    store = Store()
    store.count([Billed(OUT, 10, 10_000), Billed(OUT, 20, 20_000), Billed(OUT, 0, 1), Billed(IN, 5, 123_457)])
    samples = samples_of(registry_of(store))
    assert samples[("callingbox_billed_amount_dollars_total", labels(org="default", direction=OUT))] == 0.30001
    assert samples[("callingbox_billed_amount_dollars_total", labels(org="default", direction=IN))] == 1.23457


@pytest.mark.parametrize("samples_of", [text_samples, openmetrics_samples], ids=["text", "openmetrics"])
def test_histogram_buckets_are_cumulative_and_inf_equals_count(samples_of):
    store = Store()
    store.count([ended(duration=d) for d in (0, 3, 10, 10, 4000)])
    samples = samples_of(registry_of(store))
    series = dict(org="default", direction=OUT, status="completed")
    bounds = [
        "0.0",
        "5.0",
        "10.0",
        "20.0",
        "30.0",
        "60.0",
        "120.0",
        "180.0",
        "300.0",
        "600.0",
        "1200.0",
        "1800.0",
        "3600.0",
        "+Inf",
    ]
    expected = [1, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5]
    assert [samples[(DURATION + "_bucket", labels(le=le, **series))] for le in bounds] == expected
    assert samples[(DURATION + "_count", labels(**series))] == 5
    assert samples[(DURATION + "_sum", labels(**series))] == 4023


# The contract: SPEC §3, every family with its type and label names.
SPEC_FAMILIES = [
    ("callingbox_calls_created_total", "counter", {"org", "direction"}),
    ("callingbox_calls_ended_total", "counter", {"org", "direction", "status"}),
    ("callingbox_calls_active", "gauge", {"org", "direction", "status"}),
    ("callingbox_call_hangups_total", "counter", {"org", "direction", "status", "hangup_cause"}),
    ("callingbox_call_errors_total", "counter", {"org", "direction", "error_code"}),
    ("callingbox_webhook_deliveries_total", "counter", {"org", "status"}),
    ("callingbox_result_extractions_total", "counter", {"org", "status"}),
    ("callingbox_call_duration_seconds", "histogram", {"org", "direction", "status"}),
    ("callingbox_call_answer_delay_seconds", "histogram", {"org", "direction"}),
    ("callingbox_call_billed_duration_seconds", "histogram", {"org", "direction"}),
    ("callingbox_billed_amount_dollars_total", "counter", {"org", "direction"}),
    ("callingbox_call_setup_delay_seconds", "histogram", {"org", "direction"}),
    ("callingbox_webhooks_pending", "gauge", {"org"}),
    ("callingbox_webhook_pending_oldest_age_seconds", "gauge", {"org"}),
    ("callingbox_up", "gauge", {"org"}),
    ("callingbox_exporter_polls_total", "counter", {"org", "result"}),
    ("callingbox_exporter_poll_duration_seconds", "histogram", {"org"}),
    ("callingbox_exporter_last_success_timestamp_seconds", "gauge", {"org"}),
    ("callingbox_exporter_api_requests_total", "counter", {"org", "code"}),
    ("callingbox_exporter_watermark_timestamp_seconds", "gauge", {"org"}),
    ("callingbox_exporter_tracked_calls", "gauge", {"org"}),
    ("callingbox_exporter_invalid_records_total", "counter", {"org", "reason"}),
    ("callingbox_exporter_label_overflow_total", "counter", {"org", "label"}),
    ("callingbox_exporter_stragglers", "gauge", {"org"}),
    ("callingbox_exporter_vanished_calls_total", "counter", {"org"}),
    ("callingbox_exporter_contract_deviations_total", "counter", {"org", "kind"}),
    ("callingbox_exporter_build_info", "gauge", {"version"}),
    # issue 8: the self-audit
    ("callingbox_exporter_audit_mismatches_total", "counter", {"org", "kind"}),
    ("callingbox_exporter_audit_calls_checked_total", "counter", {"org", "method"}),
    ("callingbox_exporter_last_audit_timestamp_seconds", "gauge", {"org"}),
    # issue 18: the audit's coverage
    ("callingbox_exporter_audited_until_timestamp_seconds", "gauge", {"org"}),
    ("callingbox_exporter_audit_skipped_seconds_total", "counter", {"org"}),
    # issue 8: the API budget
    ("callingbox_exporter_backoff_seconds", "gauge", {"org"}),
    ("callingbox_exporter_next_poll_timestamp_seconds", "gauge", {"org"}),
    ("callingbox_exporter_api_response_bytes_total", "counter", {"org", "endpoint"}),
    ("callingbox_exporter_read_depth_seconds", "gauge", {"org"}),
    ("callingbox_exporter_last_full_read_timestamp_seconds", "gauge", {"org"}),
    ("callingbox_exporter_open_calls", "gauge", {"org", "path"}),
]
# Families with a sample only for targets that configure them (issue 23: daily_budget_dollars).
OPTIONAL_FAMILIES = [
    ("callingbox_daily_budget_dollars", "gauge", {"org"}),
]
EXPOSED = {n.removesuffix("_total") if k == "counter" else n for n, k, _ in SPEC_FAMILIES + OPTIONAL_FAMILIES}


def populated_registry():
    store = busy_store()
    store.count([ended("d"), ended("e")])  # overflow the cap of 3
    return registry_of(
        store, Health(Status(up=True, last_success=NOW - 5), watermark=NOW - 7, tracked=4, active={(OUT, "ringing"): 1})
    )


@pytest.mark.parametrize("name, kind, label_names", SPEC_FAMILIES, ids=[f[0] for f in SPEC_FAMILIES])
def test_every_spec_family_is_exposed_with_its_type_and_labels(name, kind, label_names):
    families = {f.name: f for f in parse_text(generate_latest(populated_registry()).decode())}
    family_name = name.removesuffix("_total") if kind == "counter" else name
    family = families[family_name]
    assert family.type == kind
    sample_names = {name} if kind != "histogram" else {name + "_bucket", name + "_count", name + "_sum"}
    assert {s.name for s in family.samples} == sample_names
    assert {frozenset(s.labels) - {"le"} for s in family.samples} == {frozenset(label_names)}


def test_no_family_outside_the_spec_is_exposed():
    families = {f.name for f in parse_text(generate_latest(populated_registry()).decode())}
    assert families == EXPOSED


@pytest.mark.parametrize("samples_of", [text_samples, openmetrics_samples], ids=["text", "openmetrics"])
def test_the_daily_budget_is_a_sample_only_for_targets_that_set_it(samples_of):
    collector = Collector("1.2.3", clock=lambda: NOW)
    asyncio.run(collector.publish("acme", Snapshot(Store(), Health(daily_budget_dollars=250.5))))
    asyncio.run(collector.publish("globex", Snapshot(Store(), Health())))
    registry = CollectorRegistry()
    registry.register(collector)
    budgets = {
        labels: value
        for (name, labels), value in samples_of(registry).items()
        if name == "callingbox_daily_budget_dollars"
    }
    assert budgets == {(("org", "acme"),): 250.5}


def test_openmetrics_exposition_parses_whole_with_the_strict_reference_parser():
    """No two families clash (SPEC §3): a counter `x_total` reserves the sample name `x_created`,
    which is why the terminal-calls counter is `callingbox_calls_ended_total`, not
    `callingbox_calls_total` beside `callingbox_calls_created_total`."""
    text = generate_openmetrics(populated_registry()).decode()
    names = {f.name for f in parse_openmetrics(text)}
    assert names == EXPOSED


def test_openmetrics_exposition_has_no_created_samples():
    registry = populated_registry()
    text = generate_openmetrics(registry).decode()
    assert [line for line in text.splitlines() if re.match(r"^[a-z_]+_created[ {]", line)] == []
    assert [key for key in openmetrics_samples(registry) if key[0].endswith("_created")] == []


@pytest.mark.parametrize("samples_of", [text_samples, openmetrics_samples], ids=["text", "openmetrics"])
def test_known_series_start_at_zero(samples_of):
    samples = samples_of(registry_of(Store(), Health()))
    expected = {}
    for d in (OUT, IN):
        for s in TERMINAL:
            expected[("callingbox_calls_ended_total", labels(org="default", direction=d, status=s))] = 0
        for s in ACTIVE:
            expected[("callingbox_calls_active", labels(org="default", direction=d, status=s))] = 0
        expected[("callingbox_calls_created_total", labels(org="default", direction=d))] = 0
    for s in ("delivered", "failed"):
        expected[("callingbox_webhook_deliveries_total", labels(org="default", status=s))] = 0
    for s in ("completed", "failed"):
        expected[("callingbox_result_extractions_total", labels(org="default", status=s))] = 0
    for reason in {decode_record(obj).reason for _, obj in MALFORMED}:
        expected[("callingbox_exporter_invalid_records_total", labels(org="default", reason=reason))] = 0
    for label in ("hangup_cause", "error_code", "status"):
        expected[(OVERFLOW, labels(org="default", label=label))] = 0
    for kind in (
        "undocumented_value",
        "late_end_detail",
        "outcome_without_subject",
        "settled_without_amount",
        "by_id_not_found_but_listed",
    ):  # SPEC §3: each kind starts at 0
        expected[("callingbox_exporter_contract_deviations_total", labels(org="default", kind=kind))] = 0
    for method in ("window", "spot_check"):  # the audit's coverage, readable before the first audit
        expected[("callingbox_exporter_audit_calls_checked_total", labels(org="default", method=method))] = 0
    expected[("callingbox_exporter_audit_skipped_seconds_total", labels(org="default"))] = 0
    expected[("callingbox_exporter_audited_until_timestamp_seconds", labels(org="default"))] = 0
    assert {k: samples.get(k) for k in expected} == expected


def test_overflow_of_each_metadata_label_starts_at_zero():
    """Metadata labels are capped like hangup_cause, so their folds show in increase() from the start."""
    samples = text_samples(registry_of(Store(extra_labels=("campaign", "tier")), Health()))
    overflow = {dict(k[1])["label"]: v for k, v in samples.items() if k[0] == OVERFLOW}
    assert overflow == {"hangup_cause": 0, "error_code": 0, "status": 0, "campaign": 0, "tier": 0}


GOOD_CALL = {
    "id": "c1",
    "status": "completed",
    "direction": OUT,
    "created_at": "2024-05-01T12:00:00Z",
    "updated_at": "2024-05-01T12:01:00Z",
}
# One element of GET /v1/calls per way the decoder rejects a record, with the reason it gives.
MALFORMED = [
    ("not_object", ["a", "list"]),
    ("missing_field", {**GOOD_CALL, "id": None}),
    ("bad_type", {**GOOD_CALL, "id": 42}),
    ("bad_value", {**GOOD_CALL, "duration_seconds": -1}),
    ("bad_timestamp", {**GOOD_CALL, "created_at": "yesterday"}),
    ("unknown_status", {**GOOD_CALL, "status": ""}),  # a value outside the docs is a status, an empty one not
]


def test_invalid_reasons_are_exactly_the_reasons_the_decoder_gives():
    assert [decode_record(obj).reason for _, obj in MALFORMED] == [reason for reason, _ in MALFORMED]
    assert sorted(reason for reason, _ in MALFORMED) == sorted(INVALID_REASONS)


def test_every_reason_named_in_the_decoder_is_an_invalid_reason():
    """A reason records.py passes to Invalid or _Reject outside INVALID_REASONS would have no zero series."""
    named = set()
    for node in ast.walk(ast.parse(Path(records.__file__).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("Invalid", "_Reject") and node.args:
            for part in ast.walk(node.args[0]):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    named.add(part.value)
                elif isinstance(part, ast.Name) and part.id.isupper():
                    named.add(getattr(records, part.id))
    assert named == set(INVALID_REASONS)


def test_series_of_each_target_carry_its_org():
    collector = Collector("1.2.3", clock=lambda: NOW)
    a, b = Store(), Store()
    a.count([Created(OUT)])
    b.count([Created(OUT), Created(OUT)])
    asyncio.run(collector.publish("alpha", Snapshot(a, Health(Status(up=True)))))
    asyncio.run(collector.publish("beta", Snapshot(b, Health(Status(up=False)))))
    registry = CollectorRegistry()
    registry.register(collector)
    samples = text_samples(registry)
    assert samples[("callingbox_calls_created_total", labels(org="alpha", direction=OUT))] == 1
    assert samples[("callingbox_calls_created_total", labels(org="beta", direction=OUT))] == 2
    assert samples[("callingbox_up", labels(org="alpha"))] == 1
    assert samples[("callingbox_up", labels(org="beta"))] == 0
    assert samples[("callingbox_exporter_build_info", labels(version="1.2.3"))] == 1


def test_a_publish_replaces_the_view_whole_and_a_view_once_read_never_changes():
    """The poller, the web app and the exposition share no mutable object: each reads a view."""
    collector = Collector("1.2.3", clock=lambda: NOW)
    first = Snapshot(Store(), Health(Status(up=True)))
    asyncio.run(collector.publish("alpha", first))
    held = collector.view
    second = Snapshot(Store(), Health(Status(up=False)))
    asyncio.run(collector.publish("alpha", second))
    asyncio.run(collector.publish("beta", first))
    assert dict(held.snapshots) == {"alpha": first}
    assert collector.snapshot("alpha") is second and collector.snapshot("gamma") is None
    assert list(collector.view.snapshots) == ["alpha", "beta"]
    with pytest.raises(TypeError):
        collector.view.snapshots["gamma"] = first  # type: ignore[index]
    collector.withdraw("alpha")
    assert collector.snapshot("alpha") is None and list(collector.view.snapshots) == ["beta"]


def test_health_gauges_render_from_the_snapshot():
    health = Health(
        Status(up=True, last_success=NOW - 5),
        watermark=NOW - 7.5,
        tracked=9,
        stragglers=2,
        active={(OUT, "ringing"): 3, (IN, "in_progress"): 1},
        webhooks_pending=4,
    )
    samples = text_samples(registry_of(Store(), health))
    org = labels(org="default")
    assert samples[("callingbox_up", org)] == 1
    assert samples[("callingbox_exporter_last_success_timestamp_seconds", org)] == NOW - 5
    assert samples[("callingbox_exporter_watermark_timestamp_seconds", org)] == NOW - 7.5
    assert samples[("callingbox_exporter_tracked_calls", org)] == 9
    assert samples[("callingbox_exporter_stragglers", org)] == 2
    assert samples[("callingbox_webhooks_pending", org)] == 4
    assert samples[("callingbox_calls_active", labels(org="default", direction=OUT, status="ringing"))] == 3
    assert samples[("callingbox_calls_active", labels(org="default", direction=IN, status="in_progress"))] == 1
    assert samples[("callingbox_calls_active", labels(org="default", direction=OUT, status="queued"))] == 0


def test_oldest_pending_webhook_age_is_now_minus_pending_since():
    samples = text_samples(registry_of(Store(), Health(webhooks_pending=2, webhook_pending_oldest=NOW - 3600.5)))
    assert samples[("callingbox_webhook_pending_oldest_age_seconds", labels(org="default"))] == 3600.5


def test_oldest_pending_webhook_age_follows_the_clock_between_scrapes():
    clock = [NOW]
    registry = registry_of(Store(), Health(webhooks_pending=1, webhook_pending_oldest=NOW - 10), clock=lambda: clock[0])
    assert text_samples(registry)[("callingbox_webhook_pending_oldest_age_seconds", labels(org="default"))] == 10
    clock[0] = NOW + 50
    assert text_samples(registry)[("callingbox_webhook_pending_oldest_age_seconds", labels(org="default"))] == 60


def test_oldest_pending_webhook_age_is_zero_when_none_is_pending():
    samples = text_samples(registry_of(Store(), Health(webhooks_pending=0, webhook_pending_oldest=None)))
    assert samples[("callingbox_webhook_pending_oldest_age_seconds", labels(org="default"))] == 0


# --- Exemplars ----------------------------------------------------------------------------------

EXEMPLAR_COUNTERS = ("callingbox_calls_ended_total", HANGUPS, ERRORS, "callingbox_billed_amount_dollars_total")
CALL_HISTOGRAMS = (
    DURATION,
    "callingbox_call_answer_delay_seconds",
    "callingbox_call_billed_duration_seconds",
    "callingbox_call_setup_delay_seconds",
)


def exemplars_of(registry) -> dict:
    """(sample name, sorted labels) → (exemplar labels, value, timestamp), from OpenMetrics."""
    found = {}
    for block in openmetrics_blocks(generate_openmetrics(registry).decode()).values():
        for family in parse_openmetrics(block):
            for s in family.samples:
                if s.exemplar is not None:
                    e = s.exemplar
                    when = None if e.timestamp is None else e.timestamp.sec + e.timestamp.nsec / 1e9
                    found[(s.name, tuple(sorted(s.labels.items())))] = (e.labels, e.value, when)
    return found


def call(call_id: str, status="completed", duration=None, cause="normal_clearing", error=None) -> Ended:
    return Ended(OUT, status, cause, error, duration, 1.5, 2.5, call_id)


def test_terminal_counters_carry_the_latest_counted_call_as_exemplar():
    store = Store()
    store.count([call("first", duration=40), call("second", duration=7)], now=NOW - 10)
    store.count(
        [call("third", status="failed", cause="rejected", error="E1"), Billed(OUT, 42, 12_345, "second")], now=NOW
    )
    found = exemplars_of(registry_of(store))
    org = {"org": "default"}
    assert found[("callingbox_calls_ended_total", labels(**org, direction=OUT, status="completed"))] == (
        {"call_id": "second"},
        1.0,
        NOW - 10,
    )
    assert found[("callingbox_calls_ended_total", labels(**org, direction=OUT, status="failed"))] == (
        {"call_id": "third"},
        1.0,
        NOW,
    )
    assert found[(HANGUPS, labels(**org, direction=OUT, status="failed", hangup_cause="rejected"))][0] == {
        "call_id": "third"
    }
    assert found[(ERRORS, labels(**org, direction=OUT, error_code="E1"))][0] == {"call_id": "third"}
    # the money exemplar is in dollars, like its counter
    assert found[("callingbox_billed_amount_dollars_total", labels(**org, direction=OUT))] == (
        {"call_id": "second"},
        0.12345,
        NOW,
    )
    # series that counted nothing carry none; every exemplar names a call and nothing else
    assert ("callingbox_calls_ended_total", labels(**org, direction=IN, status="completed")) not in found
    assert {tuple(e[0]) for e in found.values()} == {("call_id",)}


def test_each_histogram_bucket_carries_the_latest_call_that_fell_in_it():
    store = Store()
    store.count(
        [call("a", duration=40), call("b", duration=7), call("c", duration=45), call("d", duration=9000)], now=NOW
    )
    found = exemplars_of(registry_of(store))
    bucket = lambda le: (f"{DURATION}_bucket", labels(org="default", direction=OUT, status="completed", le=le))  # noqa: E731
    assert found[bucket("60.0")] == ({"call_id": "c"}, 45.0, NOW)  # a (40 s) was overwritten by c
    assert found[bucket("10.0")] == ({"call_id": "b"}, 7.0, NOW)
    assert found[bucket("+Inf")] == ({"call_id": "d"}, 9000.0, NOW)
    assert bucket("30.0") not in found and bucket("120.0") not in found  # cumulative, but only where it fell
    delay = ("callingbox_call_answer_delay_seconds_bucket", labels(org="default", direction=OUT, le="2.0"))
    assert found[delay] == ({"call_id": "d"}, 1.5, NOW)
    assert not [key for key in found if key[0].endswith(("_sum", "_count"))]


def test_exemplars_add_no_series_and_stay_out_of_the_text_format():
    plain, with_exemplars = Store(), Store()
    events = [Created(OUT), call("x", duration=12), Billed(OUT, 12, 500, "x"), WebhookOutcome("delivered")]
    plain.count(events)
    with_exemplars.count(events, now=NOW)
    assert openmetrics_samples(registry_of(plain)) == openmetrics_samples(registry_of(with_exemplars))
    assert exemplars_of(registry_of(plain)) == {}
    assert (
        len(exemplars_of(registry_of(with_exemplars))) == 7
    )  # calls, hangups, money; duration, billed, answer and setup delay
    assert " # {" not in generate_latest(registry_of(with_exemplars)).decode()


def test_exemplar_families_are_the_terminal_call_counters_and_call_histograms():
    store = Store()
    store.count(
        [
            Created(OUT),
            call("x", duration=3, error="E"),
            Billed(OUT, 3, 10, "x"),
            WebhookOutcome("failed"),
            ExtractionOutcome("failed"),
        ],
        now=NOW,
    )
    families = {name.removesuffix("_bucket") for name, _ in exemplars_of(registry_of(store))}
    assert families == set(EXEMPLAR_COUNTERS) | set(CALL_HISTOGRAMS)


# --- metadata labels ------------------------------------------------------------------------------


def campaign_call(campaign, status="completed", direction=OUT, call_id="c1") -> list:
    extra = (campaign,)
    return [Created(direction, extra), Ended(direction, status, "normal_clearing", None, 30, 1.0, 2.0, call_id, extra)]


def test_targets_with_other_metadata_labels_share_a_family_with_empty_values():
    with_campaign = Store(extra_labels=("campaign",))
    with_campaign.count(campaign_call("spring"))
    collector = Collector("1.2.3", clock=lambda: NOW)
    asyncio.run(collector.publish("agency", Snapshot(with_campaign, Health())))
    asyncio.run(collector.publish("plain", Snapshot(Store(), Health())))
    registry = CollectorRegistry()
    registry.register(collector)
    samples = text_samples(registry)
    assert (
        samples[
            ("callingbox_calls_ended_total", labels(org="agency", direction=OUT, status="completed", campaign="spring"))
        ]
        == 1
    )
    assert (
        samples[("callingbox_calls_ended_total", labels(org="plain", direction=OUT, status="completed", campaign=""))]
        == 0
    )
    assert (
        samples[("callingbox_calls_active", labels(org="agency", direction=OUT, status="ringing", campaign="none"))]
        == 0
    )
    assert samples[("callingbox_up", labels(org="plain"))] == 0
