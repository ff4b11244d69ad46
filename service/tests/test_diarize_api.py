"""Speakers in the API, on the real models (faster-whisper base, the GE2E speaker encoder on onnxruntime) and a
synthesized meeting of three voices: /transcribe, OpenAI's diarized_json read by the official `openai` client,
the other formats (WebVTT read by webvtt-py), jobs and their webhook, upload grants, and every refusal."""

from __future__ import annotations

import base64
import io
import json
import time
import wave

import httpx2
import numpy as np
import pytest
import webvtt
from openai import OpenAI
from openai.types.audio import TranscriptionDiarized

from pilotys_whisper.app import create_app
from pilotys_whisper.jobs.webhooks import verify

from conftest import FakeEngine, https_receiver, make_settings
from speakers import reference_clip, three_speakers, write_wav

pytestmark = pytest.mark.model

ALICE = "alice-key-0123456789"
SECRET = "whsec-test-secret-0123"
AUTH = {"Authorization": f"Bearer {ALICE}"}


def wav_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
    return buffer.getvalue()


def data_url(audio: np.ndarray) -> str:
    return "data:audio/wav;base64," + base64.b64encode(wav_bytes(audio)).decode()


@pytest.fixture(scope="module")
def meeting(tmp_path_factory):
    meeting = three_speakers()
    path = tmp_path_factory.mktemp("meeting") / "comite.wav"
    write_wav(path, meeting.audio)
    return meeting, path


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """An HTTPS webhook receiver on 127.0.0.1 with its own certificate."""
    with https_receiver(tmp_path_factory.mktemp("receiver")) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def app(tmp_path_factory, model_dir, assets, receiver):
    """The service with diarization on, both real models loaded at start-up, and jobs."""
    tmp = tmp_path_factory.mktemp("service")
    keys = tmp / "keys"
    keys.write_text(f"{ALICE} label=alice webhook_secret={SECRET}\n")
    settings = make_settings(WHISPER_MODEL=model_dir, WHISPER_API_KEY="", WHISPER_API_KEYS_FILE=keys,
                             WHISPER_STATE_DIR=tmp / "state", WHISPER_TMP_DIR=tmp, WHISPER_DIARIZATION="true",
                             WHISPER_DIARIZATION_MODEL=assets / "models" / "ge2e" / "ge2e.onnx",
                             WHISPER_WEBHOOK_ALLOW_PRIVATE="127.0.0.0/8", WHISPER_WEBHOOK_CA_FILE=receiver[1])
    app = create_app(settings)
    state = app.extensions["whisper"]
    assert state.ready.wait(120), state.load_error
    yield app
    state.jobs.stop()


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def post(client, audio_path, route="/transcribe", **fields):
    with open(audio_path, "rb") as f:
        data = {"file": (f, audio_path.name), **fields}
        return client.post(route, headers=AUTH, data=data, content_type="multipart/form-data")


def _first_line_speaker(segments, meeting, number: int) -> str:
    """The label the service gave to the speaker of the meeting's line NUMBER (the segments within it)."""
    start, end, _, _ = meeting.lines[number]
    inside = [s for s in segments if s["start"] >= start - 0.5 and s["end"] <= end + 0.5]
    assert inside, f"no segment within line {number} ({start:.1f}-{end:.1f} s): {segments}"
    return max({s["speaker"] for s in inside}, key=lambda label: sum(s["end"] - s["start"] for s in inside
                                                                    if s["speaker"] == label))


# -- the routes ------------------------------------------------------------------------------------------------

def test_health_says_diarization_is_loaded(client):
    assert client.get("/health").get_json()["diarization"] == {"enabled": True, "loaded": True, "model": "ge2e.onnx"}


def test_transcribe_labels_every_segment_and_lists_the_speakers(client, meeting):
    reference, path = meeting
    body = post(client, path, diarize="true").get_json()
    # The original fields are unchanged: "speaker" and "speakers" are added.
    assert set(body) == {"text", "language", "duration", "segments", "speakers"}
    assert all(set(s) == {"id", "start", "end", "text", "avg_logprob", "no_speech_prob", "speaker"}
               for s in body["segments"])
    assert body["segments"] and all(s["speaker"] for s in body["segments"])
    speakers = body["speakers"]
    assert [s["speaker"] for s in speakers] == ["A", "B", "C"], speakers  # three voices, in order of appearance
    for entry in speakers:
        talked = sum(s["end"] - s["start"] for s in body["segments"] if s["speaker"] == entry["speaker"])
        assert entry["duration"] == pytest.approx(talked, abs=0.01)
    # Each line of the meeting is given to its own voice: the labels follow the reference's speakers.
    labels = {}
    for number, (_, _, name, _) in enumerate(reference.lines):
        labels.setdefault(name, set()).add(_first_line_speaker(body["segments"], reference, number))
    assert all(len(found) == 1 for found in labels.values()), labels
    assert len({next(iter(found)) for found in labels.values()}) == 3, labels


def test_the_openai_client_parses_diarized_json_with_known_speakers(app, meeting):
    """The official client (openai 3.57) sends known_speaker_names[] and known_speaker_references[] (data URLs)
    and parses the answer into its TranscriptionDiarized model."""
    reference, path = meeting
    http = httpx2.Client(transport=httpx2.WSGITransport(app=app), base_url="http://whisper.test")
    client = OpenAI(base_url="http://whisper.test/v1", api_key=ALICE, http_client=http)
    with open(path, "rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=f, language="fr", response_format="diarized_json",
            known_speaker_names=["Claire", "Paul"],
            known_speaker_references=[data_url(reference_clip("Claire")), data_url(reference_clip("Paul"))])
    assert isinstance(result, TranscriptionDiarized)
    assert result.task == "transcribe" and result.duration == pytest.approx(reference.duration, abs=0.1)
    assert result.segments and all(s.type == "transcript.text.segment" and s.speaker for s in result.segments)
    assert [s.id for s in result.segments] == [f"seg_{n}" for n in range(len(result.segments))]
    assert result.usage is not None and result.usage.type == "duration"
    segments = [s.model_dump() for s in result.segments]
    # The known names land on their own voices; the third voice keeps a letter.
    by_name = {name: _first_line_speaker(segments, reference, n) for n, (_, _, name, _) in enumerate(reference.lines)}
    assert by_name["Claire"] == "Claire" and by_name["Paul"] == "Paul", by_name
    assert by_name["Marc"] not in ("Claire", "Paul") and len(by_name["Marc"]) == 1, by_name


def test_reference_clips_as_file_parts_name_the_speakers_too(client, meeting):
    reference, path = meeting
    with open(path, "rb") as f:
        data = {"file": (f, path.name), "response_format": "verbose_json", "diarize": "true",
                "known_speaker_names[]": ["Marc"],
                "known_speaker_references[]": [(io.BytesIO(wav_bytes(reference_clip("Marc"))), "marc.wav")]}
        body = client.post("/v1/audio/transcriptions", headers=AUTH, data=data,
                           content_type="multipart/form-data").get_json()
    marc = next(n for n, line in enumerate(reference.lines) if line[2] == "Marc")
    assert _first_line_speaker(body["segments"], reference, marc) == "Marc"
    assert all(s["speaker"] for s in body["segments"])


# -- jobs and grants ---------------------------------------------------------------------------------------------

def wait_job(client, job_id: str, timeout: float = 1200) -> dict:
    # A guard against a job that never ends, not a speed check: generous for a loaded machine.
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


@pytest.fixture(scope="module")
def diarized_job(client, meeting, receiver):
    _, path = meeting
    accepted = post(client, path, route="/v1/jobs", diarize="true", callback_url=receiver[0], num_speakers="3")
    assert accepted.status_code == 202, accepted.get_json()
    return wait_job(client, accepted.get_json()["id"])


def test_a_diarized_job_carries_its_speakers_in_its_result_and_webhook(client, diarized_job, receiver):
    _, _, received = receiver
    job = diarized_job
    assert job["status"] == "succeeded", job
    assert [s["speaker"] for s in job["speakers"]] == ["A", "B", "C"]
    result = client.get(f"/v1/jobs/{job['id']}/result?format=diarized_json", headers=AUTH).get_json()
    assert result["segments"] and all(s["speaker"] in ("A", "B", "C") for s in result["segments"])
    verbose = client.get(f"/v1/jobs/{job['id']}/result?format=verbose_json", headers=AUTH).get_json()
    assert all(s["speaker"] for s in verbose["segments"])
    deadline = time.monotonic() + 30
    while not any(json.loads(body)["data"]["id"] == job["id"] for _, body, _ in received):
        assert time.monotonic() < deadline, "no webhook"
        time.sleep(0.1)
    headers, body = next((h, b) for h, b, _ in received if json.loads(b)["data"]["id"] == job["id"])
    assert verify(SECRET, headers["Whisper-Signature"], body)
    assert json.loads(body)["data"]["speakers"] == job["speakers"]


def test_an_upload_grant_fixes_diarization(client, meeting):
    _, path = meeting
    issued = client.post("/v1/uploads", headers=AUTH, json={"diarize": True, "max_speakers": 4, "language": "fr"})
    assert issued.status_code == 201, issued.get_json()
    with open(path, "rb") as f:
        accepted = client.post("/v1/jobs", headers={"Authorization": f"Bearer {issued.get_json()['token']}"},
                               data={"file": (f, path.name)}, content_type="multipart/form-data")
    assert accepted.status_code == 202, accepted.get_json()
    job = wait_job(client, accepted.get_json()["id"])
    assert job["status"] == "succeeded" and len(job["speakers"]) == 3, job
    refused = client.post("/v1/uploads", headers=AUTH, json={"diarize": True, "num_speakers": 0})
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "invalid_speaker_count"


def test_a_job_not_diarized_has_no_diarized_json(client, meeting, tmp_path):
    reference, _ = meeting
    opening = tmp_path / "opening.wav"
    write_wav(opening, reference.audio[:3 * 16000])
    job = wait_job(client, post(client, opening, route="/v1/jobs").get_json()["id"])
    assert "speakers" not in job
    refused = client.get(f"/v1/jobs/{job['id']}/result?format=diarized_json", headers=AUTH)
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "job_not_diarized"


def result(client, job: dict, fmt: str):
    response = client.get(f"/v1/jobs/{job['id']}/result?format={fmt}", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def test_the_formats_carry_the_speakers(client, diarized_job, tmp_path):
    vtt = result(client, diarized_job, "vtt")
    assert vtt.mimetype == "text/vtt"
    (tmp_path / "meeting.vtt").write_text(vtt.get_data(as_text=True))
    captions = webvtt.read(tmp_path / "meeting.vtt").captions
    assert captions and all(c.voice in ("A", "B", "C") for c in captions), [c.raw_text for c in captions]
    assert len({c.voice for c in captions}) == 3
    assert all(c.text and not c.text.startswith("<") for c in captions)  # the span's text, tag removed
    cues = result(client, diarized_job, "srt").get_data(as_text=True).strip().split("\n\n")
    first_lines = [cue.split("\n")[2] for cue in cues]
    assert first_lines[0].startswith("[A] ")
    assert {"[A] ", "[B] ", "[C] "} <= {line[:4] for line in first_lines if line.startswith("[")}
    lines = result(client, diarized_job, "text").get_data(as_text=True).splitlines()
    assert len(lines) >= 3 and all(line[:4] in ("[A] ", "[B] ", "[C] ") for line in lines), lines
    assert all(a[:4] != b[:4] for a, b in zip(lines, lines[1:]))  # one line per turn


# -- refusals ----------------------------------------------------------------------------------------------------

SHORT = np.zeros(8000, np.float32)  # half a second


@pytest.mark.parametrize(("fields", "code", "param"), [
    ({"diarize": "yes"}, "invalid_diarize", "diarize"),
    ({"num_speakers": "0"}, "invalid_speaker_count", "num_speakers"),
    ({"num_speakers": "33"}, "invalid_speaker_count", "num_speakers"),
    ({"num_speakers": "two"}, "invalid_speaker_count", "num_speakers"),
    ({"min_speakers": "3", "max_speakers": "2"}, "invalid_speaker_count", "min_speakers"),
    ({"num_speakers": "2", "max_speakers": "3"}, "invalid_speaker_count", "num_speakers"),
    ({"known_speaker_names[]": [f"P{n}" for n in range(5)], "known_speaker_references[]": ["data:,"] * 5},
     "too_many_speaker_references", "known_speaker_references"),
    ({"known_speaker_names[]": ["Claire", "Marc"], "known_speaker_references[]": ["data:,"]},
     "speaker_references_mismatch", "known_speaker_names"),
    ({"known_speaker_names[]": ["<b>"], "known_speaker_references[]": ["data:,"]},
     "invalid_speaker_name", "known_speaker_names"),
    ({"known_speaker_names[]": ["Claire"], "known_speaker_references[]": ["https://example.com/claire.wav"]},
     "invalid_speaker_reference", "known_speaker_references"),
    ({"known_speaker_names[]": ["Claire"],
      "known_speaker_references[]": ["data:audio/wav;base64," + base64.b64encode(b"not audio at all").decode()]},
     "invalid_speaker_reference", "known_speaker_references"),
    ({"known_speaker_names[]": ["Claire"], "known_speaker_references[]": [data_url(SHORT)]},
     "invalid_speaker_reference", "known_speaker_references"),
])
def test_bad_speaker_fields_are_400(client, meeting, fields, code, param):
    _, path = meeting
    response = post(client, path, route="/v1/audio/transcriptions", diarize=fields.pop("diarize", "true"),
                    **fields)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == (code, param), error


def test_a_reference_file_part_that_is_not_audio_or_too_short_is_400(client, meeting):
    _, path = meeting
    for clip, why in ((b"RIFF nothing like audio", "not usable audio"), (wav_bytes(SHORT), "lasts 0.5 s")):
        with open(path, "rb") as f:
            data = {"file": (f, path.name), "diarize": "true", "known_speaker_names[]": ["Claire"],
                    "known_speaker_references[]": [(io.BytesIO(clip), "claire.wav")]}
            response = client.post("/transcribe", headers=AUTH, data=data, content_type="multipart/form-data")
        assert response.status_code == 400 and why in response.get_json()["error"]["message"], response.get_json()


def test_diarization_turned_off_says_how_to_turn_it_on(tmp_path, audio):
    app = create_app(make_settings(WHISPER_TMP_DIR=tmp_path, WHISPER_STATE_DIR=tmp_path / "state"), FakeEngine())
    client = app.test_client()
    try:
        assert client.get("/health").get_json()["diarization"] == {"enabled": False}
        for route, fields in (("/transcribe", {"diarize": "true"}),
                              ("/v1/audio/transcriptions", {"response_format": "diarized_json"}),
                              ("/v1/jobs", {"diarize": "true"})):
            with open(audio("fr_meeting.wav"), "rb") as f:
                response = client.post(route, headers={"Authorization": "Bearer test-key-0123456789abcdef"},
                                       data={"file": (f, "m.wav"), **fields}, content_type="multipart/form-data")
            error = response.get_json()["error"]
            assert response.status_code == 400 and error["code"] == "diarization_disabled", (route, error)
            assert "whisper_service_diarization: true" in error["message"]
            assert "WHISPER_DIARIZATION=true" in error["message"]
    finally:
        app.extensions["whisper"].jobs.stop()
