"""/metrics pages rendered once per published snapshot, so a scrape costs the same at 1 target or 100.

After metrics.py in the flow: `Exposition` is its Collector plus pages. At a publish,
prometheus-client renders only the families of that target whose data changed, one block of
samples per (target, family); the blocks are joined into one page per format (text 0.0.4,
OpenMetrics 1.0.0) and gzipped in a worker thread, and swapped in with the snapshots they show
as one `Pages` view. A scrape gets that page plus a live tail: the pending-webhook age (it moves
with the clock) and the process, platform and GC collectors.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import generate_latest as render_text
from prometheus_client.openmetrics.exposition import ALLOWUTF8, UNDERSCORES
from prometheus_client.openmetrics.exposition import generate_latest as render_openmetrics
from prometheus_client.registry import Collector as _Collector

from .catalogue import CALL_FAMILIES, FAMILIES, GAUGES, PENDING_AGE
from .health import Snapshot
from .metrics import (
    TARGET_FAMILIES,
    WITH_METADATA,
    Collector,
    View,
    add_target,
    build_info,
    family,
    metadata_labels,
)
from .store import Store

TEXT, OPENMETRICS = "text", "openmetrics"
EOF = b"# EOF\n"
GZIP_WBITS = 31  # zlib: a gzip header and trailer around the deflate stream
GZIP_LEVEL = 1  # the page repeats itself: ~20x already at level 1, and level 6 costs 3.7x the CPU for 18 % less
CACHED = tuple(name for name in TARGET_FAMILIES if name != PENDING_AGE)  # in page order; build info follows


class _Metrics:
    """The smallest thing prometheus-client renders: a fixed list of families."""

    def __init__(self, *metrics):
        self.metrics = metrics

    def collect(self):
        return self.metrics


def render(*metrics) -> tuple[bytes, bytes]:
    """Text and OpenMetrics (without its `# EOF`) of `metrics`, by prometheus-client."""
    metrics = _Metrics(*metrics)
    return render_text(metrics), render_openmetrics(metrics)[: -len(EOF)]


HEADERS = {name: render(family(name)) for name in CACHED}  # HELP and TYPE: a family without samples


def runtime_registry() -> CollectorRegistry:
    """The process, platform and GC collectors: small, and rendered at every scrape."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def page_format(content_type: str) -> str | None:
    """The cached page that answers a `choose_encoder` content type, or None to render live.

    Every name here is in the legacy character set, which escaping=underscores and allow-utf-8
    leave as it is; `dots` and `values` rewrite names, so those are rendered live.
    """
    kind, *params = (part.strip() for part in content_type.split(";"))
    escaping = dict(p.split("=", 1) for p in params if "=" in p).get("escaping", UNDERSCORES)
    if escaping not in (UNDERSCORES, ALLOWUTF8):
        return None
    return OPENMETRICS if kind == "application/openmetrics-text" else TEXT


@dataclass(frozen=True)
class Page:
    """One format's cached page, and a gzip stream that has compressed it and been flushed."""

    body: bytes
    gzip_head: bytes
    gzip: zlib._Compress

    @classmethod
    def of(cls, body: bytes) -> Page:
        stream = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
        return cls(body, stream.compress(body) + stream.flush(zlib.Z_SYNC_FLUSH), stream)

    def gzipped(self, tail: bytes) -> bytes:
        """One gzip member of body + tail; the body is never compressed again."""
        stream = self.gzip.copy()
        return b"".join((self.gzip_head, stream.compress(tail), stream.flush()))


@dataclass(frozen=True)
class Pages(View):
    """The Exposition's published view: the targets' snapshots (the landing page, /-/ready, the
    live tail) and the two pages rendered from exactly those, swapped in together."""

    text: Page
    openmetrics: Page

    def page(self, kind: str) -> Page:
        return self.openmetrics if kind == OPENMETRICS else self.text


def changed_families(old: Store, new: Store) -> set[str]:
    """Families whose samples differ between two stores. The dict comparisons run in C, so an
    unchanged family costs next to nothing."""
    changed = set(CALL_FAMILIES) if old.extra_labels != new.extra_labels else set()
    for name, spec in FAMILIES.items():
        if spec.kind == "counter":
            if old.counters.get(name) != new.counters.get(name):
                changed.add(name)
        elif old.histograms.get(name) != new.histograms.get(name) or old.buckets.get(name) != new.buckets.get(name):
            changed.add(name)
    if old.exemplars != new.exemplars:  # usually with its count, but a bill of 0 moves only the exemplar
        changed.update(key[0] for key in old.exemplars.keys() ^ new.exemplars.keys())
        changed.update(key[0] for key, kept in new.exemplars.items() if old.exemplars.get(key, kept) != kept)
    return changed


def stale_families(old: Snapshot | None, new: Snapshot, relabelled: bool) -> tuple[str, ...]:
    """The cached families of a target to render again: those whose data changed since the
    snapshot its blocks show, its health gauges at each publish, and those with metadata labels
    when the union of the targets' label names changed."""
    if old is None:
        return CACHED
    names = set(WITH_METADATA) if relabelled else set()
    if new is not old:
        names.update(GAUGES)
        if new.store is not old.store:
            names.update(changed_families(old.store, new.store))
    return tuple(name for name in CACHED if name in names)


class Exposition(Collector):
    """The Collector, plus the pages /metrics serves, rendered when a target publishes.

    Assemblies run one at a time under a lock, each from every snapshot published so far, and
    a generation number skips those a later one already covered: an older page never replaces
    a newer one.
    """

    def __init__(self, version: str, clock=time.time, runtime: _Collector | None = None):
        super().__init__(version, clock)
        self.runtime = runtime if runtime is not None else runtime_registry()
        self._info = render(build_info(version))
        self._blocks: dict[str, dict[str, tuple[bytes, bytes]]] = {}  # org → family → (text, OpenMetrics)
        self._shown: Mapping[str, Snapshot] = {}  # the snapshots the blocks were rendered from
        # Published, not yet on the pages: the next `view` takes them together with the pages, so
        # every endpoint shows one state. Only this object reads or changes the dict.
        self._published: dict[str, Snapshot] = {}
        self._extra: tuple[str, ...] = ()  # the metadata label names they were rendered with
        self._lock = asyncio.Lock()
        self._wanted = self._built = self._withdrawn = 0  # generations: asked for, served, last withdraw
        self._tasks: set[asyncio.Task] = set()
        self.view: Pages = self._compressed(*self._assemble({}, {}), MappingProxyType({}))

    async def publish(self, org: str, snapshot: Snapshot) -> None:
        """Render what changed, then swap in a new `view` (pages and snapshots together); scrapes
        meanwhile get the previous one whole. Shielded: a poller cancelled here (reload, shutdown) still
        leaves pages that match the snapshots."""
        self._published[org] = snapshot
        self._wanted += 1
        await asyncio.shield(self._refresh(self._wanted))

    def withdraw(self, org: str) -> None:
        """The target leaves at once: the next scrape waits for pages without it (its blocks
        are dropped; other targets are rendered again only if the metadata labels change). The
        landing page and /-/ready drop it at once: `view` keeps its pages, which `pages` never
        serves again without assembling first."""
        super().withdraw(org)
        self._published.pop(org, None)
        self._wanted += 1
        self._withdrawn = self._wanted
        try:
            task = asyncio.get_running_loop().create_task(self._refresh(self._withdrawn))
        except RuntimeError:
            return  # no loop: the next scrape assembles
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def pages(self) -> Pages:
        """The view to serve: the last assembled, once no withdrawn target is left on its pages."""
        if self._built < self._withdrawn:
            await self._refresh(self._withdrawn)
        return self.view

    def tail(self, pages: Pages, kind: str) -> bytes:
        """What each scrape renders: the pending-webhook age at this moment, and the runtime
        collectors; in OpenMetrics it carries the page's one `# EOF`."""
        now = self.clock()
        age = family(PENDING_AGE)
        for org, snapshot in pages.snapshots.items():
            add_target(age, PENDING_AGE, org, snapshot, (), now)
        live = _Metrics(age, *self.runtime.collect())
        return render_openmetrics(live) if kind == OPENMETRICS else render_text(live)

    async def _refresh(self, wanted: int) -> None:
        async with self._lock:
            if self._built >= wanted:
                return  # a later assembly already showed it
            generation, snapshots = self._wanted, MappingProxyType(dict(self._published))
            extra = metadata_labels(snapshots.values())
            blocks = await self._render_blocks(snapshots, extra)
            self._blocks, self._shown, self._extra = blocks, snapshots, extra  # the blocks match these now
            view = await self._compress(*self._assemble(snapshots, blocks), snapshots)
            self.view, self._built = view, generation  # one assignment: every endpoint switches at once

    async def _render_blocks(self, snapshots: Mapping[str, Snapshot], extra: tuple[str, ...]) -> dict:
        """Every target's blocks: cached ones kept, stale ones rendered again, yielding between."""
        relabelled, now = extra != self._extra, self.clock()
        blocks = {}
        for org, snapshot in snapshots.items():
            own = self._blocks.get(org, {})
            stale = stale_families(self._shown.get(org), snapshot, relabelled)
            if stale:
                own = dict(own)
            for name in stale:
                metric = family(name, extra)
                add_target(metric, name, org, snapshot, extra, now)
                text, openmetrics = render(metric)
                header_text, header_openmetrics = HEADERS[name]
                own[name] = text[len(header_text) :], openmetrics[len(header_openmetrics) :]
                await asyncio.sleep(0)  # a scrape is never held up by more than one family
            blocks[org] = own
        return blocks

    def _assemble(self, snapshots: Mapping[str, Snapshot], blocks: dict) -> tuple[bytes, bytes]:
        """Each family's header, then every target's block, in the order of the snapshots."""
        text, openmetrics = [], []
        for name in CACHED:
            header_text, header_openmetrics = HEADERS[name]
            text.append(header_text)
            openmetrics.append(header_openmetrics)
            for org in snapshots:
                block_text, block_openmetrics = blocks[org][name]
                text.append(block_text)
                openmetrics.append(block_openmetrics)
        return b"".join((*text, self._info[0])), b"".join((*openmetrics, self._info[1]))

    async def _compress(self, text: bytes, openmetrics: bytes, snapshots: Mapping[str, Snapshot]) -> Pages:
        """gzip in a worker thread: zlib releases the GIL, so scrapes go on meanwhile."""
        return await asyncio.to_thread(self._compressed, text, openmetrics, snapshots)

    @staticmethod
    def _compressed(text: bytes, openmetrics: bytes, snapshots: Mapping[str, Snapshot]) -> Pages:
        return Pages(snapshots, Page.of(text), Page.of(openmetrics))
