"""What must fail closed, or stay secret, in the roles: run by Ansible on the controller (no host)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from local_play import ANSIBLE_PLAYBOOK, ROOT, render, run_play, run_role_tasks

SECRET = "s3cr3t-never-shown-0123456789"


def role_tasks(role: str, tasks_file: str) -> list[dict]:
    return yaml.safe_load((ROOT / "roles" / role / "tasks" / tasks_file).read_text())


def role_vars(role: str) -> list[dict]:
    return [{"name": f"Load {part}", "ansible.builtin.include_vars": {"file": str(ROOT / "roles" / role / part / "main.yml")}}
            for part in ("defaults", "vars") if (ROOT / "roles" / role / part / "main.yml").is_file()]


def environment_task(keep_diff_setting: bool = True) -> dict:
    task = copy.deepcopy(next(t for t in role_tasks("whisper_service", "configure.yml")
                              if t.get("ansible.builtin.template", {}).get("src") == "environment.j2"))
    task["ansible.builtin.template"]["src"] = str(ROOT / "roles" / "whisper_service" / "templates" / "environment.j2")
    task.pop("notify")
    if not keep_diff_setting:
        task.pop("diff")
        task.pop("no_log")
    return task


@pytest.mark.parametrize("keep_diff_setting", [True, False])
def test_the_environment_file_stays_out_of_check_diff(tmp_path, monkeypatch, keep_diff_setting):
    """--check --diff shows what each file would become: never the environment file's, which may carry a
    secret through whisper_service_extra_env (the same run without the role's diff: false and no_log shows it)."""
    monkeypatch.setenv("ANSIBLE_DIFF_ALWAYS", "true")
    (tmp_path / "etc").mkdir()
    done = run_play(role_vars("whisper_service") + [environment_task(keep_diff_setting)], tmp_path, {
        "whisper_service_config_dir": str(tmp_path / "etc"), "whisper_service_deployment": "container",
        "whisper_service_extra_env": {"PILOTYS_TOKEN": SECRET}}, check=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (SECRET in done.stdout) is not keep_diff_setting, done.stdout


def test_firewall_default_policies_come_after_the_ssh_rule():
    """On a host where ufw is already active a deny policy applies at once: the rules (SSH's first) must be
    there before it, or the session running the play is cut."""
    block = next(t for t in role_tasks("firewall", "ufw.yml") if "block" in t)["block"]
    names = [t["name"] for t in block]
    allow = names.index("Allow the wanted traffic")
    policies = names.index("Deny incoming and allow outgoing traffic by default")
    assert allow < policies < names.index("Enable the firewall"), names


@pytest.mark.parametrize("template", ["52unattended-upgrades-security.j2", "20auto-upgrades.j2"])
def test_apt_configuration_is_checked_by_apt_before_it_is_written(tmp_path, template):
    task = next(t for t in role_tasks("base", "unattended_upgrades.yml")
                if t.get("ansible.builtin.template", {}).get("src") == template)
    command = task["ansible.builtin.template"]["validate"]
    assert command == "apt-config -c %s dump"
    rendered = render("base", template, tmp_path)
    good, bad = tmp_path / "good.conf", tmp_path / "bad.conf"
    good.write_text(rendered)
    bad.write_text(rendered.replace(";", "", 1))  # one missing semicolon: apt refuses the whole file
    assert subprocess.run(command.replace("%s", str(good)).split(), capture_output=True, check=False).returncode == 0
    assert subprocess.run(command.replace("%s", str(bad)).split(), capture_output=True, check=False).returncode != 0


def production_preflight(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """The whisper_service preflight on the production inventory's hosts, as the controller itself."""
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{"name": "Preflight", "hosts": "whisper", "gather_facts": False, "tasks": [
        {"name": "Check", "ansible.builtin.include_role": {"name": "whisper_service", "tasks_from": "preflight"}}]}]))
    local = ["-e", "ansible_connection=local", "-e", "ansible_become=false",
             "-e", f"ansible_python_interpreter={sys.executable}"]
    return subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(ROOT / "inventories" / "production"), *local, *extra, str(play)],
                          capture_output=True, text=True, check=False, cwd=ROOT,
                          env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"})


def test_production_without_its_vault_stops_with_a_message(tmp_path):
    """Without vault.yml the production inventory has no keys: the play stops and says what to do, instead of
    generating a key that PILOTYS does not know (every request a 401)."""
    assert not (ROOT / "inventories" / "production" / "group_vars" / "all" / "vault.yml").exists()
    done = production_preflight(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "vault.yml.example" in done.stdout and "ansible-vault encrypt" in done.stdout, done.stdout
    keys = [{"key": "k" * 32, "label": "pilotys", "webhook_secret": "w" * 32}]
    done = production_preflight(tmp_path, "-e", json.dumps({"vault_whisper_service_api_keys": keys}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "k" * 32 not in done.stdout


def _job_queue_filters():
    spec = importlib.util.spec_from_file_location(
        "job_queue_filters", ROOT / "roles" / "job_queue" / "filter_plugins" / "job_queue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("address", "private"), [
    ("10.0.1.5", True), ("172.31.255.1", True), ("192.168.10.2", True), ("100.101.102.103", True),
    ("fd12:3456::1", True),
    ("203.0.113.10", False), ("51.15.1.2", False), ("172.32.0.1", False), ("2001:db8::1", False),
    ("127.0.0.1", False), ("169.254.1.1", False), ("db.example.com", False), ("", False),
])
def test_private_addresses(address, private):
    assert _job_queue_filters().job_queue_private_address(address) is private


def test_the_queue_refuses_to_listen_on_a_public_address(tmp_path):
    """The role stops before it installs anything, and says what to set."""
    done = run_role_tasks("job_queue", "main", tmp_path, {
        "job_queue_listen_address": "203.0.113.10", "job_queue_clients": ["10.0.0.2"]})
    assert done.returncode != 0 and "is not a private address" in done.stdout, done.stdout
    assert "Install PostgreSQL" not in done.stdout


ACME = {"caddy_tls_mode": "acme", "caddy_acme_email": "ops@example.com", "firewall_clients_allowed": ["any"]}


def test_hosts_sharing_one_acme_name_are_refused(tmp_path):
    """Two hosts asking Let's Encrypt for one name: only the host the name points to passes the challenge."""
    done = run_role_tasks("caddy", "preflight", tmp_path, ACME, hosts={
        "whisper-1": {"caddy_site_address": "whisper.example.com"},
        "whisper-2": {"caddy_site_address": "whisper.example.com"}})
    assert done.returncode != 0, done.stdout
    assert "caddy_site_address whisper.example.com is also the name of whisper-2" in done.stdout
    assert "Set caddy_site_address per host in hosts.yml" in done.stdout


@pytest.mark.parametrize("mode", ["acme", "internal"])
def test_hosts_with_names_of_their_own_pass(tmp_path, mode):
    names = ({"whisper-1": "whisper-1.example.com", "whisper-2": "whisper-2.example.com"} if mode == "acme"
             else {"whisper-1": "10.66.1.2", "whisper-2": "10.66.2.2"})
    done = run_role_tasks("caddy", "preflight", tmp_path, {**ACME, "caddy_tls_mode": mode},
                          hosts={host: {"caddy_site_address": name} for host, name in names.items()})
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_production_cluster_example_talks_over_private_addresses_only():
    """inventories/production-cluster: the queue listens on, the workers dial and the gateway proxies to private
    addresses only; the public name is the gateway's alone."""
    wanted = ("[caddy_site_address | default(''), caddy_tls_mode | default(''), job_queue_listen_address | default(''),"
              " job_queue_clients | default([]), caddy_upstreams | default([]),"
              " whisper_service_job_database_host | default('')]")
    done = subprocess.run(
        [str(Path(ANSIBLE_PLAYBOOK).parent / "ansible"), "-i", str(ROOT / "inventories" / "production-cluster"), "all",
         "-m", "ansible.builtin.debug", "-a", f"msg={{{{ {wanted} }}}}", "-e", "cluster_queue_password=unused"],
        capture_output=True, text=True, check=False, cwd=ROOT,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
             "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"})
    assert done.returncode == 0, done.stdout + done.stderr
    seen = {host: result["msg"] for host, result in json.loads(done.stdout)["plays"][0]["tasks"][0]["hosts"].items()}
    private = _job_queue_filters().job_queue_private_address
    site, mode, listen, clients, upstreams, database = seen["whisper-queue"]
    assert private(listen) and clients and all(map(private, clients)), seen
    site, mode, listen, clients, upstreams, database = seen["whisper-gw"]
    assert (site, mode) == ("whisper.example.com", "acme") and upstreams, seen
    assert all(private(u.rsplit(":", 1)[0]) for u in upstreams), seen
    for worker in ("whisper-w1", "whisper-w2"):
        site, mode, listen, clients, upstreams, database = seen[worker]
        assert private(site) and mode == "internal" and private(database), seen


def apt_value(tmp_path, rendered: str, name: str) -> str:
    conf = tmp_path / "apt.conf"
    conf.write_text(rendered)
    done = subprocess.run(["apt-config", "-c", str(conf), "shell", "VALUE", name], capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().removeprefix("VALUE=").strip("'")


def test_no_automatic_reboot_unless_asked_for(tmp_path):
    rendered = render("base", "52unattended-upgrades-security.j2", tmp_path)
    assert apt_value(tmp_path, rendered, "Unattended-Upgrade::Automatic-Reboot") == "false"


def test_the_opt_in_reboot_window_as_apt_reads_it(tmp_path):
    rendered = render("base", "52unattended-upgrades-security.j2", tmp_path, {
        "base_unattended_upgrades_reboot": True, "base_unattended_upgrades_reboot_time": "03:30"})
    assert apt_value(tmp_path, rendered, "Unattended-Upgrade::Automatic-Reboot") == "true"
    assert apt_value(tmp_path, rendered, "Unattended-Upgrade::Automatic-Reboot-Time") == "03:30"
    assert apt_value(tmp_path, rendered, "Unattended-Upgrade::Automatic-Reboot-WithUsers") == "true"


@pytest.mark.parametrize("time_of_day", ["4:00", "24:00", "04:60", "now", "04:00am"])
def test_a_reboot_time_that_is_not_a_time_of_day_is_refused(tmp_path, time_of_day):
    # The controller's own facts (Debian 12) for the release check before it.
    done = run_play([{"name": "Gather", "ansible.builtin.setup": {"gather_subset": ["min"]}},
                     {"name": "Check", "ansible.builtin.include_role": {"name": "base", "tasks_from": "preflight"}}],
                    tmp_path, {"base_unattended_upgrades_reboot_time": time_of_day})
    assert done.returncode != 0 and "base_unattended_upgrades_reboot_time a time of day" in done.stdout, done.stdout
