"""When an open call past the list read is next worth asking by id: by what it waits for (SPEC §1, §4).

Pure: `turn(state, last_asked, now, settings, spread)` is the time the call's next by-id turn
comes. A call that can change any moment (active, an extraction pending, a replayed webhook)
is asked every little while; a webhook being retried only when its next attempt can come, by
CallingBox's schedule; a call that waits for nothing predictable (a late settlement, an attempt
later than the schedule allows) less often the longer it has been quiet.
"""

from __future__ import annotations

from .accounting import CAUSE, SETTLED_RESULTS, CallState
from .settings import Settings

# CallingBox retries a failed delivery 8 times, each gap double the last, the 8th attempt about
# 42 h after the first, every gap ±20 % (SPEC §1): attempt k comes (2^(k-1) - 1) first gaps
# after the first, within ±20 %, and the gap after it is 2^(k-1) first gaps, ±20 %.
WEBHOOK_ATTEMPTS = 8
WEBHOOK_SPAN = 42 * 3600.0
FIRST_GAP = WEBHOOK_SPAN / (2 ** (WEBHOOK_ATTEMPTS - 1) - 1)  # ~19.8 min
JITTER = 0.2
# The first attempt follows the end (and the extraction) by seconds; allow this much besides.
FIRST_ATTEMPT_SLACK = 300.0
# A call quiet for a while is asked every tenth of its quiet time, between poll_interval and
# QUIET_CAP × open_refresh_interval: the bound on how late one of its changes is counted.
QUIET_SHARE = 10.0
AGE_SHARE = 20.0  # a call in flight: every twentieth of its age, at most open_refresh_interval
QUIET_CAP = 4.0


def in_flight(state: CallState, now: float) -> bool:
    """Whether a call can change any moment: not ended, an extraction pending, or ended so lately
    that its settlement, extraction and first delivery attempt may still come. An ordinary list
    read reaches the oldest of these (plan.py); the others are asked by id when their turn comes."""
    if state.active or state.result not in SETTLED_RESULTS:
        return True
    return state.ended is not None and now - state.ended <= FIRST_ATTEMPT_SLACK


def attempt_window(
    pending_since: float, updated_at: float, seen_at: float = float("-inf")
) -> tuple[float, float] | None:
    """When the next delivery attempt of a webhook `pending` since `pending_since`, last changed
    at `updated_at` (each failed attempt bumps it) as read at `seen_at`, can come: (earliest,
    latest). None when no attempt of the schedule fits `updated_at`: then the schedule cannot say."""
    waited = updated_at - pending_since
    if waited <= FIRST_ATTEMPT_SLACK:
        if seen_at < pending_since + FIRST_ATTEMPT_SLACK:  # the first attempt may not have come yet
            return updated_at, updated_at + FIRST_ATTEMPT_SLACK + (1 + JITTER) * FIRST_GAP
        # Still pending once the first attempt must have come: it came, failed, and bumped `updated_at`.
        return updated_at + (1 - JITTER) * FIRST_GAP, updated_at + FIRST_ATTEMPT_SLACK + (1 + JITTER) * FIRST_GAP
    fits = [
        k
        for k in range(2, WEBHOOK_ATTEMPTS)  # the 8th attempt is the last: `failed` or `delivered`
        if (1 - JITTER) * _offset(k) <= waited <= (1 + JITTER) * _offset(k) + FIRST_ATTEMPT_SLACK
    ]
    if not fits:
        return None
    return updated_at + (1 - JITTER) * _gap(fits[0]), updated_at + (1 + JITTER) * _gap(fits[-1])


def _offset(k: int) -> float:
    """Attempt k's nominal time after the first."""
    return (2 ** (k - 1) - 1) * FIRST_GAP


def _gap(k: int) -> float:
    """The nominal gap between attempt k and the next."""
    return 2 ** (k - 1) * FIRST_GAP


def turn(state: CallState, last_asked: float, now: float, s: Settings, spread: float = 1.0) -> float:
    """When the open call `state`, last asked by id at `last_asked` (-inf: never), is next due.

    `spread` (0.5 to 1) shortens every interval a little by call, so calls asked together do not
    stay in step. By what the call waits for:
    - active, or an extraction pending: every twentieth of its age, between `poll_interval` and
      `open_refresh_interval` (a long call, a slow extraction);
    - anything else (a settlement, a webhook delivery, a replay's outcome): every tenth of the
      time since the call last changed, between `poll_interval` and QUIET_CAP ×
      `open_refresh_interval`; and a webhook that CallingBox retries by its schedule, with
      nothing else open, not before its next attempt can come.
    That interval is the bound on how late a change is counted (plus a poll, and the polls it
    takes to ask a backlog larger than `straggler_batch`).
    """
    if state.active or state.result not in SETTLED_RESULTS:
        every = min(s.refresh_interval, max(s.poll_interval, (now - state.created_at) / AGE_SHARE))
        return last_asked + every * spread
    quiet = min(QUIET_CAP * s.refresh_interval, max(s.poll_interval, (now - state.updated_at) / QUIET_SHARE))
    due = last_asked + quiet * spread
    since = state.webhook_pending_since
    if state.webhook == "pending" and since is not None and state.billed and not state.todo & CAUSE:
        window = attempt_window(since, state.updated_at, last_asked)
        if window is not None:
            return max(window[0], due)
    return due
