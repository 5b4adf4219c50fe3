"""Fixtures that start real things: simulators on loopback ports, the exporter, Prometheus, Alertmanager.

Every process and server is stopped at teardown. The helpers they use are in helpers.py.
"""

from __future__ import annotations

import signal
from contextlib import ExitStack

import pytest

from exporter.simulator import Simulator, serve_in_thread
from helpers import Exporter
from servers import Server


@pytest.fixture
def stack(tmp_path):
    """Start simulators and exporters; everything is stopped at the end of the test."""

    class Stack:
        def __init__(self, exits: ExitStack):
            self.exits = exits
            self.exporters: list[Exporter] = []

        def simulator(self, **kwargs) -> tuple[Simulator, str]:
            sim = Simulator(**kwargs)
            url = self.exits.enter_context(serve_in_thread(sim))
            return sim, url

        def exporter(self, config: dict, env: dict | None = None, name: str = "exporter") -> Exporter:
            exporter = Exporter(tmp_path, config, env, name)
            self.exporters.append(exporter)
            return exporter

    with ExitStack() as exits:
        s = Stack(exits)
        try:
            yield s
        finally:
            for exporter in s.exporters:
                exporter.kill(
                    signal.SIGTERM if exporter.process and exporter.process.poll() is None else signal.SIGKILL
                )


@pytest.fixture
def launch(tmp_path):
    """`launch(name, command)` starts a real Prometheus or Alertmanager Server in tmp_path; all are
    stopped at teardown."""
    with ExitStack() as exits:

        def start(name: str, command: list[str]) -> Server:
            server = Server(tmp_path, name, command)
            exits.callback(server.stop)
            return server

        yield start
