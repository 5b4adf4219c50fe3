"""An open call's by-id turn comes by what it waits for: a webhook only when its next attempt can
come, a quiet call less often the longer it has been quiet, and no change is counted later than
the documented bound."""

from __future__ import annotations

import random

import pytest

from exporter.accounting import DURATION, ERROR, CallState
from exporter.settings import Settings
from exporter.waits import FIRST_GAP, QUIET_CAP, QUIET_SHARE, WEBHOOK_ATTEMPTS, attempt_window, turn

S = Settings(settle_window=72 * 3600.0, overlap=120.0, give_up_after=7 * 86400.0)  # defaults: 15 s polls, 5 min
NEVER = float("-inf")
END = 1_800_000_000.0
HOUR = 3600.0


def retrying(pending_since: float, updated_at: float) -> CallState:
    """Ended, billed, extraction done: only its webhook delivery is still being retried."""
    return CallState(
        "outbound", "completed", pending_since - 60, updated_at, billed=True, webhook="pending",
        webhook_pending_since=pending_since, ended=pending_since,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("waited", "window"),
    [
        (10.0, (0.0, 300.0 + 1.2 * FIRST_GAP)),  # the first attempt may still come: due at once
        (FIRST_GAP, (0.8 * 2 * FIRST_GAP, 1.2 * 2 * FIRST_GAP)),  # attempt 2 failed
        (7 * FIRST_GAP * 1.1, (0.8 * 8 * FIRST_GAP, 1.2 * 8 * FIRST_GAP)),  # attempt 4 failed, a little late
        (63 * FIRST_GAP * 0.85, (0.8 * 64 * FIRST_GAP, 1.2 * 64 * FIRST_GAP)),  # attempt 7: the last comes next
        (2 * FIRST_GAP, None),  # between attempts 2 and 3 by any jitter: off the schedule
        (60 * HOUR, None),  # past the last attempt
    ],
)
def test_the_next_attempt_can_come_only_within_its_window_of_the_schedule(waited, window):
    got = attempt_window(END, END + waited)
    expected = None if window is None else (END + waited + window[0], END + waited + window[1])
    assert got == (pytest.approx(expected) if expected else None)


def test_a_retried_webhook_is_not_asked_before_its_next_attempt_can_come_then_every_refresh_interval():
    call = retrying(END, END + 7 * FIRST_GAP)  # attempt 4 failed just now
    opens = END + 7 * FIRST_GAP + 0.8 * 8 * FIRST_GAP
    assert turn(call, NEVER, END + 8 * FIRST_GAP, S) == pytest.approx(opens), "asked last long ago: still waits"
    quiet = (opens + 20 - call.updated_at) / QUIET_SHARE  # then every tenth of its quiet time
    assert turn(call, opens + 10, opens + 20, S) == pytest.approx(opens + 10 + quiet)
    call.todo = ERROR | DURATION  # end details it never had hold nothing open
    assert turn(call, NEVER, END + 8 * FIRST_GAP, S) == pytest.approx(opens)


def test_a_webhook_past_its_schedule_and_a_late_settlement_are_asked_less_often_the_longer_they_are_quiet():
    late = retrying(END, END + 2 * FIRST_GAP)  # fits no attempt: the schedule cannot say
    reserved = CallState("outbound", "completed", END - 60, END, billed=False, ended=END)
    for call in (late, reserved):
        quiet = call.updated_at
        assert turn(call, quiet + 60, quiet + 120, S) == pytest.approx(quiet + 60 + S.poll_interval)
        assert turn(call, quiet + HOUR, quiet + HOUR, S) == pytest.approx(quiet + HOUR + HOUR / QUIET_SHARE)
        assert turn(call, quiet + 2 * 86400, quiet + 2 * 86400, S) == quiet + 2 * 86400 + QUIET_CAP * 300


def test_a_call_in_flight_is_asked_every_twentieth_of_its_age_up_to_the_refresh_interval():
    ringing = CallState("outbound", "ringing", END, END + 5)
    assert turn(ringing, END + 600, END + 600, S) == END + 600 + 30
    assert turn(ringing, END + HOUR * 10, END + HOUR * 10, S) == END + HOUR * 10 + S.refresh_interval


@pytest.mark.parametrize("seed", range(40))
def test_every_delivery_outcome_is_read_within_the_bound_by_polls_that_follow_the_turns(seed):
    """The simulator's schedule (8 attempts, doubling gaps, ±20 % each), polled every 15 s, each
    poll asking the call when its turn has come: the outcome is read at most a tenth of the
    time since the attempt before (at most QUIET_CAP x open_refresh_interval) plus a poll after it
    happened, and far fewer times than every 5 minutes."""
    rng = random.Random(seed)
    attempts, t = [], END + rng.uniform(0.3, 20)
    outcome_at = rng.randint(2, WEBHOOK_ATTEMPTS)
    for k in range(1, outcome_at + 1):
        attempts.append(t)
        t += FIRST_GAP * 2 ** (k - 1) * rng.uniform(0.8, 1.2)
    seen = retrying(END, END)
    last_asked, asked, now = NEVER, 0, END + 1800  # past the hot read
    while now < attempts[-1] + HOUR:
        if now >= turn(seen, last_asked, now, S, spread=rng.uniform(0.5, 1)):
            last_asked, asked = now, asked + 1
            done = [a for a in attempts if a <= now]
            if done and done[-1] == attempts[-1]:
                # (before END + 1800 the list read saw it: the first turn is at once)
                quiet = (attempts[-1] - (attempts[-2] if len(attempts) > 1 else END)) / QUIET_SHARE
                bound = min(QUIET_CAP * S.refresh_interval, max(S.poll_interval, quiet)) + S.poll_interval
                assert now - max(attempts[-1], END + 1800) <= bound
                break
            seen.updated_at = done[-1] if done else seen.updated_at
        now += S.poll_interval
    else:
        pytest.fail("the outcome was never read")
    fixed = (attempts[-1] - END - 1800) / (0.75 * S.refresh_interval)
    assert asked < fixed / 2 or attempts[-1] - END < 3 * HOUR
