"""The exporter-toolkit web config: validation (one line naming the key), basic auth, reloads.

Certificates are made per test run by trustme (a throwaway CA), so nothing secret is committed.
"""

from __future__ import annotations

import base64
import ssl

import bcrypt
import pytest
import trustme
import yaml

from exporter.config import ConfigError
from exporter.webconfig import Guard, load


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate; PEM files on disk."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("scraper@example.com", "prometheus.monitoring.svc")
    files = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
        "client": folder / "client.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    client.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    return {name: str(path) for name, path in files.items()} | {"other_ca": trustme.CA()}


def write(tmp_path, document) -> str:
    path = tmp_path / "web.yml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return str(path)


HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()  # cost 4: fast tests, same code path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_a_full_toolkit_file_loads(tmp_path, pki):
    config = load(
        write(
            tmp_path,
            {
                "tls_server_config": {
                    "cert_file": pki["cert"],
                    "key_file": pki["key"],
                    "client_ca_file": pki["ca"],
                    "client_auth_type": "RequireAndVerifyClientCert",
                    "client_allowed_sans": ["scraper@example.com"],
                    "min_version": "TLS12",
                    "max_version": "TLS13",
                    "prefer_server_cipher_suites": True,
                    "cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"],
                    "curve_preferences": ["CurveP256"],
                },
                "http_server_config": {
                    "http2": True,
                    "headers": {"X-Frame-Options": "deny", "Strict-Transport-Security": "max-age=31536000"},
                },
                "basic_auth_users": {"prometheus": HASH},
            },
        )
    )
    assert config.tls.client_auth == ssl.CERT_REQUIRED
    assert config.tls.ciphers == "ECDHE-RSA-AES128-GCM-SHA256"
    assert config.users == {"prometheus": HASH.encode()}
    assert config.headers == {"X-Frame-Options": "deny", "Strict-Transport-Security": "max-age=31536000"}
    assert set(config.files) >= {pki["cert"], pki["key"], pki["ca"]}


def test_inline_pem_loads_like_files(tmp_path, pki):
    config = load(
        write(tmp_path, {"tls_server_config": {"cert": open(pki["cert"]).read(), "key": open(pki["key"]).read()}})
    )
    assert config.tls.client_auth == ssl.CERT_NONE


def test_an_empty_file_means_plain_http_without_auth(tmp_path):
    config = load(write(tmp_path, ""))
    assert (config.tls, dict(config.users), dict(config.headers)) == (None, {}, {})


@pytest.mark.parametrize(
    "document, key, problem",
    [
        ("tls_server_config: [", "web.config.file", "is not valid YAML"),
        ({"tls_config": {}}, "web.config.file: tls_config", "unknown key"),
        ({"tls_server_config": {"cert_file": "CERT"}}, "tls_server_config.key_file", "required"),
        (
            {"tls_server_config": {"cert_file": "/nonexistent.pem", "key_file": "KEY"}},
            "tls_server_config.cert_file",
            "cannot read /nonexistent.pem",
        ),
        (
            {"tls_server_config": {"cert_file": "CERT", "key_file": "KEY", "certfile": 1}},
            "tls_server_config.certfile",
            "unknown key",
        ),
        (
            {"tls_server_config": {"cert_file": "CERT", "key_file": "CA"}},
            "tls_server_config.key_file",
            "do not load together",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "CERT",
                    "key_file": "KEY",
                    "client_auth_type": "RequireAndVerifyClientCert",
                }
            },
            "tls_server_config.client_ca_file",
            "required by client_auth_type",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "CERT",
                    "key_file": "KEY",
                    "client_auth_type": "RequireAnyClientCert",
                    "client_ca_file": "CA",
                }
            },
            "tls_server_config.client_auth_type",
            "is not supported",
        ),
        (
            {"tls_server_config": {"cert_file": "CERT", "key_file": "KEY", "client_auth_type": "Sometimes"}},
            "tls_server_config.client_auth_type",
            "'Sometimes' is not one of",
        ),
        (
            {"tls_server_config": {"cert_file": "CERT", "key_file": "KEY", "client_ca_file": "CA"}},
            "tls_server_config.client_auth_type",
            "without a client auth policy",
        ),
        (
            {"tls_server_config": {"cert_file": "CERT", "key_file": "KEY", "min_version": "TLS14"}},
            "tls_server_config.min_version",
            "'TLS14' is not one of",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "CERT",
                    "key_file": "KEY",
                    "min_version": "TLS13",
                    "max_version": "TLS12",
                }
            },
            "tls_server_config.min_version",
            "above max_version",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "CERT",
                    "key_file": "KEY",
                    "cipher_suites": ["TLS_RSA_WITH_RC4_128_SHA"],
                }
            },
            "tls_server_config.cipher_suites",
            "not a supported cipher suite",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "CERT",
                    "key_file": "KEY",
                    "curve_preferences": ["X25519", "CurveP256"],
                }
            },
            "tls_server_config.curve_preferences",
            "one curve only",
        ),
        (
            {"tls_server_config": {"cert_file": "CERT", "key_file": "KEY", "client_allowed_sans": ["a"]}},
            "tls_server_config.client_allowed_sans",
            "requires client_auth_type",
        ),
        ({"basic_auth_users": {"alice": "plaintext"}}, "basic_auth_users.alice", "not a bcrypt hash"),
        ({"basic_auth_users": {"alice": "$2y$10$short"}}, "basic_auth_users.alice", "not a valid bcrypt hash"),
        ({"basic_auth_users": ["alice"]}, "basic_auth_users", "expected a mapping"),
        (
            {"http_server_config": {"headers": {"X-Frame-Options": "allow"}}},
            "http_server_config.headers.X-Frame-Options",
            "expected deny or sameorigin",
        ),
        (
            {"http_server_config": {"headers": {"X-Powered-By": "me"}}},
            "http_server_config.headers.X-Powered-By",
            "unknown key",
        ),
        ({"http_server_config": {"http2": "yes"}}, "http_server_config.http2", "is not true or false"),
        ({"rate_limit": {"interval": "1s", "burst": 5}}, "rate_limit", "not supported"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_key(tmp_path, pki, document, key, problem):
    if isinstance(document, dict):
        names = {"CERT": pki["cert"], "KEY": pki["key"], "CA": pki["ca"]}
        tls = document.get("tls_server_config", {})
        for name in ("cert_file", "key_file", "client_ca_file"):
            if tls.get(name) in names:
                tls[name] = names[tls[name]]
    with pytest.raises(ConfigError) as raised:
        load(write(tmp_path, document))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(key if key.startswith("web.config.file") else f"web.config.file: {key}"), message
    assert problem in message, message


def test_a_missing_file_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^web.config.file: cannot read .*nope.yml: No such file"):
        load(str(tmp_path / "nope.yml"))


async def test_basic_auth_accepts_the_right_password_only(tmp_path):
    guard = Guard(*(lambda p: (p, load(p)))(write(tmp_path, {"basic_auth_users": {"prometheus": HASH}})))
    assert await guard.authorized(basic("prometheus", "s3cret"))
    assert await guard.authorized(basic("prometheus", "s3cret"))  # cached the second time
    assert not await guard.authorized(basic("prometheus", "wrong"))
    assert not await guard.authorized(basic("mallory", "s3cret"))
    assert not await guard.authorized(None)
    assert not await guard.authorized("Bearer s3cret")
    assert not await guard.authorized("Basic !!!notbase64")
    assert guard.needs_auth("/metrics") and guard.needs_auth("/")
    assert not guard.needs_auth("/-/healthy") and not guard.needs_auth("/-/ready")


async def test_a_changed_file_is_re_read_and_a_broken_one_keeps_the_old(tmp_path):
    now = [0.0]
    path = write(tmp_path, {"basic_auth_users": {"prometheus": HASH}})
    guard = Guard(path, load(path), clock=lambda: now[0])
    assert await guard.authorized(basic("prometheus", "s3cret"))

    new_hash = bcrypt.hashpw(b"rotated", bcrypt.gensalt(4)).decode()
    write(tmp_path, {"basic_auth_users": {"prometheus": new_hash}})
    guard.refresh()  # within the re-check interval: not looked at yet
    assert await guard.authorized(basic("prometheus", "s3cret"))
    now[0] += 2
    guard.refresh()
    assert not await guard.authorized(basic("prometheus", "s3cret"))  # the cache went with the old file
    assert await guard.authorized(basic("prometheus", "rotated"))

    write(tmp_path, "basic_auth_users: {prometheus: plaintext, extra: 1}\n# changed")
    now[0] += 2
    guard.refresh()
    assert await guard.authorized(basic("prometheus", "rotated"))  # the last good file still rules


def test_turning_tls_on_needs_a_restart(tmp_path, pki, caplog):
    now = [0.0]
    path = write(tmp_path, {"basic_auth_users": {"prometheus": HASH}})
    guard = Guard(path, load(path), clock=lambda: now[0])
    write(tmp_path, {"tls_server_config": {"cert_file": pki["cert"], "key_file": pki["key"]}})
    now[0] += 2
    guard.refresh()
    assert guard.config.tls is None and guard.context is None
    assert "needs a restart" in caplog.records[-1].error
