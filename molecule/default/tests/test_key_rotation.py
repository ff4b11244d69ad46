"""Keys rotate without a restart: the play rewrites the keys file, the running service re-reads it, and requests in
flight (a transcription, a job) are never cut; the job keeps its owner, the client's label."""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
import wave
from pathlib import Path

import requests
from test_default import SCENARIO, journal, run_site, wait_job_end

KEYS_DIR = "/etc/whisper-service/keys"
KEYS_GROUP = "whisper-service-keys"


def test_keys_file_is_root_only_but_for_the_service_group(host):
    directory, keys = host.file(KEYS_DIR), host.file(f"{KEYS_DIR}/api-keys")
    assert (directory.user, directory.group, directory.mode) == ("root", KEYS_GROUP, 0o750)
    assert (keys.user, keys.group, keys.mode) == ("root", KEYS_GROUP, 0o640)
    assert not host.file("/etc/whisper-service/api-keys").exists  # the earlier release's copy is gone
    props = host.service("whisper-service").systemd_properties
    assert KEYS_GROUP in props["SupplementaryGroups"].split()
    assert f"WHISPER_API_KEYS_FILE={KEYS_DIR}/api-keys" in props["Environment"]
    assert "api-keys" not in props.get("LoadCredential", "")
    # Only the service's group may read it: a user outside it may not (nobody, from root's shell).
    assert host.run(f"runuser -u nobody -- cat {KEYS_DIR}/api-keys").rc != 0


def _main_pid(host) -> str:
    return host.service("whisper-service").systemd_properties["MainPID"]


def _rotate(keys: list[dict], tmp_path, name: str) -> None:
    extra = tmp_path / f"{name}.json"
    extra.write_text(json.dumps({"whisper_service_api_keys": keys}))
    returncode, output = run_site("whisper_configure", f"@{extra}")
    assert returncode == 0, output
    assert "RUNNING HANDLER [whisper_service : Restart whisper-service]" not in output, output
    assert "Write the API keys file" in output and "changed=0" not in output.split("PLAY RECAP")[-1], output


def _status(address: str, key: str, ca: str) -> int:
    return requests.get(f"https://{address}/v1/models", headers={"Authorization": f"Bearer {key}"}, verify=ca,
                        timeout=10).status_code


def _until_status(address: str, key: str, ca: str, expected: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (status := _status(address, key, ca)) != expected:
        assert time.monotonic() < deadline, f"still {status}, not {expected}, {timeout}s after the rotation"
        time.sleep(0.5)


def _silence(directory: Path) -> Path:
    """One second of silence: a job that the voice detector ends at once (it only has to have an owner)."""
    clip = directory / "silence.wav"
    with wave.open(str(clip), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\0\0" * 16000)
    return clip


def _short_speech(directory: Path) -> Path:
    """A few seconds of French (espeak-ng): fr_meeting's 38 s can take many minutes on a loaded machine."""
    clip = directory / "bonjour.wav"
    subprocess.run(["espeak-ng", "-v", "fr", "-s", "150", "-w", str(clip), "Bonjour à tous, la réunion commence."],
                   check=True)
    return clip


class _Traffic(threading.Thread):
    """Requests one after another until stopped: transcriptions with the key of the moment, or /ready. Every
    failure is kept, and each transcription's time span, to show which ran during a run of the play."""

    def __init__(self, address: str, ca: str, clip: Path | None = None, key: str = ""):
        super().__init__(daemon=True)
        self.address, self.ca, self.clip, self.key = address, ca, clip, key
        self.stop, self.started = threading.Event(), threading.Event()
        self.failures: list[str] = []
        self.spans: list[tuple[float, float]] = []

    def _once(self) -> None:
        if self.clip is None:
            r = requests.get(f"https://{self.address}/ready", verify=self.ca, timeout=10)
            if r.status_code != 200:
                self.failures.append(f"/ready: {r.status_code}")
            time.sleep(0.5)
            return
        begun = time.monotonic()
        self.started.set()
        with open(self.clip, "rb") as f:  # as test_default's transcribe, with the patience a loaded machine needs
            r = requests.post(f"https://{self.address}/v1/audio/transcriptions", verify=self.ca, timeout=900,
                              headers={"Authorization": f"Bearer {self.key}"}, files={"file": (self.clip.name, f)},
                              data={"model": "whisper-1", "language": "fr"})
        if r.status_code != 200 or "bonjour" not in r.json()["text"].lower():
            self.failures.append(f"transcription: {r.status_code} {r.text[:200]}")
        self.spans.append((begun, time.monotonic()))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self._once()
            except requests.RequestException as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")


def test_keys_rotate_without_a_restart(host, address, api_key, ca_bundle, tmp_path):
    """The generated key (label `generated`) is replaced by a new one under the same label and webhook
    secret, in two runs of the play (add the new key, then remove the old one), while transcriptions run."""
    # One label, one webhook secret: the keys of a client share it (the service refuses two).
    webhook_secret = (SCENARIO / "inventory" / "credentials" / "whisper-webhook-secret").read_text().strip()
    old = {"key": api_key, "label": "generated", "webhook_secret": webhook_secret}
    new = {"key": secrets.token_hex(24), "label": "generated", "webhook_secret": webhook_secret}
    pid = _main_pid(host)
    clip = _short_speech(tmp_path)

    silence = _silence(tmp_path)
    with open(silence, "rb") as f:
        r = requests.post(f"https://{address}/v1/jobs", headers={"Authorization": f"Bearer {api_key}"},
                          files={"file": (silence.name, f)}, data={"language": "fr"}, verify=ca_bundle, timeout=120)
    assert r.status_code == 202, r.text
    job_url = f"https://{address}/v1/jobs/{r.json()['id']}"

    traffic = _Traffic(address, ca_bundle, clip, api_key)
    probe = _Traffic(address, ca_bundle)
    traffic.start()
    probe.start()
    assert traffic.started.wait(30)
    rotations = []
    try:
        begun = time.monotonic()
        _rotate([old, new], tmp_path, "both")
        rotations.append((begun, time.monotonic()))
        _until_status(address, new["key"], ca_bundle, 200)
        assert _status(address, api_key, ca_bundle) == 200  # both keys, for the time clients switch
        traffic.key = new["key"]
        begun = time.monotonic()
        _rotate([new], tmp_path, "new-only")
        rotations.append((begun, time.monotonic()))
        _until_status(address, api_key, ca_bundle, 401)
        assert _status(address, new["key"], ca_bundle) == 200
        # The job sent with the old key belongs to the label: the new key reads it, and its result.
        job = wait_job_end(job_url, {"Authorization": f"Bearer {new['key']}"}, ca_bundle)
        assert job["status"] == "succeeded", (job, journal(host))
    finally:
        for thread in (traffic, probe):
            thread.stop.set()
        for thread in (traffic, probe):
            thread.join(timeout=900)
        # Back to the generated key, for the tests after this one.
        returncode, output = run_site("whisper_configure", '{"whisper_service_api_keys": []}')
        assert returncode == 0, output

    assert not traffic.failures and not probe.failures, (traffic.failures, probe.failures, journal(host))
    # Each run of the play overlapped a transcription (the machine's speed decides how many).
    for start, end in rotations:
        assert any(t_start < end and t_end > start for t_start, t_end in traffic.spans), (rotations, traffic.spans)
    assert _main_pid(host) == pid, journal(host)
    assert "reloaded" in host.run("journalctl -u whisper-service --no-pager -n 200").stdout
