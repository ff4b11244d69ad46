"""The diarization corpus: French meetings of 2-6 synthetic speakers, generated, never committed (bench/README.md).

Each meeting is a seeded script of lines (service/tests/speakers.py lays them out and synthesizes them with
espeak-ng): turns of 1-20 s drawn from meeting talk written for it, short interjections ("oui", "d'accord",
"tout à fait"), one speaker who leaves for a long stretch and comes back, a few overlaps (two voices mixed),
and three meetings of two same-gender voices close in pitch with no gap at all between turns (the hard case of
issue 15). Every voice is a distinct espeak-ng French variant, its pitch (-p) and speed (-s) set per meeting.

Writes into the output folder, per meeting: NAME.wav (16 kHz mono), NAME.rttm (the reference), NAME.json (the
script: lines with their times, and the reference words with their speaker), and `corpus.json`; a meeting
already there (same script) is kept. `--cost` also writes cost_10min (a 10-minute meeting of four speakers) and
cost_3h (it, looped to three hours, written block by block).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "service" / "tests"))
from speakers import RATE, Line, Voice, assemble, write_rttm, write_wav  # noqa: E402 - the tests' synthesizer

# Meeting talk written for this corpus; a turn is one to several of these sentences.
SENTENCES = (
    "Bon, on reprend là où nous en étions la semaine dernière.",
    "Le premier point concerne le budget du deuxième trimestre.",
    "Nous avons dépensé une bonne partie de l'enveloppe, mais il reste une marge.",
    "Le client souhaite une première version avant la fin du mois de mars.",
    "L'équipe technique estime qu'il faut six semaines de développement et deux semaines de tests.",
    "Je pense qu'il nous faut deux semaines de plus pour finir proprement.",
    "Je préviens le client demain matin et je vous tiens au courant.",
    "Il faudra aussi revoir les priorités avec l'équipe de support.",
    "Les démonstrations du vendredi ont aidé tout le monde à voir l'avancement.",
    "En revanche, les revues de code prennent trop de temps.",
    "Certaines demandes restent ouvertes plusieurs jours sans réponse.",
    "Je propose que chacun relise au moins deux demandes par jour.",
    "Le contrat n'est pas encore signé, le service des achats attend la dernière version.",
    "L'audit de sécurité aura lieu en septembre, il faut préparer la documentation avant l'été.",
    "Nous avons reçu plusieurs candidatures pour le poste de développeur.",
    "Trois entretiens sont prévus la semaine prochaine, mardi et jeudi.",
    "La salle de réunion du troisième étage sera fermée pendant les travaux.",
    "Le fournisseur a confirmé la livraison des serveurs pour le quinze avril.",
    "Il faudra migrer les données de l'ancienne application avant l'été.",
    "Les utilisateurs se plaignent surtout de la lenteur de la recherche.",
    "Nous pourrions ajouter un index sur la table des commandes.",
    "La formation des nouveaux arrivants a été bien notée cette année.",
    "Le comité de direction veut un point d'étape à la fin de chaque mois.",
    "Je vous enverrai le tableau de bord mis à jour ce soir.",
    "Les chiffres de fréquentation du site ont augmenté de douze pour cent.",
    "La campagne de communication commence lundi prochain.",
    "Nous devons encore choisir entre les deux propositions de maquette.",
    "La première est plus simple, la seconde est plus complète mais plus chère.",
    "Le service juridique demande une relecture des conditions générales.",
    "Il reste trois anomalies bloquantes à corriger avant la mise en production.",
    "La mise en production est prévue un mardi, pour éviter les week-ends.",
    "Nous garderons l'ancienne version en parallèle pendant deux semaines.",
    "Le support a reçu quarante appels la semaine dernière, surtout sur la connexion.",
    "Il faudrait écrire une page d'aide pour la réinitialisation du mot de passe.",
    "Les équipes de Lyon et de Nantes travaillent maintenant sur le même outil.",
    "Le déménagement des bureaux est repoussé à l'automne.",
    "Je voudrais qu'on fixe une date pour la prochaine réunion avec le client.",
    "Le devis du prestataire est arrivé hier, il est un peu au-dessus de nos attentes.",
    "Nous pouvons négocier le prix si nous signons pour deux ans.",
    "La direction financière attend nos prévisions pour l'année prochaine.",
    "Le nouveau tableau de suivi des incidents est en place depuis lundi.",
    "Chaque incident a maintenant un responsable et une date de résolution.",
    "Les tests automatiques couvrent à peu près la moitié du code.",
    "Il faut que quelqu'un reprenne le dossier des licences logicielles.",
    "La réunion de lancement avec le partenaire s'est bien passée.",
    "Ils nous ont demandé un accès à l'environnement de recette.",
    "Je peux m'en charger, mais pas avant la semaine prochaine.",
    "Le prochain comité aura lieu jeudi à dix heures, dans la grande salle.",
    "Marc préparera le compte rendu de la réunion et l'enverra à tout le monde.",
    "Sophie prendra en charge la coordination avec le service juridique.",
)
INTERJECTIONS = ("Oui.", "D'accord.", "Tout à fait.", "Oui, oui.", "Absolument.", "Exactement.", "Non.",
                 "Bien sûr.", "Très bien.", "Merci.")
WORDS_PER_S = 3.2  # espeak-ng at 140-185 words a minute says about this many of these words a second (measured)


@dataclass(frozen=True)
class Spec:
    name: str
    voices: tuple[Voice, ...]
    seconds: float  # about how long the meeting runs
    seed: int
    gaps: tuple[float, float] = (0.2, 1.2)  # the silence before a line, drawn uniformly; (0, 0): none at all
    overlaps: int = 2  # lines that start before the previous one ends
    interjections: float = 0.15  # share of lines that are an interjection
    absent: str = ""  # this speaker leaves after the first fifth and comes back for the last fifth
    note: str = ""


def v(name: str, variant: str, pitch: int, speed: int) -> Voice:
    return Voice(name, variant, pitch, speed)


MEETINGS = (
    Spec("duo_mf", (v("A", "m1", 45, 150), v("B", "f2", 62, 172)), 150, 11, interjections=0.25,
         note="a man and a woman"),
    Spec("trio", (v("A", "m3", 40, 160), v("B", "f1", 58, 150), v("C", "m5", 60, 178)), 170, 2),
    Spec("quad_return", (v("A", "m2", 50, 165), v("B", "f3", 55, 155), v("C", "m6", 38, 145), v("D", "f5", 70, 175)),
         200, 3, absent="D", note="D leaves after the first fifth and comes back for the last"),
    Spec("five", (v("A", "m1", 52, 170), v("B", "m4", 35, 150), v("C", "f2", 50, 160), v("D", "f4", 66, 182),
                  v("E", "m7", 48, 140)), 220, 4, absent="B"),
    Spec("six", (v("A", "m2", 44, 150), v("B", "m3", 58, 175), v("C", "m5", 36, 160), v("D", "f1", 64, 165),
                 v("E", "f3", 48, 150), v("F", "f5", 56, 185)), 260, 5, overlaps=3, absent="F"),
    Spec("overlaps", (v("A", "m6", 50, 160), v("B", "f4", 60, 165), v("C", "m1", 40, 150)), 160, 6, overlaps=6,
         note="six lines start 0.5-1.5 s before the previous one ends"),
    Spec("hard_male_a", (v("A", "m2", 50, 160), v("B", "m4", 54, 168)), 150, 7, gaps=(0, 0), overlaps=0,
         note="two male voices close in pitch, no gap between turns"),
    Spec("hard_male_b", (v("A", "m3", 46, 155), v("B", "m5", 48, 160)), 150, 8, gaps=(0, 0), overlaps=0,
         note="two male voices close in pitch, no gap between turns"),
    Spec("hard_female", (v("A", "f1", 60, 165), v("B", "f3", 63, 160)), 150, 9, gaps=(0, 0), overlaps=0,
         note="two female voices close in pitch, no gap between turns"),
)
COST = Spec("cost_10min", (v("A", "m1", 48, 160), v("B", "f2", 60, 165), v("C", "m4", 40, 150),
                           v("D", "f5", 66, 175)), 600, 10)
COST_3H_S = 3 * 3600


def script(spec: Spec) -> list[Line]:
    """The meeting's lines, drawn from the spec's seed: the same spec always gives the same script."""
    rng = random.Random(spec.seed)  # noqa: S311 - a reproducible script, not a secret
    names = [voice.name for voice in spec.voices]
    lines: list[Line] = []
    said = 0.0  # estimated seconds of speech so far
    current = ""
    returned = False
    pending = spec.overlaps  # overlaps still to place, on most lines from the fourth that follow a full turn
    while said < spec.seconds or any(n not in {line.speaker for line in lines} for n in names):
        away = bool(spec.absent) and 0.2 * spec.seconds < said < 0.8 * spec.seconds
        present = [n for n in names if not (away and n == spec.absent)]
        if spec.absent and not lines:
            speaker = spec.absent  # the speaker who will be away opens the meeting
        elif spec.absent and not returned and said >= 0.8 * spec.seconds and current != spec.absent:
            speaker, returned = spec.absent, True  # back after a long absence
        else:
            speaker = rng.choice([n for n in present if n != current] or present)
        short = bool(lines) and rng.random() < spec.interjections
        if short:
            text = rng.choice(INTERJECTIONS)
        else:  # a turn of 1-20 s: a target length, filled with sentences
            target = rng.choice((rng.uniform(1.5, 5), rng.uniform(5, 12), rng.uniform(12, 19)))
            chosen = [rng.choice(SENTENCES)]
            while sum(len(s.split()) for s in chosen) / WORDS_PER_S < target - 2:
                chosen.append(rng.choice(SENTENCES))
            text = " ".join(chosen)
        gap = rng.uniform(*spec.gaps)
        if pending and len(lines) >= 3 and not short and lines[-1].text not in INTERJECTIONS and rng.random() < 0.8:
            gap, pending = -rng.uniform(0.5, 1.5), pending - 1
        lines.append(Line(speaker, text, round(gap, 2)))
        said += len(text.split()) / WORDS_PER_S + max(gap, 0)
        current = speaker
    if lines:
        lines[0] = Line(lines[0].speaker, lines[0].text, 0.0)
    return lines


def fingerprint(spec: Spec, lines: list[Line]) -> str:
    return hashlib.sha256(json.dumps([asdict(spec), [asdict(x) for x in lines]]).encode()).hexdigest()[:16]


def build(spec: Spec, out: Path) -> dict:
    lines = script(spec)
    wav, rttm, meta = out / f"{spec.name}.wav", out / f"{spec.name}.rttm", out / f"{spec.name}.json"
    key = fingerprint(spec, lines)
    if meta.is_file() and wav.is_file() and json.loads(meta.read_text()).get("fingerprint") == key:
        return json.loads(meta.read_text())
    meeting = assemble(list(spec.voices), lines)
    write_wav(wav.with_suffix(".partial.wav"), meeting.audio)
    wav.with_suffix(".partial.wav").rename(wav)
    write_rttm(rttm, spec.name, meeting.turns)
    entry = {
        "name": spec.name, "wav": str(wav), "rttm": str(rttm), "fingerprint": key, "note": spec.note,
        "duration": round(meeting.duration, 3), "speakers": meeting.speakers,
        "voices": [asdict(x) for x in spec.voices],
        "gapless": spec.gaps == (0, 0), "overlaps": spec.overlaps,
        "lines": [{"start": round(a, 3), "end": round(b, 3), "speaker": s, "text": t} for a, b, s, t in meeting.lines],
        "turns": [[round(a, 3), round(b, 3), s] for a, b, s in meeting.turns],
        "words": meeting.words,
    }
    meta.write_text(json.dumps(entry, ensure_ascii=False, indent=1))
    return entry


def loop_to(src: Path, dst: Path, seconds: float) -> Path:
    """`src` repeated until `seconds`, written a block at a time (a 3-hour file is never held in memory)."""
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    with wave.open(str(src)) as r:
        pcm = r.readframes(r.getnframes())
    total = int(seconds * RATE) * 2
    partial = dst.with_suffix(".partial.wav")
    with wave.open(str(partial), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        written = 0
        while written < total:
            block = pcm[: total - written]
            w.writeframes(block)
            written += len(block)
    partial.rename(dst)
    return dst


def generate(out: Path, cost: bool = False, names: list[str] | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    entries = [build(spec, out) for spec in MEETINGS if not names or spec.name in names]
    (out / "corpus.json").write_text(json.dumps(entries, ensure_ascii=False, indent=1))
    if cost:
        entry = build(COST, out)
        loop_to(Path(entry["wav"]), out / "cost_3h.wav", COST_3H_S)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cost", action="store_true", help="also the 10-minute and 3-hour meetings")
    parser.add_argument("--meetings", type=lambda s: s.split(","), help="only these meetings")
    args = parser.parse_args()
    for entry in generate(args.out, args.cost, args.meetings):
        print(f"{entry['name']}: {entry['duration']:.0f} s, {len(entry['speakers'])} speakers, "
              f"{len(entry['lines'])} lines, {len(entry['words'])} words")


if __name__ == "__main__":
    main()
