"""Live results: a job's Server-Sent Events and OpenAI's streamed transcription (real model, real server process).

The streams are read with the SSE decoder of the official `openai` client (WHATWG event-stream parsing), and
OpenAI's streaming with the client itself.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import requests
from openai._streaming import SSEDecoder

from conftest import ServerProcess
from hostile_corpus import flac_total_samples

pytestmark = [pytest.mark.model, pytest.mark.server]
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdefgh"
TERMINAL = ("job.succeeded", "job.failed", "job.cancelled")


def auth(key: str = ALICE) -> dict:
    return {"Authorization": f"Bearer {key}"}


def start_server(model_dir, tmp_path, **env) -> ServerProcess:
    keys = tmp_path / "keys"
    keys.write_text(f"{ALICE} label=alice\n{BOB} label=bob\n")
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    return ServerProcess({"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": "", "WHISPER_API_KEYS_FILE": str(keys),
                          "WHISPER_STATE_DIR": str(tmp_path / "state"), **env}, uploads).start()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = start_server(model_dir, tmp_path_factory.mktemp("events"), WHISPER_MAX_EVENT_STREAMS="2")
    yield proc
    proc.stop()


def submit(server, path, key: str = ALICE, **fields) -> str:
    with open(path, "rb") as f:
        r = requests.post(f"{server.url}/v1/jobs", files={"file": f}, data={"language": "en", **fields},
                          headers=auth(key), timeout=60)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def open_stream(server, job_id, key: str = ALICE, **headers) -> requests.Response:
    return requests.get(f"{server.url}/v1/jobs/{job_id}/events", headers={**auth(key), **headers}, stream=True,
                        timeout=(10, 120))


def events_of(response: requests.Response):
    """The dispatched events (a retry-only block is none), as the decoder sees them, until the stream ends."""
    for sse in SSEDecoder().iter_bytes(response.iter_content(chunk_size=None)):
        if sse.event or sse.data:
            yield sse


@pytest.fixture(scope="module")
def news(server, audio):
    """The 169 s news as a job, its stream opened at once and read to its end."""
    job_id = submit(server, audio("news_en_169s.wav"))
    response = open_stream(server, job_id)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for sse in events_of(response):
        # What the job looked like when each event came: proves segments arrive while it still runs.
        events.append((sse, requests.get(f"{server.url}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()))
    result = requests.get(f"{server.url}/v1/jobs/{job_id}/result?format=verbose_json", headers=auth(), timeout=10)
    return job_id, events, result.json()


def test_a_job_streams_its_segments_as_they_are_final_then_its_outcome(news):
    _, events, result = news
    kinds = [sse.event for sse, _ in events]
    assert kinds[-1] == "job.succeeded", kinds
    assert kinds.count("job.succeeded") == 1
    segments = [json.loads(sse.data) for sse, _ in events if sse.event == "segment"]
    assert [s["id"] for s in segments] == list(range(len(result["segments"])))
    assert [(s["start"], s["end"], s["text"]) for s in segments] == \
        [(s["start"], s["end"], s["text"]) for s in result["segments"]]
    assert "".join(s["text"] for s in segments).strip() == result["text"]
    # Live, not at the end: the first segment came while the job was still running.
    first = kinds.index("segment")
    assert events[first][1]["status"] == "running", events[first][1]
    progress = [json.loads(sse.data) for sse, _ in events if sse.event == "progress"]
    assert any(p["status"] == "running" and 0 < p["progress"] < 1 for p in progress), progress
    # Stored events carry increasing ids; progress carries none (the decoder keeps the last one, as browsers).
    ids = [int(sse.id) for sse, _ in events if sse.event in ("segment", "job.succeeded")]
    assert ids == sorted(set(ids))
    outcome = json.loads(events[-1][0].data)
    assert outcome["id"] == news[0] and outcome["status"] == "succeeded"


def test_last_event_id_resumes_without_repeating_or_skipping(server, news):
    job_id, events, _ = news
    stored = [sse for sse, _ in events if sse.event != "progress"]
    cut = len(stored) // 2
    response = open_stream(server, job_id, **{"Last-Event-ID": stored[cut].id})
    assert response.status_code == 200
    resumed = [sse for sse in events_of(response) if sse.event != "progress"]
    assert [(s.id, s.event, s.data) for s in resumed] == [(s.id, s.event, s.data) for s in stored[cut + 1:]]
    # Everything seen, outcome included: 204, which tells an EventSource to stop reconnecting.
    done = open_stream(server, job_id, **{"Last-Event-ID": stored[-1].id})
    assert done.status_code == 204


def test_another_clients_job_events_are_not_found(server, news):
    response = open_stream(server, news[0], key=BOB)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
    assert requests.get(f"{server.url}/v1/jobs/{news[0]}/events", timeout=10).status_code == 401


def test_open_streams_are_bounded_and_leave_the_other_requests_served(server, audio):
    # One worker: the second job waits behind the first, so that its streams stay open as long as needed.
    blocker = submit(server, audio("news_en_169s.wav"))
    job_id = submit(server, audio("lecture_en_60s.wav"))
    first, second = open_stream(server, job_id), open_stream(server, job_id)
    try:
        assert first.status_code == second.status_code == 200
        refused = open_stream(server, job_id)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"]["code"] == "too_many_event_streams"
        # Both streams hold their threads; the rest of the API still answers, several requests at once.
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            requests.get(f"{server.url}/v1/jobs/{job_id}", headers=auth(), timeout=10).status_code))
            for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [200] * 4
    finally:
        first.close()
    # The slot of a client that went away comes back (noticed at the stream's next write).
    deadline = time.monotonic() + 40
    while (again := open_stream(server, job_id)).status_code == 429:
        assert time.monotonic() < deadline, "the closed stream's slot never came back"
        time.sleep(0.5)
    assert again.status_code == 200
    # A cancelled job's streams end with job.cancelled.
    assert requests.delete(f"{server.url}/v1/jobs/{job_id}", headers=auth(), timeout=10).status_code == 200
    for response in (second, again):
        kinds = [sse.event for sse in events_of(response)]
        assert kinds == ["progress", "job.cancelled"], kinds
    requests.delete(f"{server.url}/v1/jobs/{blocker}", headers=auth(), timeout=10)


def test_a_failed_job_streams_job_failed(model_dir, audio, tmp_path):
    # A FLAC whose header claims 1 s, with 12 s of speech: accepted, then over the 5 s limit while decoded.
    flac = tmp_path / "declared_short.flac"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(audio("lecture_en_60s.wav")), "-t", "12", "-ar",
                    "16000", "-ac", "1", "-c:a", "flac", str(flac)], check=True)
    flac_total_samples(flac, 16000)
    server = start_server(model_dir, tmp_path, WHISPER_MAX_DURATION_S="5")
    try:
        job_id = submit(server, flac)
        events = list(events_of(open_stream(server, job_id)))
        assert events[-1].event == "job.failed", [e.event for e in events]
        outcome = json.loads(events[-1].data)
        assert outcome["status"] == "failed" and outcome["error"]["code"] == "audio_too_long", outcome
    finally:
        server.stop()


@pytest.fixture(scope="module")
def clip(audio, tmp_path_factory):
    """The lecture's first 25 s: several segments, quick to transcribe twice."""
    path = tmp_path_factory.mktemp("clip") / "lecture_25s.wav"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(audio("lecture_en_60s.wav")), "-t", "25", str(path)],
                   check=True)
    return path


def test_the_openai_client_iterates_a_streamed_transcription(server, clip):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0, timeout=600)
    with open(clip, "rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f, language="en", stream=True))
    types = [e.type for e in events]
    assert types[-1] == "transcript.text.done" and set(types[:-1]) == {"transcript.text.delta"}, types
    assert len(types) > 2, "the text came in one piece, not segment by segment"
    done = events[-1]
    assert "".join(e.delta for e in events[:-1]) == done.text
    with open(clip, "rb") as f:
        whole = client.audio.transcriptions.create(model="whisper-1", file=f, language="en")
    assert done.text == whole.text and len(done.text) > 50


def test_a_streamed_transcription_is_data_only_sse(server, clip):
    """As OpenAI sends it: `data:` lines only, no event names, no [DONE]; a bad value of stream is a 400."""
    with open(clip, "rb") as f:
        response = requests.post(f"{server.url}/v1/audio/transcriptions", files={"file": f},
                                 data={"stream": "true", "language": "en"}, headers=auth(), stream=True, timeout=600)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines), lines
    payloads = [json.loads(line[len("data: "):]) for line in lines]
    assert payloads[-1]["type"] == "transcript.text.done"
    assert all(set(p) == {"type", "delta"} for p in payloads[:-1])
    with open(clip, "rb") as f:
        bad = requests.post(f"{server.url}/v1/audio/transcriptions", files={"file": f}, data={"stream": "maybe"},
                            headers=auth(), timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"
