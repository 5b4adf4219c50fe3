"""The HTTP face: /metrics, the landing page, /-/healthy and /-/ready.

Handlers only read published snapshots and poller status, so a slow or failing API never
holds a scrape up.
"""

from __future__ import annotations

import html
import time
from typing import Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from .poller import Poller

STATUSES_SHOWN = ("completed", "no_answer", "busy", "failed", "canceled")


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    moment = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
    return f"{moment} ({now - timestamp:.0f}s ago)"


def landing_page(version: str, telemetry_path: str, pollers: Sequence[Poller], now: float) -> str:
    rows = []
    for poller in pollers:
        s = poller.status
        snapshot = poller.collector.snapshots.get(poller.org)
        totals = snapshot.store.counters.get("callingbox_calls_total", {}) if snapshot else {}
        by_status = {status: sum(v for (d, st), v in totals.items() if st == status) for status in STATUSES_SHOWN}
        lag = "n/a" if s.watermark is None else f"{max(0.0, now - s.watermark):.0f}s"
        rows.append(
            "<tr>"
            f"<td>{html.escape(poller.org)}</td>"
            f"<td class={'up' if s.up else 'down'}>{'up' if s.up else 'down'}</td>"
            f"<td>{html.escape(_when(s.last_poll, now))}</td>"
            f"<td>{html.escape(_when(s.last_success, now))}</td>"
            f"<td>{lag}</td>"
            f"<td>{s.tracked}</td>"
            f"<td>{' '.join(f'{k}={v:g}' for k, v in by_status.items())}</td>"
            f"<td>{html.escape(s.last_error or '')}</td>"
            "</tr>"
        )
    path = html.escape(telemetry_path)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>CallingBox exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.up{{color:#070}}.down{{color:#b00}}</style>
</head><body>
<h1>CallingBox exporter</h1>
<p>Version {html.escape(version)}</p>
<h2>Targets</h2>
<table><tr><th>org</th><th>state</th><th>last poll</th><th>last success</th><th>watermark lag</th>
<th>tracked calls</th><th>terminal calls counted</th><th>last error</th></tr>
{''.join(rows)}
</table>
<h2>Links</h2>
<ul><li><a href="{path}">{path}</a></li><li><a href="/-/healthy">/-/healthy</a></li>
<li><a href="/-/ready">/-/ready</a></li></ul>
</body></html>
"""


def make_app(
    registry: CollectorRegistry, pollers: Sequence[Poller], version: str, telemetry_path: str = "/metrics"
) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        page = landing_page(version, telemetry_path, pollers, time.time())
        return web.Response(text=page, content_type="text/html")

    async def healthy(request: web.Request) -> web.Response:
        return web.Response(text="Healthy.\n")

    async def ready(request: web.Request) -> web.Response:
        waiting = [p.org for p in pollers if not p.status.ready]
        if waiting:
            return web.Response(status=503, text=f"Not ready: waiting for a first poll of {', '.join(waiting)}.\n")
        return web.Response(text="Ready.\n")

    app = web.Application()
    app.router.add_get(telemetry_path, make_aiohttp_handler(registry))
    app.router.add_get("/", index)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    return app
