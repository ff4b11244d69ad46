"""The base role's SSH lock-out check (roles/base/filter_plugins): which session runs the play, from sshd's own
log lines, and which hardened settings would refuse its next login."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("base_filters", ROOT / "roles" / "base" / "filter_plugins" / "base.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

# As Debian 12's sshd and Debian 13's sshd-session write them (journalctl -o cat).
JOURNAL = """Server listening on 0.0.0.0 port 22.
Accepted password for debian from 198.51.100.7 port 50122 ssh2
Accepted publickey for root from 10.66.1.1 port 40022 ssh2: ED25519 SHA256:abc
Accepted keyboard-interactive/pam for admin from 10.66.1.1 port 40023 ssh2
Accepted publickey for debian from 198.51.100.7 port 501 ssh2: ED25519 SHA256:def
"""


@pytest.mark.parametrize(("connection", "session"), [
    ("10.66.1.1 40022 10.66.1.2 22", {"method": "publickey", "user": "root"}),
    ("198.51.100.7 50122 203.0.113.10 22", {"method": "password", "user": "debian"}),
    ("10.66.1.1 40023 10.66.1.2 22", {"method": "keyboard-interactive/pam", "user": "admin"}),
    ("198.51.100.7 501 203.0.113.10 22", {"method": "publickey", "user": "debian"}),  # not port 50122's line
    ("198.51.100.7 50 203.0.113.10 22", {}),
    ("", {}),
])
def test_the_session_is_found_by_its_client_address_and_port(connection, session):
    assert base.base_ssh_session(JOURNAL, connection) == session


@pytest.mark.parametrize(("session", "password_auth", "root_login", "password_given", "refused"), [
    ({"method": "publickey", "user": "root"}, False, "prohibit-password", False, ""),
    ({"method": "publickey", "user": "debian"}, False, "no", False, ""),
    ({"method": "publickey", "user": "root"}, False, "no", False, "root logins are being turned off"),
    ({"method": "password", "user": "debian"}, False, "prohibit-password", False, "with a password (password)"),
    ({"method": "keyboard-interactive/pam", "user": "admin"}, False, "no", False, "(keyboard-interactive/pam)"),
    ({"method": "keyboard-interactive", "user": "admin"}, False, "no", False, "password logins are being turned off"),
    ({"method": "password", "user": "debian"}, True, "prohibit-password", False, ""),
    ({"method": "password", "user": "root"}, True, "prohibit-password", False, "root may only log in with a key"),
    ({}, False, "prohibit-password", True, "the inventory gives Ansible an SSH password"),
    ({}, False, "prohibit-password", False, ""),  # not found (a local connection): nothing to judge
])
def test_settings_that_would_refuse_the_next_login(session, password_auth, root_login, password_given, refused):
    problem = base.base_ssh_lockout_problem(session, password_auth, root_login, password_given)
    assert (refused in problem) if refused else problem == "", problem
