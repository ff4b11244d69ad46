"""Diarization quality and cost (issue 15) on the generated corpus of bench/diar_corpus.py (bench/README.md).

Quality, per meeting: the service's engine transcribes with word timestamps, the diarizer finds the turns
(`pilotys_whisper.diarization`), `attribute()` gives each segment its speaker. Scored against the reference:
- DER with pyannote.metrics, without a collar and with NIST's collar of 0.25 s each side of every reference
  boundary (pyannote's `collar=0.5`: its collar is the whole width), overlap scored; its parts (missed speech,
  false alarm, confusion);
- the speaker count found against the true one;
- the word-level speaker attribution error: the transcript's words aligned on the reference words (jiwer), and
  of the words found identical on both sides, the share whose speaker is wrong after the speaker mapping that
  makes the most right (Hungarian); also by time (each word's middle against the reference speakers talking).

Cost (`--cost`): on a 10-minute meeting, the transcription alone (the service's default options) and
transcription with word timestamps + diarization + attribution as the service runs them (the speech regions
embedded in the model's thread as the model takes them, then the clustering), each in a fresh process: CPU seconds
(user + sys), wall seconds, and memory (the peak over the resident size just before each phase, VmHWM reset
per phase); then diarization alone on the same meeting looped to 3 hours. Goals: +15 % processing time,
+120 MB peak, the 3-hour meeting within the same memory.

Run it through `bench/run --diarization` (the benchmark's virtualenv has pyannote.metrics); `--service-src`
runs another checkout's service; `--worker` is the child process this script starts for each measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("PILOTYS_WHISPER_CACHE") or Path.home() / ".cache" / "pilotys-whisper")
MB = 1024 * 1024
SERVICE_SRC = Path(os.environ.get("DIARIZATION_SERVICE_SRC") or ROOT / "service" / "src")  # set by --service-src
sys.path[:0] = [str(HERE), str(SERVICE_SRC), str(ROOT / "service" / "tests")]
import diar_corpus  # noqa: E402 - beside this file

from speakers import words_of  # noqa: E402 - the corpus's own word splitting, for both sides

COLLARS = {"none": 0.0, "0.25": 0.5}  # NIST's ±0.25 s is pyannote's collar=0.5 (it takes the whole width)
GOAL_DER = {"0.25": 0.05, "none": 0.10}
GOAL_COUNT_SHARE = 7 / 8
GOAL_WORDS_WRONG = 0.03
GOAL_TIME_SHARE = 0.15
GOAL_ADDED_MB = 120


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- scoring ---------------------------------------------------------------------------------------------------

def annotation(turns, uri: str):
    from pyannote.core import Annotation, Segment

    out = Annotation(uri=uri)
    for i, (start, end, speaker) in enumerate(turns):
        if end > start:
            out[Segment(start, end), i] = str(speaker)
    return out


def der(reference_turns, hypothesis_turns, collar: float, duration: float, uri: str = "meeting") -> dict:
    """pyannote.metrics' DER and its parts (seconds) over the whole recording (0 to `duration`), overlap scored,
    `collar` as pyannote takes it (the collar's whole width)."""
    from pyannote.core import Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    metric = DiarizationErrorRate(collar=collar, skip_overlap=False)
    parts = metric(annotation(reference_turns, uri), annotation(hypothesis_turns, uri),
                   uem=Timeline([Segment(0, duration)], uri=uri), detailed=True)
    return {"der": parts["diarization error rate"], "total": parts["total"], "missed": parts["missed detection"],
            "false_alarm": parts["false alarm"], "confusion": parts["confusion"]}


def best_mapping(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The hypothesis-to-reference speaker mapping that makes the most pairs (reference, hypothesis) agree."""
    from scipy.optimize import linear_sum_assignment

    refs = sorted({r for r, _ in pairs})
    hyps = sorted({h for _, h in pairs})
    counts = np.zeros((len(refs), len(hyps)))
    for r, h in pairs:
        counts[refs.index(r), hyps.index(h)] += 1
    rows, cols = linear_sum_assignment(-counts)
    return {hyps[c]: refs[r] for r, c in zip(rows, cols, strict=True)}


def words_wrong(reference_words, hypothesis_words) -> dict:
    """Share of the transcript's words given to the wrong speaker, after the best speaker mapping.

    `reference_words`: (word, speaker) in spoken order; `hypothesis_words`: (text, speaker) in transcript order,
    each text split as the reference is. Only the words the alignment (jiwer) finds identical on both sides are
    scored: on synthetic voices the transcript misses many words, and a substitution can pair a word with one
    of the next turn's (measured: on duo_mf, 11 of 12 "wrong" words among 455 matches and substitutions were
    such pairs, 1 of 220 exact matches)."""
    import jiwer

    ref = list(reference_words)
    hyp = [(w, s) for text, s in hypothesis_words for w in words_of(text)]
    if not ref or not hyp:
        return {"wrong": 1.0 if ref else 0.0, "pairs": 0, "reference_words": len(ref), "transcript_words": len(hyp)}
    out = jiwer.process_words(" ".join(w for w, _ in ref), " ".join(w for w, _ in hyp))
    pairs = []
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            hyp_span = range(chunk.hyp_start_idx, chunk.hyp_end_idx)
            for i, j in zip(range(chunk.ref_start_idx, chunk.ref_end_idx), hyp_span, strict=True):
                pairs.append((ref[i][1], str(hyp[j][1])))
    mapping = best_mapping(pairs) if pairs else {}
    wrong = sum(mapping.get(h) != r for r, h in pairs)
    return {"wrong": wrong / len(pairs) if pairs else 1.0, "pairs": len(pairs), "reference_words": len(ref),
            "transcript_words": len(hyp), "wer": out.wer}


def words_wrong_by_time(reference_turns, timed_words) -> dict:
    """Share of the transcript's words (start, end, speaker) whose middle falls in no reference turn of the
    speaker they were given, after the best mapping; words in no reference turn at all are left out."""
    talking = []
    for start, end, speaker in timed_words:
        middle = (start + end) / 2
        who = {s for a, b, s in reference_turns if a <= middle <= b}
        if who:
            talking.append((who, str(speaker)))
    pairs = [(r, h) for who, h in talking for r in sorted(who)]
    mapping = best_mapping(pairs) if pairs else {}
    wrong = sum(mapping.get(h) not in who for who, h in talking)
    return {"wrong": wrong / len(talking) if talking else 1.0, "words": len(talking)}


# --- the measured process ----------------------------------------------------------------------------------------

def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Phase:
    """CPU seconds, wall seconds and peak memory over the resident size at its start, of one phase."""

    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self):
        reset_peak()
        self.rss = status_kb("VmRSS")
        self.cpu = self._cpu()
        self.wall = time.monotonic()
        return self

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def __exit__(self, *exc):
        self.record[self.name] = {"cpu_s": round(self._cpu() - self.cpu, 2),
                                  "wall_s": round(time.monotonic() - self.wall, 2),
                                  "rss_before_mb": round(self.rss / 1024, 1),
                                  "peak_mb": round(status_kb("VmHWM") / 1024, 1),
                                  "added_mb": round((status_kb("VmHWM") - self.rss) / 1024, 1)}


def worker(mode: str, wav: Path, out: Path, model: Path, num_speakers: int | None, language: str = "fr") -> None:
    """One measurement in this fresh process: `asr` (default options), `both` (words + diarization) or
    `diarize` (the diarizer alone)."""
    record: dict = {"mode": mode, "wav": str(wav)}
    embedder = None  # both: the diarizer's SpeechStream, fed by the engine
    if mode in ("asr", "both"):
        from pilotys_whisper.engines import TranscribeOptions
        from pilotys_whisper.engines.faster import FasterWhisperEngine
        from pilotys_whisper.settings import Settings

        engine = FasterWhisperEngine(Settings.from_env({"WHISPER_MODEL": str(model)}))
        with Phase(record, "load_asr"):
            engine.load()
        if mode == "both":  # as the service does it (speakers.transcribe): regions embedded during the transcription
            from pilotys_whisper.diarization import Diarizer

            with Phase(record, "load_diarizer"):
                diarizer = Diarizer.load()
            embedder = diarizer.stream()
        with Phase(record, "asr"):
            transcription = engine.transcribe(str(wav), TranscribeOptions(language=language,
                                                                          word_timestamps=mode == "both"),
                                              on_speech=embedder.add if embedder else None)
        record["transcript_words"] = len(transcription.text.split())
    if mode == "diarize":
        # The service's diarizer takes the engine's speech regions (one VAD pass per request): alone, the VAD
        # runs first, as the engine runs it, in a phase of its own that is the engine's cost, not diarization's.
        from faster_whisper.vad import get_vad_model

        from pilotys_whisper.audio import PcmStream
        from pilotys_whisper.engines import SpeechRegions
        from pilotys_whisper.engines.faster import BLOCK_S, SPEECH_PAD_MS, speech_regions, speech_vad_options

        get_vad_model()
        with Phase(record, "vad"), PcmStream(str(wav)) as stream:
            spans = tuple((r.start / 16000, (r.start + r.audio.shape[0]) / 16000)
                          for r in speech_regions(stream.blocks(BLOCK_S), speech_vad_options()))
        speech = SpeechRegions(spans=spans, pad_s=SPEECH_PAD_MS / 1000)
    if mode in ("both", "diarize"):
        from pilotys_whisper.diarization import Diarizer, attribute

        if mode == "diarize":
            with Phase(record, "load_diarizer"):
                diarizer = Diarizer.load()
        with Phase(record, "diarize"):  # both: the embeddings are done with the transcription, the clustering left
            if embedder is not None:
                found = diarizer.diarize_stream(embedder, num_speakers=num_speakers)
            else:
                found = diarizer.diarize(str(wav), speech=list(speech.spans), speech_pad_s=speech.pad_s,
                                         num_speakers=num_speakers)
        record["turns"] = [[t.start, t.end, str(t.speaker)] for t in found.turns]
        record["speakers"] = [str(s) for s in found.speakers]
        if mode == "both":
            with Phase(record, "attribute"):
                segments = attribute(transcription.segments, found)
            record["segments"] = [{"start": s.start, "end": s.end, "text": s.text, "speaker": str(s.speaker),
                                   "words": [[w.start, w.end, w.word] for w in (s.words or [])]}
                                  for s in segments]
    # The process's peak: the highest of its phases' (each phase resets VmHWM, and ru_maxrss follows the reset).
    record["process_peak_mb"] = max(v["peak_mb"] for v in record.values() if isinstance(v, dict))
    out.write_text(json.dumps(record, ensure_ascii=False))


def measure(mode: str, wav: Path, args, tag: str, num_speakers: int | None = None, language: str = "fr") -> dict:
    out = args.work / f"{tag}.{mode}.json"
    command = [sys.executable, __file__, "--worker", mode, "--wav", str(wav), "--out", str(out),
               "--model", str(args.assets / "models" / "base"), "--language", language]
    if num_speakers:
        command += ["--num-speakers", str(num_speakers)]
    began = time.monotonic()
    subprocess.run(command, check=True)
    record = json.loads(out.read_text())
    record["process_wall_s"] = round(time.monotonic() - began, 1)
    return record


# --- the report --------------------------------------------------------------------------------------------------

def score(entry: dict, record: dict) -> dict:
    turns = [tuple(t) for t in entry["turns"]]
    found = [tuple(t) for t in record["turns"]]
    row = {"name": entry["name"], "duration": entry["duration"], "true": len(entry["speakers"]),
           "found": len(record["speakers"]), "note": entry.get("note", "")}
    for label, collar in COLLARS.items():
        row[f"der_{label}"] = der(turns, found, collar, entry["duration"], entry["name"])
    transcript = [(s["text"], s["speaker"]) for s in record["segments"]]
    row["words"] = words_wrong(entry["words"], transcript)
    timed = [(w[0], w[1], s["speaker"]) for s in record["segments"] for w in s["words"]]
    row["words_by_time"] = words_wrong_by_time(turns, timed)
    row["diarize_cpu_s"] = record["diarize"]["cpu_s"]
    row["asr_cpu_s"] = record["asr"]["cpu_s"]
    return row


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def report(rows: list[dict], cost: dict, extra: dict) -> str:
    lines = ["# Diarization benchmark", "", f"{datetime.now():%Y-%m-%d %H:%M}, load average "
             f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs.", ""]
    if rows:
        lines += ["| meeting | length | speakers true / found | DER ±0.25 s | DER no collar | missed / FA / confusion "
                  "(no collar) | words wrong (matched words) | by time | diarize CPU s / ASR CPU s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            d = r["der_none"]
            parts = " / ".join(pct(d[k] / d["total"]) for k in ("missed", "false_alarm", "confusion"))
            lines.append(f"| {r['name']} | {r['duration']:.0f} s | {r['true']} / {r['found']} | "
                         f"{pct(r['der_0.25']['der'])} | {pct(d['der'])} | {parts} | {pct(r['words']['wrong'])} "
                         f"({r['words']['pairs']}) | {pct(r['words_by_time']['wrong'])} | "
                         f"{r['diarize_cpu_s']:.1f} / {r['asr_cpu_s']:.1f} |")
        total = {k: sum(r[f"der_{k}"]["total"] for r in rows) for k in COLLARS}
        errors = {k: sum(r[f"der_{k}"]["der"] * r[f"der_{k}"]["total"] for r in rows) for k in COLLARS}
        overall = {k: errors[k] / total[k] for k in COLLARS}
        right = sum(r["true"] == r["found"] for r in rows)
        pairs = sum(r["words"]["pairs"] for r in rows)
        wrong = sum(r["words"]["wrong"] * r["words"]["pairs"] for r in rows) / max(pairs, 1)
        verdict = {
            "DER ±0.25 s": (overall["0.25"] <= GOAL_DER["0.25"], f"{pct(overall['0.25'])} (goal ≤ 5 %)"),
            "DER no collar": (overall["none"] <= GOAL_DER["none"], f"{pct(overall['none'])} (goal ≤ 10 %)"),
            "speaker count": (right >= GOAL_COUNT_SHARE * len(rows), f"{right} of {len(rows)} (goal ≥ 7 of 8)"),
            "words wrong": (wrong <= GOAL_WORDS_WRONG, f"{pct(wrong)} of {pairs} matched words (goal ≤ 3 %)"),
        }
        lines += ["", "Over the corpus (DER weighted by scored time):", ""]
        lines += [f"- {'PASS' if ok else 'MISS'} {k}: {text}" for k, (ok, text) in verdict.items()]
    if cost:
        lines += ["", "## Cost", "", "```json", json.dumps(cost, indent=1), "```"]
    if extra:
        lines += ["", "## Real recording", "", "```json", json.dumps(extra, indent=1, ensure_ascii=False), "```"]
    return "\n".join(lines) + "\n"


def cost_figures(args) -> dict:
    entry = diar_corpus.build(diar_corpus.COST, args.corpus)
    long = diar_corpus.loop_to(Path(entry["wav"]), args.corpus / "cost_3h.wav", diar_corpus.COST_3H_S)
    wav = Path(entry["wav"])
    log(f"cost: {wav.name} ({entry['duration']:.0f} s), transcription alone")
    plain = measure("asr", wav, args, "cost_10min")
    log("cost: transcription with words + diarization")
    both = measure("both", wav, args, "cost_10min")
    log(f"cost: diarization alone on {long.name}")
    alone_10 = measure("diarize", wav, args, "cost_10min")
    alone_3h = measure("diarize", long, args, "cost_3h")
    plain_cpu, plain_wall = plain["asr"]["cpu_s"], plain["asr"]["wall_s"]
    with_cpu = both["asr"]["cpu_s"] + both["diarize"]["cpu_s"] + both["attribute"]["cpu_s"]
    with_wall = both["asr"]["wall_s"] + both["diarize"]["wall_s"] + both["attribute"]["wall_s"]
    return {
        "meeting_s": entry["duration"], "speakers_true_found": [len(entry["speakers"]), len(both["speakers"])],
        "without": {"cpu_s": plain_cpu, "wall_s": plain_wall, "process_peak_mb": plain["process_peak_mb"]},
        "with": {"cpu_s": with_cpu, "wall_s": with_wall, "process_peak_mb": both["process_peak_mb"],
                 "asr_with_words_cpu_s": both["asr"]["cpu_s"], "diarize_cpu_s": both["diarize"]["cpu_s"],
                 "diarize_wall_s": both["diarize"]["wall_s"], "attribute_cpu_s": both["attribute"]["cpu_s"]},
        "added_cpu_share": round(with_cpu / plain_cpu - 1, 3), "added_wall_share": round(with_wall / plain_wall - 1, 3),
        "added_process_peak_mb": round(both["process_peak_mb"] - plain["process_peak_mb"], 1),
        "diarize_alone_10min": {k: alone_10[k] for k in ("vad", "load_diarizer", "diarize", "process_peak_mb")},
        "diarize_alone_3h": {k: alone_3h[k] for k in ("vad", "load_diarizer", "diarize", "process_peak_mb")},
    }


def real_recording(args) -> dict:
    """The TV news (several voices, no reference of who speaks): what the diarizer finds, with the transcript."""
    wav = args.assets / "audio" / "news_en_169s.wav"
    record = measure("both", wav, args, "news_en_169s", language="en")
    talk: dict[str, float] = {}
    for a, b, s in record["turns"]:
        talk[s] = talk.get(s, 0.0) + b - a
    return {"file": wav.name, "speakers": record["speakers"], "talk_s": {k: round(v, 1) for k, v in talk.items()},
            "turns": [[round(a, 2), round(b, 2), s] for a, b, s in record["turns"]],
            "segments": [[round(s["start"], 1), round(s["end"], 1), s["speaker"], s["text"].strip()]
                         for s in record["segments"]],
            "diarize_cpu_s": record["diarize"]["cpu_s"], "asr_cpu_s": record["asr"]["cpu_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=CACHE / "assets")
    parser.add_argument("--work-dir", type=Path, default=CACHE / "bench")
    parser.add_argument("--meetings", type=lambda s: s.split(","), help="only these meetings of the corpus")
    parser.add_argument("--cost", action="store_true", help="also the cost on 10 minutes and 3 hours")
    parser.add_argument("--cost-only", action="store_true", help="only the cost")
    parser.add_argument("--real", action="store_true", help="also the TV news of the assets")
    parser.add_argument("--real-only", action="store_true", help="only the TV news")
    parser.add_argument("--service-src", type=Path, default=SERVICE_SRC,
                        help="run another checkout's service (its src directory)")
    parser.add_argument("--oracle-count", action="store_true", help="tell the diarizer the true speaker count")
    parser.add_argument("--num-speakers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--language", default="fr", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("asr", "both", "diarize"), help=argparse.SUPPRESS)
    parser.add_argument("--wav", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.wav, args.out, args.model, args.num_speakers, args.language)
        return
    os.environ["DIARIZATION_SERVICE_SRC"] = str(args.service_src.resolve())  # the workers' service
    args.corpus = args.work_dir / "diarization"
    args.work = args.corpus / "runs"
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if not (args.cost_only or args.real_only):
        entries = diar_corpus.generate(args.corpus, names=args.meetings)
        for entry in entries:
            log(f"{entry['name']}: {entry['duration']:.0f} s, {len(entry['speakers'])} speakers")
            record = measure("both", Path(entry["wav"]), args, entry["name"],
                             len(entry["speakers"]) if args.oracle_count else None)
            rows.append(score(entry, record))
            r = rows[-1]
            log(f"  found {r['found']}, DER ±0.25 s {pct(r['der_0.25']['der'])}, no collar {pct(r['der_none']['der'])}"
                f", words wrong {pct(r['words']['wrong'])}")
    cost = cost_figures(args) if args.cost or args.cost_only else {}
    extra = real_recording(args) if args.real or args.real_only else {}
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / f"{stamp}-diarization.json").write_text(json.dumps({"meetings": rows, "cost": cost, "real": extra},
                                                                  ensure_ascii=False, indent=1))
    text = report(rows, cost, extra)
    (results / f"{stamp}-diarization.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
