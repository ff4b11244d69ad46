"""Render a transcription as the response formats of OpenAI's API, and as the original /transcribe body."""

from __future__ import annotations

from .engines import Segment, Transcription

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, int(round(seconds * 1000)))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cue_text(segment: Segment) -> str:
    # A blank line would end the cue early, and "-->" would be read as a timing line.
    lines = [line.strip() for line in segment.text.strip().splitlines() if line.strip()]
    return "\n".join(lines).replace("-->", "->")


def to_srt(result: Transcription) -> str:
    cues = []
    for number, seg in enumerate((s for s in result.segments if _cue_text(s)), 1):
        cues.append(f"{number}\n{_clock(seg.start, ',')} --> {_clock(seg.end, ',')}\n{_cue_text(seg)}\n")
    return "\n".join(cues)


def to_vtt(result: Transcription) -> str:
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{_cue_text(s)}\n"
            for s in result.segments if _cue_text(s)]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_verbose_json(result: Transcription, task: str, words: bool, segments: bool = True) -> dict:
    body = {
        "task": task,
        "language": _language_name(result.language),
        "duration": result.duration,
        "text": result.text,
    }
    if segments:
        body["segments"] = [s.as_dict() for s in result.segments]
        for seg in body["segments"]:
            seg.pop("words", None)
    if words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in result.words]
    return body


def to_legacy(result: Transcription) -> dict:
    """The body of the original POST /transcribe, which PILOTYS already reads."""
    return {
        "text": result.text,
        "language": result.language,
        "duration": result.duration,
        "segments": [
            {"id": s.id, "start": s.start, "end": s.end, "text": s.text.strip(),
             "avg_logprob": s.avg_logprob, "no_speech_prob": s.no_speech_prob}
            for s in result.segments
        ],
    }


def render(result: Transcription, response_format: str, task: str = "transcribe",
           granularities: tuple[str, ...] = ("segment",)) -> tuple[object, str]:
    """(body, content type); the body is a dict for JSON formats, a str otherwise."""
    if response_format == "json":
        return {"text": result.text}, CONTENT_TYPES["json"]
    if response_format == "text":
        return result.text + "\n", CONTENT_TYPES["text"]
    if response_format == "srt":
        return to_srt(result), CONTENT_TYPES["srt"]
    if response_format == "vtt":
        return to_vtt(result), CONTENT_TYPES["vtt"]
    return (to_verbose_json(result, task, words="word" in granularities, segments=True),
            CONTENT_TYPES["verbose_json"])


# OpenAI's verbose_json names the language in English ("french"); ISO codes for the common ones.
_LANGUAGES = {
    "fr": "french", "en": "english", "de": "german", "es": "spanish", "it": "italian", "nl": "dutch",
    "pt": "portuguese", "ar": "arabic", "zh": "chinese", "ja": "japanese", "ru": "russian", "pl": "polish",
}


def _language_name(code: str | None) -> str | None:
    return None if code is None else _LANGUAGES.get(code, code)
