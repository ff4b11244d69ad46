"""The stress corpus: French meeting speech made hard on purpose (espeak-ng voices, noise, telephone, clipping,
a music bed, long silences, repeated words and numbers), generated, never committed (bench/README.md).

Writes WAV files (16 kHz mono), their references and `corpus.json` into the output folder; a file already
there is kept. `--size` picks how much: `full` (every voice at three speeds, 52 files, 17 min of audio), `small`
(every voice at one speed, the noise with both voices, the rest with one: 23 files, 7.6 min) or `smoke`
(one file per class).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RATE = 16000
VOICES = [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 6)]
SPEEDS = (130, 160, 190)  # words per minute; espeak-ng's default is 175

# Meeting talk, written for this corpus: what PILOTYS records, said by one synthetic voice.
TEXTS = (
    "Bon, on reprend. Merci à tous d'avoir rejoint la réunion de suivi. Premier point, le budget du deuxième "
    "trimestre. Nous avons dépensé une bonne partie de l'enveloppe, mais il reste une marge. Julie, tu peux nous "
    "dire où en est le recrutement ? Oui, nous avons reçu plusieurs candidatures pour le poste de développeur, "
    "et trois entretiens sont prévus la semaine prochaine.",
    "Deuxième point, le planning. La livraison au client est prévue à la fin du mois. Est-ce que c'est encore "
    "réaliste ? Non, honnêtement je pense qu'il nous faut deux semaines de plus. D'accord, je préviens le client "
    "demain matin et je vous tiens au courant. Il faudra aussi revoir les priorités avec l'équipe de support.",
    "Pour la rétrospective, commençons par ce qui a bien marché. Les démonstrations du vendredi ont aidé tout le "
    "monde à voir l'avancement. En revanche, les revues de code prennent trop de temps, et certaines demandes "
    "restent ouvertes plusieurs jours. Je propose que chacun relise au moins deux demandes par jour.",
    "Côté juridique, le contrat n'est pas encore signé. Le service des achats attend la dernière version des "
    "conditions générales. Sophie, peux-tu relancer leur avocat cette semaine ? Oui, je m'en occupe. Et pour la "
    "sécurité, l'audit aura lieu en septembre, il faudra préparer la documentation avant l'été.",
)
REPEATS_TEXT = (
    "Oui, oui, oui, c'est bien ça. La réunion est le lundi 3 mars, puis le mardi 4 mars, puis le mercredi 5 mars. "
    "Le numéro de commande est le 4 5 7 8 9 2. Je répète, 4 5 7 8 9 2. Le budget passe de 12 500 euros à "
    "15 750 euros, soit 3 250 euros de plus. Merci, merci beaucoup, à jeudi 6 mars à 10 heures."
)


@dataclass(frozen=True)
class Item:
    name: str
    kind: str  # the class reported over: voice, noise, telephone, clipping, bed, silences, repeats
    voice: str
    speed: int
    text: str
    effect: str = ""  # snr20, snr10, snr5, mulaw, clip, music, tone, gaps


def corpus(size: str) -> list[Item]:
    items = []
    for v, voice in enumerate(VOICES):
        speeds = SPEEDS if size == "full" else (SPEEDS[v % len(SPEEDS)],)
        for speed in speeds:
            text = TEXTS[(v + SPEEDS.index(speed)) % len(TEXTS)]
            items.append(Item(f"voice_{voice}_{speed}", "voice", voice, speed, text))
    hard = [("f2", TEXTS[1]), ("m3", TEXTS[0])]  # a female and a male voice for each degradation
    for snr in (20, 10, 5):
        items += [Item(f"noise{snr}_{v}", "noise", v, 160, t, f"snr{snr}") for v, t in hard]
    items += [Item(f"telephone_{v}", "telephone", v, 160, t, "mulaw") for v, t in hard]
    items += [Item(f"clipping_{v}", "clipping", v, 160, t, "clip") for v, t in hard]
    items += [Item(f"music_{hard[0][0]}", "bed", hard[0][0], 160, TEXTS[2], "music"),
              Item(f"tone_{hard[1][0]}", "bed", hard[1][0], 160, TEXTS[3], "tone")]
    items += [Item(f"silences_{v}", "silences", v, 160, t, "gaps") for v, t in hard]
    items += [Item(f"repeats_{v}", "repeats", v, 160, REPEATS_TEXT) for v, _ in hard]
    if size == "smoke":
        seen: set[str] = set()
        items = [i for i in items if not (i.kind in seen or seen.add(i.kind))]
    elif size == "small":
        items = [i for i in items if i.kind == "voice" or i.name.endswith("_f2") or i.kind == "noise"]
    return items


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", f"fr+{voice}", "-s", str(speed), "-w", str(raw), text], check=True)
        return read_wav(resample(raw, Path(tmp) / "16k.wav"))


def resample(src: Path, dst: Path, codec: list[str] | None = None) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src), "-ac", "1", "-ar", str(RATE),
                    *(codec or []), str(dst)], check=True)
    return dst


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


def write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def speech_power(audio: np.ndarray) -> float:
    return float(np.mean(audio[np.abs(audio) > 1e-3] ** 2))


def apply(effect: str, audio: np.ndarray, item: Item, rng: np.random.Generator) -> np.ndarray:
    seconds = np.arange(audio.shape[0]) / RATE
    if effect.startswith("snr"):
        noise = rng.standard_normal(audio.shape[0]).astype(np.float32)
        return audio + noise * np.sqrt(speech_power(audio) / 10 ** (int(effect[3:]) / 10))
    if effect == "clip":  # a microphone gain far too high: 12 times louder, cut at full scale
        return np.clip(audio * 12.0, -0.5, 0.5) * 1.6
    if effect == "tone":  # a 440 Hz whine at 15 dB under the speech
        return audio + np.sqrt(2 * speech_power(audio) / 10 ** 1.5) * np.sin(2 * np.pi * 440 * seconds)
    if effect == "music":  # four chords of three notes, two seconds each, looped, 12 dB under the speech
        chords = ((220.0, 261.6, 329.6), (174.6, 220.0, 261.6), (196.0, 246.9, 293.7), (164.8, 207.7, 246.9))
        bed = np.zeros_like(audio)
        for c, notes in enumerate(chords):
            on = (seconds // 2 % len(chords)) == c
            for f in notes:
                bed += on * np.sin(2 * np.pi * f * seconds) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * seconds) ** 2)
        bed *= np.sqrt(speech_power(audio) / 10 ** 1.2 / max(float(np.mean(bed ** 2)), 1e-9))
        return audio + bed.astype(np.float32)
    return audio


def build(item: Item, out: Path, rng: np.random.Generator) -> dict:
    wav, ref = out / f"{item.name}.wav", out / f"{item.name}.txt"
    if not wav.is_file():
        if item.effect == "gaps":  # 6 s of silence between the sentences
            sentences = [s.strip() + "." for s in item.text.split(".") if s.strip()]
            gap = np.zeros(6 * RATE, np.float32)
            audio = np.concatenate([part for s in sentences for part in (speak(s, item.voice, item.speed), gap)])
        else:
            audio = apply(item.effect, speak(item.text, item.voice, item.speed), item, rng)
        if item.effect == "mulaw":  # telephone: 8 kHz, G.711 mu-law, back to 16 kHz for the servers
            with tempfile.TemporaryDirectory() as tmp:
                clean = Path(tmp) / "clean.wav"
                write_wav(clean, audio)
                phone = Path(tmp) / "phone.wav"
                subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(clean), "-ar", "8000",
                                "-c:a", "pcm_mulaw", str(phone)], check=True)
                audio = read_wav(resample(phone, Path(tmp) / "back.wav"))
        partial = wav.with_suffix(".partial.wav")
        write_wav(partial, audio)
        partial.rename(wav)
    ref.write_text(item.text + "\n")
    return {**asdict(item), "path": str(wav), "reference": str(ref), "language": "fr"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=["full", "small", "smoke"], default="small")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(18)
    entries = [build(item, args.out, rng) for item in corpus(args.size)]
    (args.out / "corpus.json").write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
    print(f"stress corpus: {len(entries)} files in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
