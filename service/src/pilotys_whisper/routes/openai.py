"""OpenAI's audio API: GET /v1/models, POST /v1/audio/transcriptions (stream=true: Server-Sent Events) and
/v1/audio/translations."""

from __future__ import annotations

import io

from flask import Blueprint, Response, jsonify, request

from ..errors import ApiError
from ..formats import render
from ..state import ServiceState
from .event_stream import ClosingBody, event_stream_response
from .openai_stream import transcription_events
from .transcription import TranscriptionParams, run_transcription


def blueprint(state: ServiceState) -> Blueprint:
    bp = Blueprint("openai", __name__)
    settings = state.settings

    @bp.get("/v1/models")
    def models():
        state.authenticate()
        created = 1700000000
        data = [{"id": name, "object": "model", "created": created, "owned_by": "pilotys-whisper"}
                for name in (settings.model_label, "whisper-1")]
        return jsonify(object="list", data=data)

    @bp.post("/v1/audio/transcriptions")
    def transcriptions():
        return _audio_route(state, task="transcribe")

    @bp.post("/v1/audio/translations")
    def translations():
        return _audio_route(state, task="translate")

    return bp


def _audio_route(state: ServiceState, task: str):
    state.authenticate()
    state.admission.refuse_if_full()
    stream = task == "transcribe" and _stream_requested(request.form.get("stream"))
    params = TranscriptionParams.parse(state, task=task)
    if stream:
        return _streamed(state, params)
    result = run_transcription(state, params)
    body, content_type = render(result, params.response_format, task, params.granularities)
    if isinstance(body, dict):
        return jsonify(body)
    return Response(body, content_type=content_type)


def _stream_requested(raw: str | None) -> bool:
    value = (raw or "").strip().lower()
    if value not in ("", "true", "false", "1", "0"):
        raise ApiError(400, "invalid_stream", "stream must be true or false", param="stream")
    return value in ("true", "1")


def _streamed(state: ServiceState, params: TranscriptionParams) -> Response:
    """OpenAI's streamed transcription (openai_stream.py). The admission slot is taken before the 200 (a full
    service still answers 429) and held until the stream is closed."""
    # The request ends (and werkzeug deletes its uploads) before the stream is read: the stream owns the upload.
    upload = request.files["file"]
    held, upload.stream = upload.stream, io.BytesIO()
    try:
        slot = state.admission.slot()
        slot.__enter__()
    except BaseException:
        held.close()
        raise

    def release() -> None:
        try:
            slot.__exit__(None, None, None)
        finally:
            held.close()

    return event_stream_response(ClosingBody(transcription_events(state, params), release))
