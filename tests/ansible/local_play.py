"""Run a role's templates and preflight tasks on the controller itself (connection local, no host, no become),
so that tests see what Ansible really renders and asserts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
MANAGED = "Managed by Ansible (tests)"


def run_play(tasks: list, tmp_path: Path, extra_vars: dict | None = None, hosts: dict | None = None,
             check: bool = False, tags: str | None = None,
             ansible_playbook: str = ANSIBLE_PLAYBOOK, environment: dict | None = None) -> subprocess.CompletedProcess:
    """Run TASKS on HOSTS ({name: host vars}, one local host by default) with EXTRA_VARS, in check mode with
    CHECK, only TAGS when given, with the ANSIBLE_PLAYBOOK of another controller if given, the tasks' ENVIRONMENT
    (the play's `environment:`) if given; never raises."""
    hosts = hosts or {"testhost": {}}
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"all": {"hosts": {name: {**local, **values} for name, values in hosts.items()}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    play = {"name": "Run under test", "hosts": "all", "gather_facts": False, "tasks": tasks}
    if environment:
        play["environment"] = environment
    (tmp_path / "play.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    (tmp_path / "vars.json").write_text(json.dumps({"ansible_managed": MANAGED, **(extra_vars or {})}))
    return subprocess.run(
        [ansible_playbook, "-i", str(tmp_path / "inventory.yml"), "-e", f"@{tmp_path / 'vars.json'}",
         str(tmp_path / "play.yml"), *(["--check"] if check else []), *(["--tags", tags] if tags else [])],
        check=False, capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
             "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"})


def render(role: str, template: str, tmp_path: Path, extra_vars: dict | None = None, release: str = "Debian-13") -> str:
    """TEMPLATE of ROLE rendered with the role's defaults and vars (those of RELEASE too, vars/RELEASE.yml),
    overridden by EXTRA_VARS."""
    role_dir = ROOT / "roles" / role
    out = tmp_path / template.removesuffix(".j2")
    tasks = [{"name": f"Load {part}", "ansible.builtin.include_vars": {"file": str(path)}}
             for part, path in (("defaults", role_dir / "defaults" / "main.yml"), ("vars", role_dir / "vars" / "main.yml"),
                                (release, role_dir / "vars" / f"{release}.yml")) if path.is_file()]
    tasks.append({"name": "Render", "ansible.builtin.template": {
        "src": str(role_dir / "templates" / template), "dest": str(out), "mode": "0600"}})
    done = run_play(tasks, tmp_path, extra_vars)
    assert done.returncode == 0, done.stdout + done.stderr
    return out.read_text()


def run_role_tasks(role: str, tasks_from: str, tmp_path: Path, extra_vars: dict | None = None,
                   hosts: dict | None = None, check: bool = False, tags: str | None = None) -> subprocess.CompletedProcess:
    """ROLE's tasks file TASKS_FROM (e.g. preflight) on local HOSTS, with the role's defaults under EXTRA_VARS."""
    return run_play([{"name": "Include the role's tasks", "ansible.builtin.include_role": {
        "name": role, "tasks_from": tasks_from}}], tmp_path, extra_vars, hosts, check, tags)


def recap(output: str) -> dict:
    """The PLAY RECAP of OUTPUT: {host: {"ok": n, "changed": n, "failed": n, ...}}."""
    return {host: {name: int(n) for name, n in re.findall(r"(\w+)=(\d+)", counts)}
            for host, counts in re.findall(r"^(\S+)\s+: (ok=.*)$", output, re.MULTILINE)}


def build_service_wheel(role: str, tmp_path: Path, ansible_playbook: str = ANSIBLE_PLAYBOOK) -> Path:
    """The service wheel as ROLE (whisper_service, or its name in a collection) builds it on the controller that
    ANSIBLE_PLAYBOOK belongs to: its tasks_from=wheel, then the wheel copied to TMP_PATH/wheel/."""
    built = "{{ _whisper_service_built.stdout_lines[-1] }}"
    tasks = [
        {"name": "Build", "ansible.builtin.include_role": {"name": role, "tasks_from": "wheel"}},
        {"name": "Keep", "ansible.builtin.copy": {"src": built, "dest": f"{tmp_path}/wheel/", "mode": "0644"}},
        {"name": "Clean", "ansible.builtin.file": {"path": "{{ _whisper_service_build.path }}", "state": "absent"}},
    ]
    done = run_play(tasks, tmp_path, ansible_playbook=ansible_playbook)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list((tmp_path / "wheel").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def wheel_version(wheel: Path) -> str:
    """The Version: of WHEEL's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    return re.search(r"^Version: (\S+)$", metadata, re.MULTILINE).group(1)
