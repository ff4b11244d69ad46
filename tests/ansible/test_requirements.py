"""requirements.yml names every collection the roles use, at the version installed with the ansible package."""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GALAXY = str(Path(sys.executable).parent / "ansible-galaxy")
MODULE = re.compile(r"^([a-z][a-z0-9_]*\.[a-z][a-z0-9_]*)\.[a-z][a-z0-9_]*$")
# A filter or test named in Jinja: | community.general.dict_kv, map('community.general.dict_kv', ...).
PLUGIN = re.compile(r"(?:\|\s*|\bis\s+|\(\s*['\"])([a-z][a-z0-9_]*\.[a-z][a-z0-9_]*)\.[a-z][a-z0-9_]*\b")


def required() -> dict:
    doc = yaml.safe_load((ROOT / "requirements.yml").read_text())
    return {c["name"]: str(c["version"]) for c in doc["collections"]}


def installed() -> dict:
    done = subprocess.run([GALAXY, "collection", "list", "--format", "json"], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    found = {}
    for collections in json.loads(done.stdout).values():
        for name, info in collections.items():
            found.setdefault(name, info["version"])
    return found


def _task_keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _task_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _task_keys(item)


def used_by_roles() -> set:
    names = set()
    for path in (ROOT / "roles").rglob("*"):
        if path.suffix not in (".yml", ".j2"):
            continue
        text = path.read_text()
        names.update(PLUGIN.findall(text))
        if path.suffix == ".yml" and path.parent.name in ("tasks", "handlers"):
            names.update(m.group(1) for key in _task_keys(yaml.safe_load(text)) if (m := MODULE.match(key)))
    return names - {"ansible.builtin", "ansible.legacy"}


def test_requirements_pin_the_installed_versions():
    have = installed()
    for name, version in required().items():
        assert name in have, f"{name} is not installed (pip install ansible, see requirements/dev.txt)"
        assert have[name] == version, f"requirements.yml pins {name} {version}; the ansible package has {have[name]}"


def test_every_collection_used_is_required():
    missing = used_by_roles() - set(required())
    assert not missing, f"roles use {sorted(missing)}, absent from requirements.yml"
