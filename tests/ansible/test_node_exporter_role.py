"""The node_exporter role listens on a private address of the host only: its preflight refuses anything else, on
this machine's real facts, and its configuration file says exactly that address."""

import ipaddress
import json

import pytest
from local_play import render, run_play


def preflight(tmp_path, **settings):
    tasks = [
        {"name": "Gather", "ansible.builtin.setup": {"gather_subset": ["min", "network"]}},
        {"name": "Keep the addresses", "ansible.builtin.copy": {"dest": str(tmp_path / "addresses.json"), "mode": "0600",
                                                                "content": "{{ ansible_facts['all_ipv4_addresses'] | to_json }}"}},
        {"name": "Preflight", "ansible.builtin.include_role": {"name": "node_exporter", "tasks_from": "preflight",
                                                                 "public": True}},
        {"name": "Keep", "ansible.builtin.copy": {"dest": str(tmp_path / "seen.json"), "mode": "0600", "content":
            "{{ {'listen': node_exporter_listen_address} | to_json }}"}},
    ]
    return run_play(tasks, tmp_path, extra_vars=settings)


def test_the_default_is_a_private_address_of_the_host(tmp_path):
    """On this machine's real facts: its first private address, or, on a machine without one (a CI runner on a
    documentation range), a refusal that names the addresses it has. Molecule's hosts (10.66.x) run the first case
    on real hosts (molecule/default/tests/test_node_exporter.py)."""
    done = preflight(tmp_path)
    # The role's private networks (RFC 1918 and 100.64/10); Python's is_private also counts documentation
    # ranges such as 192.0.2.0/24, which a host may carry and the role rightly refuses.
    networks = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")]
    facts = json.loads((tmp_path / "addresses.json").read_text())  # gathered by the same run, before the preflight
    private = [a for a in facts if any(ipaddress.ip_address(a) in n for n in networks)]
    if private:
        assert done.returncode == 0, done.stdout + done.stderr
        seen = json.loads((tmp_path / "seen.json").read_text())
        assert seen["listen"] == private[0], seen
    else:
        assert done.returncode != 0, done.stdout
        assert "node_exporter_listen_address is ''" in done.stdout, done.stdout
        assert all(a in done.stdout for a in facts), (facts, done.stdout)


@pytest.mark.parametrize("address", ["203.0.113.10", "192.0.2.2", "8.8.8.8", "0.0.0.0", "", "10.255.254.253"])
def test_preflight_refuses_public_or_foreign_addresses(tmp_path, address):
    done = preflight(tmp_path, node_exporter_listen_address=address)
    assert done.returncode != 0
    assert f"node_exporter_listen_address is '{address}'" in done.stdout, done.stdout


def test_preflight_accepts_the_loopback(tmp_path):
    done = preflight(tmp_path, node_exporter_listen_address="127.0.0.1")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_configuration_file_binds_that_address(tmp_path):
    text = render("node_exporter", "prometheus-node-exporter.j2", tmp_path, {
        "node_exporter_listen_address": "10.0.0.11", "node_exporter_collectors_disabled": ["wifi", "infiniband"]})
    assert 'ARGS="--web.listen-address=10.0.0.11:9100 --collector.systemd --no-collector.wifi ' \
           '--no-collector.infiniband"' in text.splitlines()
    assert "# Managed by Ansible (tests)" in text


def test_a_disabled_role_touches_nothing(tmp_path):
    done = run_play([{"name": "Role", "ansible.builtin.include_role": {"name": "node_exporter"}}], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    recap = done.stdout[done.stdout.index("PLAY RECAP"):]
    assert "changed=0" in recap and "failed=0" in recap, recap
    results, task = {}, None
    for line in done.stdout.splitlines():
        if line.startswith("TASK ["):
            task = line[6:line.index("]")]
        elif task and line.startswith(("ok:", "changed:", "skipping:")):
            results[task] = line.split(":")[0]
    ran = {name: r for name, r in results.items() if name.startswith("node_exporter : ") and r != "skipping"
           and "Validating arguments" not in name}
    assert ran == {} and len(results) > 2, results  # every task of the role skipped
