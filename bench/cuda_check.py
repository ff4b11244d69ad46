"""Our engine in-process on a GPU: the paths that differ from the CPU, and the settings worth choosing there.

Runs the 627 s recording with several batch/beam/thread settings (time, real-time factor, word-error rate),
word timestamps on a batch where part of the chunks hold no speech (their encoder output is taken apart),
and language detection on French. Needs the inputs bench/run builds (run `bench/run --device cuda` first);
usage: python bench/cuda_check.py [--device cuda] (with service/src on PYTHONPATH, as bench/run sets it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "service" / "src"))

from bench import CACHE, REFERENCES, word_error_rate  # noqa: E402
from pilotys_whisper.engines import TranscribeOptions  # noqa: E402
from pilotys_whisper.engines.faster import FasterWhisperEngine  # noqa: E402
from pilotys_whisper.settings import Settings  # noqa: E402

# (batch, beam, CPU threads; 0 is the service's default)
SETTINGS = ((16, 1, 0), (3, 2, 0), (3, 2, 2), (16, 2, 2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--assets", type=Path,
                        default=Path(os.environ.get("PILOTYS_WHISPER_ASSETS") or CACHE / "assets"))
    parser.add_argument("--work-dir", type=Path, default=CACHE / "bench")
    args = parser.parse_args()
    model, audio = args.assets / "models" / "base", args.assets / "audio"

    def engine(**env) -> FasterWhisperEngine:
        values = {"WHISPER_MODEL": str(model), "WHISPER_DEVICE": args.device, **{k: str(v) for k, v in env.items()}}
        loaded = FasterWhisperEngine(Settings.from_env(values))
        loaded.load()
        return loaded

    def run(loaded: FasterWhisperEngine, path: Path, label: str, reference: Path, **options):
        loaded.transcribe(str(path), TranscribeOptions(**options))  # warm-up
        began = time.perf_counter()
        result = loaded.transcribe(str(path), TranscribeOptions(**options))
        took = time.perf_counter() - began
        error = word_error_rate(reference.read_text(), result.text)
        print(f"{label}: {took:.2f} s for {result.duration:.0f} s, RTF {took / result.duration:.4f}, "
              f"language {result.language}, {len(result.segments)} segments, WER {error:.1%}", flush=True)
        return result

    for batch, beam, threads in SETTINGS:
        env = {"WHISPER_BATCH_SIZE": batch, "WHISPER_BEAM_SIZE": beam, "WHISPER_CPU_THREADS": threads}
        run(engine(**env), args.work_dir / "long_en_627s.wav",
            f"long_en_627s, batch {batch}, beam {beam}, CPU threads {threads or 'default'}",
            args.work_dir / "long_en_627s.txt", language="en")
    loaded = engine(WHISPER_BATCH_SIZE=3)
    result = run(loaded, audio / "lecture_then_noise_120s.wav", "word timestamps, lecture then noise",
                 REFERENCES / "lecture_en_60s.txt", language="en", word_timestamps=True)
    words = [w for s in result.segments for w in (s.words or [])]
    print(f"  {len(words)} words, the last ending at {max(w.end for w in words):.1f} s; "
          f"words after 61 s: {sum(1 for w in words if w.start > 61)}")
    run(loaded, audio / "fr_meeting.wav", "language detection, French", REFERENCES / "fr_meeting.txt", language=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
