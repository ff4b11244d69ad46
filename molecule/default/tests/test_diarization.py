"""Speaker diarization on the provisioned host (whisper_service_diarization: true in the scenario's inventory):
the service loads the speaker model at start-up, and a meeting of three voices sent over HTTPS comes back with
each segment given its speaker, in OpenAI's diarized_json."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
import requests

SCENARIO = Path(__file__).resolve().parent.parent
PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", SCENARIO.parent.parent))
sys.path.insert(0, str(PROJECT / "service" / "tests"))

from speakers import three_speakers, write_wav  # the service tests' synthesized meeting


@pytest.fixture(scope="module")
def meeting(tmp_path_factory):
    meeting = three_speakers()
    path = tmp_path_factory.mktemp("meeting") / "three_speakers.wav"
    write_wav(path, meeting.audio)
    return meeting, path


def test_the_speaker_model_is_shipped_checked_and_loaded(host, address, ca_bundle):
    model = host.file("/opt/whisper-service/models/diarization/ge2e.onnx")
    assert model.is_file and model.user == "root" and model.mode == 0o644
    assert host.run("cd /opt/whisper-service/models/diarization && sha256sum --check --strict SHA256SUMS").rc == 0
    assert host.run("/opt/whisper-service/venv/bin/python -c 'import scipy'").rc == 0  # the [diarization] extra
    health = requests.get(f"https://{address}/health", verify=ca_bundle, timeout=10).json()
    assert health["diarization"] == {"enabled": True, "loaded": True, "model": "ge2e.onnx"}, health


def test_a_meeting_comes_back_with_its_speakers_over_https(host, address, api_key, ca_bundle, meeting):
    reference, path = meeting
    with open(path, "rb") as f:
        response = requests.post(f"https://{address}/v1/audio/transcriptions", timeout=600, verify=ca_bundle,
                                 headers={"Authorization": f"Bearer {api_key}"},
                                 files={"file": (path.name, f)},
                                 data={"model": "whisper-1", "language": "fr", "response_format": "diarized_json"})
    journal = host.run("journalctl -u whisper-service --no-pager -n 40").stdout
    assert response.status_code == 200, f"{response.status_code} {response.text}\n{journal}"
    body = response.json()
    assert body["segments"] and all(s["type"] == "transcript.text.segment" and s["speaker"] for s in body["segments"])
    assert len({s["speaker"] for s in body["segments"]}) == len(reference.speakers), body["segments"]


def test_the_vtt_of_a_meeting_names_its_speakers(address, api_key, ca_bundle, meeting):
    _, path = meeting
    audio = io.BytesIO(path.read_bytes())
    response = requests.post(f"https://{address}/v1/audio/transcriptions", timeout=600, verify=ca_bundle,
                             headers={"Authorization": f"Bearer {api_key}"}, files={"file": (path.name, audio)},
                             data={"language": "fr", "response_format": "vtt", "diarize": "true"})
    assert response.status_code == 200, response.text
    cues = [line for line in response.text.splitlines() if line and "-->" not in line and line != "WEBVTT"]
    assert cues and all(line.startswith("<v ") for line in cues), response.text
