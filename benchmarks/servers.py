"""The fake CallingBox API of the benchmarks, run as its own process so it never shares a GIL.

`--mode live` serves `exporter.simulator.Simulator` itself: history records are generated as
they are sent, so a 1M-call (1.4 GB) history costs only what a client actually reads.
`--mode replay` captures the simulator's response once and serves those bytes from memory, so
a poll's time is the client's alone, not the simulator's record generation. Both print one
JSON line (url, the history's newest creation time, body size) and serve until terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request

from aiohttp import web

from exporter.simulator import Simulator, serve_in_thread

CHUNK = 64 * 1024  # what the simulator writes at a time


def _stats_route(stats: dict):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(stats)

    return handler


def capture(sim: Simulator) -> bytes:
    with serve_in_thread(sim) as url, urllib.request.urlopen(url + "/v1/calls", timeout=600) as response:
        return response.read()


def replay_app(body: bytes) -> web.Application:
    stats = {"list_requests": 0, "bytes_sent": 0, "last_list_bytes": 0, "client_closed_early": 0}
    view = memoryview(body)

    async def calls(request: web.Request) -> web.StreamResponse:
        stats["list_requests"] += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        sent = 0
        try:
            await response.prepare(request)
            for offset in range(0, len(view), CHUNK):
                await response.write(view[offset : offset + CHUNK])
                sent += min(CHUNK, len(view) - offset)
            await response.write_eof()
        except ConnectionError:
            stats["client_closed_early"] += 1
        finally:
            stats["bytes_sent"] += sent
            stats["last_list_bytes"] = sent
        return response

    app = web.Application()
    app.router.add_get("/v1/calls", calls)
    app.router.add_get("/_bench/stats", _stats_route(stats))
    return app


async def serve(args: argparse.Namespace) -> None:
    top = time.time() - args.history_age  # the simulator's newest history call is created at most this late
    sim = Simulator(
        seed=args.seed,
        rate=0.0,
        max_calls=0,
        history=args.history,
        history_age=args.history_age,
        history_spacing=args.history_spacing,
    )
    body_bytes = None
    if args.mode == "replay":
        body = await asyncio.to_thread(capture, sim)
        body_bytes = len(body)
        runner = web.AppRunner(replay_app(body), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
    else:
        sim.app.router.add_get("/_bench/stats", _stats_route(sim.stats))
        url = await sim.start("127.0.0.1", 0)
    print(json.dumps({"url": url, "top": top, "body_bytes": body_bytes}), flush=True)
    await asyncio.Event().wait()  # until SIGTERM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("live", "replay"), default="live")
    p.add_argument("--history", type=int, required=True)
    p.add_argument("--history-age", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--history-spacing", type=float, default=None, help="seconds between history calls")
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
