"""The top-level group_vars/ really reaches every inventory, and each inventory can override it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_INVENTORY = str(Path(sys.executable).parent / "ansible-inventory")
PROJECT_VARS = ROOT / "group_vars" / "all" / "main.yml"
INVENTORIES = [ROOT / "inventories" / "local", ROOT / "inventories" / "production",
               ROOT / "inventories" / "production-cluster",
               ROOT / "molecule" / "default" / "inventory" / "hosts.yml",
               ROOT / "molecule" / "cluster" / "inventory" / "hosts.yml"]


def host_vars(inventory: Path, host: str) -> dict:
    # --playbook-dir as ansible-playbook sees it (playbooks/), so that group_vars/ at the top is not
    # picked up by accident as the current directory's "playbook" group_vars.
    done = subprocess.run([ANSIBLE_INVENTORY, "-i", str(inventory), "--playbook-dir", str(ROOT / "playbooks"),
                           "--host", host], capture_output=True, text=True, check=True, cwd="/")
    return json.loads(done.stdout)


def hosts(inventory: Path) -> list[str]:
    done = subprocess.run([ANSIBLE_INVENTORY, "-i", str(inventory), "--list"], capture_output=True, text=True,
                          check=True, cwd="/")
    return sorted(json.loads(done.stdout)["_meta"]["hostvars"])


@pytest.mark.parametrize("inventory", INVENTORIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_project_group_vars_reach_every_host(inventory):
    project = yaml.safe_load(PROJECT_VARS.read_text())
    names = hosts(inventory)
    assert names, f"{inventory} has no host"
    for name in names:
        values = host_vars(inventory, name)
        assert values["ansible_managed"] == project["ansible_managed"]
        assert values["whisper_service_port"] == project["whisper_service_port"]


def test_local_inventory_overrides_the_project_defaults():
    assert yaml.safe_load(PROJECT_VARS.read_text())["caddy_tls_mode"] == "acme"
    assert host_vars(ROOT / "inventories" / "local", "demo")["caddy_tls_mode"] == "internal"


def test_cluster_inventory_wires_the_gateway_to_the_workers():
    """The gateway's upstreams are the workers' HTTPS ports, and each worker opens HTTPS to the gateway alone."""
    inventory = ROOT / "molecule" / "cluster" / "inventory" / "hosts.yml"
    wanted = "[caddy_upstreams | default([]), firewall_clients_allowed, caddy_internal_ca_fetch_dest]"
    done = subprocess.run([str(Path(sys.executable).parent / "ansible"), "-i", str(inventory), "all", "-o",
                           "-m", "ansible.builtin.debug", "-a", f"msg={{{{ {wanted} | to_json }}}}",
                           "--playbook-dir", str(ROOT / "playbooks")],
                          capture_output=True, text=True, check=True, cwd="/", env={**os.environ, "ANSIBLE_NOCOLOR": "1"})
    seen = {}
    for line in done.stdout.splitlines():
        name, _, rest = line.partition(" | SUCCESS => ")
        seen[name] = json.loads(json.loads(rest)["msg"])
    assert seen["wc-gw"][0] == ["10.66.22.2:443", "10.66.23.2:443"]
    for worker in ("wc-w1", "wc-w2"):
        upstreams, clients, ca_dest = seen[worker]
        assert upstreams == [] and clients == ["10.66.21.2"]
        assert ca_dest.endswith(f"/credentials/{worker}-caddy-root-ca.crt")


def test_generated_credentials_are_never_read_as_inventory(tmp_path):
    """The roles write the API key to credentials/ inside the inventory: with the project's ansible.cfg,
    an inventory directory that holds it lists the same hosts, and the key never becomes a host name."""
    inventory = tmp_path / "local"
    subprocess.run(["cp", "-r", str(ROOT / "inventories" / "local"), str(inventory)], check=True)
    (inventory / "credentials").mkdir(exist_ok=True)
    (inventory / "credentials" / "whisper-api-key").write_text("k3y-that-must-not-be-a-host\n")
    done = subprocess.run([ANSIBLE_INVENTORY, "-i", str(inventory), "--list"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert "k3y-that-must-not-be-a-host" not in done.stdout + done.stderr
    assert sorted(json.loads(done.stdout)["_meta"]["hostvars"]) == hosts(ROOT / "inventories" / "local")
