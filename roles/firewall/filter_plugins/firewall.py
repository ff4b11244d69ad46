"""Address and port checks for the firewall role's preflight, with the standard library only
(ansible.utils' ipaddr filters would need netaddr on the controller)."""

from __future__ import annotations

import ipaddress

ANY = "any"


def _network(source):
    return ipaddress.ip_network(str(source).strip(), strict=False)


def firewall_invalid_sources(sources):
    """The entries of SOURCES that are neither 'any' nor an IPv4/IPv6 address or network."""
    invalid = []
    for source in sources or []:
        if str(source).strip() == ANY:
            continue
        try:
            _network(source)
        except ValueError:
            invalid.append(source)
    return invalid


def firewall_ipv6_sources(sources):
    """The IPv6 addresses or networks in SOURCES."""
    return [s for s in sources or [] if str(s).strip() != ANY and not firewall_invalid_sources([s])
            and _network(s).version == 6]


def firewall_address_in(address, sources):
    """True when ADDRESS is covered by SOURCES ('any' covers everything)."""
    if any(str(s).strip() == ANY for s in sources or []):
        return True
    try:
        ip = ipaddress.ip_address(str(address).strip())
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for source in sources or []:
        try:
            if ip in _network(source):
                return True
        except (ValueError, TypeError):
            continue
    return False


def _ports(spec):
    """Ports named by a ufw port spec: 8000, '8000', '80,443', '60000:61000'. None means every port."""
    if spec is None or str(spec).strip() in ("", ANY):
        return None
    ports = set()
    for part in str(spec).split(","):
        low, _, high = part.strip().partition(":")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def firewall_opened_ports(rules, ports):
    """The PORTS that some allow/limit rule of RULES opens (a rule without a port opens them all)."""
    wanted = {int(p) for p in ports or []}
    opened = set()
    for rule in rules or []:
        if str(rule.get("rule", "allow")) not in ("allow", "limit"):
            continue
        named = _ports(rule.get("port"))
        opened |= wanted if named is None else wanted & named
    return sorted(opened)


def firewall_multiport_without_proto(rules):
    """The port specs of RULES that name several ports (a range, a comma list) without proto tcp or udp:
    ufw refuses them ("Must specify 'tcp' or 'udp' with multiple ports")."""
    return [str(rule.get("port")) for rule in rules or []
            if any(sep in str(rule.get("port", "")) for sep in (",", ":"))
            and str(rule.get("proto", "any")) not in ("tcp", "udp")]


class FilterModule:
    def filters(self):
        return {
            "firewall_invalid_sources": firewall_invalid_sources,
            "firewall_ipv6_sources": firewall_ipv6_sources,
            "firewall_address_in": firewall_address_in,
            "firewall_opened_ports": firewall_opened_ports,
            "firewall_multiport_without_proto": firewall_multiport_without_proto,
        }
