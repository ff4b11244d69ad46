"""The nvidia_driver role's decisions, run by Ansible on the controller with the host's state in files (this
machine has no GPU): the reboot follows from the installed and the loaded module versions and /run/reboot-required,
not from the install task; the driver's packages are held and kept out of unattended-upgrades. dpkg and
dpkg-query are stood in for on the PATH (the listing a host would show; the holds recorded, this machine's dpkg
untouched); apt-config checks the written file for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from local_play import run_play

PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  {}  Tue Apr  8 20:55:54 UTC 2025\n"
               "GCC version:  gcc version 14.2.0 (Debian 14.2.0-19)\n")
OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {}  Release Build  (root@host)  Tue Apr 8 2025\n"

# What `dpkg-query --show` lists on a GPU worker (status, name, version), with packages of other sources around.
INSTALLED = [
    ("ii ", "nvidia-driver", "550.163.01-2~deb13u1"),
    ("ii ", "nvidia-kernel-dkms", "550.163.01-2~deb13u1"),
    ("ii ", "nvidia-smi", "550.163.01-2~deb13u1"),
    ("ii ", "libcuda1:amd64", "550.163.01-2~deb13u1"),
    ("ii ", "libnvidia-ml1:amd64", "550.163.01-2~deb13u1"),
    ("ii ", "firmware-nvidia-gsp", "550.163.01-1"),
    ("ii ", "firmware-misc-nonfree", "20250410-2"),
    ("ii ", "linux-image-amd64", "6.12.57-1"),
    ("ii ", "libc6:amd64", "2.41-12"),
    ("rc ", "nvidia-legacy-390xx-driver", "390.157-1"),  # removed, its configuration left: nothing to hold
]
HELD = ["nvidia-driver", "nvidia-kernel-dkms", "nvidia-smi", "libcuda1", "libnvidia-ml1", "firmware-nvidia-gsp"]

FAKE_DPKG_QUERY = """#!/bin/sh
cat {listing}
"""
FAKE_DPKG = """#!{python}
import sys
from pathlib import Path
log = Path({log!r})
if sys.argv[1] == "--get-selections":
    current = [line for line in (log.read_text().splitlines() if log.exists() else [])
               if line.split()[0] == sys.argv[2]]
    if current:
        print(current[-1])
elif sys.argv[1] == "--set-selections":
    with open(log, "a") as out:
        out.write(sys.stdin.read().strip() + "\\n")
else:
    sys.exit(f"dpkg {{sys.argv[1:]}} is not stood in for")
"""


def stand_in(tmp_path: Path, installed) -> dict:
    """dpkg-query listing INSTALLED and a dpkg recording selections in TMP_PATH/selections: the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    listing = tmp_path / "dpkg-listing"
    listing.write_text("".join(f"{status}\t{name}\t{version}\n" for status, name, version in installed))
    for name, text in (("dpkg-query", FAKE_DPKG_QUERY.format(listing=listing)),
                       ("dpkg", FAKE_DPKG.format(python=sys.executable, log=str(tmp_path / "selections")))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def decide(tmp_path, installed=INSTALLED, loaded: str | None = None, reboot_required: bool = False,
           extra_vars: dict | None = None) -> dict:
    """The role's hold and reboot tasks on this machine with that state: the facts they leave behind."""
    loaded_file, required_file = tmp_path / "nvidia-version", tmp_path / "reboot-required"
    if loaded is not None:
        loaded_file.write_text(loaded)
    if reboot_required:
        required_file.write_text("*** System restart required ***\n")
    out = tmp_path / "facts.json"
    tasks = [
        {"name": "Hold", "ansible.builtin.include_role": {"name": "nvidia_driver", "tasks_from": "hold"}},
        {"name": "Decide", "ansible.builtin.include_role": {"name": "nvidia_driver", "tasks_from": "reboot"}},
        {"name": "Keep", "ansible.builtin.copy": {"content": "{{ {'reasons': _nvidia_driver_reboot_reasons} | to_json }}",
                                                   "dest": str(out), "mode": "0600"}},
    ]
    done = run_play(tasks, tmp_path, {
        "nvidia_driver_skip_reboot": True, "_nvidia_driver_install": {"changed": False},
        "_nvidia_driver_loaded_version_file": str(loaded_file), "_nvidia_driver_reboot_required_file": str(required_file),
        "_nvidia_driver_unattended_upgrades_conf": str(tmp_path / "51pilotys-nvidia-driver"), **(extra_vars or {})},
        environment=stand_in(tmp_path, installed))
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


# --- The reboot ---

def test_a_driver_installed_but_not_loaded_reboots(tmp_path):
    """A run cut off after the install: the install task reports no change the next time, the host reboots all
    the same."""
    assert decide(tmp_path)["reasons"] == ["the driver 550.163.01 is installed but no NVIDIA module is loaded"]


@pytest.mark.parametrize("line", [PROPRIETARY, OPEN])
def test_an_older_loaded_module_reboots(tmp_path, line):
    reasons = decide(tmp_path, loaded=line.format("535.247.01"))["reasons"]
    assert reasons == ["module 535.247.01 is loaded but 550.163.01 is installed"]


@pytest.mark.parametrize("line", [PROPRIETARY, OPEN])
def test_the_installed_module_loaded_needs_no_reboot(tmp_path, line):
    assert decide(tmp_path, loaded=line.format("550.163.01"))["reasons"] == []


def test_a_reboot_the_packages_asked_for_is_done(tmp_path):
    reasons = decide(tmp_path, loaded=PROPRIETARY.format("550.163.01"), reboot_required=True)["reasons"]
    assert reasons == [f"{tmp_path / 'reboot-required'} exists"]


def test_no_driver_installed_no_reboot(tmp_path):
    assert decide(tmp_path, installed=[p for p in INSTALLED if "nvidia" not in p[1] and "cuda" not in p[1]])[
        "reasons"] == []


# --- The holds ---

def test_the_driver_packages_are_held_and_kept_from_unattended_upgrades(tmp_path):
    decide(tmp_path, loaded=PROPRIETARY.format("550.163.01"))
    held = (tmp_path / "selections").read_text().split("\n")
    assert sorted(line for line in held if line) == sorted(f"{name} hold" for name in HELD)
    conf = tmp_path / "51pilotys-nvidia-driver"
    dump = subprocess.run(["apt-config", "-c", str(conf), "dump", "Unattended-Upgrade::Package-Blacklist"],
                          capture_output=True, text=True, check=True).stdout
    blacklisted = [line.split('"')[1] for line in dump.splitlines() if line.startswith("Unattended-Upgrade::Package-Blacklist:: ")]
    assert "nvidia-" in blacklisted and "libcuda1" in blacklisted and "firmware-nvidia-" in blacklisted, dump
    # unattended-upgrades matches them from the start of the name, as Python's re.match does.
    for _, name, _ in INSTALLED:
        bare = name.split(":")[0]
        assert any(re.match(p, bare) for p in blacklisted) == (bare in HELD or "nvidia" in bare), bare


def test_holds_are_released_for_a_deliberate_upgrade(tmp_path):
    conf = tmp_path / "51pilotys-nvidia-driver"
    decide(tmp_path, loaded=PROPRIETARY.format("550.163.01"))
    assert conf.is_file()
    decide(tmp_path, loaded=PROPRIETARY.format("550.163.01"), extra_vars={"nvidia_driver_hold": False})
    assert not conf.exists()
    selections = (tmp_path / "selections").read_text().splitlines()
    assert sorted(selections[len(HELD):]) == sorted(f"{name} install" for name in HELD)
