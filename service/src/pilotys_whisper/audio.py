"""Audio input: probe any file FFmpeg reads, and decode it to 16 kHz mono float32 in bounded memory and work.

Decoding runs in the service's own process through PyAV (FFmpeg's libraries, which faster-whisper already
loads), block by block: no ffmpeg process beside the service, and memory bounded by the block size. What a
file declares (rate, channels, frame length, duration) is checked before decoding, and what it decodes to is
checked again as it comes: the work a file costs is bounded by the bytes it holds, not by what it claims.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from .errors import ApiError

SAMPLE_RATE = 16000

# Bounds on what a file may declare or decode to. Each is far from any real recording and keeps one decoding
# step (one packet, one frame, its resampled output) within a few MB.
MIN_SAMPLE_RATE = 4_000  # telephone audio is 8 kHz; below 4 kHz there is no speech band left
MAX_SAMPLE_RATE = 384_000  # the highest rate audio interfaces record at
MAX_CHANNELS = 32  # a large microphone array; more is no recording of speech
MAX_FRAME_S = 10.0  # codecs use frames of a few ms (FLAC's largest, 65535 samples, is 1.5 s at 44.1 kHz)
MAX_FRAME_VALUES = 1 << 21  # samples x channels in one decoded frame (8 MB as float32)
MAX_PACKET_BYTES = 1 << 22  # one demuxed packet (4 MB; PCM packets hold a fraction of a second)
# Decompression bombs: past its first minute, a file must hold at least one byte of audio data per
# MAX_SAMPLES_PER_BYTE samples it decodes to (an average of 250 bit/s at 16 kHz). Speech codecs stay far above
# (Opus 6 kbit/s, AMR-NB 4.75 kbit/s), and so does a meeting that is mostly silence in VBR Opus (about
# 1 kbit/s while nobody speaks, container included); 4 hours of digital silence in FLAC is 57 KB, 16 bit/s.
FREE_SECONDS = 60
MAX_SAMPLES_PER_BYTE = 512


@dataclass(frozen=True)
class AudioInfo:
    duration: float | None  # None when the container does not say (e.g. MediaRecorder webm)
    codec: str
    sample_rate: int = 0
    channels: int = 0


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


def _kb(size: int) -> str:
    return f"{size / 1024:.0f} KB" if size >= 1024 else f"{size} bytes"


def _min_bitrate() -> int:
    return SAMPLE_RATE * 8 // MAX_SAMPLES_PER_BYTE


def too_dense(seconds: float, size: int) -> ApiError:
    return ApiError(422, "implausible_audio",
                    f"the file holds {seconds:.0f} s of audio in {_kb(size)}, far more than any recording does:"
                    f" past the first {FREE_SECONDS} s this service needs at least one byte per "
                    f"{MAX_SAMPLES_PER_BYTE} samples at {SAMPLE_RATE} Hz ({_min_bitrate()} bit/s); send the "
                    "recording as it was made")


def check_format(rate: int, channels: int, frame_samples: int = 0) -> None:
    """Refuse a sample rate, channel count or frame length out of bounds (0: not known yet)."""
    if rate and not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ApiError(422, "unsupported_sample_rate",
                       f"the audio's sample rate is {rate} Hz; this service accepts {MIN_SAMPLE_RATE} to "
                       f"{MAX_SAMPLE_RATE} Hz")
    if channels > MAX_CHANNELS:
        raise ApiError(422, "too_many_channels",
                       f"the audio has {channels} channels; this service accepts at most {MAX_CHANNELS} "
                       "(mix it down to mono or stereo first)")
    if frame_samples and rate and (frame_samples > MAX_FRAME_S * rate
                                   or frame_samples * max(channels, 1) > MAX_FRAME_VALUES):
        raise ApiError(422, "frame_too_long",
                       f"the audio comes in frames of {frame_samples} samples ({frame_samples / rate:.1f} s) "
                       f"x {channels} channels; this service accepts frames of at most {MAX_FRAME_S:.0f} s and "
                       f"{MAX_FRAME_VALUES} samples over all channels")


def _declared_frame_samples(codec: av.CodecContext) -> int:
    """The longest frame the stream says it holds: the codec's frame size, or FLAC's largest block."""
    if codec.frame_size:
        return codec.frame_size
    extradata = codec.extradata
    if codec.name == "flac" and extradata and len(extradata) >= 34:  # STREAMINFO: max block size at bytes 2-3
        return int.from_bytes(extradata[2:4], "big")
    return 0


def _open(path: str):
    try:
        return av.open(path, metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise unsupported(_reason(exc)) from exc


def probe(path: str) -> AudioInfo:
    """Check that the file holds an audio stream FFmpeg can decode, within the bounds above, and what it
    declares is plausible for its size; fail with 415/422 otherwise. Nothing is decoded."""
    with _open(path) as container:
        if not container.streams.audio:
            raise no_audio()
        stream = container.streams.audio[0]
        codec = stream.codec_context
        if codec is None or codec.name is None:
            raise unsupported("no decoder for its audio codec")
        check_format(codec.sample_rate, codec.channels, _declared_frame_samples(codec))
        duration = None
        if container.duration:
            duration = container.duration / av.time_base
        elif stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        size = os.path.getsize(path)
        if duration and duration * SAMPLE_RATE > FREE_SECONDS * SAMPLE_RATE + size * MAX_SAMPLES_PER_BYTE:
            raise too_dense(duration, size)
        return AudioInfo(duration=duration if duration and duration > 0 else None, codec=codec.name,
                         sample_rate=codec.sample_rate, channels=codec.channels)


def _unmixable(layout: av.AudioLayout) -> bool:
    """A layout without channel positions (FFmpeg has none past 8 channels but for a few): FFmpeg's
    resampler cannot mix it down, so we do."""
    return any(channel.name in ("NONE", "UNK") or channel.name.startswith("USR") for channel in layout.channels)


def _mono(frame: av.AudioFrame) -> av.AudioFrame:
    """The average of the frame's channels, as a mono float frame at its own rate."""
    values = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        values = values.reshape(-1, channels).T
    if values.dtype == np.uint8:
        mixed = (values.mean(axis=0, dtype=np.float64) - 128.0) / 128.0
    elif np.issubdtype(values.dtype, np.integer):
        mixed = values.mean(axis=0, dtype=np.float64) / float(np.iinfo(values.dtype).max + 1)
    else:
        mixed = values.mean(axis=0, dtype=np.float64)
    mono = av.AudioFrame.from_ndarray(mixed.astype(np.float32)[None, :], format="flt", layout="mono")
    mono.sample_rate = frame.sample_rate
    return mono


class PcmStream:
    """A file's first audio stream decoded to 16 kHz mono, read block by block.

    Memory stays bounded by the block size whatever the file's length, and each step by the bounds above.
    Damaged packets are skipped, as the ffmpeg command does; a file that yields no sample at all is refused.
    Use as a context manager: the file is always closed, also when the caller stops early. The counters say
    what the file cost: bytes of audio data demuxed, frames decoded, 16 kHz samples out of the resampler, the
    most samples one decoded frame gave, and samples handed out in blocks (`samples_read`).
    """

    def __init__(self, path: str, max_seconds: float | None = None):
        self.path = path
        self.max_seconds = max_seconds
        self.samples_read = 0
        self.bytes_read = 0
        self.frames_decoded = 0
        self.samples_decoded = 0
        self.largest_step = 0
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

    def _check_density(self) -> None:
        if self.samples_decoded > FREE_SECONDS * SAMPLE_RATE + self.bytes_read * MAX_SAMPLES_PER_BYTE:
            raise too_dense(self.samples_decoded / SAMPLE_RATE, self.bytes_read)

    def _resampled(self, resampler: av.AudioResampler, frame: av.AudioFrame | None) -> Iterator[np.ndarray]:
        try:
            outs = resampler.resample(frame)
        except (av.FFmpegError, ValueError) as exc:  # a layout or format FFmpeg cannot convert
            reason = _reason(exc) if isinstance(exc, av.FFmpegError) else str(exc)
            raise unsupported(f"its audio cannot be converted to mono: {reason}") from exc
        step = 0
        for out in outs:
            samples = out.to_ndarray().reshape(-1)
            step += samples.shape[0]
            self.samples_decoded += samples.shape[0]
            yield samples
        self.largest_step = max(self.largest_step, step)
        self._check_density()

    def _frames(self) -> Iterator[np.ndarray]:
        """Resampled frames as float32 arrays; damaged packets are skipped and remembered."""
        assert self._container is not None, "use PcmStream as a context manager"
        stream = self._container.streams.audio[0]
        resampler, setup = None, None
        try:
            for packet in self._container.demux(stream):
                if packet.size > MAX_PACKET_BYTES:
                    raise ApiError(422, "frame_too_long",
                                   f"the audio holds a packet of {_kb(packet.size)}; this service accepts "
                                   f"packets of at most {_kb(MAX_PACKET_BYTES)}")
                self.bytes_read += packet.size
                try:
                    frames = packet.decode()
                except av.InvalidDataError as exc:
                    self._error = exc
                    continue
                for frame in frames:
                    # The header may lie, and some streams change format midway: every frame is checked.
                    check_format(frame.sample_rate, len(frame.layout.channels), frame.samples)
                    self.frames_decoded += 1
                    if _unmixable(frame.layout):
                        frame = _mono(frame)
                    # Joined files (MP3s cat'ed together) change rate or channels midway: a new resampler
                    # takes over from there, once the previous one is flushed.
                    if (frame.format.name, frame.layout.name, frame.sample_rate) != setup:
                        if resampler is not None:
                            yield from self._resampled(resampler, None)
                        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                        setup = (frame.format.name, frame.layout.name, frame.sample_rate)
                    frame.pts = None  # a gap or overlap in the timestamps must not stop the resampler
                    yield from self._resampled(resampler, frame)
        except av.FFmpegError as exc:  # the container itself broke off: keep what was decoded
            self._error = exc
        if resampler is not None:
            yield from self._resampled(resampler, None)

    def blocks(self, seconds: float) -> Iterator[np.ndarray]:
        """Blocks of `seconds` (the last one shorter). Each sample is copied once, into its block: frames
        are sliced, never joined with what is pending."""
        want = int(seconds * SAMPLE_RATE)
        limit = None if self.max_seconds is None else int(self.max_seconds * SAMPLE_RATE)
        block = np.empty(want, dtype=np.float32)
        held = 0
        for frame in self._frames():
            if limit is not None and self.samples_read + held + frame.shape[0] > limit:
                raise too_long(int(self.max_seconds))
            start = 0
            while start < frame.shape[0]:
                take = min(want - held, frame.shape[0] - start)
                block[held:held + take] = frame[start:start + take]
                held, start = held + take, start + take
                if held == want:
                    self.samples_read += held
                    yield block
                    block, held = np.empty(want, dtype=np.float32), 0
        if held:
            self.samples_read += held
            yield block[:held].copy()
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
