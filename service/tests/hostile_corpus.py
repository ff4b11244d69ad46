"""Hostile audio files, built from the test speech with Python's `wave`, byte patches and the ffmpeg command.

Shared by the tests (tests/test_audio_hostile.py) and the benchmark (bench/hostile.py); nothing is committed.
"""

import subprocess
import wave
from pathlib import Path

import numpy as np

from pilotys_whisper.audio import SAMPLE_RATE


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

    def speech_wav(self) -> Path:
        """The 12 s of speech as a 16 kHz mono WAV."""
        self.speech()
        return self.root / "speech_16000.wav"

    def make_control_speech_wav(self, path):  # no trick: the benchmark's yardstick for what transcribing costs
        path.write_bytes(self.speech_wav().read_bytes())
        return path

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
        ffmpeg("-i", self.speech_wav(), "-c:a", "flac", path)
        flac_total_samples(path, SAMPLE_RATE)
        return path

    def make_rate_change_mp3(self, path):
        # Two MP3s joined, as `cat` does: 12 s of speech at 16 kHz mono, then 12 s of faint noise at 22.05 kHz
        # stereo (a 500 before: the resampler refused the second half's frames).
        first, second = self.root / "part_speech.mp3", self.root / "part_noise.mp3"
        ffmpeg("-i", self.speech_wav(), "-c:a", "libmp3lame", first)
        ffmpeg("-f", "lavfi", "-i", "anoisesrc=r=22050:d=12:a=0.002:seed=1", "-ac", 2, "-c:a", "libmp3lame", second)
        path.write_bytes(first.read_bytes() + second.read_bytes())
        return path

    # -- broken files --
    def make_truncated_flac(self, path):  # the first 40 % of a 12 s FLAC (its header still says 12 s)
        whole = self.root / "whole.flac"
        ffmpeg("-i", self.speech_wav(), "-c:a", "flac", whole)
        data = whole.read_bytes()
        path.write_bytes(data[:len(data) * 4 // 10])
        return path

    def make_garbage_flac(self, path):  # a valid FLAC header, then 200 KB of random bytes
        whole = self.root / "whole.flac"
        if not whole.exists():
            ffmpeg("-i", self.speech_wav(), "-c:a", "flac", whole)
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

    def make_silent_meeting_webm(self, path):  # not a bomb: 5 minutes of digital silence as Chrome's Opus
        ffmpeg("-f", "lavfi", "-i", "anullsrc=r=48000:cl=mono", "-t", 300, "-c:a", "libopus", "-b:a", "32k", path)
        return path

    # -- frames --
    def make_long_frames_flac(self, path):  # 4 kHz with 65535-sample blocks: 16.4 s a frame
        ffmpeg("-f", "lavfi", "-i", "anoisesrc=r=4000:d=40:a=0.1:seed=1", "-c:a", "flac", "-frame_size", 65535, path)
        return path

    # -- video --
    def make_video_no_audio_mp4(self, path):
        ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-t", 3, "-c:v", "mpeg4", path)
        return path

    def make_video_8_audio_mkv(self, path):  # speech on the first audio stream, tones on the 7 others
        args = ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=5:duration=12", "-i", self.speech_wav()]
        for i in range(7):
            args += ["-f", "lavfi", "-i", f"sine=f={300 + 100 * i}:r=16000:d=12"]
        maps = ["-map", "0:v"] + [x for i in range(1, 9) for x in ("-map", f"{i}:a")]
        ffmpeg(*args, *maps, "-c:v", "mpeg4", "-c:a", "flac", path)
        return path


# Every file of the corpus, in the order the benchmark sends them.
NAMES = ("control_speech.wav",
         "rate_3hz.flac", "rate_2khz.wav", "rate_768khz.wav", "rate_8khz.wav", "rate_384khz.wav", "rate_change.mp3",
         "channels_64.wav", "channels_9.wav", "declared_long.wav", "declared_short.flac", "truncated.flac",
         "garbage.flac", "garbage.wav", "bomb.flac", "bomb_undeclared.flac", "long_frames.flac",
         "video_no_audio.mp4", "video_8_audio.mkv")
