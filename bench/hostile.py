"""Hostile audio files through the service: status, wall time, CPU time and peak memory per file.

The corpus of service/tests/hostile_corpus.py (the tests' own), each file sent once to the service running
as a real process with its default settings and the `base` model (POST /v1/audio/transcriptions), after a
warm-up with 12 s of speech. Per file: the status and error code, the wall time of the request, the server's
CPU time, and its peak resident memory over its resident size just before the file (VmHWM reset per file).
Goal: every file answered within 5 s and +100 MB. `--service-src` runs another checkout's service (main's,
for a before). Run: .venv/bin/python bench/hostile.py (the service's dev virtualenv has all it needs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import requests

from bench import (
    CACHE,
    HERE,
    MB,
    ROOT,
    ServerProcess,
    Variant,
    log,
    process_cpu_seconds,
    reset_peak,
    status_bytes,
)

sys.path[:0] = [str(ROOT / "service" / "tests"), str(ROOT / "service" / "src")]
from hostile_corpus import NAMES, Corpus  # noqa: E402 - the tests' corpus, found through the path above

KEY = "bench-hostile-key-0123456789ab"
GOAL_S = 5.0
GOAL_MB = 100


def send(server: ServerProcess, path: Path, timeout: float) -> dict:
    rss_before = status_bytes(server.pid, "VmRSS")
    reset_peak(server.pid)
    cpu_before = process_cpu_seconds(server.pid)
    began = time.monotonic()
    try:
        with open(path, "rb") as f:
            response = requests.post(server.url + "/v1/audio/transcriptions", files={"file": (path.name, f)},
                                     data={"language": "fr"}, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=timeout)
        status = response.status_code
        code = response.json().get("error", {}).get("code", "") if status != 200 else ""
    except requests.Timeout:
        status, code = 0, f"no answer in {timeout:.0f} s"
    seconds = time.monotonic() - began
    cpu = process_cpu_seconds(server.pid) - cpu_before
    peak = status_bytes(server.pid, "VmHWM") - rss_before
    return {"file": path.name, "bytes": path.stat().st_size, "status": status, "code": code,
            "seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "peak_delta_mb": round(peak / MB, 1),
            "ok": 0 < status < 500 and seconds <= GOAL_S and peak <= GOAL_MB * MB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=Path(os.environ.get("PILOTYS_WHISPER_ASSETS")
                                                            or CACHE / "assets"))
    parser.add_argument("--service-src", type=Path, default=ROOT / "service" / "src",
                        help="the service's source to run (default: this checkout's)")
    parser.add_argument("--files", default=",".join(NAMES), help="comma-separated corpus names")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for one answer")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.device = "cpu"

    started = datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    work = CACHE / "bench" / "hostile"
    work.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(work, args.assets / "audio" / "fr_meeting.wav")
    files = [corpus(name) for name in args.files.split(",")]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(Variant("ours", "pilotys_whisper defaults", {"WHISPER_API_KEY": KEY}), args,
                           args.results_dir / f"{stamp}-hostile-server.log")
    server.env["PYTHONPATH"] = str(args.service_src)
    results = []
    load_before = os.getloadavg()[0]
    try:
        log(f"[ours] ready in {server.start():.1f} s ({args.service_src})")
        send(server, corpus.speech_wav(), args.timeout)  # warm-up: the first request's allocations
        for path in files:
            result = send(server, path, args.timeout)
            log(f"  {result['file']}: HTTP {result['status']} {result['code']} in {result['seconds']:.2f} s, "
                f"{result['cpu_s']:.2f} s of CPU, {result['peak_delta_mb']:+.0f} MB")
            results.append(result)
    finally:
        server.stop()

    lines = [f"# Hostile files {started.isoformat(timespec='seconds')}", "",
             f"service: `{args.service_src}`; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
             f"after, on {os.cpu_count()} CPUs", "",
             "| file | size | status | error code | wall (s) | server CPU (s) | peak over RSS before (MB) | goal |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['file']} | {r['bytes'] / 1024:.0f} KB | {r['status']} | {r['code']} | {r['seconds']:.2f} | "
                     f"{r['cpu_s']:.2f} | {r['peak_delta_mb']:+.0f} | {'PASS' if r['ok'] else 'MISS'} |")
    ok = all(r["ok"] for r in results)
    lines += ["", f"- **{'PASS' if ok else 'MISS'}** every file answered with a status below 500 within "
              f"{GOAL_S:.0f} s and +{GOAL_MB} MB ({sum(r['ok'] for r in results)}/{len(results)})"]
    report = "\n".join(lines) + "\n"
    path = args.results_dir / f"{stamp}-hostile.md"
    path.write_text(report)
    path.with_suffix(".json").write_text(json.dumps({"started": stamp, "service_src": str(args.service_src),
                                                     "results": results}, indent=2))
    print(report)
    log(f"bench: written {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
