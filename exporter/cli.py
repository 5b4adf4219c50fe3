"""Command line: flags, logging set-up and wiring of config → pollers → web. No logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector as _Collector

from . import __version__, backfill, config, explain, logs, state, webconfig
from .exposition import Exposition, runtime_registry
from .metrics import Collector
from .simulator import Simulator
from .supervisor import Supervisor
from .web import make_app
from .webconfig import Guard

log = logging.getLogger("exporter")

DEMO_POLL_INTERVAL = 2.0
DEMO_NEW_SERIES_HOLD = 5.0  # the demo shows counters moving within seconds, new series born at zero too


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="callingbox-exporter",
        description="Prometheus exporter for CallingBox calls: exact counters from GET /v1/calls.",
    )
    p.add_argument("--config.file", dest="config_file", metavar="PATH", help="YAML configuration file")
    p.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=config.DEFAULT_LISTEN,
        metavar="[HOST]:PORT",
        help="address to serve on (default %(default)s)",
    )
    p.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        metavar="PATH",
        help="path of the metrics endpoint (default %(default)s)",
    )
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="PATH",
        help="exporter-toolkit web config (TLS, basic auth)",
    )
    p.add_argument("--log.level", dest="log_level", default="info", choices=tuple(logs.LEVELS))
    p.add_argument("--log.format", dest="log_format", default="logfmt", choices=("logfmt", "json"))
    p.add_argument("--demo", action="store_true", help="run against the built-in CallingBox simulator, no key needed")
    p.add_argument(
        "--once", action="store_true", help="poll once, print the exposition, exit non-zero if a poll failed"
    )
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--version", action="version", version=f"callingbox-exporter {__version__}")
    p.add_argument(
        "command",
        nargs="?",
        choices=("explain", "backfill"),
        metavar="explain|backfill",
        help="explain CALL_ID: the call as the API returns it now, and what the exporter counted of it;"
        " backfill: the organization's past calls as Prometheus history, and the state to go on from",
    )
    p.add_argument("call_id", nargs="?", metavar="CALL_ID", help="the call to explain")
    p.add_argument("--target", metavar="NAME", help="explain: the target to look in, when there are several")
    b = p.add_argument_group("backfill")
    b.add_argument("--since", metavar="DURATION", help="backfill: how far back, e.g. 35d")
    b.add_argument("--step", metavar="DURATION", default="5m", help="backfill: time between samples (default 5m)")
    b.add_argument("--output", metavar="DIR", help="backfill: where the files, blocks and state go")
    b.add_argument("--job", default="callingbox-exporter", help="backfill: the job label your scrape attaches")
    b.add_argument("--instance", default="localhost:9860", help="backfill: the instance label your scrape attaches")
    b.add_argument("--force", action="store_true", help="backfill: replace a backfill already in --output")
    return p


def registry_for(collector: Collector, runtime: _Collector | None = None) -> CollectorRegistry:
    """All of /metrics rendered live (--once, `name[]` filters, the reference in tests): the
    targets' families, then the process, platform and GC collectors (`runtime`)."""
    registry = CollectorRegistry(support_collectors_without_names=True)  # so `name[]` finds ours too
    registry.register(collector)
    registry.register(runtime if runtime is not None else runtime_registry())
    return registry


def _secrets_redacted(cfg: config.Config) -> config.Config:
    for target in cfg.targets:
        if target.api_key is not None:
            logs.redact(target.api_key.reveal())
    return cfg


async def run(cfg: config.Config, load: Callable[[], config.Config], guard: Guard | None = None) -> int:
    collector = Exposition(__version__)
    registry = registry_for(collector, collector.runtime)
    simulator = None
    demo_url = None

    def targets_of(c: config.Config) -> tuple[config.Target, ...]:
        targets = c.targets
        if c.once:  # nothing scrapes a single poll: it prints the true values, no new series held
            targets = tuple(dataclasses.replace(t, new_series_hold=0.0) for t in targets)
        if demo_url is None:
            return targets
        return tuple(
            dataclasses.replace(
                t,
                api_url=demo_url,
                api_key=None,
                api_key_file=None,
                poll_interval=min(t.poll_interval, DEMO_POLL_INTERVAL),
                new_series_hold=min(t.new_series_hold, DEMO_NEW_SERIES_HOLD),
            )
            for t in targets
        )

    if cfg.demo:
        simulator = Simulator(rate=2.0, time_scale=10.0, webhook_retry_base=1.0, replay_share=0.02)
        demo_url = await simulator.start()
        log.info("demo simulator started", extra={"url": demo_url})
    try:
        async with aiohttp.ClientSession() as session:
            supervisor = Supervisor(collector, session)
            await supervisor.prepare(targets_of(cfg))
            if cfg.once:
                results = [ok for ok, _ in await asyncio.gather(*(p.poll() for p in supervisor))]
                sys.stdout.write(generate_latest(registry).decode())
                return 0 if all(results) else 1

            async def reload() -> dict[str, list[str]]:
                """Re-read the config (SIGHUP, POST /-/reload); a bad one raises and changes nothing."""
                try:
                    new = _secrets_redacted(load())
                except config.ConfigError as error:
                    log.error("config not reloaded; the running one stays in force", extra={"error": str(error)})
                    raise
                fixed = ("listen_host", "listen_port", "telemetry_path", "log_level", "log_format")
                if [k for k in fixed if getattr(new, k) != getattr(cfg, k)]:
                    log.warning("listen address, telemetry path and log settings take effect on restart")
                changes = await supervisor.apply(targets_of(new))
                log.info("config reloaded", extra={k: ",".join(v) for k, v in changes.items() if v})
                return changes

            return await serve(cfg, registry, supervisor, reload, guard)
    finally:
        if simulator is not None:
            await simulator.stop()


async def serve(cfg: config.Config, registry: CollectorRegistry, supervisor: Supervisor, reload, guard) -> int:
    app = make_app(
        supervisor.collector,
        registry,
        __version__,
        cfg.telemetry_path,
        reload=reload,
        guard=guard,
        wedged=supervisor.wedged,
    )
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    address = f"{cfg.listen_host or ''}:{cfg.listen_port}"
    try:
        site = web.TCPSite(
            runner, cfg.listen_host, cfg.listen_port, ssl_context=guard.server_context() if guard else None
        )
        await site.start()
    except OSError as error:
        log.error("cannot listen", extra={"address": address, "error": error.strerror})
        await runner.cleanup()
        return 1
    log.info(
        "listening",
        extra={
            "address": address,
            "version": __version__,
            "targets": ",".join(p.org for p in supervisor),
            "tls": bool(guard and guard.config.tls),
            "basic_auth": bool(guard and guard.config.users),
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    reloads: set[asyncio.Task] = set()

    async def reload_logged() -> None:
        try:
            await reload()
        except config.ConfigError:
            pass  # logged by reload

    def on_hangup() -> None:
        task = loop.create_task(reload_logged())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    supervisor.start()
    await stop.wait()
    log.info("shutting down")
    await supervisor.stop()
    await runner.cleanup()
    return 0


def _backfill(cfg: config.Config, args: argparse.Namespace) -> int:
    """`backfill --since D [--step D] --output DIR`: the flags checked, then backfill.main."""
    try:
        if not args.since or not args.output:
            raise config.ConfigError("since" if not args.since else "output", "backfill needs --since and --output")
        since = config.positive_duration("since", args.since)
        step = config.positive_duration("step", args.step)
        if step > since:
            raise config.ConfigError("step", f"{args.step!r} is longer than --since")
    except config.ConfigError as error:
        print(f"callingbox-exporter: config error: {error}", file=sys.stderr)
        return 2
    options = backfill.Options(since, step, args.output, args.job, args.instance, args.force)
    return backfill.main(cfg, options)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    load = functools.partial(
        config.build,
        config_file=args.config_file,
        listen_address=args.listen_address,
        telemetry_path=args.telemetry_path,
        log_level=args.log_level,
        log_format=args.log_format,
        demo=args.demo,
        once=args.once,
    )
    try:
        cfg = _secrets_redacted(load())
        guard = Guard(args.web_config_file, webconfig.load(args.web_config_file)) if args.web_config_file else None
    except config.ConfigError as error:
        print(f"callingbox-exporter: config error: {error}", file=sys.stderr)
        return 2
    if args.command == "backfill":
        return _backfill(cfg, args)
    if args.command or args.call_id or args.target:
        if not (args.command and args.call_id):
            print(
                "callingbox-exporter: usage: callingbox-exporter [--config.file PATH] explain CALL_ID [--target NAME]",
                file=sys.stderr,
            )
            return 2
        return explain.main(cfg, args.call_id, args.target)
    if args.check_config:
        print(f"config ok: {len(cfg.targets)} target(s): {', '.join(t.name for t in cfg.targets)}")
        return 0
    try:
        return asyncio.run(run(cfg, load, guard))
    except state.StateError as error:  # a state file that cannot be used: never count from zero over it
        print(f"callingbox-exporter: state error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
