"""How long a request to the API may take, connect to last byte (SPEC §4, Faults).

A between-bytes timeout never ends a body that trickles a byte every few seconds, so every
request also has a deadline for its whole response, sized from what it is expected to carry:
a call by id within `request_timeout`; a list read within `request_timeout` plus the time its
expected bytes take at a conservative throughput, never less than a floor. Pure arithmetic: the
client (api.py) enforces the deadlines, the poll loop promises them to its heartbeat (liveness.py).
"""

from __future__ import annotations

# The least a list read is assumed to reach, bytes a second: 1 Mbit/s. The API streams tens of
# MB/s and the exporter parses ~40 MB/s (BENCHMARKS.md), so a healthy read runs far faster; a
# trickle (a byte every few seconds) runs ~100 000 times slower.
MIN_THROUGHPUT = 128 * 1024
HEADROOM = 2.0  # the list may have grown since its size was measured (a burst of calls)
FLOOR = 10.0  # seconds a list body may always take, beyond request_timeout
# A list read that missed its deadline gets twice as long at the next poll, up to 8 times: a list
# that outgrew its estimate is read whole within a few polls, a trickle still fails each time.
LATE_DOUBLINGS = 3


def call_deadline(request_timeout: float) -> float:
    """`GET /v1/calls/{id}`: one call object, a few kB: the whole answer within request_timeout."""
    return request_timeout


def expected_list_bytes(bytes_per_call: float, calls_per_second: float, depth: float) -> float:
    """Body bytes of a list read `depth` seconds of created_at deep, from what the last reads
    measured (plan.ReadPlanner.learn): the size of a call, how fast the list grows."""
    return bytes_per_call * calls_per_second * max(0.0, depth)


def list_deadline(request_timeout: float, expected_bytes: float, late: int = 0) -> float:
    """`GET /v1/calls`: request_timeout for the answer to start, then its expected bytes (with
    HEADROOM) at MIN_THROUGHPUT, at least FLOOR; doubled for each of the last `late` reads in a
    row that missed their deadline (at most LATE_DOUBLINGS times)."""
    body = max(FLOOR, HEADROOM * expected_bytes / MIN_THROUGHPUT)
    return (request_timeout + body) * 2 ** min(max(0, late), LATE_DOUBLINGS)
