"""Reload (POST /-/reload and SIGHUP): targets change while the others' counters carry on.

The story: orgs a and b run. A reload changes a's poll interval, removes b and adds c: b's
series leave /metrics, c appears, a's counters never go back. An invalid config is refused
(500, logged) and the running one keeps serving. SIGHUP brings b back from its state file,
and in the end every org equals its simulator's truth: nothing lost or counted twice across
reloads, including b's calls made while it was not polled.
"""

from __future__ import annotations

import re
import signal
import urllib.error
import urllib.request

import yaml

from helpers import assert_orgs_exact, http_get, wait_until

KEY = "sk_test_reload_0123456789"


def post(url: str) -> tuple[int, str]:
    request = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def orgs_on(samples) -> set[str]:
    return {dict(labels)["org"] for (name, labels) in samples if name == "callingbox_up"}


def created(samples, org: str) -> float:
    return sum(v for (n, lbl), v in samples.items() if n == "callingbox_calls_created_total" and ("org", org) in lbl)


def test_reload_adds_removes_and_changes_targets_without_losing_counts(stack, tmp_path):
    sims, target = {}, {}
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    for seed, org in enumerate("abc", start=51):
        sim, url = stack.simulator(
            seed=seed, rate=25, max_calls=400, time_scale=300, webhook_retry_base=0.05, api_key=KEY
        )
        sims[org] = sim
        target[org] = {
            "name": org,
            "api_url": url,
            "api_key_file": str(key_file),
            "state_file": str(tmp_path / f"{org}.json"),
        }
    config_path = tmp_path / "exporter.yml"

    def configure(*entries: dict, **top) -> None:
        # new_series_hold 0s: counts reach /metrics at once (born at zero is not this story; see write_exporter_config)
        config_path.write_text(
            yaml.safe_dump(
                {
                    "poll_interval": "0.3s",
                    "overlap": "10s",
                    "initial_lookback": "1h",
                    "new_series_hold": "0s",
                    **top,
                    "targets": list(entries),
                }
            )
        )

    configure(target["a"], target["b"])
    exporter = stack.exporter(None)
    exporter.config_path = config_path
    exporter.start()
    wait_until(exporter.ready, 20, message="a and b polled")
    wait_until(lambda: created(exporter.scrape(), "b") > 0, 20, message="b counting")
    before = exporter.scrape()

    # a changed (its interval), b removed, c added.
    configure({**target["a"], "poll_interval": "0.5s"}, target["c"])
    status, body = post(exporter.url + "/-/reload")
    assert (status, body) == (200, "Reloaded: added c; removed b; changed a.\n")
    wait_until(lambda: created(exporter.scrape(), "c") > 0, 20, message="c counting")
    after = exporter.scrape()
    assert orgs_on(after) == {"a", "c"}
    assert created(after, "b") == 0 and not [k for k in after if ("org", "b") in k[1]]
    assert created(after, "a") >= created(before, "a")
    assert re.findall(r'data-org="([^"]+)"', http_get(exporter.url + "/")[1]) == ["a", "c"]

    # An invalid config is refused; the running one stays.
    config_path.write_text(config_path.read_text().replace("poll_interval: 0.3s", "poll_interval: soon"))
    status, body = post(exporter.url + "/-/reload")
    assert status == 500 and body.startswith("failed to reload config: poll_interval: 'soon' is not a duration"), body
    assert 'msg="config not reloaded; the running one stays in force"' in exporter.log()
    polls = sum(
        v
        for (n, lbl), v in exporter.scrape().items()
        if n == "callingbox_exporter_polls_total" and ("result", "success") in lbl
    )
    wait_until(
        lambda: (
            sum(
                v
                for (n, lbl), v in exporter.scrape().items()
                if n == "callingbox_exporter_polls_total" and ("result", "success") in lbl
            )
            > polls + 4
        ),
        10,
        message="a and c still polling",
    )

    # SIGHUP brings b back, restored from its state file.
    configure({**target["a"], "poll_interval": "0.5s"}, target["b"], target["c"])
    exporter.process.send_signal(signal.SIGHUP)
    wait_until(lambda: orgs_on(exporter.scrape()) == {"a", "b", "c"}, 20, message="b back after SIGHUP")
    assert created(exporter.scrape(), "b") >= created(before, "b")  # restored, not restarted from zero
    assert exporter.process.poll() is None

    assert_orgs_exact(exporter, sims)
