"""Audio input: probe any file ffmpeg reads, and decode it to 16 kHz mono float32 in bounded memory."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import ApiError

SAMPLE_RATE = 16000
_BYTES_PER_SAMPLE = 2  # ffmpeg writes s16le: half the pipe traffic of f32le


@dataclass(frozen=True)
class AudioInfo:
    duration: float | None  # None when the container does not say (e.g. MediaRecorder webm)
    codec: str


def _ffmpeg_reason(stderr: str, path: str) -> str:
    """The first meaningful ffmpeg error line, without the temporary file's path."""
    lines = [line.replace(path, "input").strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "Invalid data" in line or "could not find codec" in line.lower() or "matches no streams" in line:
            return line
    return lines[-1] if lines else "unknown decoding error"


def unsupported(reason: str) -> ApiError:
    return ApiError(415, "unsupported_media",
                    f"the file could not be decoded as audio ({reason}); send mp3, wav, flac, ogg, webm, m4a or mp4")


def too_long(limit_s: int) -> ApiError:
    return ApiError(413, "audio_too_long",
                    f"the audio is longer than the {limit_s} s this service accepts; split it or send it as a job")


def probe(path: str, timeout: float = 60) -> AudioInfo:
    """Check that the file holds a decodable audio stream; fail with 415/422 otherwise."""
    cmd = ["ffprobe", "-v", "error", "-print_format", "json",
           "-show_entries", "format=duration:stream=codec_type,codec_name,duration", path]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise unsupported("probing the file took too long") from exc
    if done.returncode != 0:
        raise unsupported(_ffmpeg_reason(done.stderr, path))
    try:
        data = json.loads(done.stdout or "{}")
    except json.JSONDecodeError as exc:
        raise unsupported("unreadable container") from exc
    audio = [s for s in data.get("streams", []) if s.get("codec_type") == "audio"]
    if not audio:
        raise ApiError(422, "no_audio", "the file has no audio stream")
    duration = _float(data.get("format", {}).get("duration")) or _float(audio[0].get("duration"))
    return AudioInfo(duration=duration, codec=audio[0].get("codec_name", "unknown"))


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


class PcmStream:
    """ffmpeg decoding a file to 16 kHz mono, read block by block.

    Memory stays bounded by the block size whatever the file's length. Use as a context manager:
    the ffmpeg process is always reaped, also when the caller stops early.
    """

    def __init__(self, path: str, max_seconds: float | None = None, start_s: float = 0.0):
        self.path = path
        self.max_seconds = max_seconds
        self.start_s = start_s
        self.samples_read = 0
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    def __enter__(self) -> PcmStream:
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error"]
        if self.start_s > 0:
            cmd += ["-ss", f"{self.start_s:.3f}"]
        cmd += ["-i", self.path, "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar", str(SAMPLE_RATE)]
        if self.max_seconds is not None:
            # Decode a little past the limit only, so that an over-long file is detected, not decoded whole.
            cmd += ["-t", f"{self.max_seconds + 1:.3f}"]
        cmd += ["-f", "s16le", "pipe:1"]
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            if proc.stdout:
                proc.stdout.close()
            proc.wait()
        if self._stderr is not None:
            self._stderr.close()

    def blocks(self, seconds: float) -> Iterator[np.ndarray]:
        assert self._proc is not None and self._proc.stdout is not None, "use PcmStream as a context manager"
        want = int(seconds * SAMPLE_RATE) * _BYTES_PER_SAMPLE
        limit = None if self.max_seconds is None else int(self.max_seconds * SAMPLE_RATE)
        while True:
            data = _read_exactly(self._proc.stdout, want)
            if not data:
                break
            usable = len(data) - len(data) % _BYTES_PER_SAMPLE
            block = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32) / 32768.0
            self.samples_read += block.shape[0]
            if limit is not None and self.samples_read > limit:
                raise too_long(int(self.max_seconds))
            yield block
            if len(data) < want:
                break
        self._finish()

    def _finish(self) -> None:
        assert self._proc is not None
        code = self._proc.wait()
        if self.samples_read == 0:
            self._stderr.seek(0)
            stderr = self._stderr.read().decode(errors="replace")
            if code != 0:
                raise unsupported(_ffmpeg_reason(stderr, self.path))
            raise ApiError(422, "no_audio", "the file's audio stream holds no samples")

    @property
    def seconds_read(self) -> float:
        return self.samples_read / SAMPLE_RATE


def _read_exactly(stream, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = stream.read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def decode_all(path: str, max_seconds: float | None = None) -> np.ndarray:
    """The whole file as one array (for short clips and the openai-whisper engine)."""
    with PcmStream(path, max_seconds=max_seconds) as stream:
        blocks = list(stream.blocks(60.0))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)

