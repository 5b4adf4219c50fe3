"""`callingbox-exporter explain CALL_ID`: one call as the API shows it now, and what was counted of it.

The API half is `GET /v1/calls/{id}` without phone numbers, prompt or context. The exporter half
is read from the target's state file, never written: the call's ledger entry, the baseline and
the watermark, and what they mean for each counter. Family names and outcome sets come from the
catalogue, what a call is and still waits for from accounting and ledger. The formatting
functions are pure; `run` does the two reads, `main` is what the command line calls.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple, TextIO
from urllib.parse import urlsplit

import aiohttp

from . import state
from .accounting import CAUSE, CallState
from .api import ApiError, Client, NotFound
from .catalogue import (
    BILLED_DOLLARS,
    CALLS_CREATED,
    CALLS_ENDED,
    EXTRACTIONS,
    MILLI_CENTS_PER_DOLLAR,
    OUTCOMES,
    RESULT_EXTRACTIONS,
    VANISHED_CALLS,
    WEBHOOK_DELIVERIES,
)
from .config import Config, Target
from .ledger import Ledger, give_up_age
from .records import Invalid, Record, decode_record

WITHHELD = ("to_number", "from_number", "prompt", "context")
FREE_FORM = ("metadata", "result")  # the customer's own data: numbers in it may be phone numbers too
MAX_VALUE_CHARS = 200
PHONE = "<phone number withheld>"

# Seven digits or more, possibly with + ( ) . - and spaces, not inside a word, uuid or timestamp.
_PHONE_LIKE = re.compile(r"(?<![\w+-])\+?\(?\d[\d ().-]{5,}\d(?![\w-])")
_NOT_PHONES = re.compile(r"\d{4}-\d\d-\d\d|[\d-]{36}")  # a date; a uuid made of digits only


def redact(text: str) -> str:
    """`text` with everything that looks like a phone number replaced."""

    def hide(match: re.Match) -> str:
        found = match.group()
        if sum(c.isdigit() for c in found) < 7 or _NOT_PHONES.fullmatch(found):
            return found
        return PHONE

    return _PHONE_LIKE.sub(hide, text)


def _clip(text: str) -> str:
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _origin(url: str) -> str:
    """A webhook URL's scheme and host: its path or query may hold a token."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        host = None
    if not host:
        return "(withheld)"
    more = parts.path not in ("", "/") or parts.query
    return f"{parts.scheme}://{host}{port}" + ("/… (path withheld)" if more else "")


def _shown(name: str, value: Any, free_form: bool) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return redact(json.dumps(value)) if free_form else json.dumps(value)
    if isinstance(value, str):
        return _origin(value) if name == "webhook_url" else _clip(redact(value))
    return _clip(redact(json.dumps(value, ensure_ascii=False)))


def _field_lines(name: str, value: Any, free_form: bool) -> list[str]:
    if isinstance(value, dict) and value:
        lines = []
        for key, inner in value.items():
            lines.extend(_field_lines(f"{name}.{_clip(redact(str(key)))}", inner, free_form))
        return lines
    return [f"{name}: {_shown(name, value, free_form)}"]


def api_lines(call: dict) -> list[str]:
    """The call object, one field a line (nested objects as `metadata.campaign`), private fields left out."""
    lines: list[str] = []
    for key, value in call.items():
        if key not in WITHHELD:
            lines.extend(_field_lines(_clip(redact(str(key))), value, key in FREE_FORM))
    withheld = [key for key in WITHHELD if key in call]
    if withheld:
        lines.append(f"withheld: {', '.join(withheld)}, and any value that looks like a phone number")
    return lines


def ts(t: float | None) -> str:
    if t is None:
        return "none"
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _when(lo: float, hi: float, baseline: float) -> str:
    """Whether an event dated somewhere in [lo, hi] was counted, given the baseline."""
    if lo > baseline:
        return "counted"
    if hi <= baseline:
        return f"not counted: at or before the baseline {ts(baseline)}"
    return f"counted only if it happened after the baseline {ts(baseline)} (the state does not say when)"


class Held(NamedTuple):
    """What the state file says, or why there is nothing to say."""

    ledger: Ledger | None
    saved_at: float | None
    source: str  # the path, or why there is no state


def _money(milli_cents: int | None) -> str:
    if milli_cents is None:
        return "amount not kept in this state file"
    dollars = Decimal(milli_cents) / MILLI_CENTS_PER_DOLLAR  # exact, as the counter sums it
    whole_cents = milli_cents % (MILLI_CENTS_PER_DOLLAR // 100) == 0
    shown = f"{dollars:,.2f}" if whole_cents else f"{dollars:,.5f}".rstrip("0")
    return f"{milli_cents} milli-cents (${shown})"


def tracked_lines(
    call: CallState, ledger: Ledger, record: Record | None, saved_at: float | None, target: Target
) -> list[str]:
    """What the ledger entry of a tracked call means for each counter."""
    base, d = ledger.baseline, call.direction
    span = (call.created_at, call.updated_at)  # an event seen by the exporter lies in here
    lines = [
        "ledger: tracked",
        f"seen status: {call.status}",
        f"seen updated_at: {ts(call.updated_at)}",
        f"seen direction: {d}",
    ]
    labels = [label for _, label in target.metadata_labels]
    if labels and call.extra:
        shown = ", ".join(f"{label}={value or 'none'}" for label, value in zip(labels, call.extra))
        lines.append(f"seen metadata labels: {shown}")
    lines.append(
        f"created {ts(call.created_at)}: {_when(call.created_at, call.created_at, base)}"
        f" in {CALLS_CREATED}{_labels(direction=d)}"
    )
    if call.active:
        lines.append("ended: not yet (still active when last seen)")
    else:
        ended = call.ended if call.ended is not None else (record.ended_at if record is not None else None)
        when = _when(ended, ended, base) if ended is not None else _when(*span, base)
        series = _labels(direction=d, status=call.status)
        lines.append(
            f"ended as {call.status}: {when} in {CALLS_ENDED}{series} (with its hangup, error and duration series)"
        )
        if call.todo & CAUSE:
            lines.append(
                f"hangup_cause: not told yet; counted when a version tells it, or as none once nothing"
                f" else is open and end_grace ({target.end_grace:g}s) has passed since the end"
            )
        elif record is not None:
            lines.append(f"hangup_cause label: {record.hangup_cause or 'none'} (other if past max_label_values)")
    if call.billed:  # only a terminal call is billed; its money counts when its end does (SPEC §3)
        lines.append(f"billed {_money(call.amount)}: {when} in {BILLED_DOLLARS}{_labels(direction=d)}")
    elif call.active:
        lines.append("billed: not yet (the call has not ended)")
    else:
        lines.append("billed: not yet (still reserved, or settled without its amount, when last seen)")
    lines.append(_outcome_line("webhook", call.webhook, OUTCOMES, WEBHOOK_DELIVERIES, span, base))
    if call.webhook == "pending":
        lines.append(f"webhook pending since: {ts(call.webhook_pending_since)}")
    lines.append(_outcome_line("extraction", call.result, EXTRACTIONS, RESULT_EXTRACTIONS, span, base))
    lines.extend(_fate(call, saved_at, target))
    if record is not None and record.updated_at > call.updated_at:
        lines.append(
            f"news: the API's version (updated_at {ts(record.updated_at)}) is newer than the exporter's;"
            " it is counted at the next poll"
        )
    return lines


def _outcome_line(
    what: str, seen: str | None, outcomes: tuple[str, ...], family: str, span: tuple[float, float], base: float
) -> str:
    if seen is None:
        return f"{what}: none seen"
    if seen in outcomes:
        return f"{what} {seen} (last outcome seen): {_when(*span, base)} in {family}{_labels(status=seen)}"
    return f"{what}: {seen}, not counted until it is {' or '.join(outcomes)}"


def _fate(call: CallState, saved_at: float | None, target: Target) -> list[str]:
    if call.final:
        return ["final: yes, nothing more expected; it leaves the ledger once created before the settle window"]
    lines = ["final: no, still expected to change"]
    if saved_at is not None and call.created_at < saved_at - target.settle_window:
        give_up = call.created_at + give_up_age(target.settle_window, target.straggler_give_up)
        lines.append(
            f"straggler: yes, past the settle window; refreshed by id each poll until final, given up at {ts(give_up)}"
        )
    return lines


def untracked_lines(record: Record | None, ledger: Ledger, saved_at: float | None, target: Target) -> list[str]:
    """Why a call is not in the ledger, as far as can be told."""
    if record is None:
        return ["ledger: unknown (not in the ledger, and the API does not know it either)"]
    horizon = None if saved_at is None else saved_at - target.settle_window
    created = _when(record.created_at, record.created_at, ledger.baseline)
    if horizon is not None and record.created_at < horizon:
        return [
            f"ledger: not tracked: created before the settle window at the last save ({ts(horizon)});"
            " dropped once final (or given up, or vanished)",
            f"created {ts(record.created_at)}: {created}; its later events were counted while it was tracked,"
            " if they happened after the baseline",
        ]
    if ledger.watermark is None or record.created_at > ledger.watermark:
        return ["ledger: unknown: not read yet (created after the exporter's last poll)"]
    return ["ledger: unknown: inside the settle window but not tracked (is this the right target and state file?)"]


def explain(call_id: str, target: Target, call: dict | None, api_problem: str | None, held: Held) -> str:
    """The whole answer as text, one fact a line."""
    lines = [f"call: {_clip(redact(call_id))}", f"target: {target.name}", "", "API now (GET /v1/calls/{id}):"]
    record: Record | None = None
    if call is not None:
        lines.extend(api_lines(call))
        decoded = decode_record(call, tuple(key for key, _ in target.metadata_labels))
        if type(decoded) is Invalid:
            lines.append(f"record: invalid ({decoded.reason}): the exporter skips it")
        else:
            record = decoded
    else:
        lines.append(api_problem or "no answer")
    lines += ["", "exporter state:"]
    ledger = held.ledger
    if ledger is None:
        lines.append(held.source)
        return "\n".join(lines) + "\n"
    lines += [
        f"state file: {held.source}",
        f"saved at: {ts(held.saved_at)}",
        f"baseline: {ts(ledger.baseline)} (events at or before it are not counted)",
        f"watermark: {ts(ledger.watermark)} (newest updated_at read from the list)",
        f"tracked calls: {len(ledger.calls)}",
    ]
    tracked = ledger.calls.get(call_id)
    if tracked is not None:
        lines.extend(tracked_lines(tracked, ledger, record, held.saved_at, target))
        if call is None and api_problem and api_problem.startswith("not found"):
            lines.append(
                "not found by id: if the next list read that covers its creation lacks it too, it is"
                f" counted in {VANISHED_CALLS} and forgotten (a 404 alone may be"
                " a by-id read lagging the list)"
            )
    else:
        lines.extend(untracked_lines(record, ledger, held.saved_at, target))
    return "\n".join(lines) + "\n"


def read_state(target: Target) -> Held:
    """The target's saved ledger, read only: a file that cannot be used is reported, never moved,
    changed or migrated (an unmigrated JSON file is read as it is)."""
    path = target.state_file
    if not path:
        return Held(None, None, f"none: target {target.name} has no state_file (a running exporter keeps it in memory)")
    labels = tuple(label for _, label in target.metadata_labels)
    try:
        restored = state.read(path, dict(target.buckets), target.max_label_values, labels)
    except state.StateError as error:
        return Held(None, None, f"unreadable: {error}")
    if restored is None:
        return Held(None, None, f"none: {path} does not exist yet (no poll saved)")
    return Held(restored.ledger, restored.saved_at, path)


async def run(target: Target, call_id: str, out: TextIO) -> int:
    """Ask the API, read the state, print. 0 when the API knows the call, else 1."""
    call, problem = None, None
    async with aiohttp.ClientSession() as session:
        client = Client(session, target.api_url, target.api_key, target.request_timeout)
        try:
            call = await client.get_call(call_id)
        except NotFound:
            problem = "not found: the API does not know this call id (404)"
        except ApiError as error:
            problem = f"request failed: {error}"
    text = explain(call_id, target, call, problem, await asyncio.to_thread(read_state, target))
    if target.api_key is not None and target.api_key.reveal():
        text = text.replace(target.api_key.reveal(), "***")
    out.write(text)
    return 0 if call is not None else 1


def main(cfg: Config, call_id: str, target_name: str | None) -> int:
    """`explain CALL_ID [--target NAME]`; exit 2 when the target cannot be chosen."""
    names = [t.name for t in cfg.targets]
    if cfg.demo:
        print("callingbox-exporter: explain needs a real API and key, not --demo", file=sys.stderr)
        return 2
    if target_name is None and len(names) > 1:
        print(
            f"callingbox-exporter: config error: target: several targets ({', '.join(names)}):"
            " choose one with --target",
            file=sys.stderr,
        )
        return 2
    chosen = [t for t in cfg.targets if target_name is None or t.name == target_name]
    if not chosen:
        print(
            f"callingbox-exporter: config error: target: {target_name!r} is not one of {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(run(chosen[0], call_id, sys.stdout))
