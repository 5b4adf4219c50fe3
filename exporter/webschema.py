"""The exporter-toolkit web config file (`--web.config.file`) → a checked, frozen `WebConfig`.

`load()` reads the file and checks it key by key, as the toolkit does (TLS, client auth, users,
headers); every problem is one line naming the key (exit 2). `ssl_context()` turns its TLS part
into the server's `SSLContext`. `webconfig.py`, below, keeps the config in force while serving.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import bcrypt
import yaml

from .config import ConfigError

KEY = "web.config.file"
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's client auth policies that Python's ssl can enforce. Request/RequireAny (a certificate
# asked for but not verified) have no equivalent: OpenSSL verifies whatever it is given.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNVERIFIED_CLIENT_AUTH = {"RequestClientCert", "RequireAnyClientCert"}
# Go's TLS 1.2 suite names (those of tls.CipherSuites()) → OpenSSL's. TLS 1.3 suites are not
# configurable, in Go as here, and are accepted and ignored.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
TLS13_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
# The headers the toolkit allows, with the values it accepts (None: any).
HEADERS: dict[str, set[str] | None] = {
    "Content-Security-Policy": None,
    "X-Frame-Options": {"deny", "sameorigin"},
    "X-Content-Type-Options": {"nosniff"},
    "X-XSS-Protection": None,
    "Strict-Transport-Security": None,
}
TLS_KEYS = {
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
}


@dataclass(frozen=True)
class TlsConfig:
    cert: str  # PEM, read from cert_file or given inline
    key: str
    client_ca: str | None
    client_auth: ssl.VerifyMode
    allowed_sans: frozenset[str]
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    ciphers: str | None  # OpenSSL cipher string, None for the defaults
    prefer_server_ciphers: bool
    curve: str | None


@dataclass(frozen=True)
class WebConfig:
    tls: TlsConfig | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user → bcrypt hash
    headers: Mapping[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()  # every file read: a change to any of them means a re-read


def _error(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{KEY}: {key}", problem)


def _mapping(value: Any, key: str, allowed: set[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _error(key, "expected a mapping")
    unknown = sorted(set(map(str, value)) - allowed)
    if unknown:
        raise _error(f"{key}.{unknown[0]}" if key else unknown[0], "unknown key")
    return value


def _strings(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _error(key, "expected a list of strings")
    return value


def _pem(raw: Mapping[str, Any], name: str, files: list[str], required: bool) -> str | None:
    """A PEM given inline (`cert`) or by file (`cert_file`), never both."""
    inline, path = raw.get(name), raw.get(f"{name}_file")
    where = f"tls_server_config.{name}"
    if inline is not None and path is not None:
        raise _error(f"{where}_file", f"give {name} or {name}_file, not both")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise _error(f"{where}_file", f"{path!r} is not a file path")
        try:
            with open(path, encoding="ascii") as f:
                inline = f.read()
        except (OSError, UnicodeDecodeError) as error:
            raise _error(f"{where}_file", f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
        files.append(path)
        where = f"{where}_file"
    if inline is None:
        if required:
            raise _error(f"{where}_file", "required when tls_server_config is given")
        return None
    if not isinstance(inline, str) or "-----BEGIN " not in inline:
        raise _error(where, "is not PEM data")
    return inline


def _tls(raw: Mapping[str, Any], files: list[str]) -> TlsConfig:
    cert, key = _pem(raw, "cert", files, True), _pem(raw, "key", files, True)
    client_ca = _pem(raw, "client_ca", files, False)
    auth_name = raw.get("client_auth_type", "NoClientCert")
    if auth_name in UNVERIFIED_CLIENT_AUTH:
        raise _error(
            "tls_server_config.client_auth_type",
            f"{auth_name} (a client certificate accepted unverified) "
            "is not supported: use RequireAndVerifyClientCert or VerifyClientCertIfGiven",
        )
    if auth_name not in CLIENT_AUTH:
        raise _error("tls_server_config.client_auth_type", f"{auth_name!r} is not one of {', '.join(CLIENT_AUTH)}")
    client_auth = CLIENT_AUTH[auth_name]
    if client_auth != ssl.CERT_NONE and client_ca is None:
        raise _error("tls_server_config.client_ca_file", f"required by client_auth_type {auth_name}")
    if client_auth == ssl.CERT_NONE and client_ca is not None:
        raise _error("tls_server_config.client_auth_type", "client CAs are configured without a client auth policy")
    sans = _strings(raw.get("client_allowed_sans"), "tls_server_config.client_allowed_sans")
    if sans and client_auth != ssl.CERT_REQUIRED:
        raise _error("tls_server_config.client_allowed_sans", "requires client_auth_type RequireAndVerifyClientCert")
    versions = []
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        value = raw.get(name, default)
        if value not in TLS_VERSIONS:
            raise _error(f"tls_server_config.{name}", f"{value!r} is not one of {', '.join(TLS_VERSIONS)}")
        versions.append(TLS_VERSIONS[value])
    if versions[0] > versions[1]:
        raise _error("tls_server_config.min_version", "is above max_version")
    suites = _strings(raw.get("cipher_suites"), "tls_server_config.cipher_suites")
    unknown = [s for s in suites if s not in CIPHER_SUITES and s not in TLS13_SUITES]
    if unknown:
        raise _error("tls_server_config.cipher_suites", f"{unknown[0]!r} is not a supported cipher suite")
    ciphers = ":".join(CIPHER_SUITES[s] for s in suites if s in CIPHER_SUITES) or None
    prefer = raw.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise _error("tls_server_config.prefer_server_cipher_suites", f"{prefer!r} is not true or false")
    curves = _strings(raw.get("curve_preferences"), "tls_server_config.curve_preferences")
    if [c for c in curves if c not in CURVES]:
        raise _error("tls_server_config.curve_preferences", f"{curves!r}: curves are {', '.join(CURVES)}")
    if len(curves) > 1:
        raise _error("tls_server_config.curve_preferences", "Python's ssl can restrict to one curve only: give one")
    return TlsConfig(
        cert,
        key,
        client_ca,
        client_auth,
        frozenset(sans),
        versions[0],
        versions[1],
        ciphers,
        prefer,
        CURVES[curves[0]] if curves else None,
    )


def _users(raw: Any) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _error("basic_auth_users", "expected a mapping of user name to bcrypt hash")
    users = {}
    for user, hashed in raw.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise _error("basic_auth_users", f"{user!r} is not a user name")
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise _error(f"basic_auth_users.{user}", "is not a bcrypt hash (htpasswd -nBC 10 \"\" | tr -d ':\\n')")
        try:
            bcrypt.checkpw(b"", hashed.encode())
        except ValueError:
            raise _error(f"basic_auth_users.{user}", "is not a valid bcrypt hash") from None
        users[user] = hashed.encode()
    return users


def _headers(raw: Any) -> dict[str, str]:
    headers = {}
    for name, value in _mapping(raw, "http_server_config.headers", set(HEADERS)).items():
        if value in (None, ""):
            continue
        allowed = HEADERS[name]
        if not isinstance(value, str) or (allowed is not None and value.lower() not in allowed):
            expected = " or ".join(sorted(allowed)) if allowed else "a string"
            raise _error(f"http_server_config.headers.{name}", f"{value!r}: expected {expected}")
        headers[name] = value
    return headers


def load(path: str) -> WebConfig:
    """Read and validate the web config file; raises ConfigError naming the key."""
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(KEY, f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError(KEY, f"{path} is not valid YAML") from None
    document = _mapping(document, "", {"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"})
    if "rate_limit" in document:
        raise _error("rate_limit", "is not supported; put a reverse proxy in front to rate-limit")
    files = [path]
    http = _mapping(document.get("http_server_config"), "http_server_config", {"http2", "headers"})
    if not isinstance(http.get("http2", True), bool):
        raise _error("http_server_config.http2", "is not true or false")  # HTTP/1.1 is served either way
    tls_raw = document.get("tls_server_config")
    tls = _tls(_mapping(tls_raw, "tls_server_config", TLS_KEYS), files) if tls_raw is not None else None
    config = WebConfig(tls, _users(document.get("basic_auth_users")), _headers(http.get("headers")), tuple(files))
    if tls is not None:
        ssl_context(tls)  # a key that does not match its certificate fails now, not at the first scrape
    return config


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version, context.maximum_version = tls.min_version, tls.max_version
    # load_cert_chain reads files only: inline PEM passes through a private, short-lived directory.
    with tempfile.TemporaryDirectory(prefix="callingbox-tls-") as private:
        cert, key = os.path.join(private, "cert.pem"), os.path.join(private, "key.pem")
        for path, pem in ((cert, tls.cert), (key, tls.key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(pem)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as error:
            raise _error(
                "tls_server_config.key_file", f"key and certificate do not load together: {error.reason}"
            ) from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cadata=tls.client_ca)
        except ssl.SSLError as error:
            raise _error("tls_server_config.client_ca_file", f"not a CA certificate: {error.reason}") from None
    context.verify_mode = tls.client_auth
    if tls.ciphers:
        try:
            context.set_ciphers(tls.ciphers)
        except ssl.SSLError:
            raise _error("tls_server_config.cipher_suites", "none of these suites is available here") from None
    if tls.prefer_server_ciphers:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.curve:
        context.set_ecdh_curve(tls.curve)
    return context
