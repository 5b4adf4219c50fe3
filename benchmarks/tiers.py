"""Case 6, read tiers: the API cost of an ordinary poll with the tiered defaults, beside today's
full-window read (the same exporter with `full_read_interval: 0s`), on one reference org.

The reference org (the issue, `benchmarks/reference_org.py`): `tier_calls` calls in the 72 h
settle window (150 000 in the full run), about 1 % of them open past the hot read (webhooks
retried by CallingBox's schedule, late settlements), and live traffic at the window's own rate.
Its simulator runs in a process of its own on a *virtual clock* that this process advances 15 s
per poll, so an hour of the org's life (241 polls, with a full read and audit at its end) takes
a minute or two, and the exporter's read plan sees the times it sees in production: ordinary
reads down to the oldest call in flight (at most 30 min), open calls by id by what they wait
for (waits.py), a full read with each audit.

- History calls stop changing at 39:00, one delay bound of a quiet call (20 min) before 59:45.
  Live calls run for 30 min before the first poll (the hot window then holds live calls only)
  and through the hour.
- At 54:00 the traffic stops and every live call freezes (`tier_polls.QUIET_AT`). At 59:45, after
  ordinary polls only, every call counter and histogram sample must equal the simulator's truth
  (the tiers alone kept them exact); at 60:00 the full read and audit run, and they must still.
- The hour ends in a full read: the tiered exporter runs with `full_read_interval` and
  `audit_interval` at 1 h (the defaults before issue 26; since, 3 h) so that one full read falls
  inside the simulated hour. Nothing else differs from the defaults.

Each configuration runs against its own simulator with the same seed, one after the other, so
the two ledgers never share a process (a full GC walks one of them only); the virtual clock
makes both simulators play the same calls at the same times. Both save a state file after each
poll, as deployed. `max_requests_per_minute` is lifted, because the budget counts real seconds
and the hour passes here in about a minute; the requests per simulated minute are reported.

A day is extrapolated from the hour (BENCHMARKS.md states the formula): one full-read poll as
measured at 60:00 for every `full_read_interval` of the day (8 at the default 3 h, 24 at 1 h),
plus the day's other polls at the mean of the steady ordinary ones (15:00-59:45, past the
start's by-id backlog). `python -m benchmarks --cases 6` runs this case alone.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import MB, Facts, Row, Sizes, median, verdict
from benchmarks.tier_polls import run_one
from exporter.config import Target

CASE = "6 read tiers"
GOAL_LIST, GOAL_DAY, GOAL_CPU = 100, 50, 20  # full-window read ÷ read tiers, at least
# Issue 26, for the reference org: by-id requests a minute and API GB a day, at most.
REFERENCE_CALLS, GOAL_BY_ID, GOAL_DAY_GB = 150_000, 100, 6.0
GB = 1_000_000_000

POLL = 15.0  # poll_interval, default
HOUR = 3600.0  # the simulated hour, and the full_read_interval and audit_interval it runs with
POLLS_PER_DAY = round(86400 / POLL)  # 5 760
FULL_READS_PER_DAY = round(86400 / Target.full_read_interval)  # 8 at the default 3 h
HOURLY_FULL_READS = round(86400 / HOUR)  # 24: the defaults before issue 26
CHECK_AT = HOUR - POLL  # the last ordinary poll: counters must be exact (no full read since t = 0)
END = HOUR  # the full read (and audit) that ends the hour
STEADY_FROM = 900.0  # ordinary polls from here are "steady": past the start's by-id backlog
TIERED_POLLS = [k * POLL for k in range(round(END / POLL) + 1)]  # 0:00, 0:15, ... 60:00
FULL_POLLS = [0.0, POLL, 2 * POLL, 3 * POLL, CHECK_AT, END]
FULL_MEASURED = (POLL, 2 * POLL, 3 * POLL)  # ordinary polls 15 s after the last one; 60:00 is the full-read one


def _clock(t: float) -> str:
    return f"{int(t // 60)}:{int(t % 60):02d}"


def run(sizes: Sizes, facts: Facts, log_dir: Path, progress=lambda message: None) -> list[Row]:
    # A full read and an audit at 60:00 (module docstring); the day counts them at the defaults.
    tiers = run_one(
        "tiers", sizes, log_dir, TIERED_POLLS, (CHECK_AT, END), progress, full_read_interval=HOUR, audit_interval=HOUR
    )
    full = run_one(
        "full-window", sizes, log_dir, FULL_POLLS, (END,), progress, full_read_interval=0.0, audit_interval=HOUR
    )

    def at(result: dict, t: float) -> dict:
        return next(p for p in result["polls"] if p["t"] == t)

    steady = [p for p in tiers["polls"] if not p["full"] and STEADY_FROM <= p["t"] <= CHECK_AT]
    measured = [p for p in full["polls"] if p["t"] in FULL_MEASURED]
    hourly = {"tiers": at(tiers, END), "full": at(full, END)}
    if not steady or not hourly["tiers"]["full"] or not all(p["full"] for p in full["polls"]):
        raise RuntimeError("case 6: the polls did not follow the expected tiers; see the facts")

    def per_day(ordinary: list[dict], hour: dict, key, full_reads: int = FULL_READS_PER_DAY) -> float:
        """`full_reads` polls as the full-read one (full read, audit, by id) + the day's other
        polls at the measured mean of the ordinary ones."""
        value = key if callable(key) else (lambda p: p[key])
        return full_reads * value(hour) + (POLLS_PER_DAY - full_reads) * statistics.fmean(map(value, ordinary))

    def api_bytes(p: dict) -> int:
        return p["list_bytes"] + p["call_bytes"]

    day = {"tiers": per_day(steady, hourly["tiers"], api_bytes), "full": per_day(measured, hourly["full"], api_bytes)}
    by_id = {
        "tiers": per_day(steady, hourly["tiers"], "call_bytes"),
        "full": per_day(measured, hourly["full"], "call_bytes"),
    }
    per_minute = {
        "tiers": per_day(steady, hourly["tiers"], "requests") / 1440,
        "full": per_day(measured, hourly["full"], "requests") / 1440,
    }
    listed = {"tiers": median([p["list_bytes"] for p in steady]), "full": median([p["list_bytes"] for p in measured])}
    cpu = {"tiers": median([p["cpu_s"] for p in steady]), "full": median([p["cpu_s"] for p in measured])}
    bare = {
        "tiers": median([p["cpu_s"] - p["save_cpu_s"] for p in steady]),
        "full": median([p["cpu_s"] - p["save_cpu_s"] for p in measured]),
    }
    open_by_id = median([p["open_by_id"] for p in steady])
    found = {
        "tiers_before_full_read": tiers["differences"][CHECK_AT],
        "tiers_after_full_read": tiers["differences"][END],
        "full_window": full["differences"][END],
    }

    f = facts[CASE]
    f.update(
        window_calls=sizes.tier_calls,
        open_history=tiers["open_history"],
        steady_polls=len(steady),
        day_bytes=day,
        by_id_bytes_per_day=by_id,
        requests_per_minute=per_minute,
        list_bytes=listed,
        cpu_s=cpu,
        cpu_s_without_save=bare,
        differences=found,
        audit_mismatches={"tiers": tiers["audit_mismatches"], "full": full["audit_mismatches"]},
        server={"tiers": tiers["server"], "full": full["server"]},
        tiers={key: [p[key] for p in tiers["polls"]] for key in tiers["polls"][0]},
        full={key: [p[key] for p in full["polls"]] for key in full["polls"][0]},
    )

    def times(figure: str, full_value: float, tiers_value: float, goal: int | None = None) -> Row:
        less = full_value / tiers_value if tiers_value else None
        return Row(
            CASE,
            f"full-window read ÷ read tiers: {figure}",
            less,
            "x",
            goal=f">= {goal}x" if goal else "",
            verdict=verdict(None if goal is None else less is not None and less >= goal),
        )

    ordinary = POLLS_PER_DAY - FULL_READS_PER_DAY
    rows = [
        Row(
            CASE,
            f"full-window read (full_read_interval 0s): list bytes per poll, {sizes.tier_calls:,} calls in the window",
            listed["full"] / MB,
            "MB",
        ),
        Row(
            CASE,
            f"read tiers (defaults): list bytes per ordinary poll (median of {len(steady)})",
            listed["tiers"] / MB,
            "MB",
        ),
        times("list bytes per ordinary poll", listed["full"], listed["tiers"], GOAL_LIST),
        Row(
            CASE,
            f"full-window read: API bytes per day ({POLLS_PER_DAY:,} full reads; list + by id)",
            day["full"] / GB,
            "GB",
        ),
        Row(
            CASE,
            f"read tiers: API bytes per day ({FULL_READS_PER_DAY} full reads with their audits + {ordinary:,} "
            f"ordinary polls; list + by id)",
            day["tiers"] / GB,
            "GB",
        ),
        times("API bytes per day", day["full"], day["tiers"], GOAL_DAY),
        Row(
            CASE,
            "read tiers: of which by id (open calls past the hot read, audit spot-checks)",
            by_id["tiers"] / GB,
            "GB",
        ),
        Row(CASE, "full-window read: CPU per poll (state save included)", cpu["full"] * 1000, "ms"),
        Row(CASE, "read tiers: CPU per ordinary poll (state save included)", cpu["tiers"] * 1000, "ms"),
        times("CPU per ordinary poll", cpu["full"], cpu["tiers"], GOAL_CPU),
        Row(CASE, "full-window read: CPU per poll, the state save left out", bare["full"] * 1000, "ms"),
        Row(CASE, "read tiers: CPU per ordinary poll, the state save left out", bare["tiers"] * 1000, "ms"),
        times("CPU per ordinary poll, the state save left out", bare["full"], bare["tiers"]),
        Row(CASE, "full-window read: API requests per minute", per_minute["full"], "req/min"),
        Row(
            CASE,
            f"read tiers: API requests per minute (4 list + by id; {open_by_id:,.0f} open calls past the hot read)",
            per_minute["tiers"],
            "req/min",
        ),
    ]
    # Issue 26's goals, for the reference org (150 000 calls in the window) and in proportion to it.
    scale = sizes.tier_calls / REFERENCE_CALLS
    by_id_per_minute = per_minute["tiers"] - POLLS_PER_DAY / 1440
    hourly_day = per_day(steady, hourly["tiers"], api_bytes, HOURLY_FULL_READS)
    rows += [
        Row(
            CASE,
            "read tiers: by-id requests per minute (open calls past the read, audit spot-checks)",
            by_id_per_minute,
            "req/min",
            goal=f"<= {GOAL_BY_ID * scale:,.0f}",
            verdict=verdict(by_id_per_minute <= GOAL_BY_ID * scale),
        ),
        Row(
            CASE,
            "read tiers: API bytes per day, against 2x the floor (the list read to the oldest call in flight)",
            day["tiers"] / GB,
            "GB",
            goal=f"<= {GOAL_DAY_GB * scale:.2f} GB",
            verdict=verdict(day["tiers"] / GB <= GOAL_DAY_GB * scale),
        ),
        Row(
            CASE,
            f"read tiers, the same polls with a full read and audit every hour (the defaults before issue 26; "
            f"{HOURLY_FULL_READS} a day)",
            hourly_day / GB,
            "GB",
        ),
    ]
    for name, when, key in (
        ("read tiers", f"after ordinary polls only ({_clock(CHECK_AT)})", "tiers_before_full_read"),
        ("read tiers", f"after the full read and audit ({_clock(END)})", "tiers_after_full_read"),
        ("full-window read", f"at the end ({_clock(END)})", "full_window"),
    ):
        rows.append(
            Row(
                CASE,
                f"{name}: counter samples off the simulator's truth, {when}",
                len(found[key]),
                "samples",
                goal="= 0",
                verdict=verdict(not found[key]),
            )
        )
        for line in found[key][:10]:
            progress(f"case 6: {name}, {when}: {line}")
    return rows
