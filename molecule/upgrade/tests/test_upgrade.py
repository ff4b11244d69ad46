"""After the previous release and then this tree converged on one host: what users and operators left behind
survived (the job and its transcript, the generated key, the model files, Caddy's root certificate) and the
service runs this tree's version."""

from __future__ import annotations

import subprocess
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[3]
NOTES = Path(__file__).resolve().parent.parent / "inventory" / "credentials" / "before-upgrade.txt"


def before() -> dict[str, str]:
    return dict(line.split("=", 1) for line in NOTES.read_text().splitlines() if "=" in line)


def test_the_service_runs_this_trees_version(address, ca_bundle):
    version = subprocess.run([ROOT / "scripts" / "version"], capture_output=True, text=True, check=True).stdout.strip()
    body = requests.get(f"https://{address}/health", verify=ca_bundle, timeout=10).json()
    assert body["ready"] and body["version"] == version, body


def test_the_job_and_its_transcript_survived_with_the_same_key(address, api_key, ca_bundle):
    notes = before()
    assert notes["job_status"] == "succeeded", notes
    headers = {"Authorization": f"Bearer {api_key}"}
    url = f"https://{address}/v1/jobs/{notes['job']}"
    job = requests.get(url, headers=headers, verify=ca_bundle, timeout=10)
    assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
    result = requests.get(url + "/result", headers=headers, verify=ca_bundle, timeout=10)
    assert result.status_code == 200 and "réunion" in result.json()["text"].lower(), result.text
    # The client (the key's label) still owns it: it is in the key's list of jobs.
    listed = requests.get(f"https://{address}/v1/jobs", headers=headers, verify=ca_bundle, timeout=10)
    assert listed.status_code == 200 and notes["job"] in [j["id"] for j in listed.json()["data"]], listed.text


def test_the_key_moved_from_the_credential_to_the_keys_directory(host, api_key):
    """The previous release handed /etc/whisper-service/api-keys over by LoadCredential=; this tree reads
    /etc/whisper-service/keys/api-keys in place: the same key, label and webhook secret, the old file gone."""
    secret = (NOTES.parent / "whisper-webhook-secret").read_text().strip()
    keys = host.file("/etc/whisper-service/keys/api-keys")
    assert (keys.user, keys.group, keys.mode) == ("root", "whisper-service-keys", 0o640)
    lines = [line for line in keys.content_string.splitlines() if line and not line.startswith("#")]
    assert lines == [f"{api_key} label=generated webhook_secret={secret}"], "the keys file changed"
    assert not host.file("/etc/whisper-service/api-keys").exists
    assert "api-keys" not in host.service("whisper-service").systemd_properties.get("LoadCredential", "")


def test_the_model_was_not_replaced(host):
    model = host.check_output("find /var/lib/whisper-service /opt/whisper-service -name model.bin -exec sha256sum {} +"
                              " | sort | sha256sum | cut -c1-64")
    assert model == before()["model"]


def test_caddys_root_certificate_survived(ca_bundle):
    import hashlib

    assert hashlib.sha256(Path(ca_bundle).read_bytes()).hexdigest() == before()["ca"]
