"""`--web.config.file` on a real exporter process: TLS, basic auth, client certificates, headers.

Certificates come from throwaway CAs made by trustme in each run. Every request goes over real
TLS on loopback with Python's own client: the right CA and password get in; a wrong CA, plain
HTTP, a missing or wrong password, a missing or foreign client certificate do not. Rotated
certificate files are served to new connections without a restart.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import time

import bcrypt
import pytest
import trustme
import yaml

from helpers import wait_until

PASSWORD = "correct horse battery staple"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()  # the toolkit's usual cost


class Pki:
    def __init__(self, folder):
        self.folder = folder
        self.ca, self.other_ca = trustme.CA(), trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        server = self.ca.issue_cert("127.0.0.1")
        self.cert_file = self._write("server.pem", server.cert_chain_pems[0].bytes())
        self.key_file = self._write("server.key", server.private_key_pem.bytes())
        self.server_for_other_ca = self.other_ca.issue_cert("127.0.0.1")

    def _write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.write_bytes(data)
        return str(path)

    def client_context(self, ca: trustme.CA | None = None, client_cert=None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        if client_cert is not None:
            client_cert.configure_cert(context)
        return context


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


def request(
    exporter,
    path: str,
    context: ssl.SSLContext | None,
    password: str | None = None,
    user="prometheus",
    method: str = "GET",
) -> tuple[int, dict[str, str], str]:
    """One request on a new connection: (status, headers, body)."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", exporter.port, timeout=10, context=context)
    headers = {}
    if password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def start(stack, tmp_path, web_config: dict):
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(web_config))
    exporter = stack.exporter(None)
    return exporter.start("--demo", "--web.config.file", str(path), wait_healthy=False), path


def up(exporter, context, password=None) -> bool:
    if exporter.process.poll() is not None:
        raise AssertionError(f"exporter exited: {exporter.log()[-2000:]}")
    try:
        return request(exporter, "/-/healthy", context, password)[0] == 200
    except OSError:
        return False


def test_tls_with_basic_auth_lets_in_the_right_ca_and_password_only(stack, tmp_path, pki):
    exporter, _ = start(
        stack,
        tmp_path,
        {
            "tls_server_config": {"cert_file": pki.cert_file, "key_file": pki.key_file},
            "basic_auth_users": {"prometheus": HASH},
            "http_server_config": {
                "headers": {
                    "X-Frame-Options": "deny",
                    "X-Content-Type-Options": "nosniff",
                    "Strict-Transport-Security": "max-age=31536000",
                }
            },
        },
    )
    trusted = pki.client_context()
    wait_until(lambda: up(exporter, trusted), 20, message="exporter serving TLS")

    status, headers, body = request(exporter, "/metrics", trusted, PASSWORD)
    assert status == 200 and "callingbox_up" in body
    assert headers["X-Frame-Options"] == "deny" and headers["Strict-Transport-Security"] == "max-age=31536000"
    assert request(exporter, "/", trusted, PASSWORD)[0] == 200

    for path, method in (("/metrics", "GET"), ("/", "GET"), ("/-/reload", "POST")):
        status, headers, _ = request(exporter, path, trusted, method=method)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Basic ")
        assert headers["X-Content-Type-Options"] == "nosniff"  # the headers go on refusals too
        assert request(exporter, path, trusted, "wrong password", method=method)[0] == 401
        assert request(exporter, path, trusted, PASSWORD, user="mallory", method=method)[0] == 401

    # Probes need no password; /-/ready then does not name the targets.
    assert request(exporter, "/-/healthy", trusted)[0] == 200
    status, _, body = request(exporter, "/-/ready", trusted)
    assert status in (200, 503) and "default" not in body

    with pytest.raises(ssl.SSLCertVerificationError):
        request(exporter, "/-/healthy", pki.client_context(pki.other_ca))
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        status, _, _ = request(exporter, "/-/healthy", None)  # plain HTTP to the TLS port
        raise AssertionError(f"plain HTTP was answered with {status}")


def test_client_certificates_required_verified_and_matched_by_san(stack, tmp_path, pki):
    exporter, _ = start(
        stack,
        tmp_path,
        {
            "tls_server_config": {
                "cert_file": pki.cert_file,
                "key_file": pki.key_file,
                "client_ca_file": pki.ca_file,
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_allowed_sans": ["prometheus.monitoring.svc"],
            }
        },
    )
    scraper = pki.client_context(client_cert=pki.ca.issue_cert("prometheus.monitoring.svc"))
    wait_until(lambda: up(exporter, scraper), 20, message="exporter serving mTLS")

    status, _, body = request(exporter, "/metrics", scraper)
    assert status == 200 and "callingbox_up" in body
    # Same CA, another name: the handshake succeeds, the SAN allowlist refuses.
    other_name = pki.client_context(client_cert=pki.ca.issue_cert("intruder.example.com"))
    assert request(exporter, "/metrics", other_name)[0] == 403
    # No certificate, or one from another CA: no connection at all.
    for context in (
        pki.client_context(),
        pki.client_context(client_cert=pki.other_ca.issue_cert("prometheus.monitoring.svc")),
    ):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            request(exporter, "/metrics", context)


def test_rotated_certificate_files_are_served_without_a_restart(stack, tmp_path, pki):
    exporter, _ = start(stack, tmp_path, {"tls_server_config": {"cert_file": pki.cert_file, "key_file": pki.key_file}})
    wait_until(lambda: up(exporter, pki.client_context()), 20, message="exporter serving TLS")
    pid = exporter.process.pid

    # cert-manager style: new key and certificate written over the old files.
    new = pki.server_for_other_ca
    pki._write("server.key", new.private_key_pem.bytes())
    pki._write("server.pem", new.cert_chain_pems[0].bytes())
    time.sleep(1.1)  # the files are looked at again at most once a second
    wait_until(lambda: up(exporter, pki.client_context(pki.other_ca)), 10, message="the new certificate served")
    with pytest.raises(ssl.SSLCertVerificationError):
        request(exporter, "/-/healthy", pki.client_context())
    assert exporter.process.pid == pid and exporter.process.poll() is None
    assert 'msg="web config reloaded"' in exporter.log()
