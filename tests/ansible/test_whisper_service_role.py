"""The whisper_service role's templates and preflight, run by Ansible on the controller (no host)."""

import pytest
from local_play import render, run_role_tasks

CONTAINER = {"whisper_service_deployment": "container"}


def preflight(tmp_path, extra_vars=None, hosts=None, check=False):
    return run_role_tasks("whisper_service", "preflight", tmp_path, extra_vars, hosts, check)


def failed(done) -> str:
    """The output of a run that must have failed (for the operator's message in it)."""
    assert done.returncode != 0, done.stdout
    return done.stdout


def passed(done):
    assert done.returncode == 0, done.stdout + done.stderr


# --- The container's GPU (CDI) ---

@pytest.mark.parametrize(("device", "cdi_specs", "gpu"), [
    ("cpu", 1, False),
    ("auto", 0, False),  # a CPU-only host
    ("auto", 1, True),
    ("cuda", 1, True),
])
def test_container_gets_the_gpu_only_through_a_cdi_spec(tmp_path, device, cdi_specs, gpu):
    unit = render("whisper_service", "whisper-service-container.service.j2", tmp_path, {
        **CONTAINER, "whisper_service_device": device, "_whisper_service_cdi_specs": {"matched": cdi_specs}})
    assert ("--device nvidia.com/gpu=all" in unit) is gpu
    assert "\\\n  localhost/pilotys-whisper:latest\n" in unit  # the command line still ends with the image


def test_container_without_the_preflight_gets_no_gpu_with_auto(tmp_path):
    unit = render("whisper_service", "whisper-service-container.service.j2", tmp_path,
                  {**CONTAINER, "whisper_service_device": "auto"})
    assert "--device" not in unit


def test_preflight_refuses_cuda_in_a_container_without_a_cdi_spec(tmp_path):
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "other-vendor.yaml").write_text("cdiVersion: 0.5.0\n")
    out = failed(preflight(tmp_path, {**CONTAINER, "whisper_service_device": "cuda",
                                      "_whisper_service_cdi_dirs": [str(cdi), str(tmp_path / "absent")]}))
    assert "nvidia-container-toolkit" in out
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in out


@pytest.mark.parametrize(("device", "check"), [("cuda", False), ("auto", False), ("cuda", True)])
def test_preflight_finds_the_nvidia_cdi_spec(tmp_path, device, check):
    cdi = tmp_path / "run-cdi"
    cdi.mkdir()
    (cdi / "nvidia.json").write_text("{}\n")
    passed(preflight(tmp_path, {**CONTAINER, "whisper_service_device": device,
                                "_whisper_service_cdi_dirs": [str(tmp_path / "absent"), str(cdi)]}, check=check))


def test_preflight_lets_auto_run_on_a_cpu_only_host(tmp_path):
    passed(preflight(tmp_path, {**CONTAINER, "whisper_service_device": "auto",
                                "_whisper_service_cdi_dirs": [str(tmp_path / "absent")]}))
