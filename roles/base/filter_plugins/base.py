"""The base role's SSH lock-out check: how the session that runs the play was authenticated (sshd's own log
line for it), and whether the hardened settings would refuse that session's next login. Standard library only."""

from __future__ import annotations

import re


def base_ssh_session(journal_text, ssh_connection) -> dict:
    """{'method', 'user'} of sshd's "Accepted METHOD for USER from IP port PORT" line for the session whose
    $SSH_CONNECTION ("client_ip client_port server_ip server_port") is SSH_CONNECTION; {} when not found."""
    parts = str(ssh_connection or "").split()
    if len(parts) < 2:
        return {}
    pattern = re.compile(r"Accepted (\S+) for (\S+) from " + re.escape(parts[0]) + r" port " + re.escape(parts[1])
                         + r"\b")
    found = {}
    for match in pattern.finditer(str(journal_text or "")):
        found = {"method": match.group(1), "user": match.group(2)}
    return found


def base_ssh_lockout_problem(session, password_authentication, permit_root_login, password_given=False) -> str:
    """Why the next login of the session described by SESSION (base_ssh_session) would be refused under the
    settings ('' when it would not); PASSWORD_GIVEN: the inventory gives Ansible an SSH password."""
    method, user = (session or {}).get("method", ""), (session or {}).get("user", "")
    with_password = method.split("/")[0] in ("password", "keyboard-interactive")  # keyboard-interactive/pam
    if not password_authentication:
        if with_password:
            return f"Ansible logs in as {user} with a password ({method}), and password logins are being turned off"
        if password_given and method != "publickey":
            return "the inventory gives Ansible an SSH password (ansible_password), and password logins are being turned off"
    if user == "root" and permit_root_login == "no":
        return "Ansible logs in as root, and root logins are being turned off (base_ssh_permit_root_login: 'no')"
    if user == "root" and permit_root_login == "prohibit-password" and with_password:
        return f"Ansible logs in as root with a password ({method}), and root may only log in with a key"
    return ""


class FilterModule:
    def filters(self):
        return {"base_ssh_session": base_ssh_session, "base_ssh_lockout_problem": base_ssh_lockout_problem}
