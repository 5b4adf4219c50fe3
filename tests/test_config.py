"""config.build: YAML + environment + flags → a validated Config, or one clear ConfigError line."""

from __future__ import annotations

import pytest

from exporter.catalogue import DEFAULT_BUCKETS
from exporter.config import Config, ConfigError, Secret, Target, build, parse_duration
from exporter.store import Store

KEY = "sk_live_9f8e7d6c5b4a"


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "api_key"
    path.write_text(KEY + "\n")
    return str(path)


@pytest.fixture
def write_config(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "callingbox.yml"
        path.write_text(text)
        return str(path)

    return write


def config_error(**kwargs) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as raised:
        build(**kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


# --- defaults ------------------------------------------------------------------------------------


def test_defaults_follow_the_spec(write_config, key_file):
    config = build(config_file=write_config(f"api_key_file: {key_file}\n"), env={})
    assert config == Config(
        targets=(Target(name="default", api_key=Secret(KEY), api_key_file=key_file),),
        listen_host=None,
        listen_port=9860,
        telemetry_path="/metrics",
    )
    target = config.targets[0]
    assert (target.api_url, target.poll_interval, target.settle_window, target.overlap) == (
        "https://api.callingbox.io",
        15.0,
        259200.0,
        120.0,
    )
    assert (target.initial_lookback, target.state_file, target.max_label_values) == (0.0, None, 50)


# SPEC §3, typed out: a change to the defaults in the code must fail here, not pass unnoticed.
SPEC_DURATIONS = (0, 5, 10, 20, 30, 60, 120, 180, 300, 600, 1200, 1800, 3600)
SPEC_DELAYS = (0.5, 1, 2, 3, 5, 8, 10, 15, 20, 30, 45, 60)
SPEC_BUCKETS = {
    "callingbox_call_duration_seconds": SPEC_DURATIONS,
    "callingbox_call_billed_duration_seconds": SPEC_DURATIONS,
    "callingbox_call_answer_delay_seconds": SPEC_DELAYS,
    "callingbox_call_setup_delay_seconds": SPEC_DELAYS,
}


def test_default_histogram_buckets_are_the_specs(write_config, key_file):
    assert {name: tuple(DEFAULT_BUCKETS.get(name, ())) for name in SPEC_BUCKETS} == SPEC_BUCKETS
    (target,) = build(config_file=write_config(f"api_key_file: {key_file}\n"), env={}).targets
    loaded = Store(dict(target.buckets), target.max_label_values).buckets  # as the poller builds its store
    assert {name: tuple(loaded[name]) for name in SPEC_BUCKETS} == SPEC_BUCKETS


def test_demo_needs_no_config_file_and_no_key():
    config = build(demo=True, env={})
    assert config.demo is True
    assert [(t.name, t.api_key) for t in config.targets] == [("default", None)]


def test_every_single_target_key_is_read(write_config, key_file, tmp_path):
    state = str(tmp_path / "state.json")
    config = build(
        config_file=write_config(
            f"api_url: http://127.0.0.1:8080/\n"
            f"api_key_file: {key_file}\n"
            "poll_interval: 30s\n"
            "request_timeout: 5s\n"
            f"state_file: {state}\n"
            "initial_lookback: 1h\n"
            "settle_window: 96h\n"
            "overlap: 5m\n"
            "max_label_values: 20\n"
            "buckets:\n  call_duration_seconds: [1, 10, 100]\n"
        ),
        listen_address="127.0.0.1:9100",
        telemetry_path="/stats",
        env={},
    )
    assert config.targets == (
        Target(
            name="default",
            api_url="http://127.0.0.1:8080",
            api_key=Secret(KEY),
            api_key_file=key_file,
            poll_interval=30.0,
            request_timeout=5.0,
            state_file=state,
            initial_lookback=3600.0,
            settle_window=345600.0,
            overlap=300.0,
            max_label_values=20,
            buckets={"callingbox_call_duration_seconds": (1.0, 10.0, 100.0)},
        ),
    )
    assert (config.listen_host, config.listen_port, config.telemetry_path) == ("127.0.0.1", 9100, "/stats")


# --- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_value, seconds",
    [
        ("15s", 15.0),
        ("2m", 120.0),
        ("72h", 259200.0),
        ("1h30m", 5400.0),
        ("90", 90.0),
        ("1.5", 1.5),
        ('"90"', 90.0),
        ('"1.5"', 1.5),
        ("500ms", 0.5),
    ],
)
def test_durations_parse_to_seconds(write_config, key_file, yaml_value, seconds):
    config = build(config_file=write_config(f"api_key_file: {key_file}\npoll_interval: {yaml_value}\n"), env={})
    assert config.targets[0].poll_interval == seconds


@pytest.mark.parametrize("value", ["fast", "-5s", "1h30", "15 s", "15S", "", True, None, [15]])
def test_a_value_that_is_no_duration_is_rejected_with_an_example(value):
    with pytest.raises(ConfigError) as raised:
        parse_duration("poll_interval", value)
    assert str(raised.value) == f"poll_interval: {value!r} is not a duration (e.g. 15s, 2m)"


def test_bad_duration_in_the_file_names_the_key(write_config, key_file):
    message = config_error(config_file=write_config(f"api_key_file: {key_file}\npoll_interval: fast\n"))
    assert message == "poll_interval: 'fast' is not a duration (e.g. 15s, 2m)"


def test_zero_poll_interval_is_rejected(write_config, key_file):
    message = config_error(config_file=write_config(f"api_key_file: {key_file}\npoll_interval: 0s\n"))
    assert message == "poll_interval: '0s' must be greater than 0"


def test_negative_overlap_is_rejected(write_config, key_file):
    message = config_error(config_file=write_config(f"api_key_file: {key_file}\noverlap: -1\n"))
    assert message == "overlap: -1 must not be negative"


@pytest.mark.parametrize(
    "line, message",
    [
        ("hot_window: soon", "hot_window: 'soon' is not a duration (e.g. 15s, 2m)"),
        ("full_read_interval: -1h", "full_read_interval: '-1h' is not a duration (e.g. 15s, 2m)"),
        ("open_refresh_interval: 0s", "open_refresh_interval: '0s' must be greater than 0"),
    ],
)
def test_bad_read_tier_settings_are_named(write_config, key_file, line, message):
    assert config_error(config_file=write_config(f"api_key_file: {key_file}\n{line}\n")) == message


def test_read_tiers_default_to_a_hot_half_hour_a_full_read_with_each_3h_audit_and_5m_refreshes(write_config, key_file):
    target = build(config_file=write_config(f"api_key_file: {key_file}\n"), env={}).targets[0]
    assert (target.hot_window, target.full_read_interval, target.open_refresh_interval) == (1800.0, 3 * 3600.0, 300.0)
    assert target.audit_interval == target.full_read_interval  # the audits are the full reads (README)
    cautious = build(config_file=write_config(f"api_key_file: {key_file}\nfull_read_interval: 0s\n"), env={})
    assert cautious.targets[0].full_read_interval == 0.0


# --- errors: one line, key first -----------------------------------------------------------------


def test_unknown_key_is_named(write_config, key_file):
    message = config_error(config_file=write_config(f"api_key_file: {key_file}\npol_interval: 15s\n"))
    assert message == "pol_interval: unknown key"


@pytest.mark.parametrize("url", ["ftp://api.callingbox.io", "api.callingbox.io", "https://", "42"])
def test_bad_api_url_is_named(write_config, key_file, url):
    message = config_error(config_file=write_config(f"api_key_file: {key_file}\napi_url: '{url}'\n"))
    assert message.startswith("api_url: ")
    assert message.endswith("is not an http(s) URL")


def test_missing_key_file_is_named(write_config, tmp_path):
    missing = tmp_path / "nope"
    message = config_error(config_file=write_config(f"api_key_file: {missing}\n"))
    assert message == f"api_key_file: cannot read {missing}: No such file or directory"


def test_empty_key_file_is_named(write_config, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    message = config_error(config_file=write_config(f"api_key_file: {empty}\n"))
    assert message == f"api_key_file: {empty} is empty"


def test_missing_api_key_is_an_error_outside_demo_mode():
    message = config_error()
    assert message.startswith("api_key_file: no API key")


def test_invalid_yaml_names_the_config_file_and_line(write_config):
    path = write_config("poll_interval: 15s\napi_url: [unclosed\n")
    message = config_error(config_file=path)
    assert message.startswith(f"config.file: {path} is not valid YAML at line ")


def test_yaml_that_is_not_a_mapping_is_rejected(write_config):
    path = write_config("- a\n- b\n")
    assert config_error(config_file=path) == f"config.file: {path} must hold a mapping of keys"


def test_unreadable_config_file_is_named(tmp_path):
    missing = tmp_path / "missing.yml"
    assert config_error(config_file=str(missing)) == f"config.file: cannot read {missing}: No such file or directory"


def test_duplicate_target_names_are_rejected(write_config, key_file):
    path = write_config(f"api_key_file: {key_file}\ntargets:\n  - name: acme\n  - name: acme\n")
    assert config_error(config_file=path) == "targets[1].name: 'acme' is used by another target"


def test_duplicate_state_files_are_rejected(write_config, key_file, tmp_path):
    state = tmp_path / "state.json"
    path = write_config(
        f"api_key_file: {key_file}\ntargets:\n  - name: a\n    state_file: {state}\n"
        f"  - name: b\n    state_file: {state}\n"
    )
    assert config_error(config_file=path) == f"targets[1].state_file: '{state}' is used by another target"


def test_state_file_inherited_by_two_targets_is_a_duplicate(write_config, key_file, tmp_path):
    state = tmp_path / "state.json"
    path = write_config(f"api_key_file: {key_file}\nstate_file: {state}\ntargets:\n  - name: a\n  - name: b\n")
    assert config_error(config_file=path) == f"targets[1].state_file: '{state}' is used by another target"


@pytest.mark.parametrize(
    "buckets, key",
    [
        ("{call_duration_seconds: [10, 5]}", "buckets.call_duration_seconds"),
        ("{call_duration_seconds: []}", "buckets.call_duration_seconds"),
        ("{call_duration_seconds: [1, 1, 2]}", "buckets.call_duration_seconds"),
        ("{call_duration_seconds: [1, x]}", "buckets.call_duration_seconds"),
        ("{call_duration_seconds: 5}", "buckets.call_duration_seconds"),
        ("{call_length_seconds: [1, 2]}", "buckets.call_length_seconds"),
        ("[1, 2]", "buckets"),
    ],
)
def test_bad_bucket_list_is_named(write_config, key_file, buckets, key):
    message = config_error(config_file=write_config(f"api_key_file: {key_file}\nbuckets: {buckets}\n"))
    assert message.startswith(f"{key}: ")


@pytest.mark.parametrize("address", ["9860", "localhost", ":http", "host:99999", ""])
def test_bad_listen_address_is_named(key_file, address):
    message = config_error(listen_address=address, env={"CALLINGBOX_API_KEY_FILE": key_file})
    assert message == f"web.listen-address: {address!r} is not [HOST]:PORT"


@pytest.mark.parametrize(
    "address, host, port", [(":9860", None, 9860), ("0.0.0.0:80", "0.0.0.0", 80), ("[::1]:9100", "::1", 9100)]
)
def test_listen_address_splits_into_host_and_port(address, host, port):
    config = build(listen_address=address, demo=True, env={})
    assert (config.listen_host, config.listen_port) == (host, port)


# --- environment ---------------------------------------------------------------------------------


def test_env_api_key_overrides_the_single_target(write_config, key_file):
    config = build(config_file=write_config(f"api_key_file: {key_file}\n"), env={"CALLINGBOX_API_KEY": "sk_from_env"})
    assert config.targets[0].api_key == Secret("sk_from_env")


def test_env_api_key_alone_is_enough():
    assert build(env={"CALLINGBOX_API_KEY": "sk_from_env"}).targets[0].api_key == Secret("sk_from_env")


def test_env_api_key_file_overrides_the_single_target(write_config, key_file, tmp_path):
    other = tmp_path / "other_key"
    other.write_text("sk_other\n")
    config = build(config_file=write_config(f"api_key_file: {key_file}\n"), env={"CALLINGBOX_API_KEY_FILE": str(other)})
    assert (config.targets[0].api_key, config.targets[0].api_key_file) == (Secret("sk_other"), str(other))


def test_env_api_url_overrides_the_single_target(write_config, key_file):
    config = build(
        config_file=write_config(f"api_key_file: {key_file}\napi_url: https://eu.callingbox.io\n"),
        env={"CALLINGBOX_API_URL": "http://127.0.0.1:8181/"},
    )
    assert config.targets[0].api_url == "http://127.0.0.1:8181"


def test_bad_env_api_url_names_the_variable():
    message = config_error(env={"CALLINGBOX_API_URL": "nope", "CALLINGBOX_API_KEY": "sk"})
    assert message == "CALLINGBOX_API_URL: 'nope' is not an http(s) URL"


# --- several targets -----------------------------------------------------------------------------


def test_targets_inherit_top_level_defaults_and_override_them(write_config, key_file, tmp_path):
    acme_key = tmp_path / "acme_key"
    acme_key.write_text("sk_acme")
    path = write_config(
        f"api_key_file: {key_file}\n"
        "poll_interval: 30s\n"
        "settle_window: 48h\n"
        "targets:\n"
        "  - name: globex\n"
        f"  - name: acme\n    api_key_file: {acme_key}\n    poll_interval: 1m\n    api_url: http://localhost:1234\n"
    )
    config = build(config_file=path, env={})
    assert config.targets == (
        Target(name="globex", api_key=Secret(KEY), api_key_file=key_file, poll_interval=30.0, settle_window=172800.0),
        Target(
            name="acme",
            api_url="http://localhost:1234",
            api_key=Secret("sk_acme"),
            api_key_file=str(acme_key),
            poll_interval=60.0,
            settle_window=172800.0,
        ),
    )


def test_unknown_key_inside_a_target_is_named_with_its_index(write_config, key_file):
    path = write_config(f"api_key_file: {key_file}\ntargets:\n  - name: a\n  - name: b\n    colour: red\n")
    assert config_error(config_file=path) == "targets[1].colour: unknown key"


def test_target_without_a_key_is_named_with_its_index(write_config, key_file):
    path = write_config(f"targets:\n  - name: a\n    api_key_file: {key_file}\n  - name: b\n")
    assert config_error(config_file=path).startswith("targets[1].api_key_file: no API key")


# --- the key never shows ---------------------------------------------------------------------------


def test_secret_never_shows_its_value():
    secret = Secret(KEY)
    shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s" % secret, f"{secret}"]  # noqa: UP031 (each spelling)
    assert [KEY in text for text in shown] == [False] * len(shown)
    assert secret.reveal() == KEY


def test_target_and_config_reprs_hide_the_key(write_config, key_file):
    config = build(config_file=write_config(f"api_key_file: {key_file}\n"), env={})
    assert config.targets[0].api_key.reveal() == KEY
    for text in (repr(config), str(config), repr(config.targets[0]), f"{config.targets}"):
        assert KEY not in text
        assert "Secret('***')" in text


def test_key_from_env_never_shows_in_config_repr():
    config = build(env={"CALLINGBOX_API_KEY": KEY})
    assert KEY not in repr(config)


# --- metadata labels ------------------------------------------------------------------------------


def test_metadata_labels_map_metadata_keys_to_label_names_in_order(write_config, key_file):
    cfg = build(
        config_file=write_config(
            f"api_key_file: {key_file}\nmetadata_labels: {{campaign_id: campaign, tier: customer_tier}}\n"
        ),
        env={},
    )
    assert cfg.targets[0].metadata_labels == (("campaign_id", "campaign"), ("tier", "customer_tier"))


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "[campaign]",
            "metadata_labels: expected a mapping of metadata key to label name, e.g. {campaign_id: campaign}",
        ),
        (
            "{campaign: 2cool}",
            "metadata_labels.campaign: '2cool' is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
        ),
        (
            "{campaign: __name__}",
            "metadata_labels.campaign: '__name__' is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
        ),
        ("{campaign: status}", "metadata_labels.campaign: 'status' is a label the exporter or Prometheus already uses"),
        (
            "{campaign: instance}",
            "metadata_labels.campaign: 'instance' is a label the exporter or Prometheus already uses",
        ),
        ("{a: x, b: x}", "metadata_labels.b: 'x' is given to another metadata key"),
        (
            "{a: a, b: b, c: c, d: d, e: e, f: f}",
            "metadata_labels: 6 labels: at most 5, each multiplies the series count",
        ),
    ],
)
def test_bad_metadata_labels_are_named(write_config, key_file, value, message):
    assert config_error(config_file=write_config(f"api_key_file: {key_file}\nmetadata_labels: {value}\n")) == message


# --- daily_budget_dollars (issue 23) -------------------------------------------------------------


def test_daily_budget_is_optional_and_read_as_dollars(write_config, key_file):
    assert (
        build(config_file=write_config(f"api_key_file: {key_file}\n"), env={}).targets[0].daily_budget_dollars is None
    )
    for value, dollars in (("250", 250.0), ("99.5", 99.5), ("0.01", 0.01)):
        target = build(
            config_file=write_config(f"api_key_file: {key_file}\ndaily_budget_dollars: {value}\n"), env={}
        ).targets[0]
        assert target.daily_budget_dollars == dollars


def test_daily_budget_is_inherited_by_targets_and_overridden_per_target(write_config, key_file):
    path = write_config(
        f"api_key_file: {key_file}\ndaily_budget_dollars: 100\n"
        "targets:\n  - name: acme\n  - name: globex\n    daily_budget_dollars: 2500\n"
    )
    assert [(t.name, t.daily_budget_dollars) for t in build(config_file=path, env={}).targets] == [
        ("acme", 100.0),
        ("globex", 2500.0),
    ]


@pytest.mark.parametrize(
    "value, problem",
    [
        ("lots", "'lots' is not a number of dollars (e.g. 250 or 99.50)"),
        ('"250"', "'250' is not a number of dollars (e.g. 250 or 99.50)"),
        ("true", "True is not a number of dollars (e.g. 250 or 99.50)"),
        ("[250]", "[250] is not a number of dollars (e.g. 250 or 99.50)"),
        ("0", "0 must be a finite number greater than 0"),
        ("-5", "-5 must be a finite number greater than 0"),
        (".inf", "inf must be a finite number greater than 0"),
        (".nan", "nan must be a finite number greater than 0"),
    ],
)
def test_a_bad_daily_budget_is_named(write_config, key_file, value, problem):
    single = write_config(f"api_key_file: {key_file}\ndaily_budget_dollars: {value}\n")
    assert config_error(config_file=single) == f"daily_budget_dollars: {problem}"
    listed = write_config(
        f"api_key_file: {key_file}\ntargets:\n  - name: a\n  - name: b\n    daily_budget_dollars: {value}\n"
    )
    assert config_error(config_file=listed) == f"targets[1].daily_budget_dollars: {problem}"


# --- born at zero and label churn (SPEC §3) ----------------------------------------------------------


def test_new_series_hold_and_label_idle_default_to_a_minute_and_a_week(write_config, key_file):
    (target,) = build(config_file=write_config(f"api_key_file: {key_file}\n"), env={}).targets
    assert (target.new_series_hold, target.label_idle) == (60.0, 7 * 86400.0)


def test_new_series_hold_and_label_idle_are_read_per_target(write_config, key_file):
    path = write_config(
        f"api_key_file: {key_file}\nnew_series_hold: 0s\nlabel_idle: 30d\n"
        "targets:\n  - name: a\n  - name: b\n    new_series_hold: 2m\n    label_idle: 36h\n"
    )
    targets = build(config_file=path, env={}).targets
    assert [(t.name, t.new_series_hold, t.label_idle) for t in targets] == [
        ("a", 0.0, 30 * 86400.0),
        ("b", 120.0, 36 * 3600.0),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ("new_series_hold: -1s", "new_series_hold: '-1s' is not a duration (e.g. 15s, 2m)"),
        ("new_series_hold: -5", "new_series_hold: -5 must not be negative"),
        ("new_series_hold: soon", "new_series_hold: 'soon' is not a duration (e.g. 15s, 2m)"),
        ("label_idle: 0s", "label_idle: '0s' must be greater than 0"),
        ("label_idle: forever", "label_idle: 'forever' is not a duration (e.g. 15s, 2m)"),
        ("targets:\n  - name: a\n    label_idle: 0", "targets[0].label_idle: 0 must be greater than 0"),
    ],
)
def test_bad_new_series_hold_and_label_idle_are_named(write_config, key_file, line, message):
    assert config_error(config_file=write_config(f"api_key_file: {key_file}\n{line}\n")) == message
