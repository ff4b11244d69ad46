"""The service as a real process (waitress on a free port) with the real model, driven by real clients."""

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import wave

import openai
import pytest
import requests

from conftest import HERE, KEY, ServerProcess, reference, wer
from test_formats import parse_srt, parse_vtt

pytestmark = [pytest.mark.model, pytest.mark.server]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("uploads")
    proc = ServerProcess({"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": KEY, "WHISPER_QUEUE_SIZE": "2"},
                         uploads).start()
    yield proc
    code = proc.stop()
    assert code == 0, f"SIGTERM must stop the service cleanly:\n{proc.logs()}"
    assert list(uploads.iterdir()) == [], "temporary uploads left behind"
    logs = proc.logs()
    assert KEY not in logs and "bonjour" not in logs.lower(), "a key or a transcript reached the logs"
    assert "shutting down" in logs


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client_json(client, audio):
    with open(audio("fr_meeting.wav"), "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f, language="fr")
    assert wer(reference("fr_meeting"), result.text) <= 0.45, result.text


def test_openai_client_verbose_json_with_words(client, audio):
    with open(audio("lecture_en_60s.wav"), "rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-base", file=f, language="en", response_format="verbose_json",
            timestamp_granularities=["word", "segment"])
    assert result.language == "english" and result.duration == pytest.approx(60.0, abs=0.1)
    assert wer(reference("lecture_en_60s"), result.text) <= 0.06
    assert result.segments and result.segments[0].start >= 0
    assert result.words and result.words[0].word and result.words[-1].end <= 60.5


@pytest.mark.parametrize("fmt, parse", [("srt", parse_srt), ("vtt", parse_vtt)])
def test_openai_client_subtitles(client, audio, fmt, parse):
    with open(audio("fr_meeting.webm"), "rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f, response_format=fmt)
    cues = parse(text)
    assert len(cues) >= 3 and cues[-1][1] <= 39


def test_openai_client_text_and_models(client, audio):
    with open(audio("fr_meeting.m4a"), "rb") as f:
        text = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="text")
    assert "réunion" in text.lower()
    assert {m.id for m in client.models.list()} == {"whisper-base", "whisper-1"}


def test_openai_client_sees_auth_errors(server, audio):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong-key-0000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError), open(audio("fr_meeting.wav"), "rb") as f:
        bad.audio.transcriptions.create(model="whisper-1", file=f)


def test_legacy_transcribe_as_pilotys_calls_it(server, audio):
    with open(audio("fr_meeting.mp3"), "rb") as f:
        r = requests.post(server.url + "/transcribe", files={"file": ("recording.mp3", f)},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200
    body = r.json()
    assert body["language"] == "fr" and "réunion" in body["text"].lower()
    assert body["segments"] and {"id", "start", "end", "text"} <= set(body["segments"][0])


def test_health_stays_fast_during_a_long_transcription(server, audio):
    done = threading.Event()

    def long_request():
        with open(audio("news_en_169s.wav"), "rb") as f:
            requests.post(server.url + "/transcribe", files={"file": f}, data={"language": "en"},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
        done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 30
    while "whisper_in_flight 1.0" not in requests.get(server.url + "/metrics", timeout=5).text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    slowest, answered = 0.0, 0
    while not done.is_set() and answered < 20:
        started = time.monotonic()
        assert requests.get(server.url + "/health", timeout=5).json()["status"] == "ok"
        slowest = max(slowest, time.monotonic() - started)
        answered += 1
        time.sleep(0.1)
    thread.join(300)
    assert answered >= 5, "the transcription finished too soon to observe /health during it"
    assert slowest < 1.0, f"/health took {slowest:.2f}s while a transcription ran"


def test_bad_configuration_stops_with_a_clear_message():
    env = {"WHISPER_PORT": "eighty", "WHISPER_MODEL": "base", "PYTHONPATH": str(HERE.parent / "src")}
    done = subprocess.run([sys.executable, "-m", "pilotys_whisper", "serve"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "WHISPER_PORT='eighty' must be a whole number" in done.stderr


def test_sigusr1_drains_ready_while_requests_are_still_served(model_dir, tmp_path, audio):
    """Before a rolling restart: a gateway's health check sees 503 and sends nothing new, but a request that
    still arrives in the meantime is served, and the service stops cleanly afterwards."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    proc = ServerProcess({"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": KEY}, uploads).start()
    try:
        assert requests.get(proc.url + "/health", timeout=5).json()["draining"] is False
        proc.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while (r := requests.get(proc.url + "/ready", timeout=5)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        assert r.headers["Retry-After"]
        health = requests.get(proc.url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["draining"] is True
        with open(audio("fr_meeting.mp3"), "rb") as f:
            done = requests.post(proc.url + "/transcribe", files={"file": ("recording.mp3", f)},
                                 headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        assert done.status_code == 200 and "réunion" in done.json()["text"].lower()
    finally:
        code = proc.stop()
    assert code == 0, proc.logs()
    assert "draining" in proc.logs()


def _first_seconds(source, seconds: float, target):
    """The start of a real recording, as a WAV of its own."""
    with wave.open(str(source)) as src, wave.open(str(target), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(int(seconds * src.getframerate())))
    return target


def test_sigterm_lets_the_requests_in_flight_finish(model_dir, tmp_path, audio):
    """systemd stops the service with SIGTERM (a deploy, a reboot): the request being transcribed and the one
    still being uploaded both get their answer, new connections are refused meanwhile, and no upload is left
    on disk. Short recordings that end on a sentence (no fallback decoding), so that all of it fits in the
    drain's bound (server.DRAIN_S) on a busy machine too."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    proc = ServerProcess({"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": KEY}, uploads).start()
    headers = {"Authorization": f"Bearer {KEY}"}
    long_clip = _first_seconds(audio("fr_meeting.wav"), 16.2, tmp_path / "three-sentences.wav")
    short_clip = _first_seconds(audio("fr_meeting.wav"), 5.2, tmp_path / "one-sentence.wav")
    upload = requests.Request("POST", proc.url + "/transcribe", headers=headers,
                              files={"file": ("one-sentence.wav", short_clip.read_bytes())}).prepare()
    half = len(upload.body) // 2
    uploading = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=120)
    outcome = {}

    def transcribe():
        try:
            with open(long_clip, "rb") as f:
                outcome["running"] = requests.post(proc.url + "/v1/audio/transcriptions", files={"file": f},
                                                   data={"language": "fr"}, headers=headers, timeout=120)
        except requests.RequestException as exc:
            outcome["running"] = exc

    running = threading.Thread(target=transcribe)
    refused_while_running = False
    try:
        uploading.putrequest("POST", "/transcribe")
        for name, value in upload.headers.items():
            uploading.putheader(name, value)
        uploading.endheaders()
        uploading.send(upload.body[:half])
        running.start()
        deadline = time.monotonic() + 30
        while "whisper_in_flight 1.0" not in requests.get(proc.url + "/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the transcription never started"
            time.sleep(0.02)
        assert list(uploads.iterdir()), "the upload is on disk while it is transcribed"
        proc.proc.send_signal(signal.SIGTERM)
        while running.is_alive() and not refused_while_running:
            try:
                requests.get(proc.url + "/health", timeout=5)
            except requests.ConnectionError:
                refused_while_running = running.is_alive()
            time.sleep(0.05)
        uploading.send(upload.body[half:])  # the rest of a request received in part before the signal
        uploaded = uploading.getresponse()
        uploaded_body = uploaded.read()
        running.join(120)
        proc.proc.wait(30)
    finally:
        uploading.close()
        code = proc.stop()
    response = outcome.get("running")
    assert isinstance(response, requests.Response), f"no answer: {response}\n{proc.logs()}"
    assert response.status_code == 200, response.text
    assert "réunion" in response.json()["text"].lower()
    assert refused_while_running, "new connections must be refused once SIGTERM is received"
    assert uploaded.status == 200, uploaded_body
    assert "bonjour" in json.loads(uploaded_body)["text"].lower()
    assert code == 0, proc.logs()
    assert list(uploads.iterdir()) == [], "temporary uploads left behind"
