"""The fixed names: the API's vocabulary and the metric families built on it, counters, histograms
and health gauges alike (SPEC §1, §3).

The top of the flow: every other module, config included, takes its names from here, so a
metric family is written once and a typo in a name is an error (`Store.inc`), not a new series.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

ACTIVE_STATUSES = ("queued", "initiated", "ringing", "in_progress")
TERMINAL_STATUSES = ("completed", "no_answer", "busy", "canceled", "failed")
STATUSES = frozenset(ACTIVE_STATUSES + TERMINAL_STATUSES)
DIRECTIONS = ("outbound", "inbound")
RESERVATIONS = frozenset({"reserved", "settled", "released"})
WEBHOOK_STATUSES = frozenset({"pending", "delivered", "failed"})
RESULT_STATUSES = frozenset({"pending", "completed", "failed"})

# Where the API did something its docs leave open (SPEC §1): the `kind` label of
# contract_deviations_total, each counted once per call and exported at 0 from the start.
UNDOCUMENTED_VALUE = "undocumented_value"  # a status, direction, reservation or outcome value outside the docs
LATE_END_DETAIL = "late_end_detail"  # an end detail filled in a version after the terminal one
OUTCOME_WITHOUT_SUBJECT = "outcome_without_subject"  # webhook_status without webhook_url, result_status without returns
SETTLED_WITHOUT_AMOUNT = "settled_without_amount"  # reservation settled, billing amount still null
BY_ID_NOT_FOUND_BUT_LISTED = "by_id_not_found_but_listed"  # 404 by id for a call a later list read showed
CONTRACT_DEVIATIONS = (
    UNDOCUMENTED_VALUE,
    LATE_END_DETAIL,
    OUTCOME_WITHOUT_SUBJECT,
    SETTLED_WITHOUT_AMOUNT,
    BY_ID_NOT_FOUND_BUT_LISTED,
)
DEVIATION_BITS = {kind: 1 << i for i, kind in enumerate(CONTRACT_DEVIATIONS)}  # a call's kinds, as one int
END_GRACE = 300.0  # default seconds after a call's end before a missing hangup cause counts as `none`

# Why a record cannot be accounted: the `reason` label of invalid_records_total. The decoder
# names its reasons only through these; each is exported at 0 from the start.
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
BAD_VALUE = "bad_value"
BAD_TIMESTAMP = "bad_timestamp"
UNKNOWN_STATUS = "unknown_status"  # an empty status: a value outside the docs is a status all the same (SPEC §4)
INVALID_REASONS = (NOT_OBJECT, MISSING_FIELD, BAD_TYPE, BAD_VALUE, BAD_TIMESTAMP, UNKNOWN_STATUS)


STRAGGLER_GIVE_UP = 7 * 86400.0  # default age after creation at which a straggler is given up
OUTCOMES = ("delivered", "failed")  # webhook_status values that are counted
EXTRACTIONS = ("completed", "failed")  # result_status values that are counted

ENDPOINTS = ("list", "call")  # GET /v1/calls and GET /v1/calls/{id}
READ_PATHS = ("list", "by_id")  # how an open call is kept up to date: each list read, or by id
AUDIT_KINDS = ("missing", "extra", "status", "billing", "webhook", "extraction")
# How the self-audit reached a call: its window of created_at, or a spot-check by id.
AUDIT_METHODS = ("window", "spot_check")

MILLI_CENTS_PER_DOLLAR = 100_000
CAPPED_LABELS = ("hangup_cause", "error_code", "status")  # status: only values outside the docs

DURATION_BUCKETS = (0, 5, 10, 20, 30, 60, 120, 180, 300, 600, 1200, 1800, 3600)
DELAY_BUCKETS = (0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 45, 60)
POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Family(NamedTuple):
    kind: str  # counter | histogram
    labels: tuple[str, ...]  # without org
    doc: str


# The call families that `explain` names (metrics.py renders every family by its key below).
CALLS_CREATED = "callingbox_calls_created_total"
CALLS_ENDED = "callingbox_calls_ended_total"
BILLED_DOLLARS = "callingbox_billed_amount_dollars_total"  # summed in integer milli-cents
WEBHOOK_DELIVERIES = "callingbox_webhook_deliveries_total"
RESULT_EXTRACTIONS = "callingbox_result_extractions_total"
VANISHED_CALLS = "callingbox_exporter_vanished_calls_total"

FAMILIES: dict[str, Family] = {
    CALLS_CREATED: Family("counter", ("direction",), "Calls first observed, by direction."),
    CALLS_ENDED: Family("counter", ("direction", "status"), "Calls first observed in a terminal status."),
    "callingbox_call_hangups_total": Family(
        "counter", ("direction", "status", "hangup_cause"), "Terminal calls by hangup cause."
    ),
    "callingbox_call_errors_total": Family(
        "counter", ("direction", "error_code"), "Terminal calls with an error code."
    ),
    WEBHOOK_DELIVERIES: Family(
        "counter", ("status",), "Webhook outcomes observed (delivered, failed); a replay counts again."
    ),
    RESULT_EXTRACTIONS: Family(
        "counter", ("status",), "Structured-data extraction outcomes observed (completed, failed)."
    ),
    BILLED_DOLLARS: Family("counter", ("direction",), "Money billed for settled calls, in US dollars."),
    "callingbox_call_duration_seconds": Family(
        "histogram", ("direction", "status"), "duration_seconds of terminal calls."
    ),
    "callingbox_call_answer_delay_seconds": Family(
        "histogram", ("direction",), "Time from ringing to answer (answered_at - started_at)."
    ),
    "callingbox_call_billed_duration_seconds": Family(
        "histogram", ("direction",), "billed_duration_seconds of settled calls."
    ),
    "callingbox_call_setup_delay_seconds": Family(
        "histogram", ("direction",), "Time from creation to ringing (started_at - created_at)."
    ),
    "callingbox_exporter_polls_total": Family("counter", ("result",), "Polls of the CallingBox API by result."),
    "callingbox_exporter_poll_duration_seconds": Family("histogram", (), "Wall time of a poll, fetch to publish."),
    "callingbox_exporter_api_requests_total": Family(
        "counter", ("code",), "Requests to the CallingBox API by HTTP status, or error when none came back."
    ),
    "callingbox_exporter_api_response_bytes_total": Family(
        "counter", ("endpoint",), "Body bytes read from the CallingBox API: list reads, and calls by id."
    ),
    "callingbox_exporter_invalid_records_total": Family(
        "counter", ("reason",), "API records skipped because they could not be read."
    ),
    "callingbox_exporter_label_overflow_total": Family(
        "counter", ("label",), "Label values folded into 'other' by the per-label cap."
    ),
    VANISHED_CALLS: Family("counter", (), "Tracked calls that the API no longer knows (404 by id)."),
    "callingbox_exporter_contract_deviations_total": Family(
        "counter", ("kind",), "Calls where the API did something its docs leave open, by kind; once per call and kind."
    ),
    "callingbox_exporter_audit_mismatches_total": Family(
        "counter", ("kind",), "Self-audit: calls whose counts disagree with the API (missing, extra, status, ...)."
    ),
    "callingbox_exporter_audit_calls_checked_total": Family(
        "counter", ("method",), "Self-audit: calls recounted against the API, by window of created_at or by spot-check."
    ),
    "callingbox_exporter_audit_skipped_seconds_total": Family(
        "counter",
        (),
        "Self-audit: seconds of created_at that no window audited (after reads stopped for longer"
        " than the settle window, or audits fell more than twice the settle window behind).",
    ),
}

DEFAULT_BUCKETS: dict[str, tuple[float, ...]] = {
    "callingbox_call_duration_seconds": DURATION_BUCKETS,
    "callingbox_call_answer_delay_seconds": DELAY_BUCKETS,
    "callingbox_call_billed_duration_seconds": DURATION_BUCKETS,
    "callingbox_call_setup_delay_seconds": DELAY_BUCKETS,
    "callingbox_exporter_poll_duration_seconds": POLL_BUCKETS,
}


class Gauge(NamedTuple):
    """A health gauge: the field of a target's published `Health` it shows, dotted for the poll
    status's (`status.up`; a flag shows as 1 or 0)."""

    labels: tuple[str, ...]  # without org
    doc: str
    field: str
    unset: float | None = 0  # shown while the field is None; None: no sample then
    values: tuple[str, ...] = ()  # of its one label, each shown (0 where the field's dict lacks it)


ACTIVE = "callingbox_calls_active"  # with zeros for every direction and active status, and metadata labels
# The health gauges, in the order they are rendered after the counter families.
GAUGES: dict[str, Gauge] = {
    ACTIVE: Gauge(("direction", "status"), "Calls now queued, initiated, ringing or in progress.", "active"),
    "callingbox_webhooks_pending": Gauge((), "Tracked calls whose webhook delivery is pending.", "webhooks_pending"),
    "callingbox_up": Gauge((), "1 when the last poll of the CallingBox API succeeded.", "status.up"),
    "callingbox_daily_budget_dollars": Gauge(  # for the alert that compares today's spend with it
        (),
        "The org's daily spend budget in US dollars (config daily_budget_dollars); only for targets that set it.",
        "daily_budget_dollars",
        unset=None,
    ),
    "callingbox_exporter_last_success_timestamp_seconds": Gauge(
        (), "When the last poll succeeded.", "status.last_success"
    ),
    "callingbox_exporter_watermark_timestamp_seconds": Gauge((), "Newest updated_at processed.", "watermark"),
    "callingbox_exporter_tracked_calls": Gauge((), "Calls held in the per-call ledger.", "tracked"),
    "callingbox_exporter_stragglers": Gauge(
        (), "Tracked calls past the settle window that are not final yet.", "stragglers"
    ),
    "callingbox_exporter_last_audit_timestamp_seconds": Gauge((), "When the last self-audit completed.", "last_audit"),
    "callingbox_exporter_audited_until_timestamp_seconds": Gauge(
        (),
        "Self-audit: created_at up to which every call has been audited, window after window (0 before the first).",
        "audited_until",
    ),
    "callingbox_exporter_backoff_seconds": Gauge(
        (),
        "Seconds the next poll waits beyond poll_interval: failures back off, slow reads slow down.",
        "status.backoff",
    ),
    "callingbox_exporter_next_poll_timestamp_seconds": Gauge(
        (), "When the next poll of the API starts.", "status.next_poll"
    ),
    "callingbox_exporter_read_depth_seconds": Gauge(
        (), "How far back in created_at the last list read went: the settle window on a full read.", "read_depth"
    ),
    "callingbox_exporter_last_full_read_timestamp_seconds": Gauge(
        (), "When the list was last read down to the settle window.", "last_full_read"
    ),
    "callingbox_exporter_open_calls": Gauge(
        ("path",),
        "Tracked calls not final yet, by how they are kept up to date: each list read, or by id.",
        "open_calls",
        values=READ_PATHS,
    ),
}
# Rendered at each scrape, after the build info: it moves with the clock, not with a publish.
PENDING_AGE = "callingbox_webhook_pending_oldest_age_seconds"
PENDING_AGE_DOC = "Age of the oldest pending webhook delivery: a dead endpoint shows here two days before failed."
BUILD_INFO = "callingbox_exporter_build_info"
BUILD_INFO_DOC = "The exporter's version."

# Families whose series carry the call_id of the latest call counted, as an OpenMetrics exemplar.
EXEMPLAR_FAMILIES = frozenset(
    {
        CALLS_ENDED,
        "callingbox_call_hangups_total",
        "callingbox_call_errors_total",
        BILLED_DOLLARS,
        "callingbox_call_duration_seconds",
        "callingbox_call_answer_delay_seconds",
        "callingbox_call_billed_duration_seconds",
        "callingbox_call_setup_delay_seconds",
    }
)
SECONDS_PER_DAY = 86_400
# Families that gained labels: the values a series saved without them takes (its count carries
# on, no counter reset). Before spot-checks had their own label, the checked count was one series.
ADDED_LABELS: dict[str, dict[str, str]] = {"callingbox_exporter_audit_calls_checked_total": {"method": "window"}}
# Families about calls: their series also carry the target's metadata labels, if configured.
CALL_FAMILIES = frozenset(
    {name for name, family in FAMILIES.items() if "direction" in family.labels}
    | {WEBHOOK_DELIVERIES, RESULT_EXTRACTIONS}
)


def initial_series(extra_labels: tuple[str, ...] = ()) -> Iterable[tuple[str, tuple[str, ...]]]:
    """Series known to exist, exported at 0 so the first failure shows in increase()."""
    none_extra = ("none",) * len(extra_labels)
    for name, labels in _base_series():
        yield name, (*labels, *none_extra) if name in CALL_FAMILIES else labels
    # Every label capped by Store.capped: the free-text ones and the metadata labels.
    for label in (*CAPPED_LABELS, *extra_labels):
        yield "callingbox_exporter_label_overflow_total", (label,)


def _base_series() -> Iterable[tuple[str, tuple[str, ...]]]:
    for d in DIRECTIONS:
        yield CALLS_CREATED, (d,)
        yield BILLED_DOLLARS, (d,)
        for s in TERMINAL_STATUSES:
            yield CALLS_ENDED, (d, s)
            yield "callingbox_call_duration_seconds", (d, s)
        for name in ("answer_delay", "billed_duration", "setup_delay"):
            yield f"callingbox_call_{name}_seconds", (d,)
    for s in OUTCOMES:
        yield WEBHOOK_DELIVERIES, (s,)
    for s in EXTRACTIONS:
        yield RESULT_EXTRACTIONS, (s,)
    for result in ("success", "error"):
        yield "callingbox_exporter_polls_total", (result,)
    for endpoint in ENDPOINTS:
        yield "callingbox_exporter_api_response_bytes_total", (endpoint,)
    for reason in INVALID_REASONS:
        yield "callingbox_exporter_invalid_records_total", (reason,)
    for kind in CONTRACT_DEVIATIONS:
        yield "callingbox_exporter_contract_deviations_total", (kind,)
    yield "callingbox_exporter_poll_duration_seconds", ()
    yield VANISHED_CALLS, ()
    for method in AUDIT_METHODS:
        yield "callingbox_exporter_audit_calls_checked_total", (method,)
    yield "callingbox_exporter_audit_skipped_seconds_total", ()
    for kind in AUDIT_KINDS:
        yield "callingbox_exporter_audit_mismatches_total", (kind,)


def added_labels(name: str, labels: list) -> list | None:
    """The label values of a counter series saved under `name` before the family gained labels
    (ADDED_LABELS), in today's order with the added ones filled in; None when it has them all.
    For families without metadata labels only (they are not CALL_FAMILIES)."""
    added = ADDED_LABELS.get(name)
    if not added or len(labels) != len(FAMILIES[name].labels) - len(added):
        return None
    names = FAMILIES[name].labels
    saved = iter(labels)
    return [added[label] if label in added else next(saved) for label in names]


def relabel(saved_labels: tuple[str, ...], values: tuple, labels: tuple[str, ...], missing=None) -> tuple:
    """Metadata label values saved under `saved_labels`, re-keyed by name onto `labels`: a label
    no longer configured is dropped, a new one reads `missing`."""
    saved = dict(zip(saved_labels, values))
    return tuple(saved.get(label, missing) for label in labels)
