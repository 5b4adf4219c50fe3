"""The HTTP face: /metrics, the landing page, /-/healthy, /-/ready and /-/reload.

Handlers only read what the pollers published (counts and health), taking the published view
afresh on each request, so a slow or failing API never holds a scrape up: /metrics serves the
pages rendered at publish (exposition.py) plus a small live tail, negotiated as
prometheus-client's own aiohttp handler does. The landing page
is plain HTML with inline CSS: each target's health and what it counted today, readable at a
glance and with no assets from anywhere else.
"""

from __future__ import annotations

import html
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from .catalogue import MILLI_CENTS_PER_DOLLAR
from .config import ConfigError
from .exposition import Exposition, page_format
from .health import Snapshot
from .webconfig import Guard

# Each figure on the page carries data-field="<name>" (cards data-org), so tests and scripts read it
# without depending on the layout.
TODAY_SHOWN = ("created", "completed", "no_answer", "busy", "canceled", "failed")
ZERO = ' class="zero"'
READY_HINT = "/-/ready answers 200 once every target's first poll since the start has finished, successfully or not"

STYLE = """
:root{--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--muted:#59636e;--line:#d1d9e0}
body{margin:0;font:14px/1.45 system-ui,"Segoe UI","Liberation Sans","DejaVu Sans",Arial,sans-serif;
color:#1f2328;background:#f6f8fa}
.top{display:flex;flex-wrap:wrap;align-items:baseline;gap:6px 18px;padding:14px 24px;background:#fff;
border-bottom:1px solid var(--line)}
h1{margin:0;font-size:20px}.muted,.ago{color:var(--muted)}.summary{font-weight:600}.summary.down{color:var(--bad)}
nav{margin-left:auto;display:flex;gap:16px}nav a{color:#0969da;text-decoration:none;font-family:monospace}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,600px));gap:16px;padding:16px 24px}
.card{background:#fff;border:1px solid var(--line);border-left:6px solid var(--ok);border-radius:8px;
padding:12px 16px}.card.down{border-left-color:var(--bad)}
.card header{display:flex;align-items:center;gap:10px}h2{margin:0;font-size:17px;overflow-wrap:anywhere}
.badge{padding:1px 9px;border-radius:99px;font-size:12px;font-weight:700;letter-spacing:.05em;color:#fff;
background:var(--ok)}.badge.down{background:var(--bad)}
.chip{padding:0 8px;border:1px solid var(--line);border-radius:99px;font-size:12px;color:var(--muted)}
.chip.waiting{border-color:var(--warn);color:var(--warn)}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:10px 0}dt{color:var(--muted)}
dd{margin:0;font-variant-numeric:tabular-nums}
.error{margin:8px 0;padding:6px 10px;background:#ffebe9;border:1px solid #ffcecb;border-radius:6px}
.error pre{margin:2px 0 0;white-space:pre-wrap;overflow-wrap:anywhere;font:12px/1.4 "DejaVu Sans Mono",monospace}
table{width:100%;border-collapse:collapse;text-align:right;font-variant-numeric:tabular-nums}
caption{text-align:left;font-weight:600;padding:4px 0}caption span{font-weight:400}
th{padding:2px 6px;border-bottom:1px solid var(--line);font-size:12px;font-weight:500;color:var(--muted)}
td{padding:3px 6px;font-size:17px;font-weight:600}td.zero{color:#8c959f;font-weight:400}
footer{padding:0 24px 16px;font-size:12px;color:var(--muted)}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _span(seconds: float) -> str:
    """42s, 5m 3s, 2h 5m, 3d 4h."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 2 * 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return '<span class="muted">never</span>'
    moment = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    return f'{moment} <span class="ago">({_span(now - timestamp)} ago)</span>'


def dollars(milli_cents: int) -> str:
    """$1,234.57, rounded half up to the cent in integers, so no float shows a stray cent."""
    cents, rest = divmod(milli_cents, MILLI_CENTS_PER_DOLLAR // 100)
    cents += rest * 2 >= MILLI_CENTS_PER_DOLLAR // 100
    return f"${cents // 100:,}.{cents % 100:02d}"


def _today(totals: dict[str, int]) -> str:
    cells = [(key, totals.get(key, 0), f"{totals.get(key, 0):,}") for key in TODAY_SHOWN]
    cells.append(("billed", totals.get("milli_cents", 0), dollars(totals.get("milli_cents", 0))))
    head = "".join(f"<th>{_e(key.replace('_', ' '))}</th>" for key, _, _ in cells)
    row = "".join(f'<td data-field="{key}"{"" if amount else ZERO}>{_e(text)}</td>' for key, amount, text in cells)
    note = "" if totals else ' · <span data-field="nothing_today">nothing counted yet</span>'
    return (
        f'<table><caption>Today <span class="muted">(since 00:00 UTC){note}</span></caption>'
        f"<tr>{head}</tr><tr>{row}</tr></table>"
    )


def _card(org: str, snapshot: Snapshot, now: float) -> str:
    health = snapshot.health
    status = health.status
    state = "up" if status.up else "down"
    readiness = "ready" if status.ready else "first poll"
    lag = "n/a" if health.watermark is None else _span(now - health.watermark)
    rows = [
        ("last poll", _when(status.last_poll, now)),
        ("last success", _when(status.last_success, now)),
        ("watermark lag", _e(lag)),
        ("consecutive failures", _e(status.failures)),
        ("tracked calls", _e(f"{health.tracked:,}")),
    ]
    if health.stragglers:
        rows.append(("stragglers", _e(f"{health.stragglers:,}")))
    details = "".join(
        f'<dt>{label}</dt><dd data-field="{label.replace(" ", "_")}">{value}</dd>' for label, value in rows
    )
    error = ""
    if status.last_error:
        error = f'<div class="error">last error<pre data-field="last_error">{_e(status.last_error)}</pre></div>'
    today = _today(snapshot.store.today_totals(now))
    return (
        f'<section class="card {state}" data-org="{_e(org)}"><header><h2 data-field="org">{_e(org)}</h2>'
        f'<span class="badge {state}" data-field="state">{state.upper()}</span>'
        f'<span class="chip{"" if status.ready else " waiting"}" title="{READY_HINT}" data-field="readiness">'
        f"{readiness}</span></header>"
        f"<dl>{details}</dl>{error}{today}</section>"
    )


def landing_page(version: str, telemetry_path: str, snapshots: Mapping[str, Snapshot], now: float) -> str:
    targets = dict(snapshots)  # one state of the targets, whatever mapping the caller passes
    statuses = [snapshot.health.status for snapshot in targets.values()]
    down = sum(not s.up for s in statuses)
    first = sum(not s.ready for s in statuses)
    parts = [f"{len(targets)} target{'' if len(targets) == 1 else 's'}", f"{down} down" if down else "all up"]
    if first:
        parts.append(f"{first} on a first poll")
    summary = _e(", ".join(parts))
    path = _e(telemetry_path)
    rendered = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="30">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>CallingBox exporter · {summary}</title><style>{STYLE}</style></head><body>
<div class="top"><h1>CallingBox exporter</h1><span class="muted">version {_e(version)}</span>
<span class="summary{" down" if down else ""}" data-field="summary">{summary}</span>
<nav><a href="{path}">{path}</a><a href="/-/healthy">/-/healthy</a><a href="/-/ready">/-/ready</a></nav></div>
<main>{"".join(_card(org, snapshot, now) for org, snapshot in targets.items())}</main>
<footer>Rendered {rendered}; refreshes every 30 s. Today's totals count what this exporter observed since
00:00 UTC; billed is the money of calls whose billing settled today.</footer>
</body></html>
"""


def metrics_handler(exposition: Exposition, registry: CollectorRegistry):
    """/metrics from the cached pages. `registry` renders everything live, for what the pages
    cannot answer: `name[]` filters and escapings that rewrite names."""

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(",".join(request.headers.getall(hdrs.ACCEPT, [])))
        names = request.query.getall("name[]", [])
        kind = None if names else page_format(content_type)
        gzip = kind is not None and gzip_accepted(request.headers.get(hdrs.ACCEPT_ENCODING, ""))
        if kind is None:
            if not names:
                exposition.read(exposition.view.snapshots)  # the live rendering below shows these
            body = encoder(registry.restricted_registry(names) if names else registry)
        else:
            pages = await exposition.pages()
            exposition.read(pages.snapshots)  # exactly what the page and its tail show
            page, tail = pages.page(kind), exposition.tail(pages, kind)
            body = page.gzipped(tail) if gzip else page.body + tail
        headers = {hdrs.CONTENT_TYPE: content_type, **({hdrs.CONTENT_ENCODING: "gzip"} if gzip else {})}
        response = web.Response(body=body, headers=headers)
        if not gzip:
            response.enable_compression()  # as prometheus-client's own handler: aiohttp's pick, if asked
        return response

    return metrics


def make_app(
    exposition: Exposition,
    registry: CollectorRegistry,
    version: str,
    telemetry_path: str = "/metrics",
    reload: Callable[[], Awaitable[dict[str, list[str]]]] | None = None,
    guard: Guard | None = None,
    wedged: Callable[[], tuple[str, str] | None] = lambda: None,
) -> web.Application:
    """`exposition.view` is read afresh on each request, as each publish and reload replaces it;
    `registry` is the live rendering of everything (`cli.registry_for`); `guard` is the web
    config; `wedged` names a poll loop that has ended or is wedged (`Supervisor.wedged`)."""

    async def index(request: web.Request) -> web.Response:
        page = landing_page(version, telemetry_path, exposition.view.snapshots, time.time())
        return web.Response(text=page, content_type="text/html")

    async def healthy(request: web.Request) -> web.Response:
        """200 while the process serves and its poll loops run; 503 with one line when a loop has
        ended or is wedged (liveness.py), so the pod is restarted. An API outage is never a reason."""
        found = wedged()
        if found is None:
            return web.Response(text="Healthy.\n")
        org, why = found
        # Probes reach this page without a password: name the target only when no one needs one.
        loop = f"the poll loop of {org}" if guard is None or not guard.config.users else "a poll loop"
        return web.Response(status=503, text=f"Unhealthy: {loop} {why}.\n")

    async def ready(request: web.Request) -> web.Response:
        """200 once the state is restored and served and every target's first poll has finished,
        successfully or not: an outage or a revoked key shows as callingbox_up 0, not as an
        unready pod that blocks a rollout (SPEC §2)."""
        targets = exposition.view.snapshots  # one state for the whole answer
        waiting = [org for org, snapshot in targets.items() if not snapshot.health.status.ready]
        if waiting:
            # Probes reach this page without a password: name the targets only when no one needs one.
            which = (
                f" of {', '.join(waiting)}"
                if guard is None or not guard.config.users
                else (f": {len(waiting)} of {len(targets)} targets")
            )
            return web.Response(status=503, text=f"Not ready: waiting for the first poll{which} to finish.\n")
        return web.Response(text="Ready.\n")

    async def reloaded(request: web.Request) -> web.Response:
        try:
            changes = await reload()
        except ConfigError as error:
            return web.Response(status=500, text=f"failed to reload config: {error}\n")
        done = "; ".join(f"{what} {', '.join(names)}" for what, names in changes.items() if names)
        return web.Response(text=f"Reloaded{': ' + done if done else ', nothing changed'}.\n")

    middlewares = [_guarded(guard)] if guard is not None else []
    app = web.Application(middlewares=middlewares)
    app.router.add_get(telemetry_path, metrics_handler(exposition, registry))
    app.router.add_get("/", index)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    if reload is not None:
        app.router.add_post("/-/reload", reloaded)
        app.router.add_put("/-/reload", reloaded)
    return app


def _guarded(guard: Guard):
    """Basic auth on every path but the probes', allowed client certificates, security headers."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        guard.refresh()
        headers = guard.config.headers
        if not guard.client_allowed(request.transport.get_extra_info("peercert") if request.transport else None):
            response: web.StreamResponse = web.Response(status=403, text="Client certificate not allowed.\n")
        elif guard.needs_auth(request.path) and not await guard.authorized(request.headers.get("Authorization")):
            response = web.Response(
                status=401, text="Unauthorized.\n", headers={"WWW-Authenticate": 'Basic realm="callingbox-exporter"'}
            )
        else:
            try:
                response = await handler(request)
            except web.HTTPException as error:
                error.headers.update(headers)
                raise
        response.headers.update(headers)
        return response

    return middleware
