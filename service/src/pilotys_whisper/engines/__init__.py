"""Transcription engines: one small interface, two implementations chosen by settings."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

ProgressFn = Callable[[float, float], None]  # (seconds of audio done, total seconds or 0 if unknown)
StopFn = Callable[[], bool]
# Segments that became final while the transcription runs, in the result's order and numbering (live results).
SegmentsFn = Callable[[list["Segment"]], None]
# A transcription slot taken only while the model works (a live upload waits for its audio without one).
HoldFn = Callable[[], AbstractContextManager]
# A speech region the VAD found, as it finds it: (first sample at 16 kHz, its samples, the padding in seconds the VAD
# put around the speech). The diarizer embeds them beside the model, so the file is decoded once.
SpeechFn = Callable[[int, "np.ndarray", float], None]


class Cancelled(Exception):
    """The caller asked to stop (a cancelled job); raised between two chunks of work."""


def release_free_memory() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise, and a long-lived server's
    resident memory then grows with every large request)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = "fr"  # None: detect
    task: str = "transcribe"  # or "translate" (to English)
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False
    max_duration_s: float | None = None
    duration_hint: float | None = None  # from probing, for progress; None if unknown
    # A live upload (jobs/live.py): the audio arrives as it is recorded, so the engine looks at it in small blocks
    # and decodes each 30 s chunk as soon as it is complete, not once a batch of them has arrived.
    live: bool = False


@dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    seek: int = 0
    words: list[Word] | None = None
    speaker: str | None = None  # set by diarization only

    def as_dict(self) -> dict:
        data = asdict(self)
        if self.words is None:
            data.pop("words")
        if self.speaker is None:  # clients that never asked for speakers see the fields they always had
            data.pop("speaker")
        return data


@dataclass(frozen=True)
class SpeechRegions:
    """Where the engine's VAD found speech (seconds, in order) and the padding it put on each side of a region:
    the diarizer takes its turns from these rather than running the VAD a second time."""

    spans: tuple[tuple[float, float], ...]
    pad_s: float


@dataclass
class Transcription:
    text: str
    language: str | None
    duration: float  # seconds of audio
    segments: list[Segment]
    language_probability: float = 1.0
    speech: SpeechRegions | None = None  # the VAD's regions, for diarization; in no response, not stored

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in (s.words or [])]


class Engine(Protocol):
    name: str
    device: str

    def load(self) -> None:
        """Load the model (once, at start-up, never at import time)."""

    def transcribe(self, path: str, options: TranscribeOptions, progress: ProgressFn | None = None,
                   should_stop: StopFn | None = None, on_segments: SegmentsFn | None = None,
                   hold: HoldFn | None = None, on_speech: SpeechFn | None = None) -> Transcription:
        """Transcribe the file at `path`; raise ApiError for bad audio, Cancelled when asked to stop.

        `on_segments`, if given, receives every segment of the result once, in order, as soon as it is final
        (an engine that cannot tell before the end hands them all at the end). `hold`, if given, is entered
        around each stretch of the model's work, and left while the engine waits for audio. `on_speech`, if
        given, receives each speech region of its VAD in order, in the model's thread as the model takes it
        (an engine without a VAD never calls it, and its result has no `speech`)."""


def build_engine(settings) -> Engine:
    if settings.engine == "openai-whisper":
        from .openai import OpenAIWhisperEngine

        return OpenAIWhisperEngine(settings)
    from .faster import FasterWhisperEngine

    return FasterWhisperEngine(settings)
