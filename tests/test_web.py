"""The landing page, rendered from real pollers that polled a small local CallingBox API.

The story: a target polls calls that ended today and one stays unreachable; the page shows
each target up or down with its poll times, lag, failures and error, and today's totals by
status and in dollars. Hostile text is escaped; a quiet day shows zeros; after midnight UTC
yesterday's totals show as 0 while the counters keep them.
"""

from __future__ import annotations

import asyncio
import gzip
from html.parser import HTMLParser

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporter.accounting import Created
from exporter.catalogue import TERMINAL_STATUSES
from exporter.cli import registry_for
from exporter.config import Target
from exporter.exposition import Exposition
from exporter.health import Health, Snapshot
from exporter.metrics import Collector
from exporter.poller import Poller
from exporter.simulator import format_ts
from exporter.store import Store
from exporter.web import dollars, landing_page, make_app
from helpers import FixedClock, free_port

MIDNIGHT = 20_000 * 86_400.0  # 2024-10-04 00:00:00 UTC
NOON = MIDNIGHT + 12 * 3600
VERSION = "9.8.7"


class Page(HTMLParser):
    """The text of every `data-field` element: page-wide ones, and per target card (`data-org`)."""

    VOID = frozenset({"meta", "br", "img", "hr", "input", "link", "wbr"})

    def __init__(self, text: str):
        super().__init__()  # convert_charrefs: the text read here is what a reader sees
        self.fields: dict[str, str] = {}
        self.targets: dict[str, dict[str, str]] = {}
        self._org: str | None = None
        self._open: list[tuple[str, str | None, bool, list[str]]] = []  # tag, field, is a card, text
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        attrs = dict(attrs)
        card = "data-org" in attrs
        if card:
            self._org = attrs["data-org"]
            self.targets[self._org] = {}
        self._open.append((tag, attrs.get("data-field"), card, []))

    def handle_data(self, data):
        for _, field, _, text in self._open:
            if field:
                text.append(data)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        opened, field, card, text = self._open.pop()
        assert opened == tag, f"</{tag}> closes <{opened}>"
        if field:
            where = self.fields if self._org is None else self.targets[self._org]
            where[field] = " ".join("".join(text).split())
        if card:
            self._org = None


TODAY = ("created", "completed", "no_answer", "busy", "canceled", "failed")


def today_of(card: dict[str, str]) -> dict[str, str]:
    return {k: card[k] for k in (*TODAY, "billed")}


def today(billed: str = "$0.00", **counts: int) -> dict[str, str]:
    """A card's totals of today as the page shows them: `counts` given, every other count 0."""
    return {**{k: str(counts.get(k, 0)) for k in TODAY}, "billed": billed}


class Api:
    """GET /v1/calls answers `calls` (newest first), or 503 with `error` when that is set."""

    def __init__(self):
        self.calls: list[dict] = []
        self.error: str | None = None

    async def list_calls(self, request: web.Request) -> web.Response:
        if self.error is not None:
            return web.json_response({"error": self.error}, status=503)
        return web.json_response(self.calls)


def call(n: int, status: str, at: float, direction: str = "outbound", milli_cents: int | None = None) -> dict:
    """A call created a minute before `at`, last updated (and ended, if terminal) at `at`."""
    terminal = status in TERMINAL_STATUSES
    return {
        "id": f"call-{n}",
        "status": status,
        "direction": direction,
        "created_at": format_ts(at - 60),
        "updated_at": format_ts(at),
        "ended_at": format_ts(at) if terminal else None,
        "reservation_status": "settled" if terminal else "reserved",
        "billing_amount_milli_cents": milli_cents,
    }


@pytest.fixture
async def api(aiohttp_server):
    fake = Api()
    app = web.Application()
    app.router.add_get("/v1/calls", fake.list_calls)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def poller(name: str, url: str, session, clock: FixedClock, collector: Collector, **target) -> Poller:
    # No hold of new series (born at zero): these pages show what each poll counted.
    target = Target(name=name, api_url=url, initial_lookback=3600.0, **{"new_series_hold": 0.0, **target})
    return Poller(target, collector, session, clock=clock)


async def test_each_target_shows_up_or_down_its_poll_and_today_totals(api, session):
    api.calls = [  # newest first; billed 1 234.56 + 0.01 (half a cent rounds up) + 0 dollars
        call(6, "in_progress", NOON - 20),
        call(5, "failed", NOON - 30, "inbound"),
        call(4, "no_answer", NOON - 40),
        call(3, "completed", NOON - 50, milli_cents=123_456_000),
        call(2, "completed", NOON - 60, "inbound", milli_cents=500),
        call(1, "completed", NOON - 70, milli_cents=0),
    ]
    clock, collector = FixedClock(NOON), Collector(VERSION)
    campaigns = poller("campaigns", api.url, session, clock, collector)
    backup = poller("backup", f"http://127.0.0.1:{free_port()}", session, clock, collector)
    assert (await campaigns.poll())[0]
    assert not (await backup.poll())[0]
    clock.now = NOON + 3
    assert not (await backup.poll())[0]

    page = Page(landing_page(VERSION, "/metrics", collector.snapshots, NOON + 5))

    assert page.fields["summary"] == "2 targets, 1 down"
    up, down = page.targets["campaigns"], page.targets["backup"]
    assert (up["org"], up["state"], up["readiness"]) == ("campaigns", "UP", "ready")
    assert up["last_poll"] == up["last_success"] == "2024-10-04 12:00:00 UTC (5s ago)"
    assert up["watermark_lag"] == "25s"  # the newest updated_at read, NOON - 20
    assert (up["consecutive_failures"], up["tracked_calls"]) == ("0", "6")
    assert "last_error" not in up and "stragglers" not in up
    assert today_of(up) == today(created=6, completed=3, no_answer=1, failed=1, billed="$1,234.57")
    assert (down["state"], down["readiness"], down["consecutive_failures"]) == ("DOWN", "ready", "2")
    assert down["last_poll"] == "2024-10-04 12:00:03 UTC (2s ago)"
    assert (down["last_success"], down["watermark_lag"]) == ("never", "n/a")
    assert down["last_error"] == backup.status.last_error
    assert down["last_error"].startswith("request failed: ClientConnectorError")
    assert today_of(down)["created"] == "0" and down["nothing_today"] == "nothing counted yet"


async def test_the_page_names_its_version_and_links_and_is_served_at_root(api, session, aiohttp_client):
    collector = Exposition(VERSION)
    target = poller("default", api.url, session, FixedClock(NOON), collector)
    await target.poll()
    client = await aiohttp_client(
        make_app(collector, registry_for(collector, collector.runtime), VERSION, "/custom-metrics")
    )

    response = await client.get("/")
    text = await response.text()

    assert response.status == 200 and response.content_type == "text/html"
    assert f"version {VERSION}" in text and "1 target, all up" in text
    for link in ("/custom-metrics", "/-/healthy", "/-/ready"):
        assert f'href="{link}"' in text
    assert "http://" not in text and "https://" not in text, "nothing from elsewhere"
    assert "<script" not in text.lower(), "no JavaScript"
    assert '<meta http-equiv="refresh" content="30">' in text


async def test_a_target_whose_first_poll_has_not_finished_is_the_one_not_ready(api, session, aiohttp_client):
    """/-/ready and the readiness chip: a first poll that failed counts as finished (SPEC §2)."""
    clock, collector = FixedClock(NOON), Exposition(VERSION)
    failed = poller("backup", f"http://127.0.0.1:{free_port()}", session, clock, collector)
    waiting = poller("campaigns", api.url, session, clock, collector)
    await failed.restore()
    await waiting.restore()  # served from the start, not polled yet
    assert not (await failed.poll())[0]
    client = await aiohttp_client(make_app(collector, registry_for(collector, collector.runtime), VERSION))
    response = await client.get("/-/ready")
    assert (response.status, await response.text()) == (
        503,
        "Not ready: waiting for the first poll of campaigns to finish.\n",
    )

    page = Page(landing_page(VERSION, "/metrics", collector.snapshots, NOON))
    assert page.fields["summary"] == "2 targets, 2 down, 1 on a first poll"
    assert (page.targets["backup"]["readiness"], page.targets["campaigns"]["readiness"]) == ("ready", "first poll")
    assert (await waiting.poll())[0]
    assert (await client.get("/-/ready")).status == 200


async def test_a_hostile_org_name_and_error_text_are_escaped(api, session):
    name = '<script>alert("org")</script>'
    api.error = "<script>alert('error')</script> & <b>bold</b>"
    collector = Collector(VERSION)
    target = poller(name, api.url, session, FixedClock(NOON), collector)
    assert not (await target.poll())[0]

    text = landing_page(VERSION, "/metrics", collector.snapshots, NOON)
    page = Page(text)

    assert "<script" not in text.lower() and "<b>" not in text
    card = page.targets[name]
    assert card["org"] == name
    assert card["last_error"] == f'HTTP 503: {{"error": "{api.error}"}}'
    assert "&lt;script&gt;alert(&quot;org&quot;)&lt;/script&gt;" in text


async def test_a_day_with_nothing_counted_shows_zeros(api, session):
    collector = Collector(VERSION)
    target = poller("quiet", api.url, session, FixedClock(NOON), collector)
    assert (await target.poll())[0]

    card = Page(landing_page(VERSION, "/metrics", collector.snapshots, NOON + 1)).targets["quiet"]

    assert today_of(card) == today()
    assert card["nothing_today"] == "nothing counted yet"


async def test_after_midnight_utc_yesterdays_totals_show_as_zero_while_counters_keep_them(api, session):
    before = MIDNIGHT - 10
    api.calls = [call(2, "busy", before - 5), call(1, "completed", before - 6, milli_cents=250_000)]
    collector = Collector(VERSION)
    target = poller("campaigns", api.url, session, FixedClock(before), collector)
    assert (await target.poll())[0]

    evening = Page(landing_page(VERSION, "/metrics", collector.snapshots, MIDNIGHT - 1)).targets["campaigns"]
    morning = Page(landing_page(VERSION, "/metrics", collector.snapshots, MIDNIGHT + 5)).targets["campaigns"]

    assert today_of(evening) == today(created=2, completed=1, busy=1, billed="$2.50")
    assert set(today_of(morning).values()) == {"0", "$0.00"}
    assert morning["last_poll"] == "2024-10-03 23:59:50 UTC (15s ago)"
    counters = collector.snapshots["campaigns"].store.counters["callingbox_calls_ended_total"]
    assert counters[("outbound", "busy")] == counters[("outbound", "completed")] == 1


async def test_the_page_shows_the_published_snapshot_and_stragglers_past_the_settle_window(api, session):
    api.calls = [call(1, "in_progress", NOON - 10)]
    clock, collector = FixedClock(NOON), Collector(VERSION)
    target = poller("campaigns", api.url, session, clock, collector, settle_window=600.0)
    assert (await target.poll())[0]
    target.store.count([Created("outbound")], NOON)  # counted, but not published by a poll

    card = Page(landing_page(VERSION, "/metrics", collector.snapshots, NOON)).targets["campaigns"]
    assert card["created"] == "1" and "stragglers" not in card

    clock.now = NOON + 700  # the call is past the settle window and still not final
    assert (await target.poll())[0]
    card = Page(landing_page(VERSION, "/metrics", collector.snapshots, clock.now)).targets["campaigns"]
    assert card["stragglers"] == "1" and card["created"] == "2"


@pytest.mark.parametrize(
    "milli_cents, shown",
    [
        (0, "$0.00"),
        (499, "$0.00"),
        (500, "$0.01"),
        (1_234_499, "$12.34"),
        (1_234_500, "$12.35"),
        (123_456_789_000, "$1,234,567.89"),
    ],
)
def test_dollars_round_half_up_to_the_cent(milli_cents, shown):
    assert dollars(milli_cents) == shown


# --- /metrics: the pages rendered at publish, plus a live tail --------------------------------------

OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8"
ACCEPTS = {  # what scrapers send; choose_encoder picks the format
    "none": None,
    "prometheus 2": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "prometheus 3": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;"
    "q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    "text 1.0.0": "text/plain;version=1.0.0;escaping=underscores",
    "escaping=dots (rendered live)": "text/plain;version=1.0.0;escaping=dots",
}


def metric_samples(body: bytes, content_type: str) -> dict:
    """(sample name, sorted labels) → value, by the strict parser of the format; process_* and
    python_* left out, as they move between two renders."""
    parse = parse_openmetrics if content_type.startswith("application/openmetrics-text") else parse_text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse(body.decode())
        if not family.name.startswith(("process_", "python_"))
        for s in family.samples
    }


async def scrape(client, accept: str | None, compressed: bool, query: str = "") -> tuple[bytes, str]:
    """The body (gunzipped here, so the gzip stream is checked) and its content type."""
    headers = {"Accept-Encoding": "gzip" if compressed else "identity", **({"Accept": accept} if accept else {})}
    response = await client.get(f"/metrics{query}", headers=headers, auto_decompress=False)
    assert response.status == 200
    raw = await response.read()
    assert response.headers.get("Content-Encoding") == ("gzip" if compressed else None)
    return (gzip.decompress(raw) if compressed else raw), response.headers["Content-Type"]


def created(body: bytes, content_type: str, org: str = "acme") -> float:
    return metric_samples(body, content_type)[
        ("callingbox_calls_created_total", (("direction", "outbound"), ("org", org)))
    ]


def counted(calls: int) -> Store:
    store = Store()
    store.count([Created("outbound")] * calls)
    return store


@pytest.fixture
async def served(aiohttp_client):
    """An Exposition with one target, `acme`, and a test client of the app that serves it."""
    clock = FixedClock(NOON)
    collector = Exposition(VERSION, clock=clock)
    await collector.publish("acme", Snapshot(counted(1), Health(webhooks_pending=1, webhook_pending_oldest=NOON - 10)))
    client = await aiohttp_client(make_app(collector, registry_for(collector, collector.runtime), VERSION))
    return collector, client, clock


@pytest.mark.parametrize("accept", list(ACCEPTS.values()), ids=list(ACCEPTS))
async def test_metrics_are_negotiated_as_prometheus_clients_own_handler_and_show_the_live_samples(
    served, accept, aiohttp_client
):
    collector, client, _ = served
    registry = registry_for(collector, collector.runtime)
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    reference = await aiohttp_client(app)
    encoder, content_type = choose_encoder(accept)
    for compressed in (False, True):
        body, served_type = await scrape(client, accept, compressed)
        _, reference_type = await scrape(reference, accept, compressed)
        assert served_type == reference_type == content_type
        assert metric_samples(body, content_type) == metric_samples(encoder(registry), content_type)
        assert metric_samples(body, content_type)  # not two empty pages


async def test_a_name_filter_is_rendered_live_with_only_the_families_named(served):
    _, client, _ = served
    body, content_type = await scrape(client, None, True, "?name[]=callingbox_up&name[]=process_open_fds")
    assert {name for name, _ in metric_samples(body, content_type)} == {"callingbox_up"}
    assert b"process_open_fds " in body and b"callingbox_calls_created_total" not in body


async def test_a_whole_scrape_marks_the_snapshots_it_served_as_read_and_a_name_filter_does_not(served):
    """What lets a series born at zero move on (SPEC §3): Prometheus has read it at its birth value."""
    collector, client, _ = served
    await collector.publish("acme", Snapshot(counted(2), Health(), published_at=NOON + 7))
    assert collector.read_at("acme") is None
    await scrape(client, None, True, "?name[]=callingbox_calls_created_total")
    assert collector.read_at("acme") is None, "a part of the page is no read of the new series"
    await scrape(client, OPENMETRICS_ACCEPT, True)
    assert collector.read_at("acme") == NOON + 7
    await collector.publish("acme", Snapshot(counted(3), Health(), published_at=NOON + 9))
    await scrape(client, "text/plain;version=1.0.0;escaping=dots", False)  # rendered live, whole
    assert collector.read_at("acme") == NOON + 9


async def test_a_scrape_during_a_publish_gets_the_previous_pages_whole_and_after_it_the_new_ones(served, monkeypatch):
    collector, client, _ = served
    previous = await collector.pages()
    rendered, release = asyncio.Event(), asyncio.Event()
    compress = collector._compress

    async def held(*args):
        rendered.set()
        await release.wait()
        return await compress(*args)

    monkeypatch.setattr(collector, "_compress", held)
    publish = asyncio.create_task(collector.publish("acme", Snapshot(counted(3), Health())))
    await rendered.wait()  # the new blocks are rendered and assembled, not swapped in yet
    combinations = [(accept, compressed) for accept in (None, OPENMETRICS_ACCEPT) for compressed in (False, True)]
    for accept, compressed in combinations:
        body, content_type = await scrape(client, accept, compressed)
        page = previous.openmetrics if accept else previous.text
        assert body.startswith(page.body) and created(body, content_type) == 1
    # The landing page and /-/ready read the view's snapshots: they switch with the pages, not before.
    assert collector.view.snapshots["acme"].store.counters["callingbox_calls_created_total"][("outbound",)] == 1
    assert not publish.done()
    release.set()
    await publish
    assert collector.view.snapshots["acme"].store.counters["callingbox_calls_created_total"][("outbound",)] == 3
    now = await collector.pages()
    for accept, compressed in combinations:
        body, content_type = await scrape(client, accept, compressed)
        assert body.startswith((now.openmetrics if accept else now.text).body) and created(body, content_type) == 3


async def test_publishes_queued_behind_an_assembly_share_the_next_one_and_never_go_back(served, monkeypatch):
    collector, client, _ = served
    compress, assemblies, reached = collector._compress, [], asyncio.Queue()
    gates = [asyncio.Event(), asyncio.Event()]  # the first two assemblies wait for the test

    async def gated(*args):
        assemblies.append(args)
        if len(assemblies) <= len(gates):
            await reached.put(len(assemblies))
            await gates[len(assemblies) - 1].wait()
        return await compress(*args)

    async def shown() -> dict[str, float]:
        body, content_type = await scrape(client, OPENMETRICS_ACCEPT, True)
        found = metric_samples(body, content_type)
        return {
            org: created(body, content_type, org)
            for org in ("acme", "beta", "gamma")
            if ("callingbox_calls_created_total", (("direction", "outbound"), ("org", org))) in found
        }

    monkeypatch.setattr(collector, "_compress", gated)
    acme = asyncio.create_task(collector.publish("acme", Snapshot(counted(2), Health())))
    assert await reached.get() == 1  # acme's assembly, of the snapshots published so far
    beta = asyncio.create_task(collector.publish("beta", Snapshot(counted(5), Health())))
    gamma = asyncio.create_task(collector.publish("gamma", Snapshot(counted(7), Health())))
    assert await shown() == {"acme": 1}
    gates[0].set()
    await acme
    assert await shown() == {"acme": 2}  # beta and gamma came after that assembly began
    assert await reached.get() == 2  # beta's, which covers gamma too
    assert await shown() == {"acme": 2}
    gates[1].set()
    await asyncio.gather(beta, gamma)
    assert len(assemblies) == 2  # gamma's publish found its snapshot already shown
    assert await shown() == {"acme": 2, "beta": 5, "gamma": 7}


async def test_the_live_tail_has_the_process_metrics_and_an_age_that_moves_with_the_clock(served):
    collector, client, clock = served
    age = ("callingbox_webhook_pending_oldest_age_seconds", (("org", "acme"),))
    for accept in (None, OPENMETRICS_ACCEPT):
        for compressed in (False, True):
            clock.now = NOON
            body, content_type = await scrape(client, accept, compressed)
            assert metric_samples(body, content_type)[age] == 10
            assert b"\nprocess_cpu_seconds_total " in body and b"\npython_info{" in body
            clock.now = NOON + 50  # no publish in between
            body, content_type = await scrape(client, accept, compressed)
            assert metric_samples(body, content_type)[age] == 60
