"""Command line: flags, logging set-up and wiring of config → pollers → web. No logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest

from . import __version__, config, logs
from .metrics import Collector
from .poller import Poller
from .simulator import Simulator
from .web import make_app

log = logging.getLogger("exporter")

DEMO_POLL_INTERVAL = 2.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="callingbox-exporter",
        description="Prometheus exporter for CallingBox calls: exact counters from GET /v1/calls.",
    )
    p.add_argument("--config.file", dest="config_file", metavar="PATH", help="YAML configuration file")
    p.add_argument("--web.listen-address", dest="listen_address", default=config.DEFAULT_LISTEN,
                   metavar="[HOST]:PORT", help="address to serve on (default %(default)s)")
    p.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics", metavar="PATH",
                   help="path of the metrics endpoint (default %(default)s)")
    p.add_argument("--web.config.file", dest="web_config_file", metavar="PATH",
                   help="exporter-toolkit web config (TLS, basic auth)")
    p.add_argument("--log.level", dest="log_level", default="info", choices=tuple(logs.LEVELS))
    p.add_argument("--log.format", dest="log_format", default="logfmt", choices=("logfmt", "json"))
    p.add_argument("--demo", action="store_true", help="run against the built-in CallingBox simulator, no key needed")
    p.add_argument("--once", action="store_true", help="poll once, print the exposition, exit non-zero if a poll failed")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--version", action="version", version=f"callingbox-exporter {__version__}")
    return p


def registry_for(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


async def run(cfg: config.Config) -> int:
    collector = Collector(__version__)
    registry = registry_for(collector)
    simulator = None
    targets = cfg.targets
    if cfg.demo:
        simulator = Simulator(rate=2.0, time_scale=10.0, webhook_retry_base=1.0, replay_share=0.02)
        url = await simulator.start()
        log.info("demo simulator started", extra={"url": url})
        targets = tuple(
            dataclasses.replace(t, api_url=url, api_key=None, poll_interval=min(t.poll_interval, DEMO_POLL_INTERVAL))
            for t in targets
        )
    try:
        async with aiohttp.ClientSession() as session:
            pollers = [Poller(t, collector, session) for t in targets]
            for poller in pollers:
                await poller.restore()
            if cfg.once:
                results = [ok for ok, _ in await asyncio.gather(*(p.poll() for p in pollers))]
                sys.stdout.write(generate_latest(registry).decode())
                return 0 if all(results) else 1
            return await serve(cfg, registry, pollers)
    finally:
        if simulator is not None:
            await simulator.stop()


async def serve(cfg: config.Config, registry: CollectorRegistry, pollers: list[Poller]) -> int:
    app = make_app(registry, pollers, __version__, cfg.telemetry_path)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.listen_host, cfg.listen_port)
        await site.start()
    except OSError as error:
        log.error("cannot listen", extra={"address": f"{cfg.listen_host or ''}:{cfg.listen_port}", "error": error.strerror})
        await runner.cleanup()
        return 1
    log.info("listening", extra={"address": f"{cfg.listen_host or ''}:{cfg.listen_port}", "version": __version__,
                                 "targets": ",".join(p.org for p in pollers)})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(p.run(), name=f"poll-{p.org}") for p in pollers]
    await stop.wait()
    log.info("shutting down")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        if args.web_config_file:
            raise config.ConfigError("web.config.file", "TLS and basic auth are not supported by this version yet")
        cfg = config.build(
            config_file=args.config_file,
            listen_address=args.listen_address,
            telemetry_path=args.telemetry_path,
            log_level=args.log_level,
            log_format=args.log_format,
            demo=args.demo,
            once=args.once,
        )
    except config.ConfigError as error:
        print(f"callingbox-exporter: config error: {error}", file=sys.stderr)
        return 2
    for target in cfg.targets:
        if target.api_key is not None:
            logs.redact(target.api_key.reveal())
    if args.check_config:
        print(f"config ok: {len(cfg.targets)} target(s): {', '.join(t.name for t in cfg.targets)}")
        return 0
    try:
        return asyncio.run(run(cfg))
    except KeyboardInterrupt:
        return 130
