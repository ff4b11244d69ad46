"""API keys: one from the environment and/or a keys file re-read when it changes (rotation without restart).

Keys file format: one key per line; blank lines and lines starting with # are ignored. A key may be
followed by options, `KEY label=pilotys webhook_secret=...`. Keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    """Who called: a stable id derived from the key (never the key itself), for job ownership and logs."""

    key_id: str
    label: str
    webhook_secret: str | None = None


ANONYMOUS = Principal(key_id="anonymous", label="anonymous")


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal
    grant_secret: bytes  # signs this key's upload grants (grants.py); derived from the key, never sent


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _entry(key: str, label: str | None = None, webhook_secret: str | None = None) -> _Entry:
    digest = _digest(key)
    key_id = digest.hex()[:16]
    return _Entry(digest, Principal(key_id=key_id, label=label or f"key-{key_id[:8]}", webhook_secret=webhook_secret),
                  hmac.new(key.encode(), b"pilotys-whisper upload grant v1", hashlib.sha256).digest())


def parse_keys(text: str, source: str = "keys file") -> list[_Entry]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, *options = line.split()
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"{source} line {number}: keys must be at least {MIN_KEY_LENGTH} characters")
        opts = {}
        for option in options:
            name, sep, value = option.partition("=")
            if not sep or name not in ("label", "webhook_secret"):
                raise ValueError(f"{source} line {number}: unknown option {name!r} (label=, webhook_secret=)")
            opts[name] = value
        entries.append(_entry(key, opts.get("label"), opts.get("webhook_secret")))
    return entries


class KeyRing:
    """The accepted keys. `authenticate` returns the caller's Principal, or None for a wrong/missing key."""

    def __init__(self, api_key: str | None = None, keys_file: Path | None = None, *,
                 webhook_secret: str | None = None, recheck_s: float = 1.0):
        self._inline = [_entry(api_key, "default", webhook_secret)] if api_key else []
        self._file = keys_file
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._file_entries: list[_Entry] = []
        self._file_stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        # Without keys anyone may call; grants still work, signed with a secret of this process.
        self._anonymous = _Entry(b"", ANONYMOUS, secrets.token_bytes(32))
        if keys_file is not None:
            self._reload(force=True)

    @property
    def enabled(self) -> bool:
        return bool(self._inline) or self._file is not None

    def _reload(self, force: bool = False) -> None:
        assert self._file is not None
        try:
            st = os.stat(self._file)
        except OSError as exc:
            if force:
                raise ValueError(f"cannot read keys file {self._file}: {exc.strerror}") from exc
            log.error("keys file %s unreadable (%s); keeping the previous keys", self._file, exc.strerror)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._file_stamp and not force:
            return
        try:
            entries = parse_keys(self._file.read_text(), str(self._file))
        except (OSError, ValueError) as exc:
            if force:
                raise ValueError(str(exc)) from exc
            log.error("keys file %s rejected (%s); keeping the previous keys", self._file, exc)
            return
        self._file_entries, self._file_stamp = entries, stamp
        if not force:
            log.info("keys file %s reloaded: %d key(s)", self._file, len(entries))

    def _entries(self) -> list[_Entry]:
        if self._file is not None:
            now = time.monotonic()
            with self._lock:
                if now - self._checked_at >= self._recheck_s:
                    self._checked_at = now
                    self._reload()
                return self._inline + self._file_entries
        return self._inline

    def entry_for(self, key_id: str) -> _Entry | None:
        """The current entry of a key id (None once the key is removed): its Principal (webhook secret) and the
        secret that signs its upload grants."""
        for entry in self._entries():
            if entry.principal.key_id == key_id:
                return entry
        return self._anonymous if key_id == ANONYMOUS.key_id and not self.enabled else None

    def principal_for(self, key_id: str) -> Principal | None:
        entry = self.entry_for(key_id)
        return entry.principal if entry is not None else None

    def authenticate(self, authorization: str | None) -> Principal | None:
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = _digest(token.strip())
        found = None
        # Compare with every key, without stopping early, so timing tells nothing about which matched.
        for entry in self._entries():
            if hmac.compare_digest(presented, entry.digest) and found is None:
                found = entry.principal
        return found
