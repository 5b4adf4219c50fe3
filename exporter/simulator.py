"""A faithful fake of the CallingBox HTTP API (SPEC §1), with faults on demand and a ground truth.

`callingbox-exporter --demo` serves it in-process; tests serve it on loopback and compare the
exporter's metrics with `Simulator.truth()`. Stdlib and aiohttp only: it imports nothing of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hashlib
import hmac
import itertools
import json
import logging
import math
import random
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "no_answer", "busy", "canceled", "failed"})
OUTCOME_WEIGHTS = {"completed": 55, "no_answer": 18, "busy": 8, "failed": 10, "canceled": 9}
PRICE_PER_MINUTE = {"outbound": 9000, "inbound": 6000}  # milli-cents, billed per started minute
API_VERSION = "2026-10-01"
# CallingBox retries a failing webhook 8 times with doubling delays, the last attempt about
# 42 h after the first: 127 first-retry delays in all. `failed` is final only after that.
WEBHOOK_ATTEMPTS = 8
WEBHOOK_FIRST_RETRY = 42 * 3600 / (2 ** (WEBHOOK_ATTEMPTS - 1) - 1)
TICK = 0.025  # lifecycle wake-up period, wall seconds
HISTORY_SPACING = 4.0  # wall seconds between synthetic history calls
HISTORY_LIFETIME = 3600.0  # no history call changes more than this after its creation
FAULT_KINDS = frozenset(
    {"status", "429", "timeout", "reset", "truncate", "non_json", "unauthorized", "malformed", "duplicates"}
)
NOW = object()  # placeholder in a planned change: "the time the change is applied"

_BUSINESSES = ("Brightsmile Dental", "Northside Auto Care", "Harbor Physio", "Lumen Realty", "Cedar Vet Clinic")
_NAMES = ("Ana Torres", "James Okafor", "Mei Chen", "Lukas Weber", "Priya Nair", "Tom Becker", "Sara Lind")
_ORG_LINES = ("+14155550142", "+14155550199", "+13125550117")
_LANGUAGES = ("en-US",) * 7 + ("es-US", "de-DE", "fr-FR")
_WEBHOOKS = ("https://hooks.brightsmile.example/callingbox", "https://crm.lumen.example/api/calls/webhook")
_PROMPT = (
    "You are Maya, a warm and concise phone assistant for {business}. {task} Confirm you are "
    "speaking with {name} and keep the call under three minutes. Never discuss prices, diagnoses "
    "or payment details. On voicemail, leave the callback number and hang up."
)
_TASKS = (
    "Confirm their appointment on {day} at {hour}:00, or offer the next two free slots.",
    "Follow up on order #{order}: ask whether it arrived complete and whether they are satisfied.",
    "Remind them that their annual check-up is due and book a slot if they want one.",
)
_RETURNS = {"confirmed": "boolean", "new_slot": "string|null", "satisfaction": "integer 1-5", "notes": "string"}
_WEBHOOK_ERRORS = ("HTTP 500", "HTTP 503", "timeout after 10s", "connection refused")
_RING_SECONDS = {"completed": (2, 20), "no_answer": (12, 30), "busy": (1, 5)}  # else 1-15 s
_CAUSES = {"no_answer": "no_answer", "busy": "busy", "canceled": "canceled"}
_FAILURES = {  # the stage a failed call dies in → (hangup_cause = error_code, error_message)
    "queued": ("insufficient_credits", "organization balance too low to reserve the call"),
    "initiated": ("invalid_number", "destination number is not a valid E.164 number"),
    "ringing": ("carrier_error", "carrier rejected the call (SIP 503)"),
}


def _outcome_table(weights: dict[str, float]) -> tuple[list[str], list[float]]:
    """Validated outcome weights as the (outcomes, weights) pair `random.choices` takes."""
    unknown = set(weights) - TERMINAL
    if unknown:
        raise ValueError(f"outcome weights for unknown statuses {sorted(unknown)}; "
                         f"expected some of {sorted(TERMINAL)}")
    if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError("outcome weights must be >= 0 with a positive sum")
    return list(weights), [float(w) for w in weights.values()]


def format_ts(t: float) -> str:
    """Unix seconds → RFC 3339 UTC with milliseconds, as CallingBox writes timestamps."""
    ms = int(t * 1000)  # floor, so a timestamp never lies after the moment it was taken
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _seconds(ts: str) -> float:
    # Parse exactly as the exporter does (datetime.timestamp), so truth matches to the last bit.
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


@dataclass
class Truth:
    """What the exporter must count: keys are (metric name, sorted label pairs without org)."""

    counters: dict[tuple[str, tuple[tuple[str, str], ...]], int | float]
    observations: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]

    def total(self, name: str, **labels: str) -> int | float:
        """Sum of a counter over every series whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, lbl), v in self.counters.items() if n == name and wanted <= set(lbl))


# An event a perfect observer counts: (date, metric, labels, value, is_observation).
_Event = tuple[float, str, tuple[tuple[str, str], ...], Any, bool]


def ledger(prev: dict | None, new: dict, billed: bool) -> tuple[list[_Event], bool]:
    """The events counted when a call moves from version `prev` to `new` (SPEC §3/§4).

    `billed` says whether billing was already accounted for this call; the new flag is returned.
    """
    events: list[_Event] = []
    direction = new["direction"]

    def add(date: str, name: str, value: Any = 1, observed: bool = False, **labels: str | None) -> None:
        key = tuple(sorted((k, v or "none") for k, v in labels.items()))
        events.append((_seconds(date), name, key, value, observed))

    if prev is None:
        add(new["created_at"], "callingbox_calls_created_total", direction=direction)
    status = new["status"]
    if status in TERMINAL and (prev is None or prev["status"] not in TERMINAL):
        when = new["ended_at"] or new["updated_at"]
        add(when, "callingbox_calls_ended_total", direction=direction, status=status)
        add(when, "callingbox_call_hangups_total", direction=direction, status=status,
            hangup_cause=new["hangup_cause"])
        if new["error_code"] is not None:
            add(when, "callingbox_call_errors_total", direction=direction, error_code=new["error_code"])
        if new["duration_seconds"] is not None:
            add(when, "callingbox_call_duration_seconds", new["duration_seconds"], True,
                direction=direction, status=status)
        for name, start, end in (("answer", "started_at", "answered_at"), ("setup", "created_at", "started_at")):
            if new[start] and new[end]:
                add(when, f"callingbox_call_{name}_delay_seconds", _seconds(new[end]) - _seconds(new[start]),
                    True, direction=direction)
    for key, metric, outcomes in (
        ("webhook_status", "callingbox_webhook_deliveries_total", ("delivered", "failed")),
        ("result_status", "callingbox_result_extractions_total", ("completed", "failed")),
    ):
        if new[key] in outcomes and (prev is None or prev[key] != new[key]):
            add(new["updated_at"], metric, status=new[key])
    if not billed and status in TERMINAL and new["reservation_status"] != "reserved":
        # Billing belongs to the terminal transition (SPEC §3): dated by the call's end, however
        # late it settles. Every terminal version here carries `ended_at`.
        billed, ended = True, new["ended_at"] or new["updated_at"]
        add(ended, "callingbox_billed_amount_milli_cents", new["billing_amount_milli_cents"] or 0,
            direction=direction)
        if new["billed_duration_seconds"] is not None:
            add(ended, "callingbox_call_billed_duration_seconds", new["billed_duration_seconds"],
                True, direction=direction)
    return events, billed


def _new_record(rng: random.Random, direction: str, created: str) -> dict:
    """A freshly queued call with realistic static fields; ~1 KB once it has ended."""
    name, business = rng.choice(_NAMES), rng.choice(_BUSINESSES)
    customer, line = f"+1{rng.randint(2012000000, 9899999999)}", rng.choice(_ORG_LINES)
    task = rng.choice(_TASKS).format(day=rng.choice(("Monday", "Wednesday", "Friday")),
                                     hour=rng.randint(8, 17), order=rng.randint(100000, 999999))
    has_returns = rng.random() < 0.5
    return {
        "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "to_number": customer if direction == "outbound" else line,
        "from_number": line if direction == "outbound" else customer,
        "status": "queued",
        "direction": direction,
        "prompt": _PROMPT.format(business=business, task=task, name=name),
        "context": {"customer_name": name, "account_id": f"acc_{rng.randint(10000, 99999)}"},
        "returns": dict(_RETURNS) if has_returns else None,
        "result": None, "result_status": None, "result_error": None,
        "language": rng.choice(_LANGUAGES),
        "webhook_url": rng.choice(_WEBHOOKS) if rng.random() < 0.7 else None,
        "webhook_status": None, "webhook_error": None,
        "created_at": created, "started_at": None, "answered_at": None, "ended_at": None,
        "duration_seconds": None, "billed_duration_seconds": None, "billing_amount_milli_cents": None,
        "reservation_status": "reserved",
        "error_code": None, "error_message": None, "hangup_cause": None,
        "metadata": {"campaign": rng.choice(("reminders-q4", "winback", "inbound-main")), "attempt": 1},
        "updated_at": created,
        # Fields of newer API versions, which a client must ignore.
        "api_version": API_VERSION, "voicemail_detected": False, "cost_breakdown": None,
    }


def _talk_seconds(rng: random.Random) -> float:
    # Most calls last a minute or two, a long tail runs into the platform's 10-minute cap.
    return min(600.0, max(5.0, rng.lognormvariate(math.log(90), 0.9)))


def _billing(direction: str, answered: bool, talk: float) -> dict:
    billed = round(talk) if answered else 0
    amount = math.ceil(billed / 60) * PRICE_PER_MINUTE[direction]
    return {
        "billed_duration_seconds": billed,
        "billing_amount_milli_cents": amount,
        "cost_breakdown": {"telephony_milli_cents": amount * 2 // 5, "ai_milli_cents": amount - amount * 2 // 5},
    }


def _result(rng: random.Random) -> dict:
    return {"confirmed": rng.random() < 0.8, "new_slot": None, "satisfaction": rng.randint(3, 5),
            "notes": rng.choice(("Confirmed, asked about parking.", "Prefers morning calls.", "All good."))}


@dataclass(order=True)
class _Step:
    due: float  # wall time
    changes: dict = field(compare=False)
    hide: float = field(default=0.0, compare=False)  # late commit: visible this long after it happens


@dataclass
class _Call:
    id: str
    steps: deque[_Step]  # the planned future, by due time; empty once the call is final
    versions: list[tuple[float, dict]] = field(default_factory=list)  # (visible_at, record)
    billed: bool = False

    @property
    def latest(self) -> dict:
        return self.versions[-1][1]

    def commit(self, record: dict, visible_at: float, now: float) -> None:
        # Visibility is monotonic: a later change never shows before an earlier one.
        if self.versions:
            visible_at = max(visible_at, self.versions[-1][0])
        self.versions.append((visible_at, record))
        self.visible(now)

    def visible(self, now: float) -> dict | None:
        """The version readers see now (None before the creation is visible)."""
        versions = self.versions
        while len(versions) > 1 and versions[1][0] <= now:
            del versions[0]  # superseded by a visible newer version: nobody can read it again
        return versions[0][1] if versions[0][0] <= now else None

    def final(self, now: float) -> bool:
        # Nothing left to happen (the plan ends terminal, settled, delivered or failed, replay
        # done) and readers can see the last version.
        return not self.steps and self.versions[-1][0] <= now


class Simulator:
    """CallingBox in a box: calls with realistic lifecycles, faults on demand, and the truth."""

    def __init__(self, *, seed: int = 0, rate: float = 2.0, max_calls: int | None = None,
                 time_scale: float = 1.0, inbound_share: float = 0.2,
                 hangup_causes: list[str] | None = None, error_codes: list[str] | None = None,
                 history: int = 0, history_age: float = 30 * 86400.0,
                 webhook_retry_base: float | None = None, replay_share: float = 0.0,
                 late_commit: float = 0.0, api_key: str | None = None,
                 chunk_size: int = 64 * 1024, outcome_weights: dict[str, float] | None = None,
                 by_id_delay: float = 0.0, conditional: bool = False):
        if by_id_delay < 0:
            raise ValueError("by_id_delay must be >= 0")
        if time_scale <= 0 or rate < 0 or chunk_size < 1 or history < 0 or late_commit < 0:
            raise ValueError("time_scale and chunk_size must be positive; rate, history, late_commit >= 0")
        if not (0 <= inbound_share <= 1 and 0 <= replay_share <= 1):
            raise ValueError("inbound_share and replay_share must lie in [0, 1]")
        self.seed, self.rate, self.max_calls, self.time_scale = seed, rate, max_calls, time_scale
        self.inbound_share, self.replay_share, self.late_commit = inbound_share, replay_share, late_commit
        self.hangup_causes, self.error_codes = hangup_causes or None, error_codes or None
        self.history, self.webhook_retry_base, self.api_key = history, webhook_retry_base, api_key
        self.chunk_size = chunk_size
        self.by_id_delay = by_id_delay  # wall seconds GET /v1/calls/{id} takes, so concurrency shows
        self.conditional = conditional  # ETag on the list, 304 to a matching If-None-Match
        self.requests: deque[tuple[float, str, int]] = deque(maxlen=100_000)  # (arrival, path, status), latest
        self._outcomes = _outcome_table(OUTCOME_WEIGHTS if outcome_weights is None else outcome_weights)
        self.stats = {"list_requests": 0, "bytes_sent": 0, "last_list_bytes": 0,
                      "client_closed_early": 0, "by_id_requests": 0,
                      "by_id_in_flight": 0, "by_id_max_in_flight": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # tests drive inject/pause/truth from another thread
        self._calls: dict[str, _Call] = {}  # insertion order = created_at order
        self._heap: list[tuple[float, int, str]] = []  # (next step due, tie-break, call id)
        self._seq = itertools.count()
        self._events: list[_Event] = []  # append-only
        self._faults: deque[tuple[str, dict]] = deque()
        self._paused = False
        self._held: dict[str, list] = {}  # call id → [held since, its heap entry was dropped]
        self._created = 0
        self._next_arrival = 0.0
        self._history_top = time.time() - history_age  # history is fixed at construction
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._guard])
        self.app.router.add_get("/v1/calls", self._list_calls)
        self.app.router.add_post("/v1/calls", self._create_call_http)
        self.app.router.add_get("/v1/calls/{call_id}", self._get_call)
        self.app.cleanup_ctx.append(self._lifecycle)

    # ---- control, from any thread -------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the API and run the call lifecycles; returns the base URL."""
        # A short shutdown_timeout: a stop must not wait for a client stuck in a "timeout" fault.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        return f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def pause(self) -> None:
        """Stop creating new calls; existing calls keep progressing."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._next_arrival = time.time()

    def set_outcome_weights(self, weights: dict[str, float]) -> None:
        """Change the mix of terminal outcomes for calls created from now on (e.g. a failure spike)."""
        table = _outcome_table(weights)
        with self._lock:
            self._outcomes = table

    def inject(self, kind: str, count: int = 1, **params: Any) -> None:
        """Make each of the next `count` list requests fail as `kind` (queued FIFO)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        with self._lock:
            self._faults.extend((kind, dict(params)) for _ in range(count))

    def delete(self, call_id: str) -> bool:
        """Remove a call: it leaves the list and answers 404 from then on."""
        with self._lock:
            self._held.pop(call_id, None)
            return self._calls.pop(call_id, None) is not None

    def hold(self, call_id: str) -> None:
        """Freeze one call as it is now: its planned steps wait for `release` (a straggler on demand)."""
        with self._lock:
            if call_id not in self._calls:
                raise KeyError(call_id)
            self._held.setdefault(call_id, [time.time(), False])

    def release(self, call_id: str) -> None:
        """Let a held call go on; its remaining steps keep their spacing, counted from now."""
        with self._lock:
            held_since, dropped = self._held.pop(call_id)
            call = self._calls[call_id]
            delay = time.time() - held_since
            for step in call.steps:
                step.due += delay
            if dropped:
                self._schedule(call)

    def tamper(self, call_id: str, **fields: Any) -> dict:
        """Change a call without bumping `updated_at`: an API that rewrites history silently.

        For the self-audit tests; the truth is not told (that is the point). Returns the record.
        """
        with self._lock:
            call = self._calls[call_id]
            visible_at, record = call.versions[-1]
            call.versions[-1] = (visible_at, {**record, **fields})
            return call.versions[-1][1]

    def insert_past(self, age: float, **fields: Any) -> str:
        """A final call that appears `age` seconds in the past, as if committed late and unannounced."""
        with self._lock:
            now = time.time()
            stamp = format_ts(now - age)
            record = {**_new_record(self._rng, "outbound", stamp), "status": "completed", "updated_at": stamp,
                      "started_at": stamp, "answered_at": stamp, "ended_at": stamp, "duration_seconds": 30,
                      "billed_duration_seconds": 30, "billing_amount_milli_cents": 5_000,
                      "reservation_status": "settled", "webhook_status": None, "result_status": None, **fields}
            self._calls[record["id"]] = _Call(record["id"], deque(), [(now - age, record)], billed=True)
            # the list is newest first by created_at: put the newcomer in its place
            self._calls = dict(sorted(self._calls.items(), key=lambda kv: _seconds(kv[1].versions[0][1]["created_at"])))
            return record["id"]

    def all_final(self) -> bool:
        """Creation is over and every call is final and visible as such."""
        with self._lock:
            now = time.time()
            creating = not self._paused and self.rate > 0 and (
                self.max_calls is None or self._created < self.max_calls)
            return not creating and all(call.final(now) for call in self._calls.values())

    def truth(self, after: float) -> Truth:
        """Everything the exporter must have counted for events dated strictly after `after`."""
        with self._lock:
            events = self._events[:]
        counters: dict = {}
        observations: dict = {}
        for date, name, labels, value, observed in itertools.chain(events, self._history_events(after)):
            if date <= after:
                continue
            if observed:
                observations.setdefault((name, labels), []).append(value)
            else:
                counters[(name, labels)] = counters.get((name, labels), 0) + value
        return Truth(counters, observations)

    # ---- lifecycles ---------------------------------------------------------------------

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        with self._lock:
            self._next_arrival = time.time()
        task = asyncio.create_task(self._run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        # One task drives every call from a heap of due steps, so thousands of live calls
        # cost one wake-up per tick, not a task each.
        while True:
            try:
                with self._lock:
                    self._advance(time.time())
            except Exception:
                log.exception("simulator step failed")
            await asyncio.sleep(TICK)

    def _advance(self, now: float) -> None:
        if self.rate > 0:
            # A stalled loop catches up at most one second of arrivals, not a burst of hours.
            self._next_arrival = max(self._next_arrival, now - 1.0)
            while not self._paused and self._next_arrival <= now and (
                    self.max_calls is None or self._created < self.max_calls):
                self._create(now)
                self._created += 1
                self._next_arrival += self._rng.expovariate(self.rate)
        while self._heap and self._heap[0][0] <= now:
            call = self._calls.get(heapq.heappop(self._heap)[2])
            if call is None:
                continue  # deleted
            if call.id in self._held:
                self._held[call.id][1] = True  # release() schedules it again
                continue
            while call.steps and call.steps[0].due <= now:
                self._apply(call, call.steps.popleft(), now)
            self._schedule(call)

    def _create(self, now: float, overrides: dict | None = None) -> _Call:
        rng = self._rng
        direction = "inbound" if rng.random() < self.inbound_share else "outbound"
        record = _new_record(rng, direction, format_ts(now))
        record.update(overrides or {})
        call = _Call(record["id"], deque(sorted(self._plan(rng, record, now))))
        self._commit(call, record, now + self._hide(rng), now)
        self._calls[call.id] = call
        self._schedule(call)
        return call

    def _apply(self, call: _Call, step: _Step, now: float) -> None:
        stamp = format_ts(now)
        changes = {k: stamp if v is NOW else v for k, v in step.changes.items()}
        self._commit(call, {**call.latest, **changes, "updated_at": stamp}, now + step.hide, now)

    def _commit(self, call: _Call, record: dict, visible_at: float, now: float) -> None:
        events, call.billed = ledger(call.latest if call.versions else None, record, call.billed)
        self._events.extend(events)
        call.commit(record, visible_at, now)

    def _schedule(self, call: _Call) -> None:
        if call.steps:
            heapq.heappush(self._heap, (call.steps[0].due, next(self._seq), call.id))

    def _hide(self, rng: random.Random) -> float:
        return self.late_commit * rng.uniform(0.5, 1.0) if self.late_commit else 0.0

    def _plan(self, rng: random.Random, record: dict, t0: float) -> list[_Step]:
        """Draw a call's whole future at creation: status path, billing, extraction, webhook."""
        steps: list[_Step] = []

        def at(t: float, **changes: Any) -> None:
            steps.append(_Step(t, changes, self._hide(rng)))

        def sim(seconds: float) -> float:  # simulated seconds → wall seconds
            return seconds / self.time_scale

        # A call's outcome is drawn at creation, so a new mix shows as calls created after it end.
        outcomes, weights = self._outcomes
        outcome = rng.choices(outcomes, weights=weights)[0]
        # Failed and canceled calls may end before the phone ever rings.
        stage = rng.choice(tuple(_FAILURES)) if outcome in ("failed", "canceled") else "ringing"
        t, ring, talk = t0, None, 0.0
        if stage != "queued":
            t += sim(rng.uniform(0.2, 1.5))
            at(t, status="initiated")
        if stage == "ringing":
            t += sim(rng.uniform(0.3, 1.5))
            at(t, status="ringing", started_at=NOW)
            ring = rng.uniform(*_RING_SECONDS.get(outcome, (1, 15)))
            t += sim(ring)
        answered = outcome == "completed"
        if answered:
            at(t, status="in_progress", answered_at=NOW)
            talk = _talk_seconds(rng)
            t += sim(talk)
        if stage != "ringing":
            t += sim(rng.uniform(0.2, 2.0))
        end = self._ending(rng, outcome, stage, answered, ring, talk, record["direction"])
        # Planned before the steps that follow it, so it stays first even at equal due times
        # (a huge time_scale); the tracks below add to its changes in place.
        steps.append(_Step(t, end, self._hide(rng)))
        settle = {"reservation_status": "settled" if answered else "released"}
        # The reservation settles in the terminal update or a few seconds later: both happen.
        if rng.random() < 0.5:
            end.update(settle)
        else:
            at(t + sim(rng.uniform(0.5, 10)), **settle)
        done = t
        if record["returns"] is not None:
            end["result_status"] = "pending"
            done = t + sim(rng.uniform(2, 20))
            if answered and rng.random() < 0.92:
                at(done, result_status="completed", result=_result(rng))
            else:
                at(done, result_status="failed",
                   result_error="extraction timed out" if answered else "no conversation to extract from")
        if record["webhook_url"] is not None:
            end["webhook_status"] = "pending"
            self._plan_webhook(rng, at, done + sim(rng.uniform(0.3, 2.0)))
        return steps

    def _ending(self, rng: random.Random, outcome: str, stage: str, answered: bool,
                ring: float | None, talk: float, direction: str) -> dict:
        """The terminal update's fields."""
        error_code = error_message = None
        if outcome == "failed":
            error_code, error_message = _FAILURES[stage]
            cause = error_code
        elif outcome == "completed":
            hangups = ("customer_hangup",) * 3 + ("agent_hangup",) * 2
            cause = "max_duration" if talk >= 600 else rng.choice(hangups)
            if rng.random() < 0.02:  # answered, yet the platform reports a degraded call
                error_code, error_message = "audio_degraded", "packet loss above 5% during the call"
        elif outcome == "no_answer" and rng.random() < 0.35:
            cause = "voicemail"
        else:
            cause = _CAUSES[outcome]
        if self.hangup_causes:
            cause = rng.choice(self.hangup_causes)
        if error_code is not None and self.error_codes:
            error_code = rng.choice(self.error_codes)
        return {
            "status": outcome, "ended_at": NOW, "hangup_cause": cause,
            "duration_seconds": None if ring is None else round(ring + talk),
            "error_code": error_code, "error_message": error_message,
            "voicemail_detected": cause == "voicemail",
            **_billing(direction, answered, talk),
        }

    def _plan_webhook(self, rng: random.Random, at: Any, t: float) -> None:
        first_retry = (WEBHOOK_FIRST_RETRY / self.time_scale if self.webhook_retry_base is None
                       else self.webhook_retry_base)
        # 10 % of endpoints stay down through every attempt; most others answer the first one.
        if rng.random() < 0.10:
            failures = WEBHOOK_ATTEMPTS
        else:
            failures = 0 if rng.random() < 0.85 else rng.randint(1, 3)
        for attempt in range(1, failures + 1):
            error = rng.choice(_WEBHOOK_ERRORS)
            if attempt == WEBHOOK_ATTEMPTS:
                at(t, webhook_status="failed", webhook_error=f"giving up after {attempt} attempts: {error}")
            else:
                at(t, webhook_error=f"attempt {attempt}/{WEBHOOK_ATTEMPTS} failed: {error}")
                t += first_retry * 2 ** (attempt - 1) * rng.uniform(0.8, 1.2)
        if failures < WEBHOOK_ATTEMPTS:
            at(t, webhook_status="delivered", webhook_error=None)
        if rng.random() < self.replay_share:  # an operator replays the delivery by hand
            # Both the first outcome and the replay's pending last long enough (>= 2 s wall,
            # late commits included) for a poller to see each, so each outcome is countable.
            t += max(2.0, rng.uniform(20, 180) / self.time_scale) + self.late_commit
            at(t, webhook_status="pending", webhook_error=None)
            t += max(2.0, rng.uniform(5, 60) / self.time_scale) + self.late_commit
            ok = rng.random() < 0.85
            at(t, webhook_status="delivered" if ok else "failed",
               webhook_error=None if ok else "replay failed: HTTP 410")

    # ---- history: old, final calls generated on the fly --------------------------------

    def _history_record(self, i: int) -> dict:
        rng = random.Random(f"{self.seed}:history:{i}")
        created = self._history_top - i * HISTORY_SPACING - rng.uniform(0, HISTORY_SPACING * 0.75)
        direction = "inbound" if rng.random() < self.inbound_share else "outbound"
        record = _new_record(rng, direction, format_ts(created))
        started = created + rng.uniform(0.5, 3)
        answered = started + rng.uniform(2, 20)
        talk = _talk_seconds(rng)
        ended = answered + talk
        cause = rng.choice(self.hangup_causes or ("customer_hangup", "agent_hangup"))
        record.update(status="completed", started_at=format_ts(started), answered_at=format_ts(answered),
                      ended_at=format_ts(ended), duration_seconds=round(ended - started), hangup_cause=cause,
                      reservation_status="settled", updated_at=format_ts(ended + rng.uniform(5, 60)),
                      **_billing(direction, True, talk))
        if record["returns"] is not None:
            record.update(result_status="completed", result=_result(rng))
        if record["webhook_url"] is not None:
            record["webhook_status"] = "delivered"
        return record

    def _history_events(self, after: float) -> Iterator[_Event]:
        for i in range(self.history):
            if self._history_top - i * HISTORY_SPACING + HISTORY_LIFETIME <= after:
                return  # this and every older history call happened entirely before `after`
            yield from ledger(None, self._history_record(i), False)[0]

    # ---- HTTP ---------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        arrived = time.time()
        response = await self._answer(request, handler)
        with self._lock:
            self.requests.append((arrived, request.path, response.status))  # what an API budget test reads
        return response

    async def _answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.api_key is not None:
            expected = f"Bearer {self.api_key}".encode()
            if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
                return _error(401, "invalid api key")
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405: answer in the API's format
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason.lower())

    async def _get_call(self, request: web.Request) -> web.Response:
        call_id = request.match_info["call_id"]
        with self._lock:
            self.stats["by_id_requests"] += 1
            self.stats["by_id_in_flight"] += 1
            self.stats["by_id_max_in_flight"] = max(self.stats["by_id_max_in_flight"], self.stats["by_id_in_flight"])
        try:
            if self.by_id_delay:
                await asyncio.sleep(self.by_id_delay)
            with self._lock:
                call = self._calls.get(call_id)
                record = call.visible(time.time()) if call else None
        finally:
            with self._lock:
                self.stats["by_id_in_flight"] -= 1
        if record is None:
            return _error(404, f"call {call_id} not found")
        return web.json_response(record)

    async def _create_call_http(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body must be a JSON object")
        if not isinstance(body, dict) or not isinstance(body.get("to_number"), str) or not body["to_number"]:
            return _error(400, "to_number is required")
        # No webhook and no extraction unless asked for, as with the real API.
        overrides = {"direction": "outbound", "webhook_url": body.get("webhook_url"),
                     "returns": body.get("returns")}
        for key in ("to_number", "from_number", "prompt", "language", "context", "metadata"):
            if key in body:
                overrides[key] = body[key]
        with self._lock:
            call = self._create(time.time(), overrides)
        return web.json_response(call.latest, status=201)

    async def _list_calls(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.stats["list_requests"] += 1
            kind, params = self._faults.popleft() if self._faults else (None, {})
        if kind == "status":
            return _error(int(params.get("code", 503)), "upstream unavailable")
        if kind == "429":  # retry_after: seconds, an HTTP date as a string, or None for no header
            retry_after = params.get("retry_after", 1)
            headers = {} if retry_after is None else {
                "Retry-After": retry_after if isinstance(retry_after, str) else f"{retry_after:g}"}
            return _error(429, "rate limit exceeded", headers)
        if kind == "unauthorized":
            return _error(401, "invalid api key")
        if kind == "non_json":
            return web.Response(text="<html>upstream error</html>", content_type="text/html")
        if kind == "reset":
            return _drop_connection(request)
        if kind == "timeout":
            await _stall(request, params.get("delay", 5.0))
        with self._lock:
            now = time.time()
            live = [r for r in (c.visible(now) for c in reversed(self._calls.values())) if r is not None]
        headers = {}
        if self.conditional and kind is None:
            # The list's version: it changes whenever a visible record does (or one appears or goes).
            tag = hashlib.sha256(repr([(r["id"], r["updated_at"]) for r in live]).encode()).hexdigest()[:16]
            headers["ETag"] = f'"{tag}-{self.history}"'
            if request.headers.get("If-None-Match") == headers["ETag"]:
                return web.Response(status=304, headers=headers)
        items = self._items(live, kind, params)
        if kind == "truncate":
            items = itertools.islice(items, (len(live) + self.history) // 2)
        return await self._stream(request, items, complete=kind != "truncate", headers=headers)

    def _items(self, live: list[dict], kind: str | None, params: dict) -> Iterator[bytes]:
        """Each array element as JSON, with any injected malformed or duplicate records."""
        records = itertools.chain(live, map(self._history_record, range(self.history)))
        n = int(params.get("n", 5 if kind == "malformed" else 10)) if kind in ("malformed", "duplicates") else 0
        span = len(live) or self.history  # damage the live calls, or the history if there are none
        picks = [j * span // n for j in range(n)]
        bad: dict[int, list[bytes]] = {}  # record index → malformed elements to put before it
        if kind == "malformed":
            rng = random.Random(f"{self.seed}:malformed:{self.stats['list_requests']}")
            template = live[0] if live else self._history_record(0) if self.history else None
            for j, i in enumerate(picks):
                bad.setdefault(i, []).append(_malformed(j, template, rng))
        doubled = set(picks) if kind == "duplicates" else set()
        for i, record in enumerate(records):
            yield from bad.pop(i, ())
            item = _dumps(record)
            yield item
            if i in doubled:
                yield item
        for rest in bad.values():  # more picks than records
            yield from rest

    async def _stream(self, request: web.Request, items: Iterator[bytes], complete: bool,
                      headers: dict | None = None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", **(headers or {})})
        sent = 0
        try:
            await response.prepare(request)
            for chunk in _chunks(items, self.chunk_size, complete):
                await response.write(chunk)
                sent += len(chunk)
                await asyncio.sleep(0)  # in --demo the exporter shares this loop: let it run
            if complete:
                await response.write_eof()
            elif request.transport is not None:
                # Flush what was written, then close without the final chunk: a truncated body.
                request.transport.close()
        except ConnectionError:
            self.stats["client_closed_early"] += 1  # e.g. the exporter stopped at its settle window
        finally:
            self.stats["bytes_sent"] += sent
            self.stats["last_list_bytes"] = sent
        return response  # aiohttp notices a dead connection and drops the rest quietly


def _chunks(items: Iterator[bytes], size: int, complete: bool) -> Iterator[bytes]:
    """Join array elements into a JSON array, cut into pieces of about `size` bytes."""
    buffer, length = [b"["], 1
    for n, item in enumerate(items):
        if n:
            buffer.append(b",")
        buffer.append(item)
        length += len(item) + 1
        if length >= size:
            yield b"".join(buffer)
            buffer, length = [], 0
    if complete:
        buffer.append(b"]")
    if buffer:
        yield b"".join(buffer)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _malformed(j: int, template: dict | None, rng: random.Random) -> bytes:
    """One broken array element; never a call, so never in the truth."""
    kind = j % 7
    if kind == 0:
        return b'"call record unavailable"'
    if kind == 1 or template is None:
        return b"42"
    record = dict(template, id=str(uuid.UUID(int=rng.getrandbits(128), version=4)))
    if kind == 2:
        del record["id"]
    elif kind == 3:
        record["status"] = 3
    elif kind == 4:
        record["status"] = "on_hold"
    elif kind == 5:
        record["created_at"] = "yesterday at noon"
    else:
        record["duration_seconds"] = "95"
    return _dumps(record)


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def _stall(request: web.Request, delay: float) -> None:
    """Hold the answer for `delay` seconds, or until the client gives up waiting."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(min(0.05, delay))


def _drop_connection(request: web.Request) -> web.Response:
    """Answer nothing: reset the TCP connection, as a crashing load balancer would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes the close a TCP RST, so the client reads "connection reset".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response()  # never sent: aiohttp finds the connection gone and drops it quietly


@contextlib.contextmanager
def serve_in_thread(sim: Simulator, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `sim` on its own event loop in a daemon thread; yields the base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="callingbox-simulator", daemon=True)
    thread.start()
    try:
        url = asyncio.run_coroutine_threadsafe(sim.start(host, port), loop).result(timeout=10)
        try:
            yield url
        finally:
            asyncio.run_coroutine_threadsafe(_shutdown(sim), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


async def _shutdown(sim: Simulator) -> None:
    await sim.stop()
    # Handlers of clients that already left are not the server's to wait for: end them, so
    # the loop closes without "Task was destroyed but it is pending".
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
