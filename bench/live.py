"""Live meetings: a recording streamed to /v1/live in 2 s timeslices as it is recorded, transcribed as it arrives.

The recording is the benchmark's long one (news x3 + lecture x2, 627 s) looped to whole copies, as Opus in WebM
written to a pipe (no index, header first, as MediaRecorder makes it). tuspy sends it one 2 s timeslice at a time
on the recording's clock (--speed 4: four times real time); the job's event stream is read meanwhile. Measured:
the time from the last timeslice's 204 to the job's result, how far each live segment lags the audio (the time
its event arrives against the time its end was sent), the server's peak memory and CPU seconds, and the final
word-error rate against the one-shot job (POST /v1/jobs) on the same file. With --faults, the first recording is
sent again through a loopback proxy that cuts three PATCHes halfway through their body, and the server is killed
(SIGKILL) and restarted once midway; tuspy resumes at HEAD's offset: the transcript against the run without
faults, and the bytes the server ended with. Run it through `bench/run --live`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import requests
from tusclient import client as tus_client

from bench import (
    HERE,
    LONG_NAME,
    MB,
    ServerProcess,
    TreePeak,
    Variant,
    environment,
    log,
    process_cpu_seconds,
    reset_peak,
    word_error_rate,
)

KEY = "bench-live-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SOURCE_S = 627  # long_en_627s: the recordings are whole copies of it, so their reference is exact
TIMESLICE_S = 2.0  # MediaRecorder's timeslice in PILOTYS (examples/pilotys)
GOAL_FINAL_S = 5.0  # last timeslice to final result, p95
GOAL_LAG_S = 10.0  # live segments behind the audio, median
GOAL_MEMORY_RATIO = 1.10  # the longest recording's peak against the shortest one's
GOAL_WER_POINTS = 0.01  # live against one-shot, and the faulty run against the clean one
FAULT_CUTS = 3  # PATCHes cut halfway (a dropped connection), then one kill -9 midway


def build(source: Path, copies: int, target: Path) -> Path:
    """`copies` of the source, as 32 kbit/s Opus in WebM written to a pipe (MediaRecorder's shape)."""
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    log(f"bench: building {target.name} ({copies} x {source.name})")
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-stream_loop", str(copies - 1),
                        "-i", str(source), "-ac", "1", "-c:a", "libopus", "-b:a", "32k", "-f", "webm", "pipe:1"],
                       check=True, stdout=out)
    partial.rename(target)
    return target


class CuttingProxy:
    """A loopback TCP proxy to the server; cut() makes it drop the next connection after `keep` bytes from the
    client (a PATCH's headers and part of its body): the network failing in the middle of a request."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._cut_next: int | None = None
        self.cuts = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    def cut(self, keep: int) -> None:
        with self._lock:
            self._cut_next = keep

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                keep, self._cut_next = self._cut_next, None
            threading.Thread(target=self._pump, args=(client, keep), daemon=True).start()

    def _pump(self, client: socket.socket, keep: int | None) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        sent = 0
        try:
            while True:
                readable, _, _ = select.select([client, upstream], [], [], 60)
                if not readable:
                    break
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        if keep is not None and sent + len(data) >= keep:
                            upstream.sendall(data[:keep - sent])
                            with self._lock:
                                self.cuts += 1
                            return  # both sides closed below: the request never completes
                        sent += len(data)
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._listener.close()


class EventLog:
    """The job's event stream in a thread: when each segment arrived; reconnects with Last-Event-ID."""

    def __init__(self, url: str, job_id: str):
        self.url, self.job_id = url, job_id
        self.segments: list[tuple[float, dict]] = []  # (arrival, segment)
        self.done = threading.Event()
        self._last_id: str | None = None
        threading.Thread(target=self._run, name="events", daemon=True).start()

    def _run(self) -> None:
        while not self.done.is_set():
            headers = dict(AUTH)
            if self._last_id is not None:
                headers["Last-Event-ID"] = self._last_id
            try:
                with requests.get(f"{self.url}/v1/jobs/{self.job_id}/events", headers=headers, stream=True,
                                  timeout=(5, 120)) as r:
                    event = None
                    for line in r.iter_lines(decode_unicode=True):
                        if line.startswith("id:"):
                            self._last_id = line[3:].strip()
                        elif line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "segment":
                            self.segments.append((time.time(), json.loads(line[5:])))
                        elif line.startswith("data:") and event and event.startswith("job."):
                            self.done.set()
                            return
            except (requests.RequestException, ValueError):
                pass
            self.done.wait(1.0)


def wait_job(url: str, job_id: str, timeout: float = 3600) -> tuple[dict, float]:
    """The job once it ended, and when (time.time()); polled every 50 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            job = requests.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()
        except (requests.RequestException, ValueError):
            job = {"status": "unreachable"}
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job, time.time()
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not end in {timeout:.0f} s")


def result_text(url: str, job_id: str) -> str:
    return requests.get(f"{url}/v1/jobs/{job_id}/result?format=text", headers=AUTH, timeout=60).text


def stream(server: ServerProcess, audio: Path, seconds: float, speed: float, *, proxy: CuttingProxy | None = None,
           restart=None) -> dict:
    """Send the recording in timeslices on its clock; the numbers of one live upload."""
    size = audio.stat().st_size
    slices = math.ceil(seconds / TIMESLICE_S)
    per_slice = math.ceil(size / slices)
    url = f"http://127.0.0.1:{proxy.port}" if proxy else server.url
    uploader = tus_client.TusClient(f"{url}/v1/live", headers=AUTH).uploader(
        str(audio), chunk_size=per_slice, metadata={"language": "en", "filename": audio.name}, upload_checksum=True,
        retries=120, retry_delay=1)
    uploader.set_url(uploader.create_url())
    job_id = requests.head(uploader.url, headers={**AUTH, "Tus-Resumable": "1.0.0"}, timeout=10).headers[
        "Whisper-Job-Id"]
    events = EventLog(url, job_id)
    # Faults at even places in the run: the cuts first, the kill once half is sent.
    cut_at = {round(slices * (i + 1) / (FAULT_CUTS + 2)) for i in range(FAULT_CUTS)} if proxy else set()
    kill_at = round(slices * (FAULT_CUTS + 1) / (FAULT_CUTS + 2)) if restart else None
    began = time.time()
    number = 0
    while uploader.offset < size:
        due = began + (number + 1) * TIMESLICE_S / speed  # the slice is recorded by then
        time.sleep(max(0.0, due - time.time()))
        if number in cut_at:
            proxy.cut(keep=1000)  # the headers and about half a kilobyte of the body
        if number == kill_at:
            restart()
        uploader.upload_chunk()
        number += 1
    last_chunk = time.time()
    job, ended = wait_job(url, job_id)
    events.done.wait(30)
    events.done.set()
    if job["status"] != "succeeded":
        raise RuntimeError(f"live job {job_id} {job['status']}: {job.get('error')}")
    lags = [arrival - (began + seg["end"] / speed) for arrival, seg in events.segments]
    return {
        "job_id": job_id, "seconds": seconds, "speed": speed, "bytes": size, "slices": number,
        "received": int(requests.head(uploader.url, headers={**AUTH, "Tus-Resumable": "1.0.0"}, timeout=10)
                        .headers["Upload-Offset"]),
        "duration": job.get("duration"),
        "final_s": round(ended - last_chunk, 2), "sending_s": round(last_chunk - began, 1),
        "segment_events": len(events.segments),
        "lag_median_s": round(statistics.median(lags), 2) if lags else None,
        "lag_p95_s": round(sorted(lags)[int(0.95 * (len(lags) - 1))], 2) if lags else None,
        "text": result_text(url, job_id),
    }


def one_shot(server: ServerProcess, audio: Path) -> dict:
    began = time.time()
    with open(audio, "rb") as f:
        r = requests.post(server.url + "/v1/jobs", headers=AUTH, files={"file": (audio.name, f)},
                          data={"language": "en"}, timeout=600)
    if r.status_code != 202:
        raise RuntimeError(f"one-shot job: HTTP {r.status_code}: {r.text[:300]}")
    job, ended = wait_job(server.url, r.json()["id"])
    if job["status"] != "succeeded":
        raise RuntimeError(f"one-shot job {job['id']} {job['status']}: {job.get('error')}")
    return {"job_id": job["id"], "wall_s": round(ended - began, 1), "text": result_text(server.url, job["id"])}


def new_server(args, state: Path, log_path: Path, port: int | None = None) -> ServerProcess:
    variant = Variant("ours", "pilotys_whisper defaults, live uploads at /v1/live",
                      {"WHISPER_STATE_DIR": str(state), "WHISPER_API_KEY": KEY, "WHISPER_MAX_UPLOAD_MB": "500",
                       "WHISPER_MAX_DURATION_S": str(int(max(args.durations) * 60 + SOURCE_S))})
    server = ServerProcess(variant, args, log_path)
    if port is not None:  # the client comes back to the same address
        server.port, server.url = port, f"http://127.0.0.1:{port}"
        server.env["WHISPER_PORT"] = str(port)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--duration", default="10,60",
                        help="minutes of each recording, comma-separated (rounded up to whole 627 s copies)")
    parser.add_argument("--speed", default="1,4", help="times real time each recording is sent at")
    parser.add_argument("--no-faults", action="store_true", help="skip the run with cuts and a kill -9")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.device = "cpu"
    args.durations = [float(d) for d in args.duration.split(",")]
    speeds = [float(s) for s in args.speed.split(",")]
    if len(speeds) != len(args.durations):
        parser.error("give one --speed per --duration")

    source = args.work_dir / f"{LONG_NAME}.wav"
    reference_one = (args.work_dir / f"{LONG_NAME}.txt").read_text()
    started = datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    state = args.work_dir / f"live-state-{stamp}"
    server = new_server(args, state, args.results_dir / f"{stamp}-live-server.log")
    runs, faults = [], None
    partial = args.results_dir / f"{stamp}-live.partial.json"
    cpu_began = resource.getrusage(resource.RUSAGE_SELF)
    try:
        log(f"[ours] ready in {server.start():.1f} s")
        for minutes, speed in zip(args.durations, speeds, strict=True):
            copies = max(1, math.ceil(minutes * 60 / SOURCE_S))
            audio = build(source, copies, args.work_dir / f"live_{copies * SOURCE_S}s.webm")
            seconds, reference = copies * SOURCE_S, "\n".join([reference_one] * copies)
            log(f"[ours] live upload of {audio.name} ({seconds / 60:.1f} min) at {speed:g}x")
            reset_peak(server.pid)
            cpu0 = process_cpu_seconds(server.pid)
            with TreePeak(server.pid) as tree:
                run = stream(server, audio, seconds, speed)
            run.update(peak_mb=round(tree.peak_bytes / MB, 1), server_cpu_s=round(process_cpu_seconds(server.pid)
                                                                                   - cpu0, 1))
            whole = one_shot(server, audio)
            run.update(wer=round(word_error_rate(reference, run["text"]), 4),
                       one_shot_wer=round(word_error_rate(reference, whole["text"]), 4),
                       one_shot_wall_s=whole["wall_s"], audio=str(audio))
            log(f"  last timeslice to result {run['final_s']:.1f} s, lag median {run['lag_median_s']} s, peak "
                f"{run['peak_mb']:.0f} MB, WER {run['wer']:.3f} (one-shot {run['one_shot_wer']:.3f}), server CPU "
                f"{run['server_cpu_s']:.0f} s")
            runs.append(run)
            partial.write_text(json.dumps({"started": stamp, "runs": runs}, indent=2))  # kept if a later run fails
        if not args.no_faults:
            faults = fault_run(args, server, runs[0], stamp)
            server = faults.pop("server")
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(state)], check=False)
    cpu_ended = resource.getrusage(resource.RUSAGE_SELF)
    bench_cpu = (cpu_ended.ru_utime - cpu_began.ru_utime) + (cpu_ended.ru_stime - cpu_began.ru_stime)
    report = render(started, args, runs, faults, bench_cpu)
    path = args.results_dir / f"{stamp}-live.md"
    path.write_text(report)
    path.with_suffix(".json").write_text(json.dumps({"started": stamp, "runs": runs, "faults": faults}, indent=2))
    partial.unlink(missing_ok=True)
    print(report)
    log(f"bench: written {path}")
    return 0


def fault_run(args, server: ServerProcess, clean: dict, stamp: str) -> dict:
    """The first recording again, through the cutting proxy, with one kill -9 and restart of the server."""
    audio, seconds, speed = Path(clean["audio"]), clean["seconds"], clean["speed"]
    proxy = CuttingProxy(server.port)
    holder = {"server": server, "restarts": 0}

    def restart() -> None:
        old = holder["server"]
        log(f"  kill -9 of the server (pid {old.pid})")
        os.kill(old.pid, signal.SIGKILL)
        old.proc.wait(30)
        old.stop()
        new = new_server(args, Path(old.env["WHISPER_STATE_DIR"]),
                         args.results_dir / f"{stamp}-live-server-restarted.log", port=old.port)
        new.start()
        holder["server"], holder["restarts"] = new, holder["restarts"] + 1

    log(f"[ours] live upload of {audio.name} again, {FAULT_CUTS} connections cut and a kill -9")
    try:
        run = stream(server, audio, seconds, speed, proxy=proxy, restart=restart)
    except BaseException:
        if holder["server"] is not server:  # the restarted one: the caller only knows the first
            holder["server"].stop()
        raise
    finally:
        proxy.close()
    run.update(cuts=proxy.cuts, restarts=holder["restarts"], server=holder["server"],
               wer_against_clean=round(word_error_rate(clean["text"], run["text"]), 4),
               identical=run["text"] == clean["text"],
               wer=round(word_error_rate("\n".join([(args.work_dir / f"{LONG_NAME}.txt").read_text()]
                                                   * round(seconds / SOURCE_S)), run["text"]), 4))
    log(f"  {run['cuts']} cuts, {run['restarts']} kill -9, received {run['received']} of {run['bytes']} bytes, "
        f"WER against the clean run {run['wer_against_clean']:.3f}")
    return run


def render(started: datetime, args, runs: list[dict], faults: dict | None, bench_cpu: float) -> str:
    env = environment(args)
    load = os.getloadavg()
    lines = [f"# Live uploads {started.isoformat(timespec='seconds')}", "",
             f"{env['cpu']}, {env['cpus']} CPUs, load average {load[0]:.1f} at the end; commit {env['commit']}", "",
             "| recording | speed | last slice to result (s) | lag median / p95 (s) | segment events | peak (MB) "
             "| server CPU (s) | sending (s) | WER live | WER one-shot |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        lines.append(f"| {r['seconds'] / 60:.1f} min | {r['speed']:g}x | {r['final_s']:.1f} | {r['lag_median_s']} / "
                     f"{r['lag_p95_s']} | {r['segment_events']} | {r['peak_mb']:.0f} | {r['server_cpu_s']:.0f} | "
                     f"{r['sending_s']:.0f} | {r['wer']:.3f} | {r['one_shot_wer']:.3f} |")
    lines.append("")

    def goal(ok: bool, text: str) -> None:
        lines.append(f"- **{'PASS' if ok else 'MISS'}** {text}")

    for r in runs:
        goal(r["final_s"] <= GOAL_FINAL_S, f"{r['seconds'] / 60:.0f} min at {r['speed']:g}x: last timeslice to "
             f"final result {r['final_s']:.1f} s (goal ≤ {GOAL_FINAL_S:.0f} s; one run, so p95 = that run)")
        if r["lag_median_s"] is not None:
            goal(r["lag_median_s"] <= GOAL_LAG_S, f"{r['seconds'] / 60:.0f} min: live segments lag the audio by "
                 f"{r['lag_median_s']:.1f} s median (goal ≤ {GOAL_LAG_S:.0f} s)")
        goal(r["wer"] - r["one_shot_wer"] <= GOAL_WER_POINTS, f"{r['seconds'] / 60:.0f} min: WER live "
             f"{r['wer']:.3f} against one-shot {r['one_shot_wer']:.3f} (goal: within one point)")
        goal(r["received"] == r["bytes"], f"{r['seconds'] / 60:.0f} min: {r['received']} of {r['bytes']} bytes "
             "received")
    if len(runs) > 1:
        ratio = runs[-1]["peak_mb"] / runs[0]["peak_mb"]
        goal(ratio <= GOAL_MEMORY_RATIO, f"peak of the {runs[-1]['seconds'] / 60:.0f} min against the "
             f"{runs[0]['seconds'] / 60:.0f} min: {ratio:.2f} (goal ≤ {GOAL_MEMORY_RATIO:.2f})")
    if faults is not None:
        goal(faults["received"] == faults["bytes"] and faults["cuts"] == FAULT_CUTS and faults["restarts"] == 1
             and (faults["identical"] or faults["wer_against_clean"] <= GOAL_WER_POINTS),
             f"faults: {faults['cuts']} PATCHes cut, {faults['restarts']} kill -9: {faults['received']} of "
             f"{faults['bytes']} bytes received, transcript {'identical to' if faults['identical'] else 'against'} "
             f"the clean run's (WER {faults['wer_against_clean']:.3f}), WER {faults['wer']:.3f}; last slice to "
             f"result {faults['final_s']:.1f} s")
    lines += ["", f"Benchmark client CPU {bench_cpu:.0f} s (user+sys); versions {json.dumps(env['versions'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
