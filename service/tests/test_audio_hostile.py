"""Hostile audio files through the real HTTP app and the real model: each gets a result or a clear 4xx, and
costs decoding work bounded by the bytes it holds (counted in bytes and samples, never in seconds).

The corpus (hostile_corpus.py) is built by the tests themselves, from the test speech.
"""

import time
from pathlib import Path

import numpy as np
import pytest

from pilotys_whisper.app import create_app
from pilotys_whisper.audio import (
    FREE_SECONDS,
    MAX_CHANNELS,
    MAX_FRAME_S,
    MAX_SAMPLES_PER_BYTE,
    SAMPLE_RATE,
    PcmStream,
    probe,
)
from pilotys_whisper.errors import ApiError

from conftest import KEY, make_settings
from hostile_corpus import Corpus

pytestmark = pytest.mark.model

AUTH = {"Authorization": f"Bearer {KEY}"}
SPEECH_WORDS = ("bonjour", "réunion")  # spoken in the first 4 s and 12 s of fr_meeting


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, audio) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("hostile"), audio("fr_meeting.wav"))


@pytest.fixture(scope="module")
def app(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("service")
    app = create_app(make_settings(WHISPER_MODEL=model_dir, WHISPER_TMP_DIR=root, WHISPER_STATE_DIR=root / "state",
                                   WHISPER_MAX_UPLOAD_MB=50))
    state = app.extensions["whisper"]
    assert state.ready.wait(120), "the model did not load"
    yield app
    state.jobs.stop()


@pytest.fixture
def streams(monkeypatch) -> list[PcmStream]:
    """Every PcmStream the engine opens, kept to read its work counters afterwards."""
    opened: list[PcmStream] = []

    class CountedStream(PcmStream):
        def __enter__(self):
            opened.append(self)
            return super().__enter__()

    monkeypatch.setattr("pilotys_whisper.engines.faster.PcmStream", CountedStream)
    return opened


def post(client, path: Path, route="/v1/audio/transcriptions", **fields):
    with open(path, "rb") as f:
        return client.post(route, data={"file": (f, path.name), **fields}, headers=AUTH,
                           content_type="multipart/form-data")


def assert_bounded(stream: PcmStream, path: Path) -> None:
    """The work a file cost is bounded by its bytes, and each step by the frame bound."""
    assert stream.bytes_read <= path.stat().st_size
    step = MAX_FRAME_S * SAMPLE_RATE
    assert stream.largest_step <= step, stream.largest_step
    allowed = FREE_SECONDS * SAMPLE_RATE + stream.bytes_read * MAX_SAMPLES_PER_BYTE
    assert stream.samples_decoded <= allowed + step, (stream.samples_decoded, allowed)
    assert stream.samples_read <= stream.samples_decoded


# Refused by probe(), on both routes: name, status, error code
REFUSED = [
    ("rate_3hz.flac", 422, "unsupported_sample_rate"),
    ("rate_2khz.wav", 422, "unsupported_sample_rate"),
    ("rate_768khz.wav", 422, "unsupported_sample_rate"),
    ("channels_64.wav", 422, "too_many_channels"),
    ("long_frames.flac", 422, "frame_too_long"),
    ("bomb.flac", 422, "implausible_audio"),
    ("video_no_audio.mp4", 422, "no_audio"),
]


@pytest.mark.parametrize("name, status, code", REFUSED)
def test_refused_before_decoding(app, hostile, streams, name, status, code):
    path = hostile(name)
    with pytest.raises(ApiError) as err:
        probe(str(path))
    assert (err.value.status, err.value.code) == (status, code)
    r = post(app.test_client(), path)
    assert r.status_code == status, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert streams == [], "nothing may be decoded"
    # The job route probes the same way: refused at submission, nothing queued.
    r = post(app.test_client(), path, route="/v1/jobs")
    assert (r.status_code, r.get_json()["error"]["code"]) == (status, code)


def test_messages_say_what_is_wrong_and_what_is_accepted(app, hostile):
    client = app.test_client()
    message = post(client, hostile("rate_3hz.flac")).get_json()["error"]["message"]
    assert "3 Hz" in message and "4000 to 384000 Hz" in message
    message = post(client, hostile("channels_64.wav")).get_json()["error"]["message"]
    assert "64 channels" in message and f"at most {MAX_CHANNELS}" in message
    message = post(client, hostile("long_frames.flac")).get_json()["error"]["message"]
    assert "16.4 s" in message and f"{MAX_FRAME_S:.0f} s" in message
    message = post(client, hostile("bomb.flac")).get_json()["error"]["message"]
    assert "14400 s" in message and "KB" in message and "250 bit/s" in message


@pytest.mark.parametrize("name, seconds", [("rate_8khz.wav", 12), ("rate_384khz.wav", 4), ("channels_9.wav", 12),
                                           ("video_8_audio.mkv", 12), ("declared_short.flac", 12)])
def test_speech_at_the_edges_is_transcribed(app, hostile, streams, name, seconds):
    path = hostile(name)
    r = post(app.test_client(), path, language="fr", response_format="verbose_json")
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    for word in SPEECH_WORDS[:1 if seconds < 12 else None]:
        assert word in body["text"].lower(), (name, body["text"])
    assert body["duration"] == pytest.approx(seconds, abs=0.1), "the real duration, not the declared one"
    [stream] = streams
    assert_bounded(stream, path)


@pytest.mark.parametrize("name, seconds", [("declared_long.wav", 10.0), ("truncated.flac", None),
                                           ("garbage.wav", 10.0), ("rate_change.mp3", 24.1)])
def test_broken_files_give_what_they_hold(app, hostile, streams, name, seconds):
    path = hostile(name)
    r = post(app.test_client(), path, response_format="verbose_json")
    assert r.status_code == 200, r.get_data(as_text=True)
    duration = r.get_json()["duration"]
    if seconds is None:  # cut at 40 %: what is left, not the 12 s the header says
        assert 3.0 < duration < 6.0, duration
    else:
        assert duration == pytest.approx(seconds, abs=0.1)
    [stream] = streams
    assert_bounded(stream, path)
    assert stream.samples_read == pytest.approx(duration * SAMPLE_RATE, abs=SAMPLE_RATE / 1000)  # ms in JSON


def test_header_then_garbage_is_422(app, hostile, streams):
    path = hostile("garbage.flac")  # the decoder finds no frame in the random bytes
    r = post(app.test_client(), path)
    assert r.status_code == 422, r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] == "no_audio"
    [stream] = streams
    assert_bounded(stream, path)
    assert stream.samples_decoded == 0


def test_a_silent_meeting_is_no_bomb(app, hostile):
    # The densest real recording: silence in VBR Opus, still far above the bound (3.6 kbit/s against 250).
    r = post(app.test_client(), hostile("silent_meeting.webm"), language="fr", response_format="verbose_json")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["text"] == ""


def test_bomb_without_a_declared_length_stops_after_its_first_minute(app, hostile, streams):
    path = hostile("bomb_undeclared.flac")
    assert probe(str(path)).duration is None
    r = post(app.test_client(), path)
    assert r.status_code == 422, r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] == "implausible_audio"
    [stream] = streams
    assert_bounded(stream, path)
    # 4 hours declared by nobody: decoding stopped a few seconds past the free minute, not at 4 hours.
    assert stream.samples_decoded < (FREE_SECONDS + 10) * SAMPLE_RATE
    assert stream.bytes_read < 2000


def test_bomb_as_a_job_fails_with_the_same_error(app, hostile):
    client = app.test_client()
    r = post(client, hostile("bomb_undeclared.flac"), route="/v1/jobs")
    assert r.status_code == 202, r.get_data(as_text=True)
    job_id = r.get_json()["id"]
    deadline = time.monotonic() + 60
    while (job := client.get(f"/v1/jobs/{job_id}", headers=AUTH).get_json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["error"]["code"] == "implausible_audio"


def test_blocks_slice_big_frames_and_keep_every_sample_once(monkeypatch, tmp_path):
    # Frames far longer than a block, and far shorter: each sample lands once, in order.
    ramp = np.arange(1_000_003, dtype=np.float32)
    sizes = [700_001, 3, 250_000, 49_999]
    frames = np.split(ramp, np.cumsum(sizes)[:-1])
    stream = PcmStream(str(tmp_path / "unused"))
    monkeypatch.setattr(stream, "_frames", lambda: iter(frames))
    blocks = list(stream.blocks(40000 / SAMPLE_RATE))
    assert [b.shape[0] for b in blocks] == [40000] * 25 + [3]
    np.testing.assert_array_equal(np.concatenate(blocks), ramp)
    assert stream.samples_read == ramp.shape[0]
