"""Load: the service saturated with transcriptions on loopback while a client polls /health, then the same with
idle connections held open (slowloris-style). Run it through bench/run --load, which builds what it needs.

Our service runs as a real process with its defaults (one transcription at a time, four waiting, the real
`base` model). TRANSCRIBERS clients, more than slots plus queue, each send a recording again as soon as their
previous request ends (after min(Retry-After, 1 s) when refused): some are always turned away with 429. A
separate client asks for /health every HEALTH_INTERVAL_S on a new connection, as a load balancer would.
In the second phase IDLE_CONNECTIONS sockets each send the start of a request and then one header line every
TRICKLE_S, never finishing it, until the phase ends. Every loop is bounded by the phase's duration; all
traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import requests

from bench import CACHE, HERE, MB, ServerProcess, TreePeak, Variant, duration_s, log, status_bytes

AUDIO = "warmup_10s.wav"  # built by bench/run: 10 s of the lecture, so that many requests end in a phase
TRANSCRIBERS = 10  # the defaults admit 1 running + 4 queued: half the clients are refused at any time
HEALTH_INTERVAL_S = 0.1
BASELINE_S = 30.0  # /health alone first, for as long as this or the phases if shorter
IDLE_CONNECTIONS = 200
TRICKLE_S = 10.0  # under waitress's channel_timeout (300 s): the connections are never idle long enough to drop
END_GRACE_S = 30.0  # a request still waiting this long after the phase's end is abandoned (counted apart)
DRAIN_TIMEOUT_S = 600.0  # after a phase, the service finishes what it accepted before the next one
HEALTH_TIMEOUT_S = 10.0
MAX_RETRY_WAIT_S = 1.0  # a refused client comes back within a second, whatever Retry-After says: saturation

# Goals (the issue's): /health stays fast and nothing breaks while the service is saturated.
GOAL_HEALTH_P99_MS = 50.0
GOAL_PEAK_MB = 450


@dataclass
class Tally:
    """What one phase's clients saw; appended to from several threads (list.append is atomic)."""

    health_ms: list[float] = field(default_factory=list)
    health_errors: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    refused_with_retry_after: int = 0
    connection_errors: list[str] = field(default_factory=list)
    transcription_s: list[float] = field(default_factory=list)
    abandoned_at_end: int = 0


def transcriber(url: str, audio: Path, deadline: float, tally: Tally) -> None:
    session = requests.Session()
    while time.monotonic() < deadline:
        began = time.perf_counter()
        try:
            with open(audio, "rb") as f:
                response = session.post(f"{url}/v1/audio/transcriptions", files={"file": (audio.name, f)},
                                        data={"model": "whisper-1", "language": "en"},
                                        timeout=(10, max(0.0, deadline - time.monotonic()) + END_GRACE_S))
        except requests.RequestException as exc:
            if time.monotonic() >= deadline + END_GRACE_S:
                tally.abandoned_at_end += 1  # the phase is over: not the service's failure
                return
            tally.connection_errors.append(f"transcription: {type(exc).__name__}: {exc}"[:300])
            session = requests.Session()
            time.sleep(MAX_RETRY_WAIT_S)
            continue
        tally.statuses.append(response.status_code)
        if response.status_code == 200:
            tally.transcription_s.append(time.perf_counter() - began)
        elif response.status_code == 429:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                tally.refused_with_retry_after += 1
            wait = min(float(retry_after) if retry_after.isdigit() else MAX_RETRY_WAIT_S, MAX_RETRY_WAIT_S)
            time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
        else:
            time.sleep(MAX_RETRY_WAIT_S)  # an unexpected answer: counted, and no tight loop on it


def health_poller(url: str, seconds: float, results) -> None:
    """In a process of its own: the transcribing clients' threads must not delay it (the GIL) and be measured."""
    latencies_ms: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        began = time.perf_counter()
        try:
            # No session: a new connection each time, as a load balancer's health check opens one.
            response = requests.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S)
            elapsed_ms = (time.perf_counter() - began) * 1000
            if response.status_code == 200:
                latencies_ms.append(elapsed_ms)
            else:
                errors.append(f"HTTP {response.status_code} after {elapsed_ms:.0f} ms")
        except requests.RequestException as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
        time.sleep(max(0.0, HEALTH_INTERVAL_S - (time.perf_counter() - began)))
    results.put((latencies_ms, errors))


class IdleConnections:
    """IDLE_CONNECTIONS sockets that start a request and never finish it: one header line every TRICKLE_S."""

    def __init__(self, port: int, count: int, deadline: float):
        self.port, self.count, self.deadline = port, count, deadline
        self.opened = 0
        self.failed_to_open: list[str] = []
        self.closed_by_server = 0
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="idle-connections", daemon=True)

    def __enter__(self) -> IdleConnections:
        for _ in range(self.count):
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            except OSError as exc:
                self.failed_to_open.append(f"{type(exc).__name__}: {exc}")
                continue
            self._sockets.append(sock)
            self.opened += 1
        self._thread.start()
        return self

    def _run(self) -> None:
        line = 0
        while time.monotonic() < self.deadline:
            time.sleep(max(0.0, min(TRICKLE_S, self.deadline - time.monotonic())))
            line += 1
            for sock in list(self._sockets):
                try:
                    sock.sendall(f"X-Trickle-{line}: 1\r\n".encode())
                except OSError:
                    self.closed_by_server += 1
                    self._sockets.remove(sock)
                    sock.close()

    def __exit__(self, *exc) -> None:
        self._thread.join()
        for sock in self._sockets:
            sock.close()


def wait_idle(url: str) -> tuple[int, float]:
    """Wait (bounded) until the service runs and queues nothing; the last /health status and the wait."""
    began = time.monotonic()
    status = 0
    while time.monotonic() - began < DRAIN_TIMEOUT_S:
        try:
            response = requests.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S)
            status = response.status_code
            if status == 200 and response.json()["in_flight"] == 0:
                break
        except requests.RequestException:
            status = 0
        time.sleep(1)
    return status, round(time.monotonic() - began, 1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_phase(name: str, server: ServerProcess, audio: Path, seconds: float, idle: int,
              transcribers: int = TRANSCRIBERS) -> dict:
    log(f"[{name}] {seconds:.0f} s: {transcribers} transcribing clients, /health every "
        f"{HEALTH_INTERVAL_S * 1000:.0f} ms" + (f", {idle} idle connections" if idle else ""))
    tally = Tally()
    cpu_before = os.times()
    with TreePeak(server.pid) as tree:
        deadline = time.monotonic() + seconds
        idle_connections = IdleConnections(server.port, idle, deadline)
        with idle_connections if idle else contextlib.nullcontext():
            spawn = multiprocessing.get_context("spawn")
            health_results = spawn.Queue()
            poller = spawn.Process(target=health_poller, args=(server.url, seconds, health_results), daemon=True)
            poller.start()
            threads = [threading.Thread(target=transcriber, args=(server.url, audio, deadline, tally))
                       for _ in range(transcribers)]
            for thread in threads:
                thread.start()
            tally.health_ms, tally.health_errors = health_results.get(timeout=seconds + HEALTH_TIMEOUT_S + 60)
            poller.join(10)
            health_results.close()
            for thread in threads:
                thread.join(seconds + END_GRACE_S + 30)
    # Did the service keep serving? Once it has finished what it accepted, /health and one transcription.
    after, drained_in = wait_idle(server.url)
    with open(audio, "rb") as f:
        after_transcription = requests.post(f"{server.url}/v1/audio/transcriptions",
                                            files={"file": (audio.name, f)}, data={"language": "en"},
                                            timeout=DRAIN_TIMEOUT_S).status_code
    statuses = tally.statuses
    refused = statuses.count(429)
    result = {
        "phase": name,
        "transcribers": transcribers,
        "duration_s": seconds,
        "idle_connections": idle,
        "idle_opened": idle_connections.opened if idle else 0,
        "idle_failed_to_open": len(idle_connections.failed_to_open) if idle else 0,
        "idle_closed_by_server": idle_connections.closed_by_server if idle else 0,
        "health_requests": len(tally.health_ms) + len(tally.health_errors),
        "health_p50_ms": _round(percentile(tally.health_ms, 0.50)),
        "health_p99_ms": _round(percentile(tally.health_ms, 0.99)),
        "health_max_ms": _round(max(tally.health_ms) if tally.health_ms else None),
        "health_errors": tally.health_errors[:20],
        "health_error_count": len(tally.health_errors),
        "transcription_requests": len(statuses),
        "ok": statuses.count(200),
        "refused_429": refused,
        "refused_share": round(refused / len(statuses), 3) if statuses else None,
        "refused_with_retry_after_share": round(tally.refused_with_retry_after / refused, 3) if refused else None,
        "server_errors_5xx": sum(1 for s in statuses if s >= 500),
        "other_statuses": sorted({s for s in statuses if s not in (200, 429) and s < 500}),
        "connection_errors": len(tally.connection_errors),
        "connection_error_samples": tally.connection_errors[:10],
        "abandoned_at_end": tally.abandoned_at_end,
        "drained_after_s": drained_in,
        "transcription_median_s": _round(statistics.median(tally.transcription_s) if tally.transcription_s else None),
        "tree_peak_mb": round(tree.peak_bytes / MB, 1),
        "server_hwm_mb": round(status_bytes(server.pid, "VmHWM") / MB, 1),
        "client_cpu_s": round(sum(os.times()[:2]) - sum(cpu_before[:2]), 1),
        "health_after": after,
        "transcription_after": after_transcription,
    }
    log(f"[{name}] /health p50 {result['health_p50_ms']} ms, p99 {result['health_p99_ms']} ms, max "
        f"{result['health_max_ms']} ms, {result['health_error_count']} failed; {len(statuses)} transcriptions: "
        f"{result['ok']} ok, {refused} x 429, {result['server_errors_5xx']} x 5xx, {result['connection_errors']} "
        f"connection errors; tree peak {result['tree_peak_mb']:.0f} MB")
    return result


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def goals(result: dict) -> list[tuple[str, bool]]:
    p99 = result["health_p99_ms"]
    return [
        (f"/health p99 < {GOAL_HEALTH_P99_MS:.0f} ms", p99 is not None and p99 < GOAL_HEALTH_P99_MS
         and result["health_error_count"] == 0),
        ("every 429 with Retry-After", result["refused_429"] > 0 and result["refused_with_retry_after_share"] == 1),
        ("0 5xx", result["server_errors_5xx"] == 0),
        ("0 connection errors", result["connection_errors"] == 0),
        (f"peak memory <= {GOAL_PEAK_MB} MB", result["tree_peak_mb"] <= GOAL_PEAK_MB),
        ("serving afterwards", result["health_after"] == 200 and result["transcription_after"] == 200),
    ]


def render(meta: dict, results: list[dict]) -> str:
    lines = [f"# Load {meta['stamp']}", "",
             f"{meta['cpus']} CPUs, load average {meta['loadavg_before']} before; our service with its defaults "
             f"(WHISPER_CONCURRENCY=1, WHISPER_QUEUE_SIZE=4, {meta['http_threads']} HTTP threads), model `base`; "
             f"{TRANSCRIBERS} clients sending {AUDIO} ({meta['audio_s']:.0f} s) again and again, /health every "
             f"{HEALTH_INTERVAL_S * 1000:.0f} ms on a new connection; {meta['duration_s']:.0f} s per phase.", "",
             "| phase | /health p50 | p99 | max | /health failed | transcriptions (ok / 429) | 429 with Retry-After "
             "| 5xx | connection errors | tree peak | serving after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        share = r["refused_with_retry_after_share"]
        lines.append(
            f"| {r['phase']} | {r['health_p50_ms']} ms | {r['health_p99_ms']} ms | {r['health_max_ms']} ms | "
            f"{r['health_error_count']} of {r['health_requests']} | {r['ok']} / {r['refused_429']} | "
            f"{'-' if share is None else f'{share:.0%}'} | {r['server_errors_5xx']} | {r['connection_errors']} | "
            f"{r['tree_peak_mb']:.0f} MB | {'yes' if r['health_after'] == r['transcription_after'] == 200 else 'NO'} |")
    for r in results:
        if not r["transcribers"]:
            continue
        lines += ["", f"{r['phase']}: transcriptions took {r['transcription_median_s']} s (median, from sending to "
                  f"the answer, queue included); {r['abandoned_at_end']} request(s) still waiting "
                  f"{END_GRACE_S:.0f} s after the end were abandoned; the service had finished the rest "
                  f"{r['drained_after_s']} s later."]
        if r["idle_connections"]:
            lines += [f"{r['phase']}: {r['idle_opened']} of {r['idle_connections']} idle connections opened, "
                      f"{r['idle_closed_by_server']} closed by the server during the phase."]
    lines += ["", "Goals:"]
    for r in results:
        if not r["transcribers"]:
            lines.append(f"- {r['phase']}: no goal, the machine's own delay on /health (p99 {r['health_p99_ms']} ms)")
            continue
        for goal, ok in goals(r):
            lines.append(f"- {r['phase']}: {goal}: {'PASS' if ok else 'MISS'}")
    for r in results:
        for sample in r["health_errors"][:5] + r["connection_error_samples"][:5]:
            lines.append(f"- {r['phase']} error: {sample}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per phase (default 120)")
    parser.add_argument("--idle", type=int, default=IDLE_CONNECTIONS,
                        help=f"idle connections in the second phase (default {IDLE_CONNECTIONS}, 0 skips it)")
    parser.add_argument("--assets", type=Path,
                        default=Path(os.environ.get("PILOTYS_WHISPER_ASSETS") or CACHE / "assets"))
    parser.add_argument("--work-dir", type=Path, default=CACHE / "bench")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not 1 <= args.duration <= 3600 or not 0 <= args.idle <= 1000:
        parser.error("--duration must be 1-3600 s and --idle 0-1000")
    args.device, args.openai_model = "cpu", None  # what ServerProcess reads
    audio = args.work_dir / AUDIO
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(Variant("load", "our service with its defaults"), args,
                           args.results_dir / f"{stamp}-load-server.log")
    meta = {"stamp": stamp, "cpus": os.cpu_count(), "loadavg_before": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "duration_s": args.duration, "audio_s": duration_s(audio),
            "http_threads": 1 + 4 + 4}  # the defaults: concurrency + queue + 4
    results = []
    try:
        server.start()
        server.transcribe(audio, "en", timeout=300)
        # The same /health polling with nothing else to do: what this machine adds (other work on it) by itself.
        results.append(run_phase("idle service", server, audio, min(args.duration, BASELINE_S), 0, transcribers=0))
        results.append(run_phase("saturated", server, audio, args.duration, 0))
        if args.idle:
            results.append(run_phase(f"saturated + {args.idle} idle connections", server, audio, args.duration,
                                     args.idle))
    finally:
        server.stop()
    meta["loadavg_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report = render(meta, results)
    (args.results_dir / f"{stamp}-load.md").write_text(report)
    (args.results_dir / f"{stamp}-load.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(report)
    return 0 if all(ok for r in results if r["transcribers"] for _, ok in goals(r)) else 1


if __name__ == "__main__":
    sys.exit(main())
