"""The firewall role's preflight, run by Ansible on the controller (no host, no ufw)."""

import pytest
from local_play import run_role_tasks


@pytest.mark.parametrize("port", ["8000:8010", "80,443"])
@pytest.mark.parametrize("proto", [None, "any"])
def test_preflight_refuses_several_ports_without_tcp_or_udp(tmp_path, port, proto):
    rule = {"port": port, "from": "10.0.0.0/8", **({"proto": proto} if proto else {})}
    done = run_role_tasks("firewall", "preflight", tmp_path, {"firewall_extra_rules": [rule]})
    assert done.returncode != 0, done.stdout
    assert f'firewall_extra_rules has a rule on port "{port}" without one' in done.stdout
    assert "Add proto tcp or proto udp to each such rule" in done.stdout


@pytest.mark.parametrize("check", [False, True])
def test_preflight_accepts_ranges_with_a_protocol(tmp_path, check):
    rules = [{"port": "8000:8010", "proto": "tcp", "from": "10.0.0.0/8"},
             {"port": "60000:61000", "proto": "udp"}, {"port": 5432, "from": "10.0.0.7"}]
    done = run_role_tasks("firewall", "preflight", tmp_path,
                          {"firewall_extra_rules": rules, "firewall_private_ports": [9000]}, check=check)
    assert done.returncode == 0, done.stdout + done.stderr
