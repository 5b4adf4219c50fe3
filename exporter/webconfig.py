"""The web config in force: `Guard` serves what `webschema.load()` checked (`--web.config.file`).

Like the exporter-toolkit, it re-reads the file and the certificate files it names when they
change, so rotated certificates and passwords take effect without a restart, and a broken new
file is logged while the last good one keeps serving. It gives each TLS handshake the freshest
context and checks basic auth against the bcrypt hashes, caching a verified password.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import logging
import os
import ssl
import time

import bcrypt

from .config import ConfigError
from .webschema import KEY, WebConfig, load, ssl_context

__all__ = ["Guard", "load"]  # `load` too: the command line and the tests read the file through here

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0  # file changes are looked for at most this often


def _file_stamp(paths: tuple[str, ...]) -> tuple:
    stamp = []
    for path in paths:
        try:
            s = os.stat(path)
            stamp.append((s.st_ino, s.st_size, s.st_mtime_ns))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def _san_values(peercert: dict) -> set[str]:
    return {value for _, value in peercert.get("subjectAltName", ())}


class Guard:
    """The web config in force: TLS context for new connections, users, headers, reloads."""

    OPEN_PATHS = frozenset({"/-/healthy", "/-/ready"})  # probes: no secrets there, never behind auth

    def __init__(self, path: str, config: WebConfig, clock=time.monotonic):
        self.path, self.config, self.clock = path, config, clock
        self._stamp = _file_stamp(config.files)
        self._checked = clock()
        self._verified: dict[bytes, bytes] = {}  # digest of user:password → the hash it matched
        self.context = ssl_context(config.tls) if config.tls else None
        self._server_context: ssl.SSLContext | None = None

    def server_context(self) -> ssl.SSLContext | None:
        """The context to listen with; each handshake switches to the freshest certificates."""
        if self.context is None:
            return None
        if self._server_context is None:
            self._server_context = ssl_context(self.config.tls)
            self._server_context.sni_callback = self._on_handshake
        return self._server_context

    def _on_handshake(self, ssl_object: ssl.SSLObject, server_name: str | None, _context) -> None:
        self.refresh()
        ssl_object.context = self.context

    def refresh(self) -> None:
        """Re-read the config if it or a file it names changed; keep the old one if the new is bad."""
        now = self.clock()
        if now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        stamp = _file_stamp(self.config.files)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            config = load(self.path)
            if (config.tls is None) != (self.config.tls is None):
                raise ConfigError(KEY, "turning TLS on or off needs a restart")
            context = ssl_context(config.tls) if config.tls else None
        except ConfigError as error:
            log.error("web config not reloaded; the previous one stays in force", extra={"error": str(error)})
            return
        if config.tls and (config.tls.client_auth, config.tls.min_version, config.tls.max_version) != (
            self.config.tls.client_auth,
            self.config.tls.min_version,
            self.config.tls.max_version,
        ):
            log.warning("web config: client_auth_type and TLS versions take effect on restart")
        self.config, self.context, self._verified = config, context, {}
        self._stamp = _file_stamp(config.files)
        log.info("web config reloaded", extra={"path": self.path})

    def client_allowed(self, peercert: dict | None) -> bool:
        sans = self.config.tls.allowed_sans if self.config.tls else frozenset()
        return not sans or (peercert is not None and bool(_san_values(peercert) & sans))

    def needs_auth(self, path: str) -> bool:
        return bool(self.config.users) and path not in self.OPEN_PATHS

    async def authorized(self, header: str | None) -> bool:
        """Basic auth against the bcrypt hashes; a verified password is cached, as the toolkit does."""
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.config.users.get(user)
        digest = hashlib.sha256(f"{user}:{password}".encode()).digest()
        if hashed is not None and self._verified.get(digest) == hashed:
            return True
        # An unknown user still pays one bcrypt check, so timing does not reveal which users exist.
        candidate = hashed or _dummy_hash()
        ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), candidate) and hashed is not None
        if ok:
            self._verified[digest] = hashed
        return ok


@functools.cache
def _dummy_hash() -> bytes:
    return bcrypt.hashpw(b"not a password", bcrypt.gensalt(10))
