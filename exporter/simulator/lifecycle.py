"""How a simulated call's future is drawn: realistic records, status paths, billing, extraction,
webhook retries, and the synthetic history. Near the bottom of the simulator package: stdlib and
the steps of call.py only; `truth.py` counts what these lifecycles do, `player.py` plays them and
`app.py` owns the clock.
"""

from __future__ import annotations

import functools
import math
import random
import time
import uuid
from datetime import datetime
from typing import Any

from .call import _Step

TERMINAL = frozenset({"completed", "no_answer", "busy", "canceled", "failed"})
OUTCOME_WEIGHTS = {"completed": 55, "no_answer": 18, "busy": 8, "failed": 10, "canceled": 9}
PRICE_PER_MINUTE = {"outbound": 9000, "inbound": 6000}  # milli-cents, billed per started minute
API_VERSION = "2026-10-01"
# CallingBox retries a failing webhook 8 times with doubling delays, the last attempt about
# 42 h after the first: 127 first-retry delays in all. `failed` is final only after that.
WEBHOOK_ATTEMPTS = 8
WEBHOOK_FIRST_RETRY = 42 * 3600 / (2 ** (WEBHOOK_ATTEMPTS - 1) - 1)
# Wall seconds each outcome of a hand replay lasts at least: a few polls of a 1 s poller on a
# loaded 2-core machine (a poll there can take over 2 s), so that each outcome can be counted.
REPLAY_VISIBLE = 5.0
HISTORY_SPACING = 4.0  # wall seconds between synthetic history calls
HISTORY_LIFETIME = 3600.0  # no history call changes more than this after its creation
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
        raise ValueError(f"outcome weights for unknown statuses {sorted(unknown)}; expected some of {sorted(TERMINAL)}")
    if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError("outcome weights must be >= 0 with a positive sum")
    return list(weights), [float(w) for w in weights.values()]


def format_ts(t: float) -> str:
    """Unix seconds → RFC 3339 UTC with milliseconds, as CallingBox writes timestamps."""
    ms = int(t * 1000)  # floor, so a timestamp never lies after the moment it was taken
    return _whole_second(ms // 1000) + f".{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=1024)  # a call's changes, and calls at a high rate, share seconds
def _whole_second(s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))


@functools.lru_cache(maxsize=4096)  # the truth dates every end detail by the same `ended_at`
def _seconds(ts: str) -> float:
    # Parse exactly as the exporter does (datetime.timestamp), so truth matches to the last bit.
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _new_record(rng: random.Random, direction: str, created: str, campaigns: list[str] | None = None) -> dict:
    """A freshly queued call with realistic static fields; ~1 KB once it has ended."""
    name, business = rng.choice(_NAMES), rng.choice(_BUSINESSES)
    customer, line = f"+1{rng.randint(2012000000, 9899999999)}", rng.choice(_ORG_LINES)
    task = rng.choice(_TASKS).format(
        day=rng.choice(("Monday", "Wednesday", "Friday")), hour=rng.randint(8, 17), order=rng.randint(100000, 999999)
    )
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
        "result": None,
        "result_status": None,
        "result_error": None,
        "language": rng.choice(_LANGUAGES),
        "webhook_url": rng.choice(_WEBHOOKS) if rng.random() < 0.7 else None,
        "webhook_status": None,
        "webhook_error": None,
        "created_at": created,
        "started_at": None,
        "answered_at": None,
        "ended_at": None,
        "duration_seconds": None,
        "billed_duration_seconds": None,
        "billing_amount_milli_cents": None,
        "reservation_status": "reserved",
        "error_code": None,
        "error_message": None,
        "hangup_cause": None,
        "metadata": {"campaign": rng.choice(campaigns or ("reminders-q4", "winback", "inbound-main")), "attempt": 1},
        "updated_at": created,
        # Fields of newer API versions, which a client must ignore.
        "api_version": API_VERSION,
        "voicemail_detected": False,
        "cost_breakdown": None,
    }


def _final_record(rng: random.Random, stamp: str) -> dict:
    """An outbound call that was queued, answered, ended and settled all at `stamp`."""
    return {
        **_new_record(rng, "outbound", stamp),
        "status": "completed",
        "updated_at": stamp,
        "started_at": stamp,
        "answered_at": stamp,
        "ended_at": stamp,
        "duration_seconds": 30,
        "billed_duration_seconds": 30,
        "billing_amount_milli_cents": 5_000,
        "reservation_status": "settled",
        "webhook_status": None,
        "result_status": None,
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
    return {
        "confirmed": rng.random() < 0.8,
        "new_slot": None,
        "satisfaction": rng.randint(3, 5),
        "notes": rng.choice(("Confirmed, asked about parking.", "Prefers morning calls.", "All good.")),
    }


class Lifecycles:
    """The planning half of `Simulator` (app.py), mixed into it: draws each call's steps and the
    history records from the settings `Simulator.__init__` stores."""

    seed: int
    time_scale: float
    inbound_share: float
    replay_share: float
    late_commit: float
    hangup_causes: list[str] | None
    error_codes: list[str] | None
    webhook_retry_base: float | None
    _outcomes: tuple[list[str], list[float]]
    _history_top: float
    history_spacing: float

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
                at(
                    done,
                    result_status="failed",
                    result_error="extraction timed out" if answered else "no conversation to extract from",
                )
        if record["webhook_url"] is not None:
            end["webhook_status"] = "pending"
            self._plan_webhook(rng, at, done + sim(rng.uniform(0.3, 2.0)))
        return steps

    def _ending(
        self,
        rng: random.Random,
        outcome: str,
        stage: str,
        answered: bool,
        ring: float | None,
        talk: float,
        direction: str,
    ) -> dict:
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
            "status": outcome,
            "ended_at": NOW,
            "hangup_cause": cause,
            "duration_seconds": None if ring is None else round(ring + talk),
            "error_code": error_code,
            "error_message": error_message,
            "voicemail_detected": cause == "voicemail",
            **_billing(direction, answered, talk),
        }

    def _plan_webhook(self, rng: random.Random, at: Any, t: float) -> None:
        first_retry = (
            WEBHOOK_FIRST_RETRY / self.time_scale if self.webhook_retry_base is None else self.webhook_retry_base
        )
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
            # Both the first outcome and the replay's pending last long enough (REPLAY_VISIBLE,
            # late commits included) for a poller to see each, so each outcome is countable.
            t += max(REPLAY_VISIBLE, rng.uniform(20, 180) / self.time_scale) + self.late_commit
            at(t, webhook_status="pending", webhook_error=None)
            t += max(REPLAY_VISIBLE, rng.uniform(5, 60) / self.time_scale) + self.late_commit
            ok = rng.random() < 0.85
            at(
                t,
                webhook_status="delivered" if ok else "failed",
                webhook_error=None if ok else "replay failed: HTTP 410",
            )

    # ---- history: old, final calls generated on the fly --------------------------------

    def _history_record(self, i: int) -> dict:
        rng = random.Random(f"{self.seed}:history:{i}")
        spacing = self.history_spacing
        created = self._history_top - i * spacing - rng.uniform(0, spacing * 0.75)
        direction = "inbound" if rng.random() < self.inbound_share else "outbound"
        record = _new_record(rng, direction, format_ts(created))
        started = created + rng.uniform(0.5, 3)
        answered = started + rng.uniform(2, 20)
        talk = _talk_seconds(rng)
        ended = answered + talk
        cause = rng.choice(self.hangup_causes or ("customer_hangup", "agent_hangup"))
        record.update(
            status="completed",
            started_at=format_ts(started),
            answered_at=format_ts(answered),
            ended_at=format_ts(ended),
            duration_seconds=round(ended - started),
            hangup_cause=cause,
            reservation_status="settled",
            updated_at=format_ts(ended + rng.uniform(5, 60)),
            **_billing(direction, True, talk),
        )
        if record["returns"] is not None:
            record.update(result_status="completed", result=_result(rng))
        if record["webhook_url"] is not None:
            record["webhook_status"] = "delivered"
        return record
