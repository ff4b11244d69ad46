"""The whisper_service role's rendered environment points the service at a model its engine can load: the
directory the model task fills (downloaded by name or copied from the controller), in both deployments."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "whisper_service"
ANSIBLE_PLAYBOOK = str(Path(sys.executable).parent / "ansible-playbook")
sys.path.insert(0, str(ROOT / "service" / "src"))

from pilotys_whisper.engines.openai import OpenAIWhisperEngine
from pilotys_whisper.settings import Settings


@pytest.fixture
def loaded(monkeypatch):
    """What the openai-whisper engine hands to whisper.load_model, which takes a model name or a checkpoint file."""
    import whisper

    given = []

    class Model:
        def set_alignment_heads(self, heads):
            pass

    def load_model(name, device=None, download_root=None):
        assert name in whisper.available_models() or Path(name).is_file(), f"Model {name} not found"
        given.append(name)
        return Model()

    monkeypatch.setattr(whisper, "load_model", load_model)

    def load(env: dict) -> str:
        OpenAIWhisperEngine(Settings.from_env({**env, "WHISPER_DEVICE": "cpu"})).load()
        return given[-1]
    return load


def render(tmp_path: Path, **variables) -> dict:
    """The role's environment file, container unit and model download task's `creates`, for these variables."""
    tasks = yaml.safe_load((ROLE / "tasks" / "model.yml").read_text())
    download = next(t for t in tasks if t["name"] == "Download the model by name on the host")
    out = tmp_path / "rendered"
    playbook = [{
        "name": "Render the whisper_service role's model settings",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
        "vars": {"ansible_managed": "test", "model_download_creates": download["ansible.builtin.command"]["creates"]},
        "tasks": [
            {"name": "Ensure the output directory exists",
             "ansible.builtin.file": {"path": str(out), "state": "directory", "mode": "0755"}},
            {"name": "Render the environment file",
             "ansible.builtin.template": {"src": str(ROLE / "templates" / "environment.j2"),
                                          "dest": str(out / "environment"), "mode": "0600"}},
            {"name": "Render the container unit",
             "ansible.builtin.template": {"src": str(ROLE / "templates" / "whisper-service-container.service.j2"),
                                          "dest": str(out / "container.service"), "mode": "0644"}},
            {"name": "Write the file the model download creates",
             "ansible.builtin.copy": {"content": "{{ model_download_creates }}", "dest": str(out / "creates"),
                                      "mode": "0644"}},
        ],
    }]
    (tmp_path / "playbook.yml").write_text(yaml.safe_dump(playbook))
    (tmp_path / "extra.json").write_text(json.dumps({"ansible_python_interpreter": sys.executable, **variables}))
    done = subprocess.run([ANSIBLE_PLAYBOOK, "-i", "localhost,", "-e", f"@{tmp_path / 'extra.json'}",
                           str(tmp_path / "playbook.yml")], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    env = {}
    for line in (out / "environment").read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("=", 1)
            env[name] = value[1:-1] if value.startswith('"') else value
    return {"env": env, "unit": (out / "container.service").read_text(), "creates": (out / "creates").read_text()}


@pytest.mark.parametrize("model", ["base", "large"])
def test_openai_whisper_loads_the_checkpoint_the_role_downloads(tmp_path, loaded, model):
    install = tmp_path / "opt"
    rendered = render(tmp_path, whisper_service_engine="openai-whisper", whisper_service_model=model,
                      whisper_service_install_dir=str(install))
    env, checkpoint = rendered["env"], Path(rendered["creates"])
    # What `whisper-service fetch-model NAME DIR --engine openai-whisper` writes, which the task checks for.
    assert checkpoint == install / "models" / model / f"{model}.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    assert env["WHISPER_ENGINE"] == "openai-whisper"
    assert loaded(env) == str(checkpoint)


def test_openai_whisper_in_a_container_loads_the_mounted_checkpoint(tmp_path, loaded):
    install = tmp_path / "opt"
    rendered = render(tmp_path, whisper_service_engine="openai-whisper", whisper_service_deployment="container",
                      whisper_service_install_dir=str(install))
    env, checkpoint = rendered["env"], Path(rendered["creates"])
    mount = re.search(r"--volume (\S+):(\S+):ro", rendered["unit"])
    assert mount and Path(mount[1]) == checkpoint.parent
    # Inside the container: the host's model directory at the mount point.
    inside = tmp_path / "container" / Path(mount[2]).relative_to("/")
    inside.mkdir(parents=True)
    (inside / checkpoint.name).write_bytes(b"")
    assert env["WHISPER_MODEL"] == mount[2]
    env = {**env, "WHISPER_MODEL": str(inside), "WHISPER_ALLOW_UNAUTHENTICATED": "true"}
    assert loaded(env) == str(inside / checkpoint.name)
