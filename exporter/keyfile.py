"""A target's `api_key_file`, watched: read again when the file system says it changed, so a
rotated (Kubernetes) Secret needs no restart. The poller asks before each poll and while waiting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from . import logs
from .config import ConfigError, Secret, read_key_file

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between looks at the file while waiting for the next poll


class KeyFile:
    """One api_key_file and the version of it last read (inode, size, mtime)."""

    def __init__(self, path: str | None):
        self.path = path
        self._stamp: tuple | None = ("unread",)  # read again at the first poll

    def changed(self) -> bool:
        """Whether the file is no longer the version last read (False without a file)."""
        return bool(self.path) and self._stamp != stamp(self.path)

    async def wait(self, seconds: float, wake: asyncio.Event) -> bool:
        """Sleep `seconds`, or less: until `wake` is set, or at once when the file changes, so a
        rotated Secret fixes a rejected key within seconds. True: the file changed."""
        deadline = time.monotonic() + seconds
        wake.clear()
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(wake.wait(), min(left, CHECK_INTERVAL))
                return False
            except TimeoutError:
                if self.changed():
                    return True
        return False

    def read(self) -> tuple[Secret | None, ConfigError | None]:
        """(the key, None) when the file changed since the last read; (None, the error) when it
        changed and cannot be used, once per version; (None, None) otherwise."""
        if not self.path:
            return None, None
        now = stamp(self.path)
        if now is not None and now == self._stamp:
            return None, None
        try:
            key = read_key_file("api_key_file", self.path)
        except ConfigError as error:
            new, self._stamp = now != self._stamp, now
            return None, error if new else None
        self._stamp = now
        return key, None

    def new_key(self, current: Secret | None, org: str) -> Secret | None:
        """The key to use from now on when the file holds a new one (redacted from every log line
        from then on), else None; a file that cannot be used is logged once and changes nothing."""
        key, error = self.read()
        if error is not None:
            log.error("API key file unreadable; the previous key stays in use", extra={"org": org, "error": str(error)})
        if key is None or key == current:
            return None
        logs.redact(key.reveal())
        log.info("API key reloaded from its file", extra={"org": org})
        return key


def stamp(path: str) -> tuple | None:
    """The version of a file as the file system tells it (inode, size, mtime): a cheap change check."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
