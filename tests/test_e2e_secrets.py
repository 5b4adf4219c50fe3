"""The API key, end to end: it appears in no log line, metric, page or error message (SPEC §2).

The story: the exporter runs with a key the API rejects, so every poll fails and the key is the
subject of every log line, given by the environment and by a file; then with the right key at
debug level through faults; then `--check-config` on bad configurations. The key string, and
its secret part without the `sk_live_` prefix, is found nowhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from test_e2e_exact import KEY, _config

from helpers import ROOT, http_get, log_records, parse_metrics, sample_value, wait_until

WRONG_KEY = "sk_live_wr0ngKey_7d4c2b9e1f0a8c63"
PAGES = ("/metrics", "/", "/-/ready", "/-/healthy")


def _leaks(key: str, places: dict[str, str]) -> list[str]:
    """Where the key, or its secret part, shows."""
    secret = key.split("_", 2)[-1]
    return [where for where, text in places.items() if key in text or secret in text]


def _everything(exporter) -> dict[str, str]:
    """Every text the exporter shows: its log and each page it serves."""
    return {"log": exporter.log(), **{path: http_get(exporter.url + path)[1] for path in PAGES}}


def _requests(samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "callingbox_exporter_api_requests_total")


@pytest.mark.parametrize("source", ["CALLINGBOX_API_KEY", "api_key_file"])
def test_a_rejected_key_is_logged_as_rejected_and_shown_nowhere(stack, tmp_path, source):
    sim, url = stack.simulator(seed=41, rate=20, max_calls=20, time_scale=300, api_key=KEY)
    if source == "api_key_file":
        key_file = tmp_path / "api_key"
        key_file.write_text(WRONG_KEY + "\n")
        config, env = _config(url, api_key_file=str(key_file)), {"CALLINGBOX_API_KEY": ""}
    else:
        config, env = _config(url), {"CALLINGBOX_API_KEY": WRONG_KEY}
    exporter = stack.exporter(config, env=env).start()

    # A rejected key retries four times slower: each poll comes after the back-off the last one logged.
    rejected = wait_until(lambda: _lines(exporter, "API key rejected"), 20, message="a rejected poll")
    while len(rejected) < 3:
        count, backoff = len(rejected), float(rejected[-1]["backoff_s"])
        rejected = wait_until(
            lambda: len(_lines(exporter, "API key rejected")) > count and _lines(exporter, "API key rejected"),
            backoff + 15,
            message=f"rejected poll {count + 1}",
        )

    # The poll logs its outcome before it persists and publishes: the third 401 shows on /metrics just after.
    samples = wait_until(
        lambda: (
            (found := parse_metrics(http_get(exporter.url + "/metrics")[1]))
            and sample_value(found, "callingbox_exporter_api_requests_total", code="401") >= 3
            and found
        ),
        10,
        message="three 401s published",
    )
    assert sample_value(samples, "callingbox_up") == 0
    assert sample_value(samples, "callingbox_exporter_polls_total", result="success") == 0
    assert http_get(exporter.url + "/-/ready")[0] == 200, "a rejected key is callingbox_up 0, not an unready pod"
    rejected = _lines(exporter, "API key rejected")
    assert all(line["org"] == "default" and line["code"] == "401" for line in rejected), rejected
    # One streak: said once at error, then repeated at debug only; never recovered, nothing else failed.
    assert [line["level"] for line in rejected] == ["error"] + ["debug"] * (len(rejected) - 1), rejected
    assert _lines(exporter, "poll recovered") == [] and _lines(exporter, "poll failed") == []
    assert "401" in http_get(exporter.url + "/")[1], "the landing page shows the error"
    assert _leaks(WRONG_KEY, _everything(exporter)) == []


def _lines(exporter, msg: str) -> list[dict]:
    """The exporter's log lines with message `msg`, as dicts, in order."""
    return [record for record in log_records(exporter.log()) if record["msg"] == msg]


def _recovered(samples, requests_before: float) -> bool:
    """The faulty request and a good one after it are done (counts are published per poll)."""
    return _requests(samples) >= requests_before + 2 and sample_value(samples, "callingbox_up") == 1


@pytest.mark.parametrize("log_format", ["logfmt", "json"])
def test_an_accepted_key_is_shown_nowhere_even_at_debug_level_through_faults(stack, log_format):
    sim, url = stack.simulator(seed=42, rate=40, max_calls=60, time_scale=300, webhook_retry_base=0.01, api_key=KEY)
    exporter = stack.exporter(_config(url), env={"CALLINGBOX_API_KEY": KEY})
    exporter.start("--log.level", "debug", "--log.format", log_format)
    wait_until(exporter.ready, 20, message="a first successful poll")

    # Error paths format exceptions and response bodies: each kind once, then a good poll (two
    # resets in a row, as aiohttp retries the first itself).
    for kind, count, params in (
        ("status", 1, {"code": 503}),
        ("reset", 2, {}),
        ("truncate", 1, {}),
        ("non_json", 1, {}),
        ("unauthorized", 1, {}),
        ("429", 1, {"retry_after": 0.2}),
    ):
        before = _requests(exporter.scrape())
        sim.inject(kind, count=count, **params)
        wait_until(lambda: _recovered(exporter.scrape(), before), 15, message=f"a {kind} fault, then a good poll")
    wait_until(sim.all_final, 30, message="simulator calls final")

    records = log_records(exporter.log())
    assert {"debug"} <= {r["level"] for r in records} and any(r["msg"] == "poll done" for r in records), (
        "debug lines were written"
    )
    # Each fault is a streak of one failed poll, said at warn (error for the key), and its end
    # said once at info; the 429 is waited out inside a poll that does not fail.
    said = [
        (r["msg"], r["level"], r.get("failures"))
        for r in records
        if r["msg"] in ("poll failed", "API key rejected", "poll recovered", "rate limited")
    ]
    streak = [("poll failed", "warn", None), ("poll recovered", "info", "1")]
    assert said == streak * 4 + [
        ("API key rejected", "error", None),
        ("poll recovered", "info", "1"),
        ("rate limited", "warn", None),
    ], said
    assert _leaks(KEY, _everything(exporter)) == []


def _check_config(tmp_path, document: dict, env: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(document))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CALLINGBOX_")}
    return subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(path), "--check-config"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


API_URL = "http://127.0.0.1:9"  # never contacted: --check-config only validates

BAD_CONFIGS = {  # case: (YAML document, environment, the config key the error must name)
    "bad_duration": ({"api_url": API_URL, "poll_interval": "fast"}, {"CALLINGBOX_API_KEY": KEY}, "poll_interval"),
    "key_pasted_into_yaml": ({"api_url": API_URL, "api_key": KEY}, {}, "api_key"),
    "key_given_as_key_file_env": ({"api_url": API_URL}, {"CALLINGBOX_API_KEY_FILE": KEY}, "api_key_file"),
    "key_given_as_key_file_yaml": ({"api_url": API_URL, "api_key_file": KEY}, {}, "api_key_file"),
    "bad_target_with_env_key": (
        {"targets": [{"name": "eu", "api_url": API_URL, "overlap": "-1m"}]},
        {"CALLINGBOX_API_KEY": KEY},
        "targets[0].overlap",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_check_config_names_the_bad_key_in_one_line_without_the_api_key(tmp_path, case):
    document, env, key = BAD_CONFIGS[case]
    result = _check_config(tmp_path, document, env)

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert len(output.splitlines()) == 1, output
    assert key in output, output
    assert _leaks(KEY, {"output": output}) == [], output


def test_check_config_accepts_a_good_config_without_printing_the_key(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY)
    result = _check_config(tmp_path, {"api_url": API_URL, "api_key_file": str(key_file)}, {})

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert _leaks(KEY, {"output": output}) == [], output


def test_a_rotated_key_file_takes_effect_without_a_restart(stack, tmp_path):
    """Kubernetes rotates a Secret by swapping the mounted file; the next poll uses the new key."""
    old_key, new_key = "sk_live_old0Key_3e9f1a7c5b2d8e40", "sk_live_new0Key_9c1e5b7a3d2f6a81"
    sim, url = stack.simulator(seed=43, rate=20, time_scale=300, api_key=old_key)
    key_file = tmp_path / "api_key"
    key_file.write_text(old_key + "\n")
    exporter = stack.exporter(
        _config(url, api_key_file=str(key_file), poll_interval="0.2s"), env={"CALLINGBOX_API_KEY": ""}
    ).start()
    wait_until(exporter.ready, 20, message="first poll with the old key")
    pid = exporter.process.pid

    sim.api_key = new_key  # the platform revoked the old key: polls now get 401
    wait_until(lambda: sample_value(exporter.scrape(), "callingbox_up") == 0, 20, message="up 0 on the revoked key")
    assert sample_value(exporter.scrape(), "callingbox_exporter_api_requests_total", code="401") >= 1

    swapped = tmp_path / "api_key.new"  # written aside, then renamed over: what a Secret update looks like
    swapped.write_text(new_key + "\n")
    os.replace(swapped, key_file)
    wait_until(lambda: sample_value(exporter.scrape(), "callingbox_up") == 1, 20, message="up 1 with the rotated key")
    assert exporter.process.pid == pid and exporter.process.poll() is None  # no restart
    assert 'msg="API key reloaded from its file"' in exporter.log()
    assert _leaks(old_key, _everything(exporter)) == []
    assert _leaks(new_key, _everything(exporter)) == []

    key_file.write_text("")  # an empty (half-written) file: keep the key in use, say so once
    wait_until(lambda: 'msg="API key file unreadable' in exporter.log(), 10, message="unreadable key file logged")
    polls = sample_value(exporter.scrape(), "callingbox_exporter_polls_total", result="success")
    wait_until(
        lambda: sample_value(exporter.scrape(), "callingbox_exporter_polls_total", result="success") >= polls + 3,
        10,
        message="polls still succeeding with the key in use",
    )
    assert exporter.log().count('msg="API key file unreadable') == 1
