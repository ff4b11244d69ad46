"""What diarization gives: speaker turns and the speakers' labels, and the error it raises when it cannot run."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


class DiarizationUnavailable(Exception):
    """Diarization cannot run here: the speaker model file or the optional dependencies are missing."""


@dataclass
class Turn:
    start: float  # seconds
    end: float
    speaker: str


@dataclass
class Diarization:
    turns: list[Turn]  # in time order, one speaker at a time
    speakers: list[str]  # "A", "B"... in order of first appearance, or the known names that matched
    windows: int = 0  # speaker embeddings computed (the work done)
    affinity_size: int = 0  # rows of the largest similarity matrix built (the memory bound)
    stats: dict = field(default_factory=dict)

    def speaker_at(self, start: float, end: float) -> str | None:
        """The speaker who talks most between `start` and `end`, else the one whose turn is nearest."""
        turns = self.turns
        if not turns:
            return None
        starts = [t.start for t in turns]  # turns are sorted and do not overlap
        last = bisect.bisect_left(starts, end) - 1  # the last turn starting before `end`
        talked: dict[str, float] = {}
        i = last
        while i >= 0 and turns[i].end > start:
            overlap = min(end, turns[i].end) - max(start, turns[i].start)
            talked[turns[i].speaker] = talked.get(turns[i].speaker, 0.0) + max(overlap, 0.0)
            i -= 1
        if talked and max(talked.values()) > 0:
            return max(talked, key=talked.get)
        around = [t for t in turns[max(last, 0):last + 2]]
        return min(around, key=lambda t: max(t.start - end, start - t.end, 0.0)).speaker
