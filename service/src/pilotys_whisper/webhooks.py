"""Signed webhook delivery, refusing destinations that would turn the service against its own network.

A callback must be https and resolve only to public addresses, unless the operator allowlists a private
network (WHISPER_WEBHOOK_ALLOW_PRIVATE). The connection goes to the address that was checked (no second
DNS lookup to rebind), redirects are not followed, and the body is signed:

    Whisper-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ApiError

USER_AGENT = "pilotys-whisper-webhook/1"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance_s: int = 300, now: float | None = None) -> bool:
    """What a receiver does (the TypeScript example does the same): recompute and compare, reject stale."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((now or time.time()) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str
    port: int
    path: str
    address: str  # the checked IP the connection goes to


class WebhookPolicy:
    def __init__(self, allow_private: tuple[str, ...] = (), ca_file: str | None = None, timeout_s: float = 10.0):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allow_private]
        self.ca_file = ca_file
        self.timeout_s = timeout_s

    def _permitted(self, ip: ipaddress._BaseAddress) -> bool:
        if any(ip in net for net in self.allowed):
            return True
        return ip.is_global and not ip.is_multicast

    def check(self, url: str) -> Destination:
        """Validate a callback URL; raise ApiError(400) with the reason otherwise."""
        def refuse(why: str) -> ApiError:
            return ApiError(400, "invalid_callback_url", f"callback_url {why}", param="callback_url")

        if len(url) > 2048:
            raise refuse("is too long")
        parts = urlsplit(url)
        if parts.scheme != "https":
            raise refuse("must use https")
        if not parts.hostname or parts.username or parts.password:
            raise refuse("must be https://host[:port]/path without credentials")
        try:
            port = parts.port or 443
        except ValueError as exc:
            raise refuse("has an invalid port") from exc
        try:
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise refuse(f"host {parts.hostname!r} does not resolve") from exc
        addresses = sorted({info[4][0] for info in infos})
        for address in addresses:
            if not self._permitted(ipaddress.ip_address(address.split("%", 1)[0])):
                raise refuse(f"resolves to {address}, a private, loopback or reserved address "
                             "(allow it with WHISPER_WEBHOOK_ALLOW_PRIVATE if it is yours)")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Destination(parts.scheme, parts.hostname, port, path, addresses[0])

    def deliver(self, url: str, secret: str, body: bytes, event_id: str) -> int:
        """POST the signed body; return the HTTP status. Raises OSError/ApiError when it cannot be sent."""
        dest = self.check(url)  # again at delivery: DNS may have changed since submission
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()
        conn = _PinnedHTTPSConnection(dest.host, dest.port, address=dest.address, context=context,
                                      timeout=self.timeout_s)
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Whisper-Event-Id": event_id,
            "Whisper-Signature": sign(secret, timestamp, body),
        }
        try:
            conn.request("POST", dest.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read(65536)
            return response.status
        finally:
            conn.close()


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a given IP, with SNI and certificate checks for the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, **kwargs):
        super().__init__(host, port, **kwargs)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
