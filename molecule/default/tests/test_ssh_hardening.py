"""SSH hardened by default on the Molecule host, and Ansible still logs in (the idempotence run and these tests
use the same root-with-a-key session as an operator's run)."""

from __future__ import annotations

from test_default import run_site


def test_sshd_takes_keys_only_and_root_with_a_key_only(host):
    effective = dict(line.split(" ", 1) for line in host.check_output("sshd -T").splitlines() if " " in line)
    assert effective["passwordauthentication"] == "no"
    assert effective["kbdinteractiveauthentication"] == "no"
    assert effective["permitrootlogin"] == "without-password"  # sshd -T's name for prohibit-password
    dropin = host.file("/etc/ssh/sshd_config.d/00-pilotys-hardening.conf")
    assert dropin.user == "root" and dropin.mode == 0o644


def test_settings_that_would_lock_ansible_out_are_refused(host):
    """Ansible logs in as root: turning root logins off is refused before sshd is touched."""
    before = host.file("/etc/ssh/sshd_config.d/00-pilotys-hardening.conf").sha256sum
    returncode, output = run_site("base_ssh", "base_ssh_permit_root_login=no")
    assert returncode != 0 and "Ansible logs in as root, and root logins are being turned off" in output, output
    assert host.file("/etc/ssh/sshd_config.d/00-pilotys-hardening.conf").sha256sum == before
    assert host.run("true").rc == 0  # still connected
