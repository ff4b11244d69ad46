"""What the Molecule scenarios' testinfra tests share, as each scenario's tests/conftest.py (a link here):
fixtures for the tested host's address and for the API key and Caddy root certificate the play generated in
the scenario's inventory (tests/ sits beside it), and helpers the tests import from conftest."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


def _credentials(request) -> Path:
    # The scenario Molecule runs: another scenario may run these tests through a link (molecule/debian12).
    scenario = os.environ.get("MOLECULE_SCENARIO_DIRECTORY") or Path(request.path).resolve().parent.parent
    return Path(scenario) / "inventory" / "credentials"


@pytest.fixture(scope="module")
def address(host) -> str:
    return host.ansible.get_variables()["ansible_host"]


@pytest.fixture(scope="module")
def api_key(request) -> str:
    return (_credentials(request) / "whisper-api-key").read_text().strip()


@pytest.fixture(scope="module")
def ca_bundle(request) -> str:
    path = _credentials(request) / "caddy-root-ca.crt"
    assert path.is_file(), "the caddy role fetches its internal root certificate for clients"
    return str(path)


def port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=3):
            return True
    except OSError:
        return False
