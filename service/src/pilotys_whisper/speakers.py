"""Speaker diarization as the API offers it: the form fields that ask for it (diarize, the speaker count, known
speakers and their reference clips), checked into SpeakerOptions, and the step that labels a transcription's
segments with their speakers. The engine itself is pilotys_whisper.diarization (the [diarization] extra)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from .audio import SAMPLE_RATE, decode_all, probe
from .engines import Transcription
from .errors import ApiError

MAX_SPEAKERS = 32
# OpenAI's limit: up to four known speakers per request.
MAX_REFERENCES = 4
MAX_NAME_CHARS = 64
# A reference clip (OpenAI: 2-10 s; 1 s is the least that gives a usable voice print): bounded in seconds
# and in bytes, a 30 s WAV at 48 kHz stereo being 5.8 MB (7.7 MB as a data URL).
MIN_REFERENCE_S = 1.0
MAX_REFERENCE_S = 30.0
MAX_REFERENCE_BYTES = 8 * 1024 * 1024
NAMES_FIELDS = ("known_speaker_names[]", "known_speaker_names")
REFERENCES_FIELDS = ("known_speaker_references[]", "known_speaker_references")
COUNT_FIELDS = ("num_speakers", "min_speakers", "max_speakers")
_DATA_URL = re.compile(rb"^data:([A-Za-z0-9.+/-]*)((?:;[A-Za-z0-9=._-]+)*)?,", re.ASCII)
_TRUE, _FALSE = ("true",), ("false", "")


@dataclass(frozen=True)
class SpeakerOptions:
    """What a request asked of the diarization: a speaker count (exact or bounded) and known voices."""

    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None
    # Known speakers' voice prints, by name, as plain lists so that a job stores them as JSON.
    references: dict[str, list[float]] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"num_speakers": self.num_speakers, "min_speakers": self.min_speakers,
                "max_speakers": self.max_speakers, "references": self.references}

    @classmethod
    def from_json(cls, data: dict) -> SpeakerOptions:
        return cls(**data)


def unavailable() -> ApiError:
    return ApiError(400, "diarization_disabled",
                    "speaker diarization is not enabled on this server: the operator turns it on with "
                    "whisper_service_diarization: true (the Ansible role) or WHISPER_DIARIZATION=true (the "
                    "environment), with the [diarization] extra installed", param="diarize")


def requested(form, response_format: str) -> bool:
    """Whether the form asks for speakers: diarize=true, or OpenAI's way, response_format=diarized_json."""
    raw = (form.get("diarize") or "").strip()
    if raw not in _TRUE + _FALSE:
        raise ApiError(400, "invalid_diarize", "diarize must be true or false", param="diarize")
    return raw in _TRUE or response_format == "diarized_json"


def _values(form, names: tuple[str, ...]) -> list:
    return [value for name in names for value in form.getlist(name)]


def check_fields(form, files=None) -> tuple[int | None, int | None, int | None, list[str]]:
    """The speaker counts and known names of a form that asks for diarization, checked (no audio read yet)."""
    counts = {name: _count(form.get(name), name) for name in COUNT_FIELDS}
    num, low, high = counts["num_speakers"], counts["min_speakers"], counts["max_speakers"]
    if num is not None and (low is not None or high is not None):
        raise ApiError(400, "invalid_speaker_count", "give num_speakers, or min_speakers and/or max_speakers, "
                       "not both", param="num_speakers")
    if low is not None and high is not None and low > high:
        raise ApiError(400, "invalid_speaker_count", f"min_speakers ({low}) is more than max_speakers ({high})",
                       param="min_speakers")
    names = [str(n).strip() for n in _values(form, NAMES_FIELDS)]
    references = _values(form, REFERENCES_FIELDS) + (_values(files, REFERENCES_FIELDS) if files is not None else [])
    if len(names) > MAX_REFERENCES or len(references) > MAX_REFERENCES:
        raise ApiError(400, "too_many_speaker_references",
                       f"at most {MAX_REFERENCES} known speakers (known_speaker_names[] and "
                       "known_speaker_references[])", param="known_speaker_references")
    if len(names) != len(references):
        raise ApiError(400, "speaker_references_mismatch",
                       f"known_speaker_names[] has {len(names)} name(s) but known_speaker_references[] has "
                       f"{len(references)} clip(s): give one reference clip per name", param="known_speaker_names")
    for name in names:
        if not name or len(name) > MAX_NAME_CHARS or any(not c.isprintable() or c in "<>&" for c in name):
            raise ApiError(400, "invalid_speaker_name", f"each known speaker name must be 1 to {MAX_NAME_CHARS} "
                           "printable characters, without < > or &", param="known_speaker_names")
    if len(set(names)) != len(names):
        raise ApiError(400, "invalid_speaker_name", "the known speaker names must differ", param="known_speaker_names")
    if num is not None and num < len(names):
        raise ApiError(400, "invalid_speaker_count", f"num_speakers ({num}) is less than the {len(names)} known "
                       "speakers", param="num_speakers")
    return num, low, high, names


def _count(raw, name: str) -> int | None:
    if raw is None or not str(raw).strip():
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_SPEAKERS:
        raise ApiError(400, "invalid_speaker_count", f"{name} must be a whole number from 1 to {MAX_SPEAKERS}",
                       param=name)
    return value


def reference_clips(form, files) -> list[object]:
    """The reference clips in the order sent: data URLs (plain fields, as OpenAI takes them; forms.py streams
    them to files) or audio files."""
    return _values(files, REFERENCES_FIELDS) or _values(form, REFERENCES_FIELDS)


def voice_prints(diarizer, names: list[str], clips: list, tmp_dir: str | None) -> dict[str, list[float]]:
    """Each known speaker's voice print, from their clip; a 400 that names the clip when it is not usable."""
    prints = {}
    for number, (name, clip) in enumerate(zip(names, clips, strict=True)):
        param = "known_speaker_references"
        with _clip_file(clip, tmp_dir, name) as path:
            try:  # what the service refuses as audio (415, 422) is a bad field here: 400, naming the clip
                probe(path)
                samples = decode_all(path, max_seconds=MAX_REFERENCE_S + 1)
            except ApiError as exc:
                raise ApiError(400, "invalid_speaker_reference",
                               f"the reference clip of {name!r} is not usable audio: {exc.message}",
                               param=param) from None
        seconds = len(samples) / SAMPLE_RATE
        if not MIN_REFERENCE_S <= seconds <= MAX_REFERENCE_S:
            raise ApiError(400, "invalid_speaker_reference",
                           f"the reference clip of {name!r} lasts {seconds:.1f} s: it must last "
                           f"{MIN_REFERENCE_S:.0f} to {MAX_REFERENCE_S:.0f} s", param=param)
        try:
            embedding = diarizer.reference(samples)
        except ValueError as exc:
            raise ApiError(400, "invalid_speaker_reference",
                           f"the reference clip of {name!r} (number {number + 1}) is not usable: {exc}",
                           param=param) from None
        prints[name] = [float(x) for x in embedding]
    return prints


@contextlib.contextmanager
def _clip_file(clip, tmp_dir: str | None, name: str) -> Iterator[str]:
    """The clip as a file path: an uploaded file as it is, a data URL decoded to a temporary file."""
    invalid = ApiError(400, "invalid_speaker_reference",
                       f"the reference clip of {name!r} must be an audio file part or a data URL "
                       "(data:audio/wav;base64,...)", param="known_speaker_references")
    stream = getattr(clip, "stream", None)
    if stream is None:  # a plain field (an upload grant's): text
        raw = str(clip).encode("utf-8", "replace")
    else:
        stream.seek(0)
        head = stream.read(5)
        stream.seek(0)
        if head != b"data:":
            path = getattr(stream, "name", None)
            if not isinstance(path, str) or not os.path.exists(path):
                raise invalid
            stream.flush()
            if os.fstat(stream.fileno()).st_size > MAX_REFERENCE_BYTES:
                raise _too_large(name)
            yield path
            return
        raw = stream.read(MAX_REFERENCE_BYTES + 1)
    if len(raw) > MAX_REFERENCE_BYTES:
        raise _too_large(name)
    match = _DATA_URL.match(raw)
    if match is None or b";base64" not in (match.group(2) or b""):
        raise invalid
    try:
        audio = base64.b64decode(raw[match.end():].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise invalid from None
    if not audio:
        raise invalid
    with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="whisper-reference-") as decoded:
        decoded.write(audio)
        decoded.flush()
        yield decoded.name


def _too_large(name: str) -> ApiError:
    return ApiError(413, "speaker_reference_too_large",
                    f"the reference clip of {name!r} is larger than {MAX_REFERENCE_BYTES // (1024 * 1024)} MB; "
                    f"a few seconds ({MIN_REFERENCE_S:.0f}-{MAX_REFERENCE_S:.0f} s) are enough")


def transcribe(engine, diarizer, path: str, options, speaker_options: SpeakerOptions | None,
               **kwargs) -> Transcription:
    """engine.transcribe(path, options, **kwargs), with each segment's speaker when `speaker_options` asks for
    them. The diarizer embeds the engine's speech regions as the model takes them, in the model's thread: the
    file is decoded once and the VAD runs once, and at the end only the clustering is left."""
    if speaker_options is None:
        return engine.transcribe(path, options, **kwargs)
    stream = diarizer.stream()
    result = engine.transcribe(path, options, on_speech=stream.add, **kwargs)
    return label(diarizer, path, result, speaker_options, stream=stream)


def label(diarizer, path: str, result: Transcription, options: SpeakerOptions, stream=None) -> Transcription:
    """The transcription with each segment given its speaker (segments split where the speaker changes).
    `stream`: the diarizer's SpeechStream the engine fed while it transcribed `path`."""
    import numpy as np

    from .diarization import attribute

    references = {name: np.asarray(emb, dtype=np.float32) for name, emb in options.references.items()}
    counts = dict(num_speakers=options.num_speakers, min_speakers=options.min_speakers,
                  max_speakers=options.max_speakers, references=references)
    speech = result.speech
    if stream is not None and speech is not None:
        diarization = diarizer.diarize_stream(stream, **counts)
    else:  # an engine without a VAD: the diarizer reads the file and runs its own
        diarization = diarizer.diarize(path, speech=list(speech.spans) if speech else None,
                                       speech_pad_s=speech.pad_s if speech else None, **counts)
    return replace(result, segments=attribute(result.segments, diarization))


def totals(result: Transcription) -> list[dict] | None:
    """Each speaker's talk time, or None for a transcription without speakers."""
    if not any(getattr(s, "speaker", None) for s in result.segments):
        return None
    from .diarization import speaker_totals

    return speaker_totals(result.segments)
