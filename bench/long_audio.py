"""Long meetings in bounded memory: a 3-hour recording through the jobs API against a 5-minute one.

Both are real speech (the benchmark's news and lecture recordings, looped) encoded as Opus in WebM, as
Chrome's MediaRecorder sends them. Each goes through `POST /v1/jobs` on our server with its default
settings; while the job runs, the resident memory of the server and its children (ffmpeg) is sampled and
the job's progress is polled. Goal: the 3-hour job's peak within 20 % of the 5-minute one's, and progress
that only moves forward, steadily. Run it through `bench/run --long-audio`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import requests

from bench import HERE, MB, ServerProcess, TreePeak, Variant, duration_s, environment, log, reset_peak, status_bytes

KEY = "bench-long-audio-key-0123456789"
GOAL_RATIO = 1.20
POLL_S = 2.0


def build(source: Path, seconds: int, target: Path) -> Path:
    """`seconds` of `source` looped, as 32 kbit/s Opus in WebM (about 14 MB an hour)."""
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    log(f"bench: building {target.name} ({seconds} s)")
    partial = target.with_suffix(".partial.webm")
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-stream_loop", "-1",
                    "-i", str(source), "-t", str(seconds), "-ac", "1", "-c:a", "libopus", "-b:a", "32k",
                    str(partial)], check=True)
    partial.rename(target)
    return target


def run_job(server: ServerProcess, audio: Path, seconds: float) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    reset_peak(server.pid)
    progress: list[tuple[float, float]] = []
    with TreePeak(server.pid) as tree:
        began = time.monotonic()
        with open(audio, "rb") as f:
            response = requests.post(server.url + "/v1/jobs", files={"file": (audio.name, f)},
                                     data={"language": "en"}, headers=headers, timeout=300)
        if response.status_code != 202:
            raise RuntimeError(f"submit: HTTP {response.status_code}: {response.text[:300]}")
        job = response.json()
        while job["status"] in ("queued", "running"):
            time.sleep(POLL_S)
            job = requests.get(server.url + f"/v1/jobs/{job['id']}", headers=headers, timeout=30).json()
            progress.append((round(time.monotonic() - began, 1), float(job.get("progress") or 0.0)))
        elapsed = time.monotonic() - began
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
    text = requests.get(server.url + f"/v1/jobs/{job['id']}/result?format=text", headers=headers, timeout=60).text
    values = [p for _, p in progress]
    running = [(t, p) for t, p in progress if 0 < p < 1]
    # Steadiness: the longest time the progress stood still while the job ran.
    longest_stall, last_change = 0.0, running[0][0] if running else 0.0
    for (_t0, p0), (t1, p1) in zip(running, running[1:], strict=False):
        if p1 > p0:
            longest_stall, last_change = max(longest_stall, t1 - last_change), t1
    return {
        "file": audio.name,
        "duration_s": round(seconds, 1),
        "seconds": round(elapsed, 1),
        "rtf": round(elapsed / seconds, 4),
        "tree_peak_mb": round(tree.peak_bytes / MB, 1),
        "server_hwm_mb": round(status_bytes(server.pid, "VmHWM") / MB, 1),
        "words": len(text.split()),
        "progress_polls": len(progress),
        "progress_monotonic": all(b >= a for a, b in zip(values, values[1:], strict=False)),
        "progress_longest_stall_s": round(longest_stall, 1),
        "progress_samples": progress[:: max(1, len(progress) // 20)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--short-s", type=int, default=300)
    parser.add_argument("--long-s", type=int, default=3 * 3600)
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.device = "cpu"

    source = args.work_dir / "long_en_627s.wav"
    files = [build(source, args.short_s, args.work_dir / f"meeting_{args.short_s}s.webm"),
             build(source, args.long_s, args.work_dir / f"meeting_{args.long_s}s.webm")]
    started = datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    state = args.work_dir / f"long-audio-state-{stamp}"
    variant = Variant("ours", "pilotys_whisper defaults, jobs API",
                      {"WHISPER_STATE_DIR": str(state), "WHISPER_API_KEY": KEY, "WHISPER_MAX_UPLOAD_MB": "500",
                       "WHISPER_MAX_DURATION_S": str(args.long_s + 60)})
    server = ServerProcess(variant, args, args.results_dir / f"{stamp}-long-audio-server.log")
    results = []
    try:
        load_s = server.start()
        log(f"[ours] ready in {load_s:.1f} s")
        for audio in files:
            seconds = duration_s(audio)
            log(f"[ours] job {audio.name} ({seconds / 60:.0f} min)")
            result = run_job(server, audio, seconds)
            log(f"  {result['seconds']:.0f} s, RTF {result['rtf']:.3f}, tree peak {result['tree_peak_mb']:.0f} MB, "
                f"progress monotonic {result['progress_monotonic']}, longest stall "
                f"{result['progress_longest_stall_s']:.0f} s")
            results.append(result)
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(state)], check=False)

    short, long = results
    ratio = long["tree_peak_mb"] / short["tree_peak_mb"]
    ok = ratio <= GOAL_RATIO and all(r["progress_monotonic"] for r in results)
    lines = [
        f"# Long audio {started.isoformat(timespec='seconds')}", "",
        f"{json.dumps(environment(args)['versions'])}", "",
        "| recording | duration | wall (s) | RTF | tree peak (MB) | server VmHWM (MB) | words | progress "
        "monotonic | longest progress stall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['file']} | {r['duration_s'] / 60:.0f} min | {r['seconds']:.0f} | {r['rtf']:.3f} | "
                     f"{r['tree_peak_mb']:.0f} | {r['server_hwm_mb']:.0f} | {r['words']} | "
                     f"{r['progress_monotonic']} | {r['progress_longest_stall_s']:.0f} |")
    lines += ["", f"- **{'PASS' if ok else 'MISS'}** peak of the {long['duration_s'] / 3600:.0f}-hour job within "
              f"{(GOAL_RATIO - 1) * 100:.0f} % of the {short['duration_s'] / 60:.0f}-minute one's: ratio {ratio:.2f}, "
              f"progress polled every {POLL_S:.0f} s"]
    report = "\n".join(lines) + "\n"
    path = args.results_dir / f"{stamp}-long-audio.md"
    path.write_text(report)
    path.with_suffix(".json").write_text(json.dumps({"started": stamp, "ratio": ratio, "results": results}, indent=2))
    print(report)
    log(f"bench: written {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
