"""Audio input: probe any file FFmpeg reads, and decode it to 16 kHz mono float32 in bounded memory.

Decoding runs in the service's own process through PyAV (FFmpeg's libraries, which faster-whisper already
loads), block by block: no ffmpeg process beside the service, and memory bounded by the block size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from .errors import ApiError

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class AudioInfo:
    duration: float | None  # None when the container does not say (e.g. MediaRecorder webm)
    codec: str


def _reason(exc: av.FFmpegError) -> str:
    """FFmpeg's own words for the failure, without the temporary file's path."""
    return exc.strerror or type(exc).__name__


def unsupported(reason: str) -> ApiError:
    return ApiError(415, "unsupported_media",
                    f"the file could not be decoded as audio ({reason}); send mp3, wav, flac, ogg, webm, m4a or mp4")


def too_long(limit_s: int) -> ApiError:
    # The same limit holds for requests and jobs (WHISPER_MAX_DURATION_S): a job is no way around it.
    return ApiError(413, "audio_too_long",
                    f"the audio is longer than the {limit_s} s this service accepts; split it into shorter parts")


def no_audio() -> ApiError:
    return ApiError(422, "no_audio", "the file has no audio stream")


def _open(path: str):
    try:
        return av.open(path, metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise unsupported(_reason(exc)) from exc


def probe(path: str) -> AudioInfo:
    """Check that the file holds an audio stream FFmpeg can decode; fail with 415/422 otherwise."""
    with _open(path) as container:
        if not container.streams.audio:
            raise no_audio()
        stream = container.streams.audio[0]
        if stream.codec_context is None or stream.codec_context.name is None:
            raise unsupported("no decoder for its audio codec")
        duration = None
        if container.duration:
            duration = container.duration / av.time_base
        elif stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        return AudioInfo(duration=duration if duration and duration > 0 else None, codec=stream.codec_context.name)


class PcmStream:
    """A file's first audio stream decoded to 16 kHz mono, read block by block.

    Memory stays bounded by the block size whatever the file's length. Damaged packets are skipped, as the
    ffmpeg command does; a file that yields no sample at all is refused. Use as a context manager: the file
    is always closed, also when the caller stops early.
    """

    def __init__(self, path: str, max_seconds: float | None = None):
        self.path = path
        self.max_seconds = max_seconds
        self.samples_read = 0
        self._container = None
        self._error: av.FFmpegError | None = None

    def __enter__(self) -> PcmStream:
        self._container = _open(self.path)
        if not self._container.streams.audio:
            self._container.close()
            raise no_audio()
        return self

    def __exit__(self, *exc) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _frames(self) -> Iterator[np.ndarray]:
        """Resampled frames as float32 arrays; damaged packets are skipped and remembered."""
        assert self._container is not None, "use PcmStream as a context manager"
        stream = self._container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        try:
            packets = self._container.demux(stream)
            for packet in packets:
                try:
                    frames = packet.decode()
                except av.InvalidDataError as exc:
                    self._error = exc
                    continue
                for frame in frames:
                    frame.pts = None  # a gap or overlap in the timestamps must not stop the resampler
                    for out in resampler.resample(frame):
                        yield out.to_ndarray().reshape(-1)
        except av.FFmpegError as exc:  # the container itself broke off: keep what was decoded
            self._error = exc
        for out in resampler.resample(None):
            yield out.to_ndarray().reshape(-1)

    def blocks(self, seconds: float) -> Iterator[np.ndarray]:
        want = int(seconds * SAMPLE_RATE)
        limit = None if self.max_seconds is None else int(self.max_seconds * SAMPLE_RATE)
        pending: list[np.ndarray] = []
        held = 0
        for frame in self._frames():
            pending.append(frame)
            held += frame.shape[0]
            if limit is not None and self.samples_read + held > limit:
                raise too_long(int(self.max_seconds))
            while held >= want:
                joined = np.concatenate(pending)
                block, rest = joined[:want], joined[want:]
                pending, held = ([rest] if rest.shape[0] else []), rest.shape[0]
                self.samples_read += block.shape[0]
                yield block
        if held:
            block = np.concatenate(pending)
            self.samples_read += block.shape[0]
            yield block
        if self.samples_read == 0:
            if self._error is not None:
                raise unsupported(_reason(self._error))
            raise ApiError(422, "no_audio", "the file's audio stream holds no samples")

    @property
    def seconds_read(self) -> float:
        return self.samples_read / SAMPLE_RATE


def decode_all(path: str, max_seconds: float | None = None) -> np.ndarray:
    """The whole file as one array (for short clips and the openai-whisper engine)."""
    with PcmStream(path, max_seconds=max_seconds) as stream:
        blocks = list(stream.blocks(60.0))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
