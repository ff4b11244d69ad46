"""Speakers put on transcript segments: a segment where the speaker changes is split at a word boundary."""

from __future__ import annotations

import dataclasses

from ..engines import Segment
from .result import Diarization


def _split(segment: Segment, diarization: Diarization) -> list[Segment]:
    words = segment.words or []
    speakers = [diarization.speaker_at(w.start, w.end) for w in words]
    if len(set(speakers)) <= 1:
        speaker = speakers[0] if speakers else diarization.speaker_at(segment.start, segment.end)
        return [dataclasses.replace(segment, speaker=speaker)]
    pieces: list[Segment] = []
    first = 0
    for i in range(1, len(words) + 1):
        if i < len(words) and speakers[i] == speakers[first]:
            continue
        part = words[first:i]
        # The tokens cannot be split with the words (the tokenizer is the engine's): a part has none.
        pieces.append(dataclasses.replace(
            segment, start=part[0].start, end=max(part[-1].end, part[0].start),
            text="".join(w.word for w in part), tokens=[], words=list(part), speaker=speakers[first]))
        first = i
    if not pieces[0].text.startswith(" ") and segment.text.startswith(" "):
        pieces[0].text = " " + pieces[0].text
    return pieces


def attribute(segments: list[Segment], diarization: Diarization) -> list[Segment]:
    """The segments with their speaker, each segment whose words belong to several speakers split where the
    speaker changes (this needs word timestamps: without them a segment goes whole to its main speaker).
    Ids are renumbered; every word is kept, in order."""
    out: list[Segment] = []
    for segment in segments:
        out.extend(_split(segment, diarization))
    for number, segment in enumerate(out):
        segment.id = number
    return out


def speaker_totals(segments: list[Segment]) -> list[dict]:
    """[{"speaker", "duration"}]: seconds each speaker talks in the segments, in order of first appearance."""
    totals: dict[str, float] = {}
    for segment in segments:
        if segment.speaker is not None:
            totals[segment.speaker] = totals.get(segment.speaker, 0.0) + max(segment.end - segment.start, 0.0)
    return [{"speaker": name, "duration": round(seconds, 3)} for name, seconds in totals.items()]
