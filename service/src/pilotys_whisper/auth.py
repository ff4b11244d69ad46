"""API keys: one from the environment and/or a keys file re-read when it changes (rotation without restart).

Keys file format: one key per line; blank lines and lines starting with # are ignored. A key may be
followed by options, `KEY label=pilotys webhook_secret=...`. Keys are compared in constant time.

A label names a client, and the client, not its key, owns its jobs: a new key with the old key's label (a
rotation) sees the old key's jobs, and their webhooks are still signed. So every key of one label carries the
same webhook secret. A key without a label is a client of its own, named after the key's id.
No error message quotes the file: a key or a secret is often what sits on the wrong line.
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
OPTIONS = ("label", "webhook_secret")
INLINE_LABEL = "default"  # the client of WHISPER_API_KEY


@dataclass(frozen=True)
class Principal:
    """Who called: the client (its owner id and label) and the key it used (kid), never the key itself."""

    owner: str  # owns the client's jobs: "client:<label>", or the key's id for a key without a label
    label: str
    kid: str  # names the key in its upload grants (grants.py)
    webhook_secret: str | None = None


ANONYMOUS = Principal(owner="anonymous", label="anonymous", kid="anonymous")


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    key_owner: str  # the owner before labels owned jobs (the key's id): rows still owned by it are adopted
    principal: Principal
    grant_secret: bytes  # signs this key's upload grants (grants.py); derived from the key, never sent


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _entry(key: str, label: str | None = None, webhook_secret: str | None = None) -> _Entry:
    digest = _digest(key)
    key_id = digest.hex()[:16]
    grant_secret = hmac.new(key.encode(), b"pilotys-whisper upload grant v1", hashlib.sha256).digest()
    # The kid is a MAC under the grant secret, which only the server holds: a browser learns nothing from it
    # that the grant's signature (a MAC under the same secret) does not already show, and no hash of the key.
    kid = hmac.new(grant_secret, b"pilotys-whisper grant kid v1", hashlib.sha256).hexdigest()[:16]
    principal = Principal(owner=f"client:{label}" if label else key_id, label=label or f"key-{key_id[:8]}",
                          webhook_secret=webhook_secret, kid=kid)
    return _Entry(digest, key_id, principal, grant_secret)


def parse_keys(text: str, source: str = "keys file") -> list[_Entry]:
    entries: list[_Entry] = []
    named: list[tuple[str, _Entry]] = []
    lines: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, *options = line.split()
        where = f"{source} line {number}"
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"{where}: keys must be at least {MIN_KEY_LENGTH} characters")
        opts: dict[str, str] = {}
        for position, option in enumerate(options, 2):
            name, sep, value = option.partition("=")
            if not sep or name not in OPTIONS:
                # Never quote the word: it is often a second key (OLDKEY NEWKEY) or a secret with a typo.
                raise ValueError(f"{where}: word {position} is not an option; write one key per line, then "
                                 "label=NAME and webhook_secret=SECRET, without spaces in a value")
            if name in opts:
                raise ValueError(f"{where}: {name}= is given twice")
            opts[name] = value
        entry = _entry(key, opts.get("label") or None, opts.get("webhook_secret") or None)
        if entry.digest in lines:
            raise ValueError(f"{where}: the same key as line {lines[entry.digest]}")
        lines[entry.digest] = number
        entries.append(entry)
        named.append((where, entry))
    _check_clients(named)
    return entries


def _check_clients(named: list[tuple[str, _Entry]]) -> None:
    """Keys of one label are one client: its webhooks are signed with one secret, whichever key sent the job."""
    first: dict[str, tuple[str, str | None]] = {}
    for where, entry in named:
        owner, secret = entry.principal.owner, entry.principal.webhook_secret
        seen_where, seen_secret = first.setdefault(owner, (where, secret))
        if seen_secret != secret:
            raise ValueError(f"{where} has the label of {seen_where} but another webhook_secret: keys with one "
                             "label are one client, whose webhooks are signed with one secret; give them the same")


class KeyRing:
    """The accepted keys. `authenticate` returns the caller's Principal, or None for a wrong/missing key."""

    def __init__(self, api_key: str | None = None, keys_file: Path | None = None, *,
                 webhook_secret: str | None = None, recheck_s: float = 1.0):
        self._inline = [_entry(api_key, INLINE_LABEL, webhook_secret)] if api_key else []
        self._file = keys_file
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._file_entries: list[_Entry] = []
        self._file_stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        # Without keys anyone may call; grants still work, signed with a secret of this process.
        self._anonymous = _Entry(b"", ANONYMOUS.owner, ANONYMOUS, secrets.token_bytes(32))
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
            entries = parse_keys(_read_text(self._file), str(self._file))
            _check_clients([("WHISPER_API_KEY", e) for e in self._inline] + [(str(self._file), e) for e in entries])
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

    def entry_for(self, kid: str) -> _Entry | None:
        """The current entry of the key a grant names (None once the key is removed): its Principal and the
        secret that signs its upload grants."""
        for entry in self._entries():
            if entry.principal.kid == kid:  # not secret: a plain comparison (and any text a browser sends)
                return entry
        return self._anonymous if kid == ANONYMOUS.kid and not self.enabled else None

    def principal_for(self, owner: str) -> Principal | None:
        """The client that owns a job (None once its last key is removed), for its webhook secret."""
        for entry in self._entries():
            if entry.principal.owner == owner:
                return entry.principal
        return ANONYMOUS if owner == ANONYMOUS.owner and not self.enabled else None

    def adoptions(self) -> list[tuple[str, str]]:
        """(key id, owner) for each current key whose client is not named after the key: jobs stored by a version
        in which the key's id owned them belong to the client (JobManager.adopt_key_owned_jobs)."""
        return [(e.key_owner, e.principal.owner) for e in self._entries() if e.key_owner != e.principal.owner]

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


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode()
    except UnicodeDecodeError as exc:  # its message shows a byte of the file: say where instead
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text") from None
