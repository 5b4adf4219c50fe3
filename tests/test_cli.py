"""The command line as a user meets it: flags, --once, --demo, and the README's examples."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import trustme

from exporter import __version__, config, webconfig
from helpers import ROOT, Exporter, parse_metrics, wait_until

SPEC_FLAGS = (
    "--config.file",
    "--web.listen-address",
    "--web.telemetry-path",
    "--web.config.file",
    "--log.level",
    "--log.format",
    "--demo",
    "--once",
    "--check-config",
    "--version",
    "--help",
)


def run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_version_and_help_name_every_flag_of_the_spec():
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"callingbox-exporter {__version__}"
    help_ = run("--help")
    assert help_.returncode == 0
    for flag in SPEC_FLAGS:
        assert flag in help_.stdout, flag


@pytest.mark.parametrize(
    "text, line",
    [
        ("poll_interval: fast\napi_key_file: /nonexistent\n", "poll_interval: 'fast' is not a duration (e.g. 15s, 2m)"),
        (
            "targets:\n  - name: acme\n    daily_budget_dollars: -1\n",
            "targets[0].daily_budget_dollars: -1 must be a finite number greater than 0",
        ),
    ],
)
def test_a_config_error_is_one_line_naming_the_key_with_exit_2(tmp_path, text, line):
    bad = tmp_path / "bad.yml"
    bad.write_text(text)
    result = run("--config.file", str(bad), "--check-config")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"callingbox-exporter: config error: {line}"]


@pytest.mark.parametrize(
    "content, problem",
    [
        (
            "basic_auth_users: {prometheus: hunter2}\n",
            "web.config.file: basic_auth_users.prometheus: is not a bcrypt hash",
        ),
        (
            "tls_server_config: {cert_file: /nonexistent.pem, key_file: /nonexistent.key}\n",
            "web.config.file: tls_server_config.cert_file: cannot read /nonexistent.pem",
        ),
        (None, "web.config.file: cannot read"),
    ],
)
def test_a_bad_web_config_file_exits_2_with_one_line_naming_the_key(tmp_path, content, problem):
    web = tmp_path / "web.yml"
    if content is not None:
        web.write_text(content)
    result = run("--demo", "--web.config.file", str(web), "--check-config")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"callingbox-exporter: config error: {problem}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("failing", [False, True], ids=["api-up", "api-down"])
def test_once_polls_prints_the_exposition_and_exits_by_the_poll_result(stack, tmp_path, failing):
    sim, url = stack.simulator(
        seed=4, rate=200, max_calls=40, time_scale=300, webhook_retry_base=0.05, api_key="sk_once"
    )
    wait_until(sim.all_final, 30, message="calls final")
    if failing:
        sim.inject("status", count=1, code=500)
    cfg = tmp_path / "once.yml"
    cfg.write_text(f"api_url: {url}\ninitial_lookback: 1h\n")
    result = run("--config.file", str(cfg), "--once", env={"CALLINGBOX_API_KEY": "sk_once", "PATH": ""})
    samples = parse_metrics(result.stdout)
    created = sum(v for (n, _), v in samples.items() if n == "callingbox_calls_created_total")
    if failing:
        assert result.returncode == 1
        assert samples[("callingbox_up", (("org", "default"),))] == 0 and created == 0
    else:
        assert result.returncode == 0, result.stderr
        assert samples[("callingbox_up", (("org", "default"),))] == 1
        assert created == sim.truth(0).total("callingbox_calls_created_total") == 40


def test_demo_shows_counters_moving_within_seconds(tmp_path):
    exporter = Exporter(tmp_path, None, name="demo").start("--demo")
    try:

        def created() -> float:
            samples = exporter.scrape()
            return sum(v for (n, _), v in samples.items() if n == "callingbox_calls_created_total")

        first = wait_until(created, 20, message="a first call counted in the demo")
        wait_until(lambda: created() > first, 20, message="counters moving")
        assert exporter.ready()
    finally:
        exporter.kill()


WEB_CONFIG = "# --web.config.file\n"  # first line of the README's web config examples


def _readme_yaml_blocks(web: bool = False) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if b.startswith(WEB_CONFIG) == web]


def test_readme_web_config_example_is_valid(tmp_path):
    (block,) = _readme_yaml_blocks(web=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    files = {"tls.crt": server.cert_chain_pems[0], "tls.key": server.private_key_pem, "ca.crt": ca.cert_pem}
    for name, pem in files.items():
        pem.write_to_path(str(tmp_path / name))
    path = tmp_path / "web.yml"
    path.write_text(block.replace("/etc/callingbox-exporter/tls/", f"{tmp_path}/"))
    loaded = webconfig.load(str(path))
    assert loaded.tls is not None and loaded.users and loaded.headers


def test_readme_configuration_examples_are_valid(tmp_path):
    blocks = _readme_yaml_blocks()
    assert len(blocks) >= 2
    key = tmp_path / "key"
    key.write_text("sk_readme\n")
    for block in blocks:
        # The examples name secrets under /run/secrets; point them at a real file here.
        text = re.sub(r"api_key_file: \S+", f"api_key_file: {key}", block)
        path = tmp_path / "example.yml"
        path.write_text(text)
        cfg = config.build(config_file=str(path), env={})
        assert all(t.api_key is not None for t in cfg.targets)


def test_the_quick_start_config_for_the_real_api_exists_and_is_valid():
    """README's "Against the real API" runs `--config.file X`: X ships with the repo and passes."""
    commands = re.findall(r"\.venv/bin/callingbox-exporter --config\.file (\S+)", (ROOT / "README.md").read_text())
    assert commands, "the README's quick start names a config file"
    for name in commands:
        assert (ROOT / name).is_file(), f"README runs --config.file {name}, which does not exist"
        result = run(
            "--config.file",
            name,
            "--check-config",
            env={"CALLINGBOX_API_KEY": "sk_test_quick_start_0123456789", "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 0 and result.stdout.startswith("config ok: 1 target(s)"), result.stderr
    without_key = run("--config.file", commands[0], "--check-config", env={"PATH": "/usr/bin:/bin"})
    assert without_key.returncode == 2 and "key" in without_key.stderr  # it really needs the key from the environment
