"""Repetition loops in a transcript: the same words written again and again, as a decoder stuck in a loop does.

Used by the engine to reject and cut loops, and by the benchmark to count them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A loop: the same run of at most LOOP_MAX_WORDS words, repeated back to back at least LOOP_MIN_REPEATS times
# and covering at least LOOP_MIN_WORDS words. "non, non, non" or "merci, merci" is speech; "non" seven times,
# or "à tous à toi et" four times, is a decoder that lost its place.
LOOP_MAX_WORDS = 8
LOOP_MIN_REPEATS = 4
LOOP_MIN_WORDS = 6

_WORD = re.compile(r"[\w'’-]+")


@dataclass(frozen=True)
class Loop:
    start: int  # index of the first word of the loop
    words: tuple[str, ...]  # the repeated run
    repeats: int

    @property
    def end(self) -> int:
        return self.start + len(self.words) * self.repeats


def words(text: str) -> list[str]:
    return [w.lower().replace("’", "'") for w in _WORD.findall(text)]


def _repeats(seq: list[str], start: int, size: int) -> int:
    run = seq[start:start + size]
    count = 1
    while seq[start + count * size:start + (count + 1) * size] == run:
        count += 1
    return count


def find_loops(text: str, *, max_words: int = LOOP_MAX_WORDS, min_repeats: int = LOOP_MIN_REPEATS,
               min_words: int = LOOP_MIN_WORDS) -> list[Loop]:
    """The loops in `text`, in order, each counted once (its shortest repeating run)."""
    seq = words(text)
    loops: list[Loop] = []
    i = 0
    while i < len(seq):
        found = None
        for size in range(1, max_words + 1):
            if i + size * min_repeats > len(seq):
                break
            count = _repeats(seq, i, size)
            if count >= min_repeats and count * size >= min_words:
                found = Loop(i, tuple(seq[i:i + size]), count)
                break
        if found:
            loops.append(found)
            i = found.end
        else:
            i += 1
    return loops


def cut_loops(text: str) -> str:
    """`text` with each loop written once: its first occurrence as written, the repeats after it dropped."""
    loops = find_loops(text)
    if not loops:
        return text
    spans = [m.span() for m in _WORD.finditer(text)]
    out, pos = [], 0
    for loop in loops:
        keep_end = spans[loop.start + len(loop.words) - 1][1]  # the first occurrence, as written
        out.append(text[pos:keep_end])
        pos = spans[loop.end - 1][1]
    out.append(text[pos:])
    return "".join(out)
