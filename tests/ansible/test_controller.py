"""A lean controller: requirements/controller.txt installs from the package index into a fresh virtualenv
without the service's stack, and that controller, without setuptools, checks the playbooks and builds the
service wheel with the role."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_play import build_service_wheel, wheel_version
from test_release import project_version

ROOT = Path(__file__).resolve().parents[2]
CONTROLLER = ROOT / "requirements" / "controller.txt"
HEAVY = {"torch", "faster-whisper", "ctranslate2", "molecule", "openai-whisper", "ansible-lint", "setuptools"}


def pins(path: Path) -> dict:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return dict(line.split("==") for line in lines if "==" in line)


@pytest.fixture(scope="module")
def lean(tmp_path_factory):
    """A fresh virtualenv with requirements/controller.txt only, setuptools removed (a Python 3.12+ venv has none)."""
    venv = tmp_path_factory.mktemp("controller") / "venv"
    python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([python, "-m", "venv", venv], check=True)
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "install", "--quiet", "-r", CONTROLLER], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    subprocess.run([*pip, "uninstall", "--quiet", "--yes", "setuptools"], capture_output=True, check=False)
    return venv


def test_the_controller_pins_are_the_dev_environments():
    controller, dev = pins(CONTROLLER), pins(ROOT / "requirements" / "dev.txt")
    assert set(controller) == {"ansible", "ansible-core"}
    assert all(dev[name] == version for name, version in controller.items()), (controller, dev)


def test_the_controller_has_no_service_stack(lean):
    done = subprocess.run([lean / "bin" / "python", "-m", "pip", "list", "--format", "freeze"],
                          capture_output=True, text=True, check=True)
    installed = {line.split("==")[0].lower().replace("_", "-") for line in done.stdout.splitlines()}
    assert "ansible-core" in installed and not installed & HEAVY, installed & HEAVY
    done = subprocess.run([lean / "bin" / "python", "-c", "import setuptools"], capture_output=True, check=False)
    assert done.returncode != 0, "setuptools is still in the controller's virtualenv"


@pytest.mark.parametrize("playbook", sorted(p.name for p in (ROOT / "playbooks").glob("*.yml")))
@pytest.mark.parametrize("inventory", ["local", "production"])
def test_the_controller_checks_the_playbooks(lean, playbook, inventory):
    done = subprocess.run([lean / "bin" / "ansible-playbook", "-i", f"inventories/{inventory}", "--syntax-check",
                           f"playbooks/{playbook}"], capture_output=True, text=True, check=False, cwd=ROOT,
                          env={**os.environ, "ANSIBLE_NOCOLOR": "1"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_controller_builds_the_wheel_without_setuptools(lean, tmp_path):
    wheel = build_service_wheel("whisper_service", tmp_path, ansible_playbook=str(lean / "bin" / "ansible-playbook"))
    assert wheel_version(wheel) == project_version()
