"""The optional node_exporter role on the Molecule host (node_exporter_enabled in the scenario's inventory): host
metrics on the private address only, for the Prometheus server the firewall lets in (here the controller)."""

from __future__ import annotations

import pytest
import requests

PORT = 9100


@pytest.fixture(scope="module", autouse=True)
def enabled(host):
    # molecule/debian12 runs these tests too, without node_exporter (make test's time): nothing to check there.
    if not host.ansible.get_variables().get("node_exporter_enabled"):
        pytest.skip("node_exporter_enabled is off in this scenario's inventory")


def connects(host, address: str) -> bool:
    """Whether a TCP connection to ADDRESS:PORT succeeds from the host itself (past its firewall)."""
    probe = host.run(f"python3 -c 'import socket; socket.create_connection((\"{address}\", {PORT}), timeout=3)'")
    return probe.rc == 0


def test_it_listens_on_the_private_address_only(host, address):
    listeners = host.check_output(f"ss -Htln 'sport = :{PORT}' | awk '{{print $4}}'").split()
    assert listeners == [f"{address}:{PORT}"], listeners
    assert host.service("prometheus-node-exporter").is_enabled


def test_the_scraper_reads_host_and_unit_metrics(address):
    metrics = requests.get(f"http://{address}:{PORT}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert 'node_filesystem_avail_bytes{device=' in metrics.text
    # The systemd collector (node_exporter_systemd_collector): the service's state, for an alert on it.
    unit = [line for line in metrics.text.splitlines()
            if line.startswith("node_systemd_unit_state{") and 'name="whisper-service.service"' in line]
    assert any('state="active"' in line and line.endswith(" 1") for line in unit), unit


def test_no_other_address_of_the_host_answers(host, address):
    """Loopback, and a public address the host is given (a VPS's public interface), refuse the port."""
    public = "198.51.100.9"  # TEST-NET-2: stands for the VPS's public address
    host.run(f"ip address add {public}/32 dev lo")
    try:
        assert connects(host, address)
        assert not connects(host, "127.0.0.1")
        assert not connects(host, public)
    finally:
        host.run(f"ip address del {public}/32 dev lo")
