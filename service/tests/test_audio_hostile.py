"""Hostile audio files through the real HTTP app and the real model: each gets a result or a clear 4xx, and
costs decoding work bounded by the bytes it holds (counted in bytes and samples, never in seconds).

The corpus is built here, from the test speech, with Python's `wave`, byte patches and the ffmpeg command.
"""

import subprocess
import time
import wave
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

pytestmark = pytest.mark.model

AUTH = {"Authorization": f"Bearer {KEY}"}
SPEECH_WORDS = ("bonjour", "réunion")  # spoken in the first 4 s and 12 s of fr_meeting


def ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)],
                   check=True)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """int16 samples, shape (n,) or (n, channels), as a plain PCM WAV."""
    frames = samples.reshape(samples.shape[0], -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.astype("<i2").tobytes())
    return path


def flac_total_samples(path: Path, total: int) -> None:
    """Patch the total sample count in a FLAC file's STREAMINFO (its low 36 bits at bytes 18-25)."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO first"
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~((1 << 36) - 1)) | total
    data[18:26] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(data))


class Corpus:
    """Hostile files, each built on first use from the 12 s of speech at the start of fr_meeting."""

    def __init__(self, root: Path, source: Path):
        self.root, self.source = root, source
        self.built: dict[str, Path] = {}

    def __call__(self, name: str) -> Path:
        if name not in self.built:
            self.built[name] = getattr(self, "make_" + name.replace(".", "_"))(self.root / name)
        return self.built[name]

    def speech(self, rate: int = SAMPLE_RATE) -> np.ndarray:
        raw = self.root / f"speech_{rate}.s16"
        if not raw.exists():
            ffmpeg("-i", self.source, "-t", 12, "-ac", 1, "-ar", rate, "-f", "s16le", raw)
        samples = np.fromfile(raw, dtype="<i2")
        if rate == SAMPLE_RATE and not (self.root / "speech_16000.wav").exists():
            write_wav(self.root / "speech_16000.wav", samples, rate)
        return samples

    # -- sample rates --
    def make_rate_3hz_flac(self, path):
        # The case: 10 KB declaring 14 000 s; each 4096-sample FLAC block is 1365 s at 3 Hz.
        wav = write_wav(self.root / "rate_3hz.wav", np.zeros(14_000 * 3, dtype=np.int16), 3)
        ffmpeg("-i", wav, "-c:a", "flac", path)
        return path

    def make_rate_2khz_wav(self, path):
        return write_wav(path, self.speech()[::8], 2000)

    def make_rate_768khz_wav(self, path):
        return write_wav(path, np.repeat(self.speech()[:SAMPLE_RATE], 48), 768_000)

    def make_rate_8khz_wav(self, path):  # telephone speech: accepted
        return write_wav(path, self.speech(8000), 8000)

    def make_rate_384khz_wav(self, path):  # the highest rate accepted: 4 s of speech
        return write_wav(path, self.speech(384_000)[:4 * 384_000], 384_000)

    # -- channels --
    def make_channels_64_wav(self, path):  # the 500: 64 channels of noise, 16 kHz int16
        noise = np.random.default_rng(64).integers(-3000, 3000, (2 * SAMPLE_RATE, 64))
        return write_wav(path, noise, SAMPLE_RATE)

    def make_channels_9_wav(self, path):  # no channel layout FFmpeg can mix down: a 500 before
        return write_wav(path, np.repeat(self.speech()[:, None], 9, axis=1), SAMPLE_RATE)

    # -- declared duration against the real one --
    def make_declared_long_wav(self, path):  # the data chunk claims 4 GB (37 h); 10 s follow
        write_wav(path, self.speech()[:10 * SAMPLE_RATE], SAMPLE_RATE)
        data = bytearray(path.read_bytes())
        assert data[36:40] == b"data"
        data[40:44] = (0xFFFFFF00).to_bytes(4, "little")
        path.write_bytes(bytes(data))
        return path

    def make_declared_short_flac(self, path):  # STREAMINFO claims 1 s; 12 s of speech follow
        ffmpeg("-i", self.root / "speech_16000.wav", "-c:a", "flac", path)
        flac_total_samples(path, SAMPLE_RATE)
        return path

    # -- broken files --
    def make_truncated_flac(self, path):  # the first 40 % of a 12 s FLAC (its header still says 12 s)
        self.speech()
        whole = self.root / "whole.flac"
        ffmpeg("-i", self.root / "speech_16000.wav", "-c:a", "flac", whole)
        data = whole.read_bytes()
        path.write_bytes(data[:len(data) * 4 // 10])
        return path

    def make_garbage_flac(self, path):  # a valid FLAC header, then 200 KB of random bytes
        self.speech()
        whole = self.root / "whole.flac"
        if not whole.exists():
            ffmpeg("-i", self.root / "speech_16000.wav", "-c:a", "flac", whole)
        header = whole.read_bytes()[:42]  # "fLaC" + STREAMINFO
        path.write_bytes(header[:4] + bytes([header[4] | 0x80]) + header[5:] +
                         np.random.default_rng(1).bytes(200_000))
        return path

    def make_garbage_wav(self, path):  # a valid WAV header for 10 s, then random bytes (PCM of loud noise)
        write_wav(path, np.zeros(10 * SAMPLE_RATE, dtype=np.int16), SAMPLE_RATE)
        data = bytearray(path.read_bytes())
        data[44:] = np.random.default_rng(2).bytes(len(data) - 44)
        path.write_bytes(bytes(data))
        return path

    # -- decompression bombs --
    # FLAC codes a block of identical samples as one "constant" subframe: 65535 samples of digital silence
    # take about 12 bytes, so 4 hours at 16 kHz fit in 40 KB and decode to 920 MB of float32.
    def make_bomb_flac(self, path):
        ffmpeg("-f", "lavfi", "-i", f"anullsrc=r={SAMPLE_RATE}:cl=mono", "-t", 4 * 3600, "-c:a", "flac",
               "-frame_size", 65535, path)
        return path

    def make_bomb_undeclared_flac(self, path):  # the same, with STREAMINFO's total set to 0 ("unknown")
        path.write_bytes(self("bomb.flac").read_bytes())
        flac_total_samples(path, 0)
        return path

    # -- frames --
    def make_long_frames_flac(self, path):  # 4 kHz with 65535-sample blocks: 16.4 s a frame
        ffmpeg("-f", "lavfi", "-i", "anoisesrc=r=4000:d=40:a=0.1", "-c:a", "flac", "-frame_size", 65535, path)
        return path

    # -- video --
    def make_video_no_audio_mp4(self, path):
        ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-t", 3, "-c:v", "mpeg4", path)
        return path

    def make_video_8_audio_mkv(self, path):  # speech on the first audio stream, tones on the 7 others
        self.speech()
        args = ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=5:duration=12", "-i", self.root / "speech_16000.wav"]
        for i in range(7):
            args += ["-f", "lavfi", "-i", f"sine=f={300 + 100 * i}:r=16000:d=12"]
        maps = ["-map", "0:v"] + [x for i in range(1, 9) for x in ("-map", f"{i}:a")]
        ffmpeg(*args, *maps, "-c:v", "mpeg4", "-c:a", "flac", path)
        return path


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
    assert "14400 s" in message and "KB" in message and "2 kbit/s" in message


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
                                           ("garbage.wav", 10.0)])
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
    assert stream.samples_read == pytest.approx(duration * SAMPLE_RATE, abs=1)


def test_header_then_garbage_is_422(app, hostile, streams):
    path = hostile("garbage.flac")  # the decoder finds no frame in the random bytes
    r = post(app.test_client(), path)
    assert r.status_code == 422, r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] == "no_audio"
    [stream] = streams
    assert_bounded(stream, path)
    assert stream.samples_decoded == 0


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
