import re

from pilotys_whisper.engines import Segment, Transcription, Word
from pilotys_whisper.formats import render, to_legacy, to_srt, to_vtt

SRT_TIME = r"(\d{2}):(\d{2}):(\d{2}),(\d{3})"
VTT_TIME = r"(\d{2}):(\d{2}):(\d{2})\.(\d{3})"


def _result():
    return Transcription(text="Bonjour. Une ligne --> piège. Fin.", language="fr", duration=3700.0, segments=[
        Segment(id=0, start=0.0, end=1.25, text=" Bonjour.", words=[Word(0.0, 1.25, " Bonjour.", 0.9)]),
        Segment(id=1, start=61.0, end=3661.5, text=" Une ligne\n\n --> piège."),
        Segment(id=2, start=3661.5, end=3700.0, text="   "),  # empty cue: left out
        Segment(id=3, start=3699.0, end=3700.0, text=" Fin."),
    ])


def _seconds(match):
    h, m, s, ms = (int(x) for x in match)
    return h * 3600 + m * 60 + s + ms / 1000


def parse_srt(text: str):
    """A strict SRT reader: numbered cues from 1, a timing line, text, a blank line between cues."""
    cues = []
    for number, block in enumerate(text.strip("\n").split("\n\n"), 1):
        lines = block.split("\n")
        assert lines[0] == str(number), block
        m = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert m, lines[1]
        start, end = _seconds(m.groups()[:4]), _seconds(m.groups()[4:])
        assert start <= end
        assert lines[2:] and all(line.strip() and "-->" not in line for line in lines[2:])
        cues.append((start, end, "\n".join(lines[2:])))
    return cues


def parse_vtt(text: str):
    assert text.startswith("WEBVTT\n\n")
    cues = []
    for block in text[len("WEBVTT\n\n"):].strip("\n").split("\n\n"):
        lines = block.split("\n")
        m = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert m, lines[0]
        assert lines[1:] and all(line.strip() and "-->" not in line for line in lines[1:])
        cues.append((_seconds(m.groups()[:4]), _seconds(m.groups()[4:]), "\n".join(lines[1:])))
    return cues


def test_srt_is_valid_and_keeps_hours():
    cues = parse_srt(to_srt(_result()))
    assert [c[2] for c in cues] == ["Bonjour.", "Une ligne\n-> piège.", "Fin."]
    assert cues[1][:2] == (61.0, 3661.5)
    assert "01:01:01,500" in to_srt(_result())


def test_vtt_is_valid():
    cues = parse_vtt(to_vtt(_result()))
    assert len(cues) == 3 and cues[0] == (0.0, 1.25, "Bonjour.")


def test_json_text_and_verbose():
    result = _result()
    body, ctype = render(result, "json")
    assert body == {"text": result.text} and ctype == "application/json"
    body, ctype = render(result, "text")
    assert body == result.text + "\n" and ctype.startswith("text/plain")
    body, _ = render(result, "verbose_json", granularities=("segment", "word"))
    assert body["language"] == "french" and body["duration"] == 3700.0 and body["task"] == "transcribe"
    assert len(body["segments"]) == 4 and "words" not in body["segments"][0]
    assert body["words"] == [{"word": "Bonjour.", "start": 0.0, "end": 1.25}]


def test_legacy_body():
    body = to_legacy(_result())
    assert set(body) >= {"text", "language", "segments"}
    assert body["segments"][0] == {"id": 0, "start": 0.0, "end": 1.25, "text": "Bonjour.",
                                   "avg_logprob": 0.0, "no_speech_prob": 0.0}
