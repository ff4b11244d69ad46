"""The collection pilotys.whisper as an operator gets it: built from this tree, installed offline from its
tarball into an empty collections path, its playbooks and roles found by their FQCN."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from local_play import build_service_wheel, wheel_version
from test_release import project_version

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p.stem for p in (ROOT / "playbooks").glob("*.yml"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(tarball, collections path) once for the module."""
    dist = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "ANSIBLE_GALAXY": str(BIN / "ansible-galaxy")}
    done = subprocess.run([ROOT / "scripts" / "build-collection", dist], capture_output=True, text=True, env=env,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    tarball = Path(done.stdout.strip().splitlines()[-1])
    path = tmp_path_factory.mktemp("collections")
    done = subprocess.run([BIN / "ansible-galaxy", "collection", "install", "--offline", "-p", path, tarball],
                          capture_output=True, text=True, check=False, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
    return tarball, path


def test_the_tarball_carries_the_version_and_no_test_files(installed):
    tarball, _ = installed
    version = project_version()
    assert tarball.name == f"pilotys-whisper-{version}.tar.gz"
    with tarfile.open(tarball) as archive:
        names = archive.getnames()
        manifest = json.load(archive.extractfile("MANIFEST.json"))
    assert manifest["collection_info"]["version"] == version
    assert set(manifest["collection_info"]["dependencies"]) == {
        c["name"] for c in yaml.safe_load((ROOT / "requirements.yml").read_text())["collections"]}
    tops = {n.split("/")[0] for n in names}
    assert tops == {"MANIFEST.json", "FILES.json", "README.md", "CHANGELOG.md", "meta", "roles", "playbooks",
                    "service", "inventory"}
    assert not [n for n in names if "__pycache__" in n or n.startswith("service/tests")]
    roles = {n.split("/")[1] for n in names if n.startswith("roles/") and n.count("/") >= 2}
    assert roles == {p.name for p in (ROOT / "roles").iterdir() if p.is_dir()}


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_each_playbook_runs_by_its_fqcn_from_the_installed_collection(installed, playbook, tmp_path):
    _, path = installed
    inventory = path / "ansible_collections/pilotys/whisper/inventory"
    # Away from this tree (no ansible.cfg, no roles/): only the installed collection can provide the roles.
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(path), "ANSIBLE_CONFIG": "", "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run([BIN / "ansible-playbook", "-i", inventory, "--list-tasks", f"pilotys.whisper.{playbook}"],
                          capture_output=True, text=True, check=False, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ansible_collections/pilotys/whisper/playbooks/{playbook}.yml" in done.stdout
    assert "pilotys.whisper." in done.stdout  # its roles came from the collection


def test_the_example_inventory_carries_the_project_wiring(installed):
    _, path = installed
    wiring = path / "ansible_collections/pilotys/whisper/inventory/group_vars/all/00-project.yml"
    assert not wiring.is_symlink()
    assert yaml.safe_load(wiring.read_text()) == yaml.safe_load((ROOT / "group_vars/all/main.yml").read_text())


def test_the_collections_role_builds_the_wheel_from_its_own_sources(installed, tmp_path, monkeypatch):
    _, path = installed
    monkeypatch.setenv("ANSIBLE_COLLECTIONS_PATH", str(path))
    wheel = build_service_wheel("pilotys.whisper.whisper_service", tmp_path)
    assert wheel_version(wheel) == project_version()


def test_ansible_doc_reads_the_roles_arguments(installed):
    _, path = installed
    done = subprocess.run([BIN / "ansible-doc", "-t", "role", "--json", "pilotys.whisper.whisper_service"],
                          capture_output=True, text=True, check=False, cwd="/",
                          env={**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(path)})
    assert done.returncode == 0, done.stdout + done.stderr
    options = json.loads(done.stdout)["pilotys.whisper.whisper_service"]["entry_points"]["main"]["options"]
    assert "whisper_service_model" in options
