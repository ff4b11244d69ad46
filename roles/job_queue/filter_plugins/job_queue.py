"""The job queue role's address check, with the standard library only (ansible.utils' ipaddr filters would need
netaddr on the controller)."""

from __future__ import annotations

import ipaddress

# Where a provider's private network puts its hosts: RFC 1918, the shared space of RFC 6598 (Tailscale and
# other overlays), IPv6 unique local addresses. Not loopback: the workers dial this address from other hosts.
PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))


def job_queue_private_address(address) -> bool:
    """True when ADDRESS is an IP address on a private network (PRIVATE_NETWORKS)."""
    try:
        ip = ipaddress.ip_address(str(address).strip())
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in PRIVATE_NETWORKS)


class FilterModule:
    def filters(self):
        return {"job_queue_private_address": job_queue_private_address}
