"""deadline.py: how long a request may take, connect to last byte, from what it is expected to carry."""

from __future__ import annotations

import pytest

from exporter.deadline import (
    FLOOR,
    HEADROOM,
    LATE_DOUBLINGS,
    MIN_THROUGHPUT,
    call_deadline,
    expected_list_bytes,
    list_deadline,
)
from exporter.plan import BYTES_PER_CALL

SETTLE_WINDOW = 72 * 3600.0


def test_a_call_by_id_has_request_timeout():
    assert call_deadline(30.0) == 30.0


@pytest.mark.parametrize(
    "expected_bytes, seconds",
    [
        (0, 30 + FLOOR),  # nothing expected: the floor
        (MIN_THROUGHPUT * FLOOR / HEADROOM, 30 + FLOOR),  # just the floor's worth
        (100 * 2**20, 30 + HEADROOM * 100 * 2**20 / MIN_THROUGHPUT),  # 100 MiB: 1600 s beyond request_timeout
    ],
)
def test_a_list_read_has_request_timeout_plus_its_bytes_at_the_least_throughput(expected_bytes, seconds):
    assert list_deadline(30.0, expected_bytes) == seconds


def test_each_missed_deadline_doubles_the_next_up_to_a_cap():
    first = list_deadline(30.0, 0)
    assert [list_deadline(30.0, 0, late) for late in range(5)] == [first, 2 * first, 4 * first, 8 * first, 8 * first]
    assert LATE_DOUBLINGS == 3


def test_the_expected_bytes_are_the_depth_at_the_measured_rate_and_size():
    assert expected_list_bytes(1500.0, 2.0, 1800.0) == 1500 * 2 * 1800
    assert expected_list_bytes(1500.0, 2.0, -5.0) == 0


def test_a_first_read_that_knows_nothing_gets_hours_not_for_ever():
    """Before any read has measured the list, the tally assumes a call a second of BYTES_PER_CALL:
    a settle window of that, ~390 MB, is given ~1.7 h (README)."""
    seconds = list_deadline(30.0, expected_list_bytes(BYTES_PER_CALL, 1.0, SETTLE_WINDOW))
    assert 1.6 * 3600 < seconds < 1.7 * 3600
