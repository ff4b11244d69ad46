"""A transcription request, read and checked (the form, the upload, the options), and run in a slot: shared by
the original contract, OpenAI's routes and the jobs' submission."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from flask import g, request

from .. import speakers
from ..audio import probe, too_long
from ..engines import TranscribeOptions
from ..errors import ApiError
from ..fields import FormFields
from ..settings import Settings
from ..state import ServiceState


@dataclass(frozen=True)
class TranscriptionParams:
    path: str
    size: int
    options: TranscribeOptions
    response_format: str = "json"
    granularities: tuple[str, ...] = ("segment",)
    filename: str = ""
    speakers: speakers.SpeakerOptions | None = None  # None: no diarization asked

    @classmethod
    def parse(cls, state: ServiceState, *, legacy: bool = False, task: str = "transcribe",
              require_ready: bool = True, fields=None) -> TranscriptionParams:
        """Validate the form fields (or those an upload grant fixed) and the uploaded file (everything cheap,
        before queueing)."""
        settings = state.settings
        upload = request.files.get("file")
        if upload is None and "file" in request.form:  # a part without a filename is a plain text field
            raise ApiError(400, "missing_file", "the 'file' field came as a plain form field: send the audio as "
                           "a file part, with a filename (as curl -F file=@audio.wav does)", param="file")
        if upload is None:
            raise ApiError(400, "missing_file", "send the audio as a multipart/form-data field named 'file'",
                           param="file")
        form = request.form if fields is None else fields
        # Reference clips come with the request itself, never from an upload grant's fixed fields.
        clips = request.files if fields is None else None
        checked = FormFields.check(state, form, clips)
        path, size = saved_upload(upload, settings)
        if require_ready or checked.speaker_names:
            state.require_ready()  # voice prints need the diarizer loaded
        speaker_options = None
        if checked.diarize:
            prints = speakers.voice_prints(state.diarizer, list(checked.speaker_names),
                                           speakers.reference_clips(form, request.files), request.upload_dir)
            num, low, high = checked.speaker_counts
            speaker_options = speakers.SpeakerOptions(num_speakers=num, min_speakers=low, max_speakers=high,
                                                      references=prints)
        info = probe(path)
        if info.duration is not None and info.duration > settings.max_duration_s + 1:
            raise too_long(settings.max_duration_s)
        options = TranscribeOptions(
            language=checked.language, task=task, prompt=checked.prompt, temperature=checked.temperature,
            # Speakers are attributed word by word: a segment is split where the speaker changes.
            word_timestamps=("word" in checked.granularities and not legacy) or checked.diarize,
            max_duration_s=settings.max_duration_s, duration_hint=info.duration)
        return cls(path=path, size=size, options=options, response_format=checked.response_format,
                   granularities=checked.granularities, filename=upload.filename or "", speakers=speaker_options)


def saved_upload(upload, settings: Settings) -> tuple[str, int]:
    stream = upload.stream
    stream.flush()
    path = getattr(stream, "name", None)
    if not isinstance(path, str) or not os.path.exists(path):
        raise ApiError(400, "missing_file", "the 'file' field must be a file upload", param="file")
    size = os.fstat(stream.fileno()).st_size
    if size == 0:
        raise ApiError(400, "empty_file", "the uploaded file is empty", param="file")
    if size > settings.max_upload_bytes:
        raise ApiError(413, "file_too_large", f"the upload is larger than {settings.max_upload_mb} MB")
    return path, size


def run_transcription(state: ServiceState, params: TranscriptionParams):
    started = time.monotonic()
    with state.admission.slot():
        began = time.monotonic()
        try:
            result = speakers.transcribe(state.engine, state.diarizer, params.path, params.options, params.speakers)
        except ApiError:
            state.metrics.transcriptions.labels(outcome="rejected").inc()
            raise
        except Exception:
            state.metrics.transcriptions.labels(outcome="failed").inc()
            raise
    processing = time.monotonic() - began
    state.metrics.transcriptions.labels(outcome="ok").inc()
    state.metrics.observe_transcription(result.duration, processing)
    g.audio_s, g.processing_s = result.duration, processing
    g.queued_s = began - started
    return result
