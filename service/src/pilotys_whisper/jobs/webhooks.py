"""Signed webhook delivery, refusing destinations that would turn the service against its own network.

A callback must be https and resolve only to public addresses, unless the operator allowlists a private
network (WHISPER_WEBHOOK_ALLOW_PRIVATE), on port 443 or 8443 (any port on such a network). The connection goes
to an address that was checked (no second DNS lookup to rebind), redirects are not followed, the whole delivery
(DNS included) ends within WHISPER_WEBHOOK_TIMEOUT_S, and the body is signed:

    Whisper-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import ApiError

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


# Public receivers are reached on the HTTPS ports only: a callback URL must not make the service talk to
# another protocol's port (SMTP, Redis, SSH) on someone else's host. Networks the operator allowlists
# (WHISPER_WEBHOOK_ALLOW_PRIVATE) are the operator's own: any port there.
PUBLIC_PORTS = (443, 8443)
MAX_URL_LENGTH = 2048
MAX_RESPONSE_BYTES = 65536
# IPv6 ranges that carry an IPv4 address: judged by that address, or refused when it cannot be told.
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: the operator's own NAT64, any prefix length
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d (also :: and ::1)
TEREDO = ipaddress.ip_network("2001::/32")  # tunnels to a NATed host: not a place for a webhook


class DeliveryError(Exception):
    """A delivery that got no HTTP status (refused URL, network, TLS, protocol, deadline): the reason is recorded."""


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]  # the checked IPs, in the resolver's order: the connection goes to one of them


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64 or ip in IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the delivery deadline passed")
    return left


def _resolve(host: str, port: int, deadline: float) -> list[tuple]:
    """getaddrinfo has no timeout of its own: it runs in a thread that is given up at the deadline (it ends by
    itself when the resolver gives up)."""
    outcome: dict = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = exc
        done.set()

    threading.Thread(target=lookup, name="webhook-dns", daemon=True).start()
    if not done.wait(_remaining(deadline)):
        raise TimeoutError(f"resolving {host!r} took longer than the delivery deadline")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["infos"]


class WebhookPolicy:
    def __init__(self, allow_private: tuple[str, ...] = (), ca_file: str | None = None, timeout_s: float = 10.0):
        self.allowed = [ipaddress.ip_network(n, strict=False) for n in allow_private]
        self.ca_file = ca_file
        self.timeout_s = timeout_s

    def _allowlisted(self, ip: ipaddress._BaseAddress) -> bool:
        embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        return any(ip in net or (embedded is not None and embedded in net) for net in self.allowed)

    def _permitted(self, ip: ipaddress._BaseAddress) -> bool:
        if self._allowlisted(ip):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            if ip in TEREDO or ip in NAT64_LOCAL:
                return False
            ip = _embedded_ipv4(ip) or ip
        return ip.is_global and not ip.is_multicast

    def check(self, url: str, deadline: float | None = None) -> Destination:
        """Validate a callback URL; raise ApiError(400) with the reason otherwise. The lookup ends by the deadline
        (monotonic time; by default the webhook timeout from now)."""
        def refuse(why: str) -> ApiError:
            return ApiError(400, "invalid_callback_url", f"callback_url {why}", param="callback_url")

        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        if len(url) > MAX_URL_LENGTH:
            raise refuse("is too long")
        # http.client refuses these only when it sends the request: refuse them while a client can still fix them.
        if not all("!" <= char <= "~" for char in url):
            raise refuse("must be plain ASCII without spaces or control characters: percent-encode the path "
                         "and use the xn-- form of an international host name")
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
            infos = _resolve(parts.hostname, port, deadline)
        except socket.gaierror as exc:
            raise refuse(f"host {parts.hostname!r} does not resolve") from exc
        except UnicodeError as exc:  # a label over 63 characters, an empty label
            raise refuse(f"host {parts.hostname!r} is not a valid host name") from exc
        except TimeoutError as exc:
            raise refuse(f"host {parts.hostname!r} did not resolve within {self.timeout_s:g} s") from exc
        # The resolver's order (RFC 6724 preferences), without repeats: tried in that order (RFC 8305).
        addresses = tuple(dict.fromkeys(info[4][0] for info in infos))
        ips = [ipaddress.ip_address(address.split("%", 1)[0]) for address in addresses]
        for address, ip in zip(addresses, ips, strict=True):
            if not self._permitted(ip):
                raise refuse(f"resolves to {address}, a private, loopback or reserved address "
                             "(allow it with WHISPER_WEBHOOK_ALLOW_PRIVATE if it is yours)")
        if port not in PUBLIC_PORTS and not all(self._allowlisted(ip) for ip in ips):
            raise refuse(f"must use port {' or '.join(map(str, PUBLIC_PORTS))} (any port only on networks "
                         "allowlisted with WHISPER_WEBHOOK_ALLOW_PRIVATE)")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return Destination(parts.scheme, parts.hostname, port, path, addresses)

    def deliver(self, url: str, secret: str, body: bytes, event_id: str) -> int:
        """POST the signed body and return the HTTP status, all within timeout_s (DNS included). Whatever stops
        it from getting a status raises DeliveryError with the reason."""
        deadline = time.monotonic() + self.timeout_s
        try:
            return self._deliver(url, secret, body, event_id, deadline)
        except ApiError as exc:
            raise DeliveryError(exc.message) from exc
        except TimeoutError as exc:
            raise DeliveryError(f"timed out: no complete answer within {self.timeout_s:g} s") from exc
        except Exception as exc:  # noqa: BLE001 - any failure (network, TLS, a broken HTTP answer) is one failed attempt
            raise DeliveryError(f"{type(exc).__name__}: {exc}"[:200]) from exc

    def _deliver(self, url: str, secret: str, body: bytes, event_id: str, deadline: float) -> int:
        dest = self.check(url, deadline)  # again at delivery: DNS may have changed since submission
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        conn = _PinnedHTTPSConnection(dest.host, dest.port, addresses=dest.addresses, deadline=deadline,
                                      context=context)
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
            response.read(MAX_RESPONSE_BYTES)  # a broken body (bad chunking) is a failed attempt too
            return response.status
        finally:
            conn.close()


class _DeadlineSSLSocket(ssl.SSLSocket):
    """Every read and write waits only for what is left of the delivery's deadline, so a receiver trickling a
    byte at a time cannot hold the delivery past it."""

    deadline: float | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(_remaining(self.deadline))

    def recv(self, *args, **kwargs):
        self._arm()
        return super().recv(*args, **kwargs)

    def recv_into(self, *args, **kwargs):
        self._arm()
        return super().recv_into(*args, **kwargs)

    def send(self, *args, **kwargs):
        self._arm()
        return super().send(*args, **kwargs)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the checked IPs (the first that accepts), with SNI and certificate checks for the URL's host name,
    within one deadline."""

    def __init__(self, host: str, port: int, *, addresses: tuple[str, ...], deadline: float, **kwargs):
        super().__init__(host, port, **kwargs)
        self._addresses = addresses
        self._deadline = deadline

    def connect(self) -> None:
        sock = _connect(self._addresses, self.port, self._deadline)
        try:
            sock.settimeout(_remaining(self._deadline))  # the TLS handshake as a whole
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock.deadline = self._deadline


def _connect(addresses: tuple[str, ...], port: int, deadline: float) -> socket.socket:
    """A TCP connection to the first address that accepts one, in the given order. Each address gets an equal
    share of the time left, so one that drops packets cannot take the time of the others."""
    failures: list[OSError] = []
    for index, address in enumerate(addresses):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline) / (len(addresses) - index))
            sock.connect((address, port))
            return sock
        except OSError as exc:
            sock.close()
            exc.add_note(address)
            failures.append(exc)
    reasons = "; ".join(f"{exc.__notes__[0]}: {exc.strerror or exc}" for exc in failures)
    if all(isinstance(exc, TimeoutError) for exc in failures):
        raise TimeoutError(f"no address answered before the deadline ({reasons})")
    raise ConnectionError(f"no address accepted a connection ({reasons})")
