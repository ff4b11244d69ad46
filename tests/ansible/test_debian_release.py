"""Every role refuses a system other than Debian 13 and 12 before it changes anything, also when it runs
alone (as deploy.yml uses whisper_service) or with --tags, and picks the values of the host's release."""

from pathlib import Path

import pytest
from local_play import ROOT, recap, render, run_play

ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks" / "main.yml").is_file())
DEPENDENT = [r for r in ROLES if r != "debian_release"]
SUPPORTED = "Debian 13 (trixie) and Debian 12 (bookworm) only. Reinstall the VPS with Debian 13 (trixie)."


def facts(distribution: str, version: str) -> dict:
    """Facts as `setup` gathers them, in place of the controller's own (extra vars win over facts)."""
    return {"ansible_facts": {"distribution": distribution, "distribution_version": version,
                              "distribution_major_version": version.split(".")[0],
                              "virtualization_tech_guest": [], "kernel": "6.1.0-18-amd64"}}


def run_role(role: str, tmp_path: Path, system: dict, tags: str | None = None, check: bool = False):
    return run_play([{"name": "Use the role alone", "ansible.builtin.import_role": {"name": role}}],
                    tmp_path, system, check=check, tags=tags)


def test_every_role_depends_on_the_release_check():
    import yaml
    for role in DEPENDENT:
        meta = yaml.safe_load((ROOT / "roles" / role / "meta" / "main.yml").read_text())
        assert {"role": "debian_release"} in (meta.get("dependencies") or []), role


@pytest.mark.parametrize("role", DEPENDENT)
@pytest.mark.parametrize("system", [("Ubuntu", "24.04"), ("Debian", "11.11")], ids=["ubuntu-24.04", "debian-11"])
def test_a_role_used_alone_refuses_another_system(tmp_path, role, system):
    done = run_role(role, tmp_path, facts(*system))
    assert done.returncode != 0, done.stdout
    assert f"testhost runs {system[0]} {system[1]}: these roles are written and tested for {SUPPORTED}" in done.stdout
    # The refusal is the first thing that happens: nothing ran, let alone changed, before it.
    assert f"TASK [{role} : " not in done.stdout, done.stdout
    assert recap(done.stdout)["testhost"]["changed"] == 0


@pytest.mark.parametrize("role, tags", [("caddy", "caddy"), ("whisper_service", "whisper_configure"),
                                        ("firewall", "firewall"), ("job_queue", "job_queue")])
@pytest.mark.parametrize("check", [False, True], ids=["run", "check"])
def test_the_refusal_holds_under_tags_and_check_mode(tmp_path, role, tags, check):
    done = run_role(role, tmp_path, facts("Ubuntu", "24.04"), tags=tags, check=check)
    assert done.returncode != 0, done.stdout
    assert f"testhost runs Ubuntu 24.04: these roles are written and tested for {SUPPORTED}" in done.stdout


@pytest.mark.parametrize("version", ["13.2", "12.11"])
def test_debian_13_and_12_pass(tmp_path, version):
    done = run_role("debian_release", tmp_path, facts("Debian", version))
    assert done.returncode == 0, done.stdout + done.stderr
    assert recap(done.stdout)["testhost"]["failed"] == 0


def test_the_facts_are_gathered_when_the_play_did_not(tmp_path):
    """The controller is a Debian 12 or 13 machine: with no facts given, the role gathers them and passes."""
    done = run_role("debian_release", tmp_path, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Gather the facts that name the system" in done.stdout


@pytest.mark.parametrize("release, python", [("Debian-13", "3.13"), ("Debian-12", "3.11")])
def test_the_unit_finds_the_cuda_libraries_of_the_releases_python(tmp_path, release, python):
    unit = render("whisper_service", "whisper-service.service.j2", tmp_path,
                  {"whisper_service_device": "cuda"}, release=release)
    line = next(x for x in unit.splitlines() if x.startswith("Environment=LD_LIBRARY_PATH="))
    site = f"/opt/whisper-service/venv/lib/python{python}/site-packages"
    assert line == f"Environment=LD_LIBRARY_PATH={site}/nvidia/cublas/lib:{site}/nvidia/cudnn/lib"


@pytest.mark.parametrize("release, postgresql", [("Debian-13", "17"), ("Debian-12", "15")])
def test_the_job_queue_uses_the_releases_postgresql(tmp_path, release, postgresql):
    done = run_play([{"name": "Load the role's values", "ansible.builtin.include_vars": {
        "file": str(ROOT / "roles" / "job_queue" / "vars" / name)}} for name in ("main.yml", f"{release}.yml")]
        + [{"name": "Show", "ansible.builtin.debug": {"msg": "conf={{ _job_queue_conf_dir }}"}}], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"conf=/etc/postgresql/{postgresql}/main" in done.stdout
