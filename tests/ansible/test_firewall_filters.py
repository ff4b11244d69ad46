"""The firewall role's preflight filters (addresses and ports), without a host."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("firewall_filters",
                                               ROOT / "roles" / "firewall" / "filter_plugins" / "firewall.py")
firewall = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(firewall)


def test_invalid_sources():
    assert firewall.firewall_invalid_sources(["any", "10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]) == []
    assert firewall.firewall_invalid_sources(["10.0.0.0/33", "office", ""]) == ["10.0.0.0/33", "office", ""]


def test_ipv6_sources():
    assert firewall.firewall_ipv6_sources(["any", "10.0.0.0/8", "2001:db8::/32", "bad"]) == ["2001:db8::/32"]


def test_address_in():
    assert firewall.firewall_address_in("203.0.113.9", ["any"])
    assert firewall.firewall_address_in("10.77.21.1", ["192.0.2.0/24", "10.77.0.0/16"])
    assert firewall.firewall_address_in("::ffff:10.77.21.1", ["10.77.0.0/16"])
    assert firewall.firewall_address_in("2001:db8::5", ["2001:db8::/64"])
    assert not firewall.firewall_address_in("10.77.21.1", ["192.0.2.0/24"])
    assert not firewall.firewall_address_in("not-an-ip", ["10.0.0.0/8"])


def test_opened_ports():
    rules = [{"port": "22", "proto": "tcp"}, {"port": "80,443", "proto": "tcp"}]
    assert firewall.firewall_opened_ports(rules, [8000]) == []
    assert firewall.firewall_opened_ports(rules + [{"port": 8000}], [8000]) == [8000]
    assert firewall.firewall_opened_ports([{"port": "7000:9000", "proto": "udp"}], [8000, 9100]) == [8000]
    assert firewall.firewall_opened_ports([{"from": "10.0.0.0/8"}], [8000]) == [8000]  # no port: all ports
    assert firewall.firewall_opened_ports([{"port": 8000, "rule": "deny"}], [8000]) == []


def test_multiport_without_proto():
    rules = [{"port": "22", "proto": "tcp"}, {"port": "80,443", "proto": "tcp"}, {"port": "7000:7010", "proto": "udp"},
             {"port": 8000}, {"port": "9000"}, {"from": "10.0.0.0/8"}, {"port": "5000", "proto": "any"}]
    assert firewall.firewall_multiport_without_proto(rules) == []
    assert firewall.firewall_multiport_without_proto(
        [{"port": "8000:8010"}, {"port": "80,443", "proto": "any"}, {"port": "60000:61000", "proto": "tcp"}]
    ) == ["8000:8010", "80,443"]
