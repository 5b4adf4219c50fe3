"""The exporter's own metrics of one target: API requests by code, response bytes by endpoint,
polls by result and their duration, counted into the target's store.

The API client and the poller report through this one object (the client sees it as an
`api.Recorder`), so neither reaches into the store, and nothing reads these counters back (the
poll's own byte sum, for its log line, is kept here beside them).
"""

from __future__ import annotations

from .store import Store

POLLS = "callingbox_exporter_polls_total"


class SelfMetrics:
    """One target's self-metrics; `use` points it at the target's store when that is replaced."""

    def __init__(self, store: Store):
        self.store = store
        self.poll_bytes = 0  # response body bytes of the current poll, for its log line

    def poll_started(self) -> None:
        self.poll_bytes = 0

    def use(self, store: Store) -> None:
        self.store = store

    def response(self, code: str) -> None:
        """An API request ended: its HTTP status as text, or `error` when none came back."""
        self.store.inc("callingbox_exporter_api_requests_total", (code,))

    def body_bytes(self, endpoint: str, size: int) -> None:
        """Response body bytes read from `endpoint` ("list", "call"): the API's cost."""
        self.store.inc("callingbox_exporter_api_response_bytes_total", (endpoint,), size)
        self.poll_bytes += size

    def poll_took(self, seconds: float) -> None:
        """A poll read and counted for `seconds` (its save, the last step, is not timed)."""
        self.store.observe("callingbox_exporter_poll_duration_seconds", (), seconds)

    @staticmethod
    def saving(result: str) -> dict[tuple[str, tuple[str, ...]], int]:
        """What the poll's save writes on top of the store (StateDB.save's `adding`): the poll as
        `result`, which holds only if that save succeeds. The store counts it after (`poll`)."""
        return {(POLLS, (result,)): 1}

    def poll(self, result: str) -> None:
        """A poll ended with `result` ("success", "error"): counted once, when its save, the last
        step that can fail it, has told."""
        self.store.inc(POLLS, (result,))
