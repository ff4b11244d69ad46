"""Render a transcription as the response formats of OpenAI's API, and as the original /transcribe body.

A diarized transcription's segments each carry a speaker: JSON formats give it per segment, SRT and text open
each speaker's turn with "[Name] ", WebVTT puts each cue in a voice span (<v Name>)."""

from __future__ import annotations

from .engines import Segment, Transcription
from .speakers import totals as speaker_totals

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
CONTENT_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "diarized_json": "application/json",
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


def _speaker(segment: Segment) -> str | None:
    return getattr(segment, "speaker", None)


def _turns(segments) -> list[tuple[Segment, bool]]:
    """The segments with text, each with whether it opens a speaker's turn (its speaker is not the previous one's)."""
    out, previous = [], None
    for seg in segments:
        if not _cue_text(seg):
            continue
        speaker = _speaker(seg)
        out.append((seg, speaker is not None and speaker != previous))
        previous = speaker
    return out


def to_srt(result: Transcription) -> str:
    cues = []
    for number, (seg, opens_turn) in enumerate(_turns(result.segments), 1):
        text = f"[{_speaker(seg)}] {_cue_text(seg)}" if opens_turn else _cue_text(seg)
        cues.append(f"{number}\n{_clock(seg.start, ',')} --> {_clock(seg.end, ',')}\n{text}\n")
    return "\n".join(cues)


def _vtt_escape(text: str) -> str:
    # In a WebVTT cue, & and < open an escape or a tag (and a voice's name may not hold >).
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(result: Transcription) -> str:
    cues = []
    for seg, _ in _turns(result.segments):
        text = _vtt_escape(_cue_text(seg))
        if _speaker(seg) is not None:  # every cue: a player shows the cues one at a time
            text = f"<v {_vtt_escape(_speaker(seg))}>{text}"
        cues.append(f"{_clock(seg.start, '.')} --> {_clock(seg.end, '.')}\n{text}\n")
    return "WEBVTT\n\n" + "\n".join(cues)


def to_text(result: Transcription) -> str:
    """The plain text; with speakers, one line per turn, opened by "[Name] "."""
    turns = _turns(result.segments)
    if not any(_speaker(seg) for seg, _ in turns):
        return result.text + "\n"
    lines: list[str] = []
    for seg, opens_turn in turns:
        text = " ".join(_cue_text(seg).split())
        if opens_turn or not lines:
            lines.append(f"[{_speaker(seg)}] {text}")
        else:
            lines[-1] += " " + text
    return "\n".join(lines) + "\n"


def to_diarized_json(result: Transcription, task: str) -> dict:
    """OpenAI's diarized_json (gpt-4o-transcribe-diarize): segments with type, id, speaker, start, end, text."""
    segments = [{"type": "transcript.text.segment", "id": f"seg_{number}", "start": seg.start, "end": seg.end,
                 "text": seg.text.strip(), "speaker": _speaker(seg)}
                for number, seg in enumerate(s for s in result.segments if s.text.strip())]
    return {"task": task, "duration": result.duration, "text": result.text, "segments": segments,
            "usage": {"type": "duration", "seconds": result.duration}}


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
    """The body of the original POST /transcribe, which PILOTYS already reads; a diarized one adds each
    segment's "speaker" and the "speakers" with their talk time, and changes nothing else."""
    body = {
        "text": result.text,
        "language": result.language,
        "duration": result.duration,
        "segments": [
            {"id": s.id, "start": s.start, "end": s.end, "text": s.text.strip(),
             "avg_logprob": s.avg_logprob, "no_speech_prob": s.no_speech_prob}
            | ({"speaker": _speaker(s)} if _speaker(s) is not None else {})
            for s in result.segments
        ],
    }
    speakers = speaker_totals(result)
    if speakers is not None:
        body["speakers"] = speakers
    return body


def render(result: Transcription, response_format: str, task: str = "transcribe",
           granularities: tuple[str, ...] = ("segment",)) -> tuple[object, str]:
    """(body, content type); the body is a dict for JSON formats, a str otherwise."""
    if response_format == "json":
        return {"text": result.text}, CONTENT_TYPES["json"]
    if response_format == "text":
        return to_text(result), CONTENT_TYPES["text"]
    if response_format == "srt":
        return to_srt(result), CONTENT_TYPES["srt"]
    if response_format == "vtt":
        return to_vtt(result), CONTENT_TYPES["vtt"]
    if response_format == "diarized_json":
        return to_diarized_json(result, task), CONTENT_TYPES["diarized_json"]
    return (to_verbose_json(result, task, words="word" in granularities, segments=True),
            CONTENT_TYPES["verbose_json"])


# OpenAI's verbose_json names the language in English ("french"); ISO codes for the common ones.
_LANGUAGES = {
    "fr": "french", "en": "english", "de": "german", "es": "spanish", "it": "italian", "nl": "dutch",
    "pt": "portuguese", "ar": "arabic", "zh": "chinese", "ja": "japanese", "ru": "russian", "pl": "polish",
}


def _language_name(code: str | None) -> str | None:
    return None if code is None else _LANGUAGES.get(code, code)
