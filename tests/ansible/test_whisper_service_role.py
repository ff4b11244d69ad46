"""The whisper_service role's templates and preflight, run by Ansible on the controller (no host)."""

import sys

import pytest
import yaml
from local_play import ROOT, recap, render, run_role_tasks

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


# --- API keys: what the preflight lets through, the service can read ---

def parse_keys(text: str):
    """The service's own parser of the keys file (service/src, standard library only)."""
    sys.path.insert(0, str(ROOT / "service" / "src"))
    try:
        from pilotys_whisper.auth import parse_keys as service_parse_keys
    finally:
        sys.path.remove(str(ROOT / "service" / "src"))
    return service_parse_keys(text, "api-keys")


VALID_KEYS = [
    {"key": "k" * 40, "label": "pilotys-prod", "webhook_secret": "s3cr=t/with+punctuation"},
    {"key": "0123456789abcdef", "label": "ops=2"},
    {"key": "Zz9" * 10, "webhook_secret": ""},
    {"key": "no-label-but-a-secret-1234", "webhook_secret": "w" * 40},
]


def test_the_service_reads_the_rendered_keys_file(tmp_path):
    passed(preflight(tmp_path, {"whisper_service_api_keys": VALID_KEYS}))
    text = render("whisper_service", "api-keys.j2", tmp_path, {"_whisper_service_keys": VALID_KEYS})
    entries = parse_keys(text)
    assert [(e.principal.label, e.principal.webhook_secret) for e in entries] == [
        ("pilotys-prod", "s3cr=t/with+punctuation"),
        ("ops=2", None),
        (entries[2].principal.label, None),  # no label: the service names it after the key's id
        (entries[3].principal.label, "w" * 40),
    ]
    assert entries[2].principal.label.startswith("key-")


@pytest.mark.parametrize(("entry", "shown"), [
    ({"key": "k" * 40, "label": "pilotys prod"}, 'label "pilotys prod"'),
    ({"key": "k" * 40, "label": "pilotys\nprod"}, 'label "pilotys\\nprod"'),
    ({"key": "k" * 40, "label": ""}, 'label ""'),
    ({"key": "k" * 40, "label": "ok", "webhook_secret": "two words-secret"}, 'label "ok"'),
    ({"key": "k" * 40, "webhook_secret": "line\nbreak-secret"}, "no label"),
    ({"key": "#" + "k" * 40}, "no label"),  # the service would take the line for a comment
    ({"key": "k" * 40 + " x"}, "no label"),
    ({"key": "short"}, "no label"),
])
def test_preflight_refuses_what_the_service_cannot_read(tmp_path, entry, shown):
    out = failed(preflight(tmp_path, {"whisper_service_api_keys": [VALID_KEYS[0], entry]}))
    assert f"whisper_service_api_keys entry 2 ({shown})" in out
    assert "without spaces, tabs or newlines" in out
    for secret in (VALID_KEYS[0]["key"], VALID_KEYS[0]["webhook_secret"], entry.get("webhook_secret", "k" * 40)):
        assert secret not in out


def test_the_service_cannot_read_a_label_with_a_space(tmp_path):
    """Why the preflight refuses it: the keys file is split at whitespace."""
    text = render("whisper_service", "api-keys.j2", tmp_path,
                  {"_whisper_service_keys": [{"key": "k" * 40, "label": "pilotys prod"}]})
    with pytest.raises(ValueError, match="word 3 is not an option"):
        parse_keys(text)


# --- The model directory, checked for each host ---

def model_dir(tmp_path, name="model"):
    path = tmp_path / name
    path.mkdir()
    (path / "model.bin").write_bytes(b"weights")
    (path / "SHA256SUMS").write_text("0" * 64 + "  model.bin\n")
    return str(path)


@pytest.mark.parametrize("check", [False, True])
def test_each_host_checks_its_own_model_directory(tmp_path, check):
    """The first host downloads its model by name; the others ship a directory each."""
    done = preflight(tmp_path, hosts={"by-name": {}, "shipped": {"whisper_service_model_src": model_dir(tmp_path)},
                                      "other": {"whisper_service_model_src": model_dir(tmp_path, "other")}},
                     check=check)
    passed(done)


def test_a_later_host_with_a_missing_model_directory_fails(tmp_path):
    done = preflight(tmp_path, hosts={"shipped": {"whisper_service_model_src": model_dir(tmp_path)},
                                      "missing": {"whisper_service_model_src": str(tmp_path / "absent")}})
    out = failed(done)
    assert f"whisper_service_model_src={tmp_path / 'absent'} must be a model directory with a SHA256SUMS" in out
    hosts = recap(out)
    assert hosts["missing"]["failed"] == 1
    assert hosts["shipped"]["failed"] == 0


# --- The listening address ---

def test_preflight_accepts_the_ipv4_loopback(tmp_path):
    passed(preflight(tmp_path, {"whisper_service_host": "127.0.0.1"}))


@pytest.mark.parametrize("host", ["::1", "localhost", "127.0.0.2", "0.0.0.0"])
def test_preflight_refuses_addresses_the_play_cannot_reach(tmp_path, host):
    """Caddy's upstream, the readiness wait and deploy.yml use 127.0.0.1: anything else would time out."""
    out = failed(preflight(tmp_path, {"whisper_service_host": host}))
    assert f"whisper_service_host={host}: the service must listen on the IPv4 loopback address 127.0.0.1" in out


# --- The engine's package ---

def test_preflight_wants_the_openai_whisper_extra_for_that_engine(tmp_path):
    out = failed(preflight(tmp_path, {"whisper_service_engine": "openai-whisper"}))
    assert "add it with whisper_service_extras: [openai-whisper]" in out
    passed(preflight(tmp_path, {"whisper_service_engine": "openai-whisper",
                                "whisper_service_extras": ["openai-whisper"]}))


# --- The environment file: what the template writes, the service's check reads back ---

def test_the_service_reads_back_the_rendered_environment(tmp_path):
    """The role validates the file with `whisper-service check-config --env-file`: its parser must read the
    template's quoting back exactly, quotes and backslashes included."""
    odd = 'a "quoted" \\ value'
    text = render("whisper_service", "environment.j2", tmp_path,
                  {"whisper_service_extra_env": {"WHISPER_MODEL_LABEL": odd}, "whisper_service_language": "en"})
    sys.path.insert(0, str(ROOT / "service" / "src"))
    try:
        from pilotys_whisper.cli import read_env_file
    finally:
        sys.path.remove(str(ROOT / "service" / "src"))
    (tmp_path / "environment").write_text(text)
    env = read_env_file(tmp_path / "environment")
    assert env["WHISPER_MODEL_LABEL"] == odd and env["WHISPER_LANGUAGE"] == "en"
    assert env["WHISPER_HOST"] == "127.0.0.1"


# --- Speaker diarization: off by default; on, it needs the ONNX model from the controller ---

def speaker_model_dir(tmp_path):
    path = tmp_path / "ge2e"
    path.mkdir()
    (path / "ge2e.onnx").write_bytes(b"onnx")
    (path / "SHA256SUMS").write_text("0" * 64 + "  ge2e.onnx\n")
    return str(path)


def test_preflight_wants_the_speaker_model_with_diarization(tmp_path):
    passed(preflight(tmp_path))  # off by default: nothing to ship
    out = failed(preflight(tmp_path, {"whisper_service_diarization": True}))
    assert "whisper_service_diarization=true needs the ONNX speaker-embedding model from the controller" in out
    out = failed(preflight(tmp_path, {"whisper_service_diarization": True,
                                      "whisper_service_diarization_model_src": str(tmp_path / "absent")}))
    assert "whisper_service_diarization_model_src must be a directory holding ge2e.onnx" in out
    passed(preflight(tmp_path, {"whisper_service_diarization": True,
                                "whisper_service_diarization_model_src": speaker_model_dir(tmp_path)}))


@pytest.mark.parametrize("deployment", ["systemd", "container"])
def test_the_environment_turns_diarization_on_with_the_shipped_model(tmp_path, deployment):
    sys.path.insert(0, str(ROOT / "service" / "src"))
    try:
        from pilotys_whisper.cli import read_env_file
    finally:
        sys.path.remove(str(ROOT / "service" / "src"))
    off = tmp_path / "off.env"
    off.write_text(render("whisper_service", "environment.j2", tmp_path, {"whisper_service_deployment": deployment}))
    assert read_env_file(off)["WHISPER_DIARIZATION"] == "false" and read_env_file(off)["WHISPER_DIARIZATION_MODEL"] == ""
    on = tmp_path / "on.env"
    on.write_text(render("whisper_service", "environment.j2", tmp_path,
                         {"whisper_service_deployment": deployment, "whisper_service_diarization": True}))
    env = read_env_file(on)
    assert env["WHISPER_DIARIZATION"] == "true"
    expected = ("/models/diarization" if deployment == "container" else "/opt/whisper-service/models/diarization")
    assert env["WHISPER_DIARIZATION_MODEL"] == expected + "/ge2e.onnx"
    if deployment == "container":  # the same directory is mounted there
        unit = render("whisper_service", "whisper-service-container.service.j2", tmp_path,
                      {**CONTAINER, "whisper_service_diarization": True})
        assert "--volume /opt/whisper-service/models/diarization:/models/diarization:ro" in unit


# --- Key rotation: the service re-reads the keys file, nothing restarts it ---

def test_the_unit_reads_the_keys_file_in_place_through_a_group(tmp_path):
    unit = render("whisper_service", "whisper-service.service.j2", tmp_path)
    assert "LoadCredential=api-keys" not in unit  # a copy taken at start: every rotation would need a restart
    assert "SupplementaryGroups=whisper-service-keys\n" in unit
    assert "Environment=WHISPER_API_KEYS_FILE=/etc/whisper-service/keys/api-keys\n" in unit
    assert "DynamicUser=yes\n" in unit and "ProtectSystem=strict\n" in unit


def test_a_change_of_keys_notifies_no_restart():
    tasks = yaml.safe_load((ROOT / "roles" / "whisper_service" / "tasks" / "configure.yml").read_text())
    keys_file = next(t for t in tasks if t.get("ansible.builtin.template", {}).get("src") == "api-keys.j2")
    assert "notify" not in keys_file
    assert (keys_file["ansible.builtin.template"]["group"], keys_file["ansible.builtin.template"]["mode"]) == (
        "{{ _whisper_service_keys_group }}", "0640")
    assert keys_file["no_log"] is True and keys_file["diff"] is False
