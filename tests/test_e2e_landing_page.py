"""The landing page end to end: the exporter process with two targets, read by headless Chromium.

The story: `campaigns` polls the simulator while calls flow, `backup` points at a closed port;
once the simulator is paused and the exporter's counters stop moving, the page Chromium
renders shows `campaigns` up and `backup` down with its error, and today's totals per status
equal the exporter's own counters on /metrics. A screenshot of it is the README's picture.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time

import pytest
from test_web import Page, today_of

from exporter.catalogue import TERMINAL_STATUSES
from exporter.web import dollars
from helpers import free_port, wait_until

KEY = "sk_test_e2e_landing_0123456789"
CHROMIUM = "/usr/bin/chromium"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def require_chromium() -> None:
    """Fail, never skip, without it: an unrendered page is an untested page."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)", pytrace=False
        )


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium, isolated and quiet: its own profile, no network of its own."""
    require_chromium()
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 0, f"chromium exited with {result.returncode}: {result.stderr[-2000:]}"
    return result


def figures(samples, org: str = "campaigns") -> dict[str, float]:
    """The exporter's own counters of one org, summed over direction, keyed like the page's totals."""
    totals = {key: 0.0 for key in ("created", *TERMINAL_STATUSES, "dollars", "success_polls")}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if labels.get("org") != org:
            continue
        if name == "callingbox_calls_created_total":
            totals["created"] += value
        elif name == "callingbox_calls_ended_total":
            totals[labels["status"]] += value
        elif name == "callingbox_billed_amount_dollars_total":
            totals["dollars"] += value
        elif name == "callingbox_exporter_polls_total" and labels["result"] == "success":
            totals["success_polls"] = value
    return totals


def counted(totals: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in totals.items() if k != "success_polls"}


def quiet(exporter) -> dict[str, float]:
    """Wait until three more successful polls of `campaigns` moved no counter; returns the counters."""

    def unchanged():
        before = figures(exporter.scrape())
        wait_until(
            lambda: figures(exporter.scrape())["success_polls"] >= before["success_polls"] + 3,
            15,
            message="three more polls of campaigns",
        )
        after = figures(exporter.scrape())
        return counted(after) if counted(after) == counted(before) else None

    return wait_until(unchanged, 60, interval=0, message="the exporter's counters to stop moving")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_landing_page_in_chromium_shows_targets_up_and_down_and_todays_totals_equal_to_counters(stack, tmp_path):
    require_chromium()
    day = time.gmtime().tm_yday
    sim, sim_url = stack.simulator(seed=23, rate=40, time_scale=300, webhook_retry_base=0.05, api_key=KEY)
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    exporter = stack.exporter(
        {
            "poll_interval": "0.3s",
            "overlap": "10s",
            "api_key_file": str(key_file),
            "targets": [{"name": "campaigns", "api_url": sim_url}, {"name": "backup", "api_url": closed}],
        }
    ).start()

    wait_until(
        lambda: (
            figures(exporter.scrape())["created"] >= 80
            and all(figures(exporter.scrape())[s] > 0 for s in ("completed", "no_answer", "failed"))
        ),
        60,
        message="calls of several outcomes counted",
    )
    sim.pause()
    wait_until(sim.all_final, 60, message="simulator calls final")
    expected = quiet(exporter)

    page = Page(chromium(tmp_path, "--dump-dom", exporter.url + "/").stdout)
    assert counted(figures(exporter.scrape())) == expected, "the counters moved while the page loaded"
    midnight_passed = time.gmtime().tm_yday != day

    assert page.fields["summary"] == "2 targets, 1 down"
    assert set(page.targets) == {"campaigns", "backup"}
    up, down = page.targets["campaigns"], page.targets["backup"]
    assert (up["state"], up["readiness"], up["consecutive_failures"]) == ("UP", "ready", "0")
    assert "last_error" not in up and up["last_success"].endswith("ago)")
    assert (down["state"], down["readiness"], down["last_success"]) == ("DOWN", "ready", "never")
    assert down["last_error"].startswith("request failed: ") and closed.removeprefix("http://") in down["last_error"]
    assert int(down["consecutive_failures"]) >= 1

    shown = {k: int(v.replace(",", "")) for k, v in today_of(up).items() if k != "billed"}
    wanted = {k: int(expected[k]) for k in ("created", *TERMINAL_STATUSES)}
    billed = dollars(round(expected["dollars"] * 100_000))
    if midnight_passed:  # today began during the test: the page counts only since 00:00 UTC
        assert all(shown[k] <= wanted[k] for k in wanted), (shown, wanted)
    else:
        assert (shown, up["billed"]) == (wanted, billed)
    assert KEY not in str(page.targets) and KEY.split("_", 2)[-1] not in str(page.targets)

    screenshot = tmp_path / "landing-page.png"
    chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1280,900", exporter.url + "/")
    data = screenshot.read_bytes()
    assert png_size(data) == (1280, 900)
    assert 10_000 < len(data) < 5_000_000, f"{len(data)} bytes"
    if os.environ.get("LANDING_PAGE_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["LANDING_PAGE_SCREENSHOT"])
