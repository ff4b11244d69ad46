"""The stress corpus through each server: real-time factor, WER, invented words and repetition loops per file,
and their median, p90 and worst case per class (bench/README.md).

Run it through `bench/run --stress` (which builds what bench.py needs); it generates the corpus itself
(bench/stress_corpus.py). Servers and measurements are bench.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
from datetime import datetime
from pathlib import Path

import jiwer

import bench
import stress_corpus
from bench import CACHE, GOAL_PEAK_MB, GOAL_WER_MARGIN, HERE, ROOT, VARIANTS, AudioFile, log, normalize

sys.path.insert(0, str(ROOT / "service" / "src"))
from pilotys_whisper.repetition import find_loops  # noqa: E402 - the service's own detector, not a copy

ENGLISH = ("lecture_en_60s", "news_en_169s")  # the real recordings bench.py already uses
GOAL_WORST_OVER_MEDIAN = 3.0
GOAL_FRENCH_MEDIAN_RTF = 0.05


def load_corpus(args) -> tuple[list[AudioFile], dict[str, str]]:
    entries = json.loads((args.corpus / "corpus.json").read_text())
    if args.classes:
        entries = [e for e in entries if e["kind"] in args.classes]
    files = [AudioFile(e["name"], Path(e["path"]), e["language"], Path(e["reference"])) for e in entries]
    kinds = {e["name"]: e["kind"] for e in entries}
    if not args.classes or "english" in args.classes:
        catalogue = bench.audio_files(args.assets, args.work_dir)
        for name in ENGLISH:
            files.append(catalogue[name])
            kinds[name] = "english"
    return files, kinds


def inserted_words(reference: str, hypothesis: str) -> int:
    """Words in the output that stand for nothing said (the alignment's insertions)."""
    ref, hyp = " ".join(normalize(reference)), " ".join(normalize(hypothesis))
    if not ref or not hyp:
        return len(hyp.split())
    return jiwer.process_words(ref, hyp).insertions


def per_file(measured: dict, audio: AudioFile) -> dict:
    reference = audio.reference.read_text()
    texts = [r["text"] for r in measured["runs"]]
    return {
        "rtf": measured["rtf_min"],  # best of the requests: the machine is shared, its noise only slows
        "wer": measured["wer"],
        "invented": max(inserted_words(reference, t) for t in texts),
        "loops": max(len(find_loops(t)) for t in texts),
        "peak_mb": measured["tree_peak_mb"],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary(rows: dict[str, dict], names: list[str]) -> dict:
    rtfs = [rows[n]["rtf"] for n in names if n in rows]
    if not rtfs:
        return {}
    worst = max((n for n in names if n in rows), key=lambda n: rows[n]["rtf"])
    return {"files": len(rtfs), "rtf_median": statistics.median(rtfs), "rtf_p90": percentile(rtfs, 0.9),
            "rtf_worst": rows[worst]["rtf"], "worst_file": worst,
            "wer_mean": statistics.mean(rows[n]["wer"] for n in names if n in rows),
            "invented": sum(rows[n]["invented"] for n in names if n in rows),
            "loops": sum(rows[n]["loops"] for n in names if n in rows),
            "peak_mb": max(rows[n]["peak_mb"] for n in names if n in rows)}


def goals(tables: dict[str, dict[str, dict]], kinds: dict[str, str]) -> list[tuple[str, str, str]]:
    ours, original = tables.get("ours", {}), tables.get("original", {})
    out = []
    if not ours:
        return [("n/a", "goals", "ours not measured")]
    every = summary(ours, list(ours))
    ok = every["rtf_worst"] <= GOAL_WORST_OVER_MEDIAN * every["rtf_median"]
    out.append(("PASS" if ok else "MISS", f"worst RTF <= {GOAL_WORST_OVER_MEDIAN:.0f}x the corpus median",
                f"worst {every['rtf_worst']:.3f} ({every['worst_file']}), median {every['rtf_median']:.3f}"))
    if original:
        slower = [f"{n} {m['rtf']:.3f} vs {original[n]['rtf']:.3f}" for n, m in ours.items()
                  if n in original and m["rtf"] > original[n]["rtf"]]
        out.append(("MISS" if slower else "PASS", "never slower than the original on any file",
                    ", ".join(slower) or f"{len(ours)} files"))
    french = [n for n in ours if kinds[n] != "english"]
    if french:
        median = statistics.median(ours[n]["rtf"] for n in french)
        out.append(("PASS" if median <= GOAL_FRENCH_MEDIAN_RTF else "MISS",
                    f"French median RTF <= {GOAL_FRENCH_MEDIAN_RTF}", f"{median:.3f} over {len(french)} files"))
    if original:
        cells, ok = [], True
        for kind in sorted(set(kinds.values())):
            names = [n for n in ours if kinds[n] == kind and n in original]
            if names:
                w, o = (statistics.mean(t[n]["wer"] for n in names) for t in (ours, original))
                ok &= w <= o + GOAL_WER_MARGIN + 1e-9
                cells.append(f"{kind} {w:.1%} vs {o:.1%}")
        out.append(("PASS" if ok else "MISS", f"WER <= original + {GOAL_WER_MARGIN * 100:.0f} point per class",
                    ", ".join(cells)))
    out.append(("PASS" if every["loops"] == 0 else "MISS", "0 repetition loops", f"{every['loops']} in ours"))
    out.append(("PASS" if every["peak_mb"] <= GOAL_PEAK_MB else "MISS", f"peak <= {GOAL_PEAK_MB} MB",
                f"{every['peak_mb']:.0f} MB"))
    return out


def render(meta: dict, tables: dict[str, dict[str, dict]], kinds: dict[str, str], goal_lines) -> str:
    servers = list(tables)
    lines = [f"# Stress corpus {meta['started']}", "", f"Command: `{meta['command']}`; commit "
             f"{meta['environment']['commit']}; {meta['environment']['cpu']}, {meta['environment']['cpus']} CPUs.",
             "", "RTF: the best of the requests for each file. Invented: words inserted against the reference. "
             "Loops: repetition loops (pilotys_whisper.repetition).", "", "## Per class", "",
             "| class | server | files | RTF median | p90 | worst | mean WER | invented | loops | peak MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    classes = [*sorted(set(kinds.values())), "all"]
    for kind in classes:
        for server in servers:
            rows = tables[server]
            s = summary(rows, [n for n in rows if kind == "all" or kinds[n] == kind])
            if s:
                lines.append(f"| {kind} | {server} | {s['files']} | {s['rtf_median']:.3f} | {s['rtf_p90']:.3f} | "
                             f"{s['rtf_worst']:.3f} ({s['worst_file']}) | {s['wer_mean']:.1%} | {s['invented']} | "
                             f"{s['loops']} | {s['peak_mb']:.0f} |")
    lines += ["", "## Per file", "", "| file | class | " + " | ".join(f"{s} RTF | {s} WER | {s} inv. | {s} loops"
                                                                   for s in servers) + " |",
              "| --- | --- |" + " ---: | ---: | ---: | ---: |" * len(servers)]
    for name in kinds:
        cells = []
        for server in servers:
            m = tables[server].get(name)
            cells.append(" – | – | – | –" if m is None else
                         f" {m['rtf']:.3f} | {m['wer']:.1%} | {m['invented']} | {m['loops']}")
        lines.append(f"| {name} | {kinds[name]} |" + " |".join(cells) + " |")
    lines += ["", "## Goals", "", *[f"- **{s}** {g}: {n}" for s, g, n in goal_lines]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CACHE / "bench" / "stress", help="where the corpus is built")
    parser.add_argument("--size", choices=["full", "small", "smoke"], default="small", help="stress_corpus.py --size")
    parser.add_argument("--servers", default="original,ours")
    parser.add_argument("--classes", help="comma-separated: voice,noise,telephone,clipping,bed,silences,repeats,"
                                          "english (default: all)")
    parser.add_argument("--repeat", type=int, default=2, help="requests per file (the best is kept)")
    parser.add_argument("--assets", type=Path, default=CACHE / "assets")
    parser.add_argument("--work-dir", type=Path, default=CACHE / "bench")
    parser.add_argument("--openai-model", type=Path)
    parser.add_argument("--ggml-model", type=Path, help="for the whisper.cpp peers (bench.py's --ggml-model)")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.device = "cpu"
    args.openai_model = args.openai_model or args.assets / "models" / "base-openai.pt"
    args.ggml_model = args.ggml_model or args.assets / "models" / "ggml-base.bin"
    args.classes = args.classes.split(",") if args.classes else None
    args.server_names = args.servers.split(",")
    unknown = [n for n in args.server_names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown server {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Stopped from outside (Ctrl-C, kill): unwind, so that the server being measured is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stress_corpus.main(["--out", str(args.corpus), "--size", args.size])
    files, kinds = load_corpus(args)
    started = datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    log_dir = args.results_dir / f"{stamp}-stress-logs"
    log_dir.mkdir(parents=True)
    durations = {a.name: bench.duration_s(a.path) for a in files}
    log(f"stress: {len(args.server_names)} servers x {len(files)} files ({sum(durations.values()) / 60:.1f} min)")
    tables, raw = {}, {}
    for name in args.server_names:
        result = bench.run_variant(VARIANTS[name], files, durations, args, log_dir)
        raw[name] = result
        tables[name] = {a.name: per_file(result["files"][a.name], a) for a in files if a.name in result["files"]}
    meta = {"started": started.isoformat(timespec="seconds"), "command": " ".join(["bench/stress.py", *sys.argv[1:]]),
            "environment": bench.environment(args)}
    goal_lines = goals(tables, kinds)
    report = render(meta, tables, kinds, goal_lines)
    md = args.results_dir / f"{stamp}-stress.md"
    md.write_text(report)
    md.with_suffix(".json").write_text(json.dumps({**meta, "kinds": kinds, "tables": tables, "results": raw,
                                                   "goals": goal_lines}, indent=1, ensure_ascii=False) + "\n")
    print(report)
    print(f"stress: written {md}")
    return 1 if any(r["errors"] for r in raw.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
