"""A transcription's form fields, checked the same way wherever they come from: a form, an upload grant's
fixed fields, a live upload's metadata. Below the routes and the jobs alike."""

from __future__ import annotations

from dataclasses import dataclass

from . import speakers
from .errors import ApiError
from .formats import RESPONSE_FORMATS
from .settings import LANGUAGES

GRANULARITIES = ("segment", "word")


@dataclass(frozen=True)
class FormFields:
    """A transcription's form fields, checked (shared by uploads and upload grants)."""

    response_format: str
    granularities: tuple[str, ...]
    language: str | None
    temperature: float
    prompt: str | None
    diarize: bool = False
    speaker_counts: tuple[int | None, int | None, int | None] = (None, None, None)  # num, min, max
    speaker_names: tuple[str, ...] = ()

    @classmethod
    def check(cls, state, form, files=None) -> FormFields:
        response_format = form.get("response_format", "json").strip() or "json"
        if response_format not in RESPONSE_FORMATS:
            raise ApiError(400, "invalid_response_format",
                           f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", param="response_format")
        granularities = tuple(dict.fromkeys(
            g.strip() for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
            if g.strip())) or ("segment",)
        for item in granularities:
            if item not in GRANULARITIES:
                raise ApiError(400, "invalid_timestamp_granularity",
                               "timestamp_granularities[] takes segment and/or word", param="timestamp_granularities")
        model = form.get("model", "").strip()
        if model and model not in state.settings.model_aliases:
            raise ApiError(400, "model_not_found",
                           f"this server serves {state.settings.model_label} (also accepted as whisper-1); "
                           f"got {model!r}", param="model")
        prompt = form.get("prompt") or None
        if prompt is not None and len(prompt) > 4000:
            raise ApiError(400, "prompt_too_long", "prompt must be at most 4000 characters", param="prompt")
        diarize = speakers.requested(form, response_format)
        if diarize and not state.settings.diarization:
            raise speakers.unavailable()
        num, low, high, names = speakers.check_fields(form, files) if diarize else (None, None, None, [])
        return cls(response_format=response_format, granularities=granularities,
                   language=_language(state, form.get("language")), temperature=_temperature(form.get("temperature")),
                   prompt=prompt, diarize=diarize, speaker_counts=(num, low, high), speaker_names=tuple(names))


def _language(state, raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return state.settings.language
    value = raw.strip().lower()
    if value == "auto":
        return None
    if value not in LANGUAGES:
        raise ApiError(400, "unsupported_language",
                       f"language {raw!r} is not one Whisper knows; use an ISO 639-1 code such as fr, or auto",
                       param="language")
    return value


def _temperature(raw: str | None) -> float:
    if raw is None or not raw.strip():
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ApiError(400, "invalid_temperature", "temperature must be a number between 0 and 1",
                       param="temperature")
    return value


def idempotency_key(raw, param: str | None) -> str | None:
    """An idempotency key as a client sent it (a header, a grant's field, tus metadata): None if empty."""
    key = raw.strip() if isinstance(raw, str) else None
    if (raw is not None and not isinstance(raw, str)) or (key is not None and len(key) > 255):
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be a string of at most 255 characters",
                       param=param)
    return key or None
