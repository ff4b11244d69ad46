"""Synthesized French meetings with several speakers (espeak-ng voices), and their reference: who spoke when.

A meeting is a list of lines, each said by one voice (an espeak-ng French variant with its pitch and speed), laid
out one after the other with a gap before each line (0: no gap; negative: the line starts before the previous one
ends, and the two voices are mixed). The reference holds each speaker's speech regions (a line's synthesized
audio, its leading and trailing silence trimmed, split where it pauses 0.5 s or more: shorter pauses belong to
the turn, as an annotator would mark them) and the words in the order they are said, each with its speaker.

Used by the service's diarization tests (`three_speakers()`: a 40 s meeting of three distinct voices) and by the
diarization benchmark (bench/diar_corpus.py builds its meetings with `assemble()`).
"""

from __future__ import annotations

import re
import subprocess
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RATE = 16000
FRAME = RATE // 100  # 10 ms: the resolution of the reference's boundaries
SILENCE = 0.004  # a frame whose peak stays under this is silence (espeak-ng's pauses are near-digital zero)
MIN_PAUSE_S = 0.5  # a pause this long or longer inside a line splits its reference regions


@dataclass(frozen=True)
class Voice:
    name: str  # the speaker's label in the reference
    variant: str  # espeak-ng's French variant: m1..m7, f1..f5
    pitch: int = 50  # espeak-ng -p, 0-99
    speed: int = 160  # espeak-ng -s, words per minute


@dataclass(frozen=True)
class Line:
    speaker: str
    text: str
    gap: float = 0.6  # seconds of silence before the line; 0: right after the previous one; < 0: overlap


@dataclass
class Meeting:
    audio: np.ndarray  # float32, 16 kHz mono
    turns: list[tuple[float, float, str]]  # (start, end, speaker): the reference's speech regions, by start
    words: list[tuple[str, str]]  # (word, speaker) in the order the lines are said
    speakers: list[str]  # in order of first appearance
    lines: list[tuple[float, float, str, str]] = field(default_factory=list)  # (start, end, speaker, text)

    @property
    def duration(self) -> float:
        return self.audio.shape[0] / RATE


def speak(text: str, voice: Voice) -> np.ndarray:
    """The text said by the voice, 16 kHz float32, its leading and trailing silence cut off."""
    synth = subprocess.run(["espeak-ng", "-v", f"fr+{voice.variant}", "-p", str(voice.pitch), "-s", str(voice.speed),
                            "--stdout", text], check=True, capture_output=True).stdout
    pcm = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", "-", "-ac", "1", "-ar", str(RATE),
                          "-f", "s16le", "-"], input=synth, check=True, capture_output=True).stdout
    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
    voiced = np.flatnonzero(np.abs(audio) > SILENCE)
    if voiced.size == 0:
        raise ValueError(f"espeak-ng said nothing for {text!r}")
    return audio[voiced[0]:voiced[-1] + 1]


def regions(audio: np.ndarray, offset: float) -> list[tuple[float, float]]:
    """Speech regions of one line's audio, in seconds from `offset`: split at pauses of MIN_PAUSE_S or more."""
    frames = audio[: audio.shape[0] // FRAME * FRAME].reshape(-1, FRAME)
    voiced = np.flatnonzero(np.abs(frames).max(axis=1) > SILENCE)
    if voiced.size == 0:
        return []
    out = []
    start = previous = voiced[0]
    for frame in voiced[1:]:
        if (frame - previous - 1) * FRAME >= MIN_PAUSE_S * RATE:
            out.append((start, previous + 1))
            start = frame
        previous = frame
    out.append((start, previous + 1))
    last = audio.shape[0] / RATE
    return [(float(offset + a * FRAME / RATE), float(offset + min(b * FRAME / RATE, last))) for a, b in out]


def words_of(text: str) -> list[str]:
    """The words a transcript is compared on: lower case, no punctuation, apostrophes and hyphens split."""
    return re.findall(r"[0-9a-zàâäçéèêëîïôöùûüÿœæ]+", text.lower())


def assemble(voices: list[Voice], lines: list[Line]) -> Meeting:
    """Lay the lines out one after the other (each line's gap before it) and mix the voices where they overlap."""
    by_name = {v.name: v for v in voices}
    clips = [speak(line.text, by_name[line.speaker]) for line in lines]
    starts, cursor = [], 0.5  # half a second of silence first
    for line, clip in zip(lines, clips):
        start = max(0.0, cursor + line.gap)
        starts.append(start)
        cursor = max(cursor, start + clip.shape[0] / RATE)
    audio = np.zeros(int((cursor + 0.5) * RATE), np.float32)
    turns, words, placed, speakers = [], [], [], []
    for line, clip, start in zip(lines, clips, starts):
        at = int(round(start * RATE))
        audio[at:at + clip.shape[0]] += clip
        turns += [(a, b, line.speaker) for a, b in regions(clip, at / RATE)]
        words += [(w, line.speaker) for w in words_of(line.text)]
        placed.append((at / RATE, (at + clip.shape[0]) / RATE, line.speaker, line.text))
        if line.speaker not in speakers:
            speakers.append(line.speaker)
    peak = float(np.abs(audio).max())
    if peak > 0.99:  # overlapping voices can add up past full scale
        audio *= 0.99 / peak
    return Meeting(audio, sorted(turns), words, speakers, placed)


def write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def write_rttm(path: Path, uri: str, turns: list[tuple[float, float, str]]) -> None:
    """The reference in NIST's RTTM: one SPEAKER line per region (file, channel 1, onset, duration, name)."""
    path.write_text("".join(f"SPEAKER {uri} 1 {a:.3f} {b - a:.3f} <NA> <NA> {s} <NA> <NA>\n" for a, b, s in turns))


THREE_VOICES = [Voice("Claire", "f2", 62, 165), Voice("Marc", "m3", 42, 150), Voice("Paul", "m6", 55, 180)]
THREE_LINES = [
    Line("Claire", "Bonjour à tous, merci d'être là. Nous avons trois points à traiter ce matin, le budget, le "
                   "planning et le recrutement.", 0.0),
    Line("Marc", "Pour le budget, nous avons dépensé à peu près la moitié de l'enveloppe du trimestre, il reste "
                 "donc une marge raisonnable."),
    Line("Claire", "D'accord.", 0.4),
    Line("Paul", "Côté planning, la livraison au client reste prévue pour la fin du mois, si les tests se passent "
                 "bien la semaine prochaine."),
    Line("Marc", "Tout à fait. Et il faudra prévenir le service juridique avant de signer l'avenant."),
    Line("Claire", "Très bien. Paul, tu peux préparer le compte rendu et l'envoyer à tout le monde jeudi ?"),
    Line("Paul", "Oui, je m'en occupe dès demain matin."),
]
# Reference clips for known speakers: other sentences in the same voices (3 to 5 s each).
THREE_REFERENCES = {
    "Claire": "Je vous propose de commencer tout de suite, nous avons peu de temps.",
    "Marc": "Les chiffres du mois dernier sont meilleurs que prévu, surtout pour les ventes en ligne.",
    "Paul": "Je vais relire le document ce soir et vous faire un retour rapidement, sans doute demain.",
}


def three_speakers() -> Meeting:
    """A meeting of about 40 s: three distinct voices (a woman, two men), an interjection, gaps of 0.4-0.6 s."""
    return assemble(THREE_VOICES, THREE_LINES)


def reference_clip(name: str) -> np.ndarray:
    """A few seconds of one of `three_speakers()`'s voices saying something not in the meeting."""
    return speak(THREE_REFERENCES[name], next(v for v in THREE_VOICES if v.name == name))
