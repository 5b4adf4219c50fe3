"""The pages rendered at publish: the same samples as prometheus-client's live rendering of the
whole registry, re-rendered only where a snapshot changed, and gzip that never recompresses them.

The reference is `cli.registry_for` rendered live; both are read back with prometheus-client's
parsers (OpenMetrics with its strict one), leaving out process_* and python_*, which move.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections import Counter

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter import exposition
from exporter.accounting import Billed, Created, Ended, WebhookOutcome
from exporter.catalogue import GAUGES
from exporter.cli import registry_for
from exporter.exposition import CACHED, OPENMETRICS, TEXT, Exposition
from exporter.health import Health, Snapshot, Status
from exporter.metrics import WITH_METADATA
from exporter.store import Store

NOW = 1_700_000_000.0
OUT, IN = "outbound", "inbound"
CREATED = "callingbox_calls_created_total"
BILLED = "callingbox_billed_amount_dollars_total"
LIVE = ("process_", "python_")  # rendered by the runtime collectors; they move between two renders


def samples(body: bytes, kind: str) -> dict:
    """(sample name, sorted labels) → (value, exemplar), from the strict parser of the format."""
    parse = parse_openmetrics if kind == OPENMETRICS else parse_text
    return {
        (s.name, tuple(sorted(s.labels.items()))): (s.value, s.exemplar)
        for family in parse(body.decode())
        if not family.name.startswith(LIVE)
        for s in family.samples
    }


def live(collector: Exposition, kind: str) -> bytes:
    registry = registry_for(collector, collector.runtime)
    return generate_openmetrics(registry) if kind == OPENMETRICS else generate_latest(registry)


async def served(collector: Exposition, kind: str) -> bytes:
    pages = await collector.pages()
    return pages.page(kind).body + collector.tail(pages, kind)


async def assert_served_as_live(collector: Exposition) -> None:
    for kind in (TEXT, OPENMETRICS):
        body = await served(collector, kind)
        assert samples(body, kind) == samples(live(collector, kind), kind)
        if kind == OPENMETRICS:
            assert body.count(b"# EOF") == 1 and body.endswith(b"# EOF\n")


def store(extra: tuple[str, ...] = (), *values: str) -> Store:
    """A store with calls in several families; `values` are its metadata label values."""
    s = Store(extra_labels=extra)
    x = tuple(values)
    s.count(
        [
            Created(OUT, x),
            Created(IN, x),
            Ended(OUT, "completed", "normal_clearing", None, 42, 1.5, 2.5, "c1", x),
            Ended(OUT, "failed", "rejected", "E1", None, None, None, "c2", x),
            Billed(OUT, 42, 12_345, "c1", x),
            WebhookOutcome("delivered", x),
        ],
        NOW,
    )
    s.inc("callingbox_exporter_api_requests_total", ("200",))
    return s


def health(oldest: float | None = None, up: bool = True) -> Health:
    return Health(
        Status(up=up, last_success=NOW - 5),
        watermark=NOW - 7,
        tracked=3,
        active={(OUT, "ringing", *()): 1},
        webhooks_pending=1 if oldest else 0,
        webhook_pending_oldest=oldest,
    )


def campaign_health(*values: str) -> Health:
    return Health(Status(up=True), active={(OUT, "ringing", *values): 2})


# --- the same samples as the live rendering --------------------------------------------------------


async def test_one_target_is_served_as_the_live_rendering():
    collector = Exposition("1.2.3", clock=lambda: NOW)
    await assert_served_as_live(collector)  # no target yet: headers and build info
    await collector.publish("default", Snapshot(store(), health(NOW - 30)))
    await assert_served_as_live(collector)
    assert samples(await served(collector, TEXT), TEXT)[(CREATED, (("direction", OUT), ("org", "default")))][0] == 1


async def test_targets_with_other_metadata_labels_are_served_as_the_live_rendering_through_partial_changes():
    collector = Exposition("1.2.3", clock=lambda: NOW)
    plain, agency, tiered = store(), store(("campaign",), "spring"), store(("tier", "campaign"), "gold", "autumn")
    await collector.publish("plain", Snapshot(plain, health()))
    await collector.publish("agency", Snapshot(agency, campaign_health("spring")))
    await collector.publish("tiered", Snapshot(tiered, campaign_health("gold", "autumn")))
    await assert_served_as_live(collector)

    agency = agency.copy()  # one family of one target changes
    agency.count([Created(OUT, ("winter",))], NOW + 1)
    await collector.publish("agency", Snapshot(agency, campaign_health("spring")))
    await assert_served_as_live(collector)
    await collector.publish("plain", Snapshot(plain, health(NOW - 60, up=False)))  # only its health
    await assert_served_as_live(collector)
    tiered = tiered.copy()
    tiered.observe("callingbox_exporter_poll_duration_seconds", (), 0.2)
    await collector.publish("tiered", Snapshot(tiered, campaign_health("gold", "autumn")))
    await assert_served_as_live(collector)
    text = samples(await served(collector, TEXT), TEXT)
    assert text[(CREATED, (("campaign", "winter"), ("direction", OUT), ("org", "agency"), ("tier", "")))][0] == 1
    assert text[(CREATED, (("campaign", ""), ("direction", OUT), ("org", "plain"), ("tier", "")))][0] == 1


async def test_a_withdrawn_target_leaves_the_pages_before_the_next_scrape():
    collector = Exposition("1.2.3", clock=lambda: NOW)
    await collector.publish("plain", Snapshot(store(), health()))
    await collector.publish("agency", Snapshot(store(("campaign",), "spring"), campaign_health("spring")))
    await collector.publish("other", Snapshot(store(), health()))

    collector.withdraw("agency")  # the only target with `campaign`: the others lose the label
    await assert_served_as_live(collector)
    orgs = {dict(labels).get("org") for _, labels in samples(await served(collector, OPENMETRICS), OPENMETRICS)}
    assert orgs == {"plain", "other", None}  # None: build info
    assert b"campaign" not in (await collector.pages()).text.body

    collector.withdraw("plain")
    collector.withdraw("other")
    await assert_served_as_live(collector)
    assert b'org="' not in await served(collector, TEXT)


def test_a_withdraw_outside_an_event_loop_is_assembled_at_the_next_scrape():
    collector = Exposition("1.2.3", clock=lambda: NOW)
    asyncio.run(collector.publish("gone", Snapshot(store(), health())))
    collector.withdraw("gone")
    assert b'org="gone"' not in asyncio.run(served(collector, TEXT))


# --- only what changed is rendered again -----------------------------------------------------------


@pytest.fixture
def renders(monkeypatch) -> Counter:
    """The families prometheus-client rendered for the pages, by name."""
    seen: Counter = Counter()
    render = exposition.render

    def counted(*metrics):
        seen.update(m.name + "_total" if m.type == "counter" else m.name for m in metrics)
        return render(*metrics)

    monkeypatch.setattr(exposition, "render", counted)
    return seen


async def test_a_publish_renders_only_the_families_that_changed_and_the_health_gauges(renders):
    collector = Exposition("1.2.3", clock=lambda: NOW)
    renders.clear()  # the build info, rendered once
    first = store()
    await collector.publish("a", Snapshot(first, health()))
    assert renders == Counter(CACHED)
    await collector.publish("b", Snapshot(store(), health()))
    assert renders == Counter(CACHED) + Counter(CACHED)  # b's alone

    renders.clear()
    await collector.publish("a", Snapshot(first, health(up=False)))  # same counts (a failed poll)
    assert renders == Counter(list(GAUGES))
    renders.clear()
    second = first.copy()
    second.inc(CREATED, (IN,))
    await collector.publish("a", Snapshot(second, health()))
    assert renders == Counter(list(GAUGES)) + Counter([CREATED])
    await assert_served_as_live(collector)


async def test_a_new_metadata_label_renders_the_call_families_of_every_target_again(renders):
    collector = Exposition("1.2.3", clock=lambda: NOW)
    await collector.publish("a", Snapshot(store(), health()))
    renders.clear()
    await collector.publish("b", Snapshot(store(("campaign",), "spring"), campaign_health("spring")))
    assert renders == Counter(CACHED) + Counter(WITH_METADATA)  # b whole; a's families with metadata
    await assert_served_as_live(collector)


async def test_an_exemplar_that_moves_alone_is_rendered_again(renders):
    """A bill of 0 leaves the money counter as it was and moves only its exemplar."""
    collector = Exposition("1.2.3", clock=lambda: NOW)
    first = store()
    await collector.publish("a", Snapshot(first, health()))
    renders.clear()
    second = first.copy()
    second.count([Billed(OUT, None, 0, "free-call")], NOW + 5)
    assert second.counters[BILLED] == first.counters[BILLED]
    await collector.publish("a", Snapshot(second, health()))
    assert renders == Counter(list(GAUGES)) + Counter([BILLED])
    exemplar = samples(await served(collector, OPENMETRICS), OPENMETRICS)[(BILLED, (("direction", OUT), ("org", "a")))][
        1
    ]
    assert exemplar.labels == {"call_id": "free-call"}


# --- gzip ------------------------------------------------------------------------------------------


async def test_the_gzip_page_plus_a_tail_is_one_member_that_decompresses_to_the_page_and_tail():
    collector = Exposition("1.2.3", clock=lambda: NOW)
    for org in ("a", "b"):
        await collector.publish(org, Snapshot(store(), health(NOW - 30)))
    pages = await collector.pages()
    for kind in (TEXT, OPENMETRICS):
        page, tail = pages.page(kind), collector.tail(pages, kind)
        body = page.gzipped(tail)
        assert gzip.decompress(body) == page.body + tail  # CRC and length checked
        decompressor = zlib.decompressobj(31)
        assert decompressor.decompress(body) == page.body + tail and decompressor.eof
        assert decompressor.unused_data == b""  # one member, nothing after it
        assert page.gzipped(b"another tail") != body  # the cached stream is copied, never advanced
        assert gzip.decompress(page.gzipped(b"another tail")) == page.body + b"another tail"
