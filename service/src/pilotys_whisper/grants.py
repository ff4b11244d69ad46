"""Upload grants: let a browser send a recording straight to this service without ever holding the API key.

PILOTYS runs on Vercel, whose functions refuse request bodies over 4.5 MB: an hour of meeting (15-60 MB)
cannot pass through them. So the function asks this service for a grant (a small request, with the API
key), hands the grant to the browser, and the browser uploads the file to POST /v1/jobs with it.

A grant is a signed, short-lived token that allows one thing: creating one job, with the options fixed
when it was issued (language, callback URL, ...), owned by the client whose key asked for it. It is stateless:
signed with a secret derived from that key, so every worker holding the same keys file accepts it, and
removing the key revokes its grants. The key is named by its kid, a MAC under that same secret: the browser
holding the grant learns no hash of the key. It always carries an idempotency key, so a grant used twice (a retry,
or a leaked token) yields the same job, never a second transcription.

Format: `wug1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(grant secret, "wug1.<claims>"))>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from .auth import KeyRing, Principal
from .errors import ApiError

PREFIX = "wug1."
DEFAULT_TTL_S = 900
MAX_TTL_S = 3600
# What a grant may fix: the same fields a client sends to POST /v1/jobs. Known speakers' reference clips are
# audio, too large for a token: a grant diarizes without them.
FIELDS = ("language", "prompt", "response_format", "temperature", "timestamp_granularities[]", "callback_url",
          "diarize", "num_speakers", "min_speakers", "max_speakers")


@dataclass(frozen=True)
class Grant:
    principal: Principal
    idempotency_key: str
    fields: dict[str, str | list[str]]
    expires_at: int
    live: bool = False  # for a live upload (POST /v1/live, routes/live.py), not a one-shot job


def is_grant(authorization: str | None) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and token.strip().startswith(PREFIX)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # One spelling per token: the lenient decoder skips stray characters and padding, which would let a grant
    # be sent in many forms that all verify.
    if _b64(data) != text:
        raise ValueError("not canonical base64url")
    return data


def _signature(secret: bytes, signed: str) -> bytes:
    return hmac.new(secret, signed.encode(), hashlib.sha256).digest()


def issue(keyring: KeyRing, principal: Principal, fields: dict[str, str | list[str]], *,
          idempotency_key: str | None, ttl_s: int, live: bool = False) -> tuple[str, Grant]:
    """A token for `principal` (authenticated with its key just before) to create one job."""
    entry = keyring.entry_for(principal.kid)
    if entry is None:  # the key was removed between authentication and now
        raise ApiError(401, "invalid_api_key", "the API key is not valid")
    secret = entry.grant_secret
    grant = Grant(principal=principal, idempotency_key=idempotency_key or "grant-" + secrets.token_urlsafe(16),
                  fields=fields, expires_at=int(time.time()) + ttl_s, live=live)
    claims = {"kid": entry.principal.kid, "idem": grant.idempotency_key, "exp": grant.expires_at, "fields": fields}
    if live:
        claims["live"] = True
    signed = PREFIX + _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{signed}.{_b64(_signature(secret, signed))}", grant


def verify(keyring: KeyRing, authorization: str) -> Grant:
    """The grant in an `Authorization: Bearer wug1...` header, or a 401 that says what is wrong with it."""
    token = authorization.partition(" ")[2].strip()
    signed, _, signature = token.rpartition(".")
    invalid = ApiError(401, "invalid_upload_grant", "the upload grant is not valid; ask for a new one",
                       headers={"WWW-Authenticate": 'Bearer realm="whisper", error="invalid_token"'})
    try:
        claims = json.loads(_unb64(signed[len(PREFIX):]))
        kid, expires_at = str(claims["kid"]), int(claims["exp"])
        idempotency_key, fields = str(claims["idem"]), dict(claims["fields"])
        live = claims.get("live", False) is True
        given = _unb64(signature)
    # The signature is not checked yet: any claims end as this 401, "exp": 1e400 (OverflowError) and arrays nested
    # past the JSON parser's limit (RecursionError) included, not as a 500.
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        raise invalid from None
    entry = keyring.entry_for(kid)
    # A removed key's grants fail here, exactly like forged ones.
    if entry is None or not hmac.compare_digest(given, _signature(entry.grant_secret, signed)):
        raise invalid
    if expires_at < time.time():
        raise ApiError(401, "upload_grant_expired", "the upload grant has expired; ask for a new one",
                       headers={"WWW-Authenticate": 'Bearer realm="whisper", error="invalid_token"'})
    return Grant(principal=entry.principal, idempotency_key=idempotency_key, fields=fields, expires_at=expires_at,
                 live=live)


def not_accepted(message: str) -> ApiError:
    """A valid grant used where it gives no right: 403 insufficient_scope (RFC 6750 section 3.1), not 401,
    which would tell the client to authenticate again."""
    return ApiError(403, "upload_grant_not_accepted", message,
                    headers={"WWW-Authenticate": 'Bearer realm="whisper", error="insufficient_scope"'})


def requested_fields(body: dict) -> dict[str, str | list[str]]:
    """The job options asked for in POST /v1/uploads, in the form POST /v1/jobs takes them."""
    unknown = sorted(set(body) - set(FIELDS) - {"timestamp_granularities", "idempotency_key", "expires_in", "live"})
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s) {', '.join(unknown)}; an upload grant takes "
                       f"{', '.join(FIELDS)}, idempotency_key, expires_in and live", param=unknown[0])
    fields: dict[str, str | list[str]] = {}
    for name in FIELDS:
        value = body.get(name if name != "timestamp_granularities[]" else "timestamp_granularities",
                         body.get(name))
        if value is None or value == "":
            continue
        if name == "timestamp_granularities[]":
            items = value if isinstance(value, list) else [value]
            fields[name] = [str(v) for v in items]
        elif isinstance(value, bool) and name == "diarize":
            fields[name] = "true" if value else "false"
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            fields[name] = str(value)
        else:
            raise ApiError(400, "invalid_field", f"{name} must be a string", param=name)
    return fields


def ttl(body: dict) -> int:
    raw = body.get("expires_in", DEFAULT_TTL_S)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if not 60 <= value <= MAX_TTL_S or isinstance(raw, bool):
        raise ApiError(400, "invalid_expires_in", f"expires_in must be a number of seconds from 60 to {MAX_TTL_S}",
                       param="expires_in")
    return value
