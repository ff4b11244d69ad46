"""Throughput of transcription workers on one machine: audio-hours per hour for 1 and 2 workers, and how it scales.

Each worker is our service as a real process with its defaults, given its share of the machine's cores
(WHISPER_CPU_THREADS). A fixed batch of real recordings (the news, 169 s, sent REQUESTS times) is handed
out as a least-connections gateway would: each worker takes the next recording as soon as it is free.
Also measured: one process with WHISPER_CONCURRENCY=2 (two transcriptions at once in one process, one
model in memory). Run it through bench/run --throughput, which builds what it needs.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench import CACHE, HERE, MB, ServerProcess, Variant, duration_s, log, status_bytes

NEWS = "news_en_169s"


@dataclass(frozen=True)
class Layout:
    name: str
    workers: int
    env: dict[str, str]


def layouts(cores: int) -> list[Layout]:
    return [
        Layout("1 worker", 1, {"WHISPER_CPU_THREADS": str(cores)}),
        Layout("2 workers", 2, {"WHISPER_CPU_THREADS": str(max(1, cores // 2))}),
        Layout("1 worker, 2 at once", 1, {"WHISPER_CONCURRENCY": "2", "WHISPER_QUEUE_SIZE": "4"}),
    ]


def run_layout(layout: Layout, audio: Path, seconds: float, requests_total: int, args, log_dir: Path) -> dict:
    variant = Variant(f"throughput-{layout.name}", layout.name, layout.env)
    servers = [ServerProcess(variant, args, log_dir / f"{layout.name.replace(' ', '-').replace(',', '')}-{i}.log")
               for i in range(layout.workers)]
    try:
        for server in servers:
            server.start()
            server.transcribe(args.work_dir / "warmup_10s.wav", "en", timeout=300)
        work: queue.Queue = queue.Queue()
        for _ in range(requests_total):
            work.put(audio)
        errors: list[str] = []
        # One client per slot: a worker with WHISPER_CONCURRENCY=2 gets two at once.
        slots = [s for s in servers for _ in range(int(layout.env.get("WHISPER_CONCURRENCY", "1")))]

        def client(server: ServerProcess) -> None:
            while True:
                try:
                    path = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    server.transcribe(path, "en", timeout=1800)
                except Exception as exc:  # noqa: BLE001 - reported in the results
                    errors.append(f"{server.url}: {exc}")

        began = time.perf_counter()
        threads = [threading.Thread(target=client, args=(s,)) for s in slots]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        peak_mb = sum(status_bytes(s.pid, "VmHWM") for s in servers) / MB
    finally:
        for server in servers:
            server.stop()
    audio_s = seconds * requests_total
    result = {"layout": layout.name, "workers": layout.workers, "env": layout.env, "requests": requests_total,
              "audio_s": round(audio_s, 1), "wall_s": round(wall, 1),
              "audio_hours_per_hour": round(audio_s / wall, 2), "peak_mb_sum": round(peak_mb), "errors": errors}
    log(f"[{layout.name}] {requests_total} x {seconds:.0f} s in {wall:.1f} s: "
        f"{result['audio_hours_per_hour']:.1f} audio-hours per hour, servers' peaks {peak_mb:.0f} MB in all"
        + (f", {len(errors)} errors" if errors else ""))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6, help="recordings per layout (default 6)")
    parser.add_argument("--assets", type=Path,
                        default=Path(os.environ.get("PILOTYS_WHISPER_ASSETS") or CACHE / "assets"))
    parser.add_argument("--work-dir", type=Path, default=CACHE / "bench")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.device, args.openai_model = "cpu", None  # what ServerProcess reads
    cores = os.cpu_count() or 1
    audio = args.assets / "audio" / f"{NEWS}.wav"
    seconds = duration_s(audio)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = args.results_dir / f"{stamp}-throughput-logs"
    log_dir.mkdir(parents=True)
    results = [run_layout(layout, audio, seconds, args.requests, args, log_dir) for layout in layouts(cores)]
    base = results[0]["audio_hours_per_hour"]
    lines = [f"# Throughput {stamp}", "",
             f"{cores} CPUs; {args.requests} x {NEWS} ({seconds:.0f} s) per layout, handed to whichever worker is "
             "free; our service's defaults otherwise.", "",
             "| layout | audio-hours per hour | against 1 worker | wall | servers' peak memory, summed | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['layout']} | {r['audio_hours_per_hour']:.1f} | {r['audio_hours_per_hour'] / base:.2f}x | "
              f"{r['wall_s']:.0f} s | {r['peak_mb_sum']} MB | {len(r['errors'])} |" for r in results]
    report = "\n".join(lines) + "\n"
    (args.results_dir / f"{stamp}-throughput.md").write_text(report)
    print(report)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
