"""One version for the whole project: written once (the service package), read by everything that shows it."""

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")


def project_version() -> str:
    return subprocess.run([ROOT / "scripts" / "version"], capture_output=True, text=True, check=True).stdout.strip()


def test_the_version_is_semantic_and_matches_the_package():
    version = project_version()
    assert SEMVER.match(version), version
    namespace: dict = {}
    exec((ROOT / "service/src/pilotys_whisper/__init__.py").read_text(), namespace)  # noqa: S102 - our own file
    assert namespace["__version__"] == version


def test_the_wheel_reads_the_version_from_the_package():
    project = tomllib.loads((ROOT / "service/pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pilotys_whisper.__version__"}


def test_the_changelog_opens_with_this_version():
    sections = re.findall(r"^## (\S+) - (\S+)$", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert sections, "CHANGELOG.md has no '## VERSION - DATE' section"
    assert sections[0][0] == project_version(), "write this version's section at the top of CHANGELOG.md"
    versions = [tuple(int(n) for n in v.split("-")[0].split(".")) for v, _ in sections]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    assert all(re.match(r"^\d{4}-\d{2}-\d{2}$", date) for _, date in sections[1:]), "released sections carry a date"


def test_the_image_label_comes_from_the_build_argument_it_checks():
    containerfile = (ROOT / "service/Containerfile").read_text()
    assert 'org.opencontainers.image.version="${VERSION}"' in containerfile
    assert '"${VERSION:-}" != "${installed}"' in containerfile
