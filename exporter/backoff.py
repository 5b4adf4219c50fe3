"""A target's polls failing in a row: the status its pages show, the back-off before its next
poll (exponential with jitter) and its log lines, once per streak (STYLE.md, Errors and logs).
"""

from __future__ import annotations

import logging
import random

from .api import Unauthorized
from .health import Status

MAX_BACKOFF = 300.0

log = logging.getLogger(__name__)


class Streak:
    """One target's run of failed polls, if any: (kind, polls, since)."""

    def __init__(self, org: str, poll_interval: float, rng: random.Random):
        self.org, self.poll_interval, self.rng = org, poll_interval, rng
        self.current: tuple[tuple[str, str], int, float] | None = None

    def conclude(self, status: Status, problem: Exception | None, now: float) -> float:
        """Update the status the web pages show and log the streak. Returns the back-off.

        Expected trouble logs once per streak: the first failure and each change of kind at warn
        (a rejected key at error), repeats at debug, and one info line on recovery.
        """
        status.ready = True  # the first poll has finished, successfully or not (SPEC §2, /-/ready)
        if problem is None:
            status.up, status.last_error = True, None
            status.failures, status.last_success = 0, now
            if self.current is not None:
                _, polls, since = self.current
                log.info("poll recovered", extra={"org": self.org, "failures": polls, "down_s": round(now - since, 1)})
                self.current = None
            return 0.0
        status.up, status.last_error = False, str(problem)
        status.failures += 1
        backoff = self.backoff(status.failures, problem)
        code = getattr(problem, "code", "error")
        kind = (type(problem).__name__, code)
        previous, polls, since = self.current or (None, 0, now)
        self.current = (kind, polls + 1, since)
        rejected = isinstance(problem, Unauthorized)
        level = logging.DEBUG if kind == previous else logging.ERROR if rejected else logging.WARNING
        log.log(
            level,
            "API key rejected" if rejected else "poll failed",
            extra={"org": self.org, "code": code, "error": str(problem), "backoff_s": round(backoff, 2)},
        )
        return backoff

    def backoff(self, failures: int, problem: Exception | None) -> float:
        """Exponential with ±20 % jitter, never past MAX_BACKOFF; a rejected key retries four times slower."""
        base = self.poll_interval * (4 if isinstance(problem, Unauthorized) else 1)
        delay = base * 2 ** min(failures - 1, 20)
        return min(MAX_BACKOFF, delay * self.rng.uniform(0.8, 1.2))
