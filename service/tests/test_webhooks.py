"""Webhook delivery on its own: which destinations are refused, one deadline for the whole delivery, every
failure reported, and the resolver's addresses tried in turn. Real TLS servers on loopback addresses."""

import socket
import threading
import time

import pytest

from pilotys_whisper.errors import ApiError
from pilotys_whisper.jobs.webhooks import DeliveryError, WebhookPolicy

from conftest import RawTLSServer, make_certificate, read_request

LOOPBACK = ("127.0.0.0/8", "::1/128")


def refused(policy: WebhookPolicy, url: str) -> str:
    with pytest.raises(ApiError) as err:
        policy.check(url)
    assert err.value.status == 400 and err.value.code == "invalid_callback_url", url
    return err.value.message


@pytest.mark.parametrize("address, embedded_private", [
    ("64:ff9b::a00:1", True), ("64:ff9b::7f00:1", True), ("64:ff9b::808:808", False),  # NAT64, RFC 6052
    ("2002:a00:1::", True), ("2002:c0a8:101::1", True), ("2002:808:808::1", False),  # 6to4
    ("::10.0.0.1", True), ("::127.0.0.1", True), ("::8.8.8.8", False),  # IPv4-compatible
    ("::ffff:10.0.0.1", True), ("::ffff:169.254.169.254", True), ("::ffff:8.8.8.8", False),  # IPv4-mapped
])
def test_ipv6_forms_of_an_ipv4_address_are_judged_by_that_address(address, embedded_private):
    policy = WebhookPolicy()
    url = f"https://[{address}]/hook"
    if embedded_private:
        assert "private, loopback or reserved" in refused(policy, url)
    else:
        assert policy.check(url).addresses == (address,)


@pytest.mark.parametrize("address", [
    "64:ff9b:1::808:808",  # local-use NAT64 (RFC 8215): where the IPv4 address sits is the operator's choice
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "::", "::1",
])
def test_ipv6_ranges_that_hide_their_destination_are_refused(address):
    refused(WebhookPolicy(), f"https://[{address}]/hook")


def test_an_allowlisted_network_covers_its_ipv4_mapped_form():
    assert WebhookPolicy(("127.0.0.0/8",)).check("https://[::ffff:127.0.0.1]:9443/h").addresses == (
        "::ffff:127.0.0.1",)


def test_public_receivers_only_on_https_ports():
    policy = WebhookPolicy()
    for port in (25, 6379, 22, 80, 8080, 444):
        assert "must use port 443 or 8443" in refused(policy, f"https://8.8.8.8:{port}/hook")
    assert policy.check("https://8.8.8.8/hook").port == 443
    assert policy.check("https://8.8.8.8:8443/hook").port == 8443
    # The operator's own networks: any port.
    assert WebhookPolicy(LOOPBACK).check("https://127.0.0.1:9443/hook").port == 9443


@pytest.mark.parametrize("url", ["https://8.8.8.8/hook with space", "https://8.8.8.8/café",
                                 "https://8.8.8.8/hook\t", "https://8.8.8.8/a\r\nX-Injected: 1",
                                 "https://8.8.8.8/\x7f"])
def test_urls_http_cannot_send_are_refused_when_checked(url):
    assert "plain ASCII" in refused(WebhookPolicy(), url)


@pytest.fixture
def cert(tmp_path):
    return make_certificate(tmp_path, ("hook.test", "127.0.0.1", "127.0.0.2", "127.0.0.10", "::1"))


def answer_204(tls):
    read_request(tls)
    tls.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")


def test_a_receiver_trickling_its_answer_is_cut_at_the_deadline(cert):
    """A byte every 0.25 s never trips a per-read timeout of 1 s; the delivery's deadline of 1 s must."""
    answer = b"HTTP/1.1 204 No Content\r\nX-Padding: " + b"x" * 100 + b"\r\n\r\n"
    sent = []

    def trickle(tls):
        read_request(tls)
        for byte in answer:
            time.sleep(0.25)
            tls.sendall(bytes([byte]))  # fails soon after the client hung up
            sent.append(byte)

    server = RawTLSServer(cert, trickle)
    try:
        policy = WebhookPolicy(LOOPBACK, str(cert[0]), timeout_s=1)
        with pytest.raises(DeliveryError, match="timed out"):
            policy.deliver(f"https://127.0.0.1:{server.port}/hook", "secret", b"{}", "evt_1")
        assert server.handled.acquire(timeout=30)
        assert len(sent) < len(answer) / 2, f"{len(sent)} of {len(answer)} bytes read"
    finally:
        server.close()


def test_a_resolver_that_hangs_is_given_up_at_the_deadline(monkeypatch, cert):
    release = threading.Event()
    lookups = {"started": 0, "finished": 0}
    real_getaddrinfo = socket.getaddrinfo

    def hanging_getaddrinfo(host, *args, **kwargs):
        if host != "hook.test":
            return real_getaddrinfo(host, *args, **kwargs)
        lookups["started"] += 1
        release.wait(10)
        lookups["finished"] += 1
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_getaddrinfo)
    try:
        with pytest.raises(DeliveryError, match="did not resolve within 1 s"):
            WebhookPolicy(LOOPBACK, timeout_s=1).deliver("https://hook.test/hook", "secret", b"{}", "evt_1")
        assert lookups == {"started": 1, "finished": 0}, "the delivery waited for the resolver"
    finally:
        release.set()


@pytest.mark.parametrize("answer, reason", [
    (b"HTTP/1.1 two hundred OK\r\n\r\n", "BadStatusLine"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", "got more than 100 headers"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n", "IncompleteRead"),
    (b"", "RemoteDisconnected"),
])
def test_a_broken_answer_is_a_delivery_error(cert, answer, reason):
    def broken(tls):
        read_request(tls)
        tls.sendall(answer)

    server = RawTLSServer(cert, broken)
    try:
        with pytest.raises(DeliveryError, match=reason):
            WebhookPolicy(LOOPBACK, str(cert[0])).deliver(f"https://127.0.0.1:{server.port}/h", "s", b"{}", "evt")
    finally:
        server.close()


@pytest.fixture
def resolver(monkeypatch):
    """hook.test resolves to the addresses a test sets, in its order; the sockets behind them are real."""
    answers: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "hook.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def free_port_on(*hosts: str) -> int:
    """A port that is free on every given loopback address."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family) as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise AssertionError("no common free port")


def test_an_address_that_refuses_is_followed_by_the_next_one(cert, resolver):
    """A dual-stack receiver seen from a host without IPv6 reachability: ::1 refuses, 127.0.0.1 answers."""
    port = free_port_on("127.0.0.1", "::1")
    server = RawTLSServer(cert, answer_204, "127.0.0.1", port)
    try:
        resolver[:] = ["::1", "127.0.0.1"]
        policy = WebhookPolicy(LOOPBACK, str(cert[0]))
        assert policy.deliver(f"https://hook.test:{port}/h", "s", b"{}", "evt") == 204
        # Whichever address sorts first as a string: 127.0.0.10 refuses, 127.0.0.2 answers.
        server.close()
        server = RawTLSServer(cert, answer_204, "127.0.0.2", free_port_on("127.0.0.2", "127.0.0.10"))
        resolver[:] = ["127.0.0.10", "127.0.0.2"]
        assert policy.deliver(f"https://hook.test:{server.port}/h", "s", b"{}", "evt") == 204
        assert server.connections == 1
    finally:
        server.close()


def test_addresses_are_tried_in_the_resolvers_order(cert, resolver):
    port = free_port_on("127.0.0.2", "127.0.0.10")
    first, second = RawTLSServer(cert, answer_204, "127.0.0.2", port), RawTLSServer(cert, answer_204, "127.0.0.10",
                                                                                    port)
    try:
        resolver[:] = ["127.0.0.2", "127.0.0.10"]  # not in string order
        policy = WebhookPolicy(LOOPBACK, str(cert[0]))
        assert policy.check(f"https://hook.test:{port}/h").addresses == ("127.0.0.2", "127.0.0.10")
        assert policy.deliver(f"https://hook.test:{port}/h", "s", b"{}", "evt") == 204
        assert (first.connections, second.connections) == (1, 0)
    finally:
        first.close()
        second.close()


def test_every_address_is_checked_not_only_the_first(resolver):
    resolver[:] = ["8.8.8.8", "10.0.0.1"]
    assert "10.0.0.1" in refused(WebhookPolicy(), "https://hook.test/h")


def test_when_no_address_accepts_the_reason_names_each(resolver):
    port = free_port_on("127.0.0.1", "::1")
    resolver[:] = ["::1", "127.0.0.1"]
    with pytest.raises(DeliveryError, match=r"::1: .*; 127\.0\.0\.1: "):
        WebhookPolicy(LOOPBACK).deliver(f"https://hook.test:{port}/h", "s", b"{}", "evt")
