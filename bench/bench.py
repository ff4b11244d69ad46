"""Speed, memory and accuracy of our service against the original openai-whisper server and whisper.cpp, on real
recordings.

Each server variant runs as a real process, one at a time. Run it through bench/run, which builds the
virtualenv, the openai-whisper checkpoint, the ggml model and the long recording this script expects; see
bench/README.md. run_variant() takes any list of AudioFile, so other corpora can be sent through the same servers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

import jiwer
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCES = ROOT / "service" / "tests" / "data"
CACHE = Path(os.environ.get("PILOTYS_WHISPER_CACHE") or Path.home() / ".cache" / "pilotys-whisper")

MB = 1024 * 1024
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL_S = 0.02
REPEAT_LIMIT_S = 180.0  # files up to this long are sent 3 times by default, longer ones once
LONG_NAME = "long_en_627s"  # built by bench/run: news_en_169s x3 + lecture_en_60s x2
WARMUP_NAME = "warmup_10s"  # built by bench/run: the first 10 s of lecture_en_60s

# Goals for our service with its default settings.
GOAL_RTF = {"cpu": 0.05, "cuda": 0.005}  # on the long recordings (base: 2 CPU cores, or one GPU in float16)
GOAL_WER_MARGIN = 0.01  # one point above the original's word-error rate
GOAL_PEAK_MB = 450  # process tree, every file
GOAL_PEER_SPEEDUP = 1.5  # ours against whisper.cpp on the long recordings, at equal or better WER and less memory


@dataclass(frozen=True)
class AudioFile:
    name: str
    path: Path
    language: str
    reference: Path | None = None
    invented_after_s: float | None = None  # words in segments starting after this were never said
    long: bool = False  # counts for the real-time-factor goal


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    env: dict[str, str] = field(default_factory=dict)  # WHISPER_* settings on top of the defaults
    original: bool = False
    whispercpp_args: tuple[str, ...] | None = None  # a whisper.cpp peer (whispercpp_server.py) with these options


VARIANTS = {v.name: v for v in (
    Variant("original", "openai-whisper base, PyTorch fp32, transcribe() defaults (bench/original_server.py)",
            original=True),
    Variant("ours", "pilotys_whisper defaults: VAD on; on a CPU int8, batch 3, beam 2; on CUDA float16, batch 16, "
                    "beam 1"),
    Variant("ours-greedy", "ours with WHISPER_BEAM_SIZE=1 (greedy decoding)", {"WHISPER_BEAM_SIZE": "1"}),
    Variant("ours-beam2", "ours with WHISPER_BEAM_SIZE=2 (the CPU's default)", {"WHISPER_BEAM_SIZE": "2"}),
    Variant("ours-beam3", "ours with WHISPER_BEAM_SIZE=3", {"WHISPER_BEAM_SIZE": "3"}),
    Variant("ours-batch4", "ours with WHISPER_BATCH_SIZE=4", {"WHISPER_BATCH_SIZE": "4"}),
    Variant("ours-batch2", "ours with WHISPER_BATCH_SIZE=2", {"WHISPER_BATCH_SIZE": "2"}),
    Variant("ours-novad", "ours with WHISPER_VAD=false", {"WHISPER_VAD": "false"}),
    # Larger decoder batches: what a GPU has the memory for.
    Variant("ours-batch8", "ours with WHISPER_BATCH_SIZE=8", {"WHISPER_BATCH_SIZE": "8"}),
    Variant("ours-batch3", "ours with WHISPER_BATCH_SIZE=3 (the CPU's default)", {"WHISPER_BATCH_SIZE": "3"}),
    Variant("ours-batch16", "ours with WHISPER_BATCH_SIZE=16", {"WHISPER_BATCH_SIZE": "16"}),
    # Our service with the original engine (the converted checkpoint): the engine alone, same HTTP layer.
    Variant("ours-openai", "ours with WHISPER_ENGINE=openai-whisper (the converted checkpoint)",
            {"WHISPER_ENGINE": "openai-whisper"}),
    # Peers on the same weights (scripts/ct2_to_ggml.py), 2 threads as ours on 2 cores.
    Variant("whisper.cpp", "whisper.cpp via pywhispercpp, ggml f16, 2 threads, pywhispercpp's defaults (greedy, "
                           "temperature fallback) (bench/whispercpp_server.py)", whispercpp_args=()),
    Variant("whisper.cpp-beam5", "whisper.cpp via pywhispercpp with beam 5 (whisper.cpp's command-line default)",
            whispercpp_args=("--beam-size", "5")),
)}
CPU_VARIANTS = ("original", "whisper.cpp", "ours", "ours-greedy", "ours-beam3", "ours-batch4", "ours-batch2",
                "ours-novad")
CUDA_VARIANTS = ("ours", "ours-beam2", "ours-batch3", "ours-batch8", "ours-openai")


def audio_files(assets: Path, work_dir: Path) -> dict[str, AudioFile]:
    audio = assets / "audio"
    files = (
        # No one speaks in these: every word returned is invented. French, as PILOTYS sends by default.
        AudioFile("silence_20s", audio / "silence_20s.wav", "fr", invented_after_s=0.0),
        AudioFile("noise_20s", audio / "noise_20s.wav", "fr", invented_after_s=0.0),
        AudioFile("fr_meeting", audio / "fr_meeting.wav", "fr", REFERENCES / "fr_meeting.txt"),
        AudioFile("lecture_en_60s", audio / "lecture_en_60s.wav", "en", REFERENCES / "lecture_en_60s.txt"),
        # The lecture, then 60 s of low noise: the reference is the lecture's, words after 61 s are invented.
        AudioFile("lecture_then_noise_120s", audio / "lecture_then_noise_120s.wav", "en",
                  REFERENCES / "lecture_en_60s.txt", invented_after_s=61.0),
        AudioFile("news_en_169s", audio / "news_en_169s.wav", "en", REFERENCES / "news_en_169s.txt", long=True),
        AudioFile(LONG_NAME, work_dir / f"{LONG_NAME}.wav", "en", work_dir / f"{LONG_NAME}.txt", long=True),
    )
    return {f.name: f for f in files}


# -- memory, from /proc ------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:  # a child belongs to the thread that started it
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
        except OSError:
            pass
    return kids


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (ffmpeg and the like) that have their own memory, as they are now.

    A child that still runs its parent's program is a fork or vfork that has not exec'd yet: its pages are the
    parent's, and counting them again would report a peak of twice the server for a millisecond.
    """
    tree, todo = [], [(pid, None)]
    while todo:
        current, parent_exe = todo.pop()
        exe = _exe(current)
        if parent_exe is not None and exe == parent_exe:
            continue
        tree.append(current)
        todo.extend((child, exe) for child in _children(current))
    return tree


def resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0  # gone between listing and reading


def status_bytes(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmHWM, VmRSS) in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0), so that the next reading is this file's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine so far (all cores, idle and I/O wait excluded)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its children it has waited for (ffmpeg once it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    utime, stime, cutime, cstime = (int(v) for v in stat[stat.rindex(")") + 2:].split()[11:15])
    return (utime + stime + cutime + cstime) / CLOCK_TICKS


class TreePeak:
    """Samples the resident memory of a process tree every ~20 ms in a thread; keeps the peak of the sum."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL_S):
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self.most_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-peak", daemon=True)

    def _sample(self) -> None:
        pids = process_tree(self.pid)
        self.peak_bytes = max(self.peak_bytes, sum(resident_bytes(p) for p in pids))
        self.most_processes = max(self.most_processes, len(pids))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# -- accuracy ----------------------------------------------------------------------------------------------

def normalize(text: str) -> list[str]:
    """Words for a word-error rate: lower case, no punctuation, % spelled out (as the service's tests do)."""
    text = text.lower().replace("’", "'").replace("%", " percent")
    return re.sub(r"[^\w' ]+", " ", text).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    return jiwer.wer(" ".join(normalize(reference)), " ".join(normalize(hypothesis)))


def invented_text(audio: AudioFile, body: dict) -> str | None:
    if audio.invented_after_s is None:
        return None
    if audio.invented_after_s <= 0:
        return body.get("text", "").strip()
    return " ".join(s["text"].strip() for s in body.get("segments", []) if s["start"] > audio.invented_after_s)


# -- servers -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One variant as a real process on a free loopback port, with its output in a log file."""

    def __init__(self, variant: Variant, args: argparse.Namespace, log_path: Path):
        self.variant = variant
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # The caller's WHISPER_* settings must not leak into a variant: each runs with its documented ones.
        env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER_")}
        env["PYTHONUNBUFFERED"] = "1"
        if variant.original:
            self.command = [sys.executable, str(HERE / "original_server.py"), "--model", str(args.openai_model),
                            "--port", str(self.port)]
        elif variant.whispercpp_args is not None:
            self.command = [sys.executable, str(HERE / "whispercpp_server.py"), "--model", str(args.ggml_model),
                            "--port", str(self.port), "--threads", "2", *variant.whispercpp_args]
        else:
            self.command = [sys.executable, "-m", "pilotys_whisper", "serve"]
            env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "service" / "src"), env.get("PYTHONPATH")])),
                       WHISPER_MODEL=str(args.assets / "models" / "base"),
                       WHISPER_HOST="127.0.0.1", WHISPER_PORT=str(self.port))
            if args.device == "cuda":
                env.update(WHISPER_DEVICE="cuda", WHISPER_COMPUTE_TYPE="float16")
            env.update(variant.env)
            if variant.env.get("WHISPER_ENGINE") == "openai-whisper":
                env["WHISPER_MODEL"] = str(args.openai_model)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 300) -> float:
        """Start the server and wait until it answers; return the seconds that took (mostly loading the model)."""
        self._log = open(self.log_path, "wb")  # closed in stop()
        started = time.monotonic()
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.variant.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._answers():
                return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(f"{self.variant.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            response = requests.get(self.url + "/ready", timeout=2)
        except requests.RequestException:
            return False
        # The original loads its model before it opens the port: any answer means ready.
        return self.variant.original or response.status_code == 200

    def transcribe(self, audio: Path, language: str, timeout: float) -> dict:
        with open(audio, "rb") as f:
            response = requests.post(self.url + "/transcribe", files={"file": (audio.name, f)},
                                     data={"language": language}, timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# -- one run -----------------------------------------------------------------------------------------------

def duration_s(path: Path) -> float:
    """The decoded length, in seconds (what the real-time factor divides by)."""
    import av  # faster-whisper's dependency: FFmpeg's libraries, as the service decodes with

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_file(server: ServerProcess, audio: AudioFile, seconds: float, repeat: int) -> dict:
    """Send one file `repeat` times; wall time, memory and accuracy of each request."""
    reference = audio.reference.read_text() if audio.reference else None
    hwm_reset = reset_peak(server.pid)
    runs = []
    for number in range(1, repeat + 1):
        with TreePeak(server.pid) as tree:
            busy, own = busy_cpu_seconds(), process_cpu_seconds(server.pid)
            began = time.perf_counter()
            body = server.transcribe(audio.path, audio.language, timeout=120 + 5 * seconds)
            elapsed = time.perf_counter() - began
            own = process_cpu_seconds(server.pid) - own
            busy = busy_cpu_seconds() - busy
        invented = invented_text(audio, body)
        run = {
            "seconds": round(elapsed, 3),
            "rtf": round(elapsed / seconds, 4),
            # Cores kept busy by the server, and by everything else on the machine (this script included).
            "server_cores": round(own / elapsed, 2),
            "other_cores": round(max(busy - own, 0.0) / elapsed, 2),
            "tree_peak_mb": round(tree.peak_bytes / MB, 1),
            "most_processes": tree.most_processes,
            "samples": tree.samples,
            "words": len(normalize(body.get("text", ""))),
            "wer": round(word_error_rate(reference, body.get("text", "")), 4) if reference else None,
            "invented_words": len(normalize(invented)) if invented is not None else None,
            "invented_text": invented,
            "text": body.get("text", ""),
        }
        runs.append(run)
        extra = f", WER {run['wer']:.1%}" if run["wer"] is not None else ""
        extra += f", {run['invented_words']} invented words" if invented is not None else ""
        log(f"  {audio.name} {number}/{repeat}: {elapsed:.1f} s, RTF {run['rtf']:.3f}, tree peak "
            f"{run['tree_peak_mb']:.0f} MB, cores {run['server_cores']:.2f} + {run['other_cores']:.2f} other{extra}")
    rtfs = [r["rtf"] for r in runs]
    wers = [r["wer"] for r in runs if r["wer"] is not None]
    invented_counts = [r["invented_words"] for r in runs if r["invented_words"] is not None]
    return {
        "file": audio.name,
        "duration_s": round(seconds, 2),
        "language": audio.language,
        "repeat": repeat,
        "rtf_median": round(statistics.median(rtfs), 4),
        "rtf_min": round(min(rtfs), 4),
        "rtf_max": round(max(rtfs), 4),
        "server_cores": round(statistics.mean(r["server_cores"] for r in runs), 2),
        "other_cores": round(statistics.mean(r["other_cores"] for r in runs), 2),
        "tree_peak_mb": max(r["tree_peak_mb"] for r in runs),
        # With the reset, VmHWM is this file's peak; without it (old kernel), the peak so far.
        "server_hwm_mb": round(status_bytes(server.pid, "VmHWM") / MB, 1),
        "server_hwm_is_per_file": hwm_reset,
        "server_rss_after_mb": round(status_bytes(server.pid, "VmRSS") / MB, 1),
        "wer": round(statistics.median(wers), 4) if wers else None,
        "wer_min": min(wers) if wers else None,
        "wer_max": max(wers) if wers else None,
        "invented_words": max(invented_counts) if invented_counts else None,
        "runs": runs,
    }


def run_variant(variant: Variant, files: list[AudioFile], durations: dict[str, float], args, log_dir: Path) -> dict:
    log(f"[{variant.name}] starting: {variant.description}")
    server = ServerProcess(variant, args, log_dir / f"{variant.name}.log")
    result: dict = {"variant": variant.name, "description": variant.description, "files": {}, "errors": []}
    try:
        result["load_s"] = round(server.start(), 2)
        result["hwm_after_load_mb"] = round(status_bytes(server.pid, "VmHWM") / MB, 1)
        result["rss_after_load_mb"] = round(status_bytes(server.pid, "VmRSS") / MB, 1)
        began = time.perf_counter()
        server.transcribe(args.work_dir / f"{WARMUP_NAME}.wav", "en", timeout=300)
        result["warmup_s"] = round(time.perf_counter() - began, 2)
        peaks = [result["hwm_after_load_mb"], round(status_bytes(server.pid, "VmHWM") / MB, 1)]
        log(f"[{variant.name}] ready in {result['load_s']:.1f} s, VmHWM {result['hwm_after_load_mb']:.0f} MB "
            f"after loading; warm-up {result['warmup_s']:.1f} s")
        for audio in files:
            repeat = args.repeat or (3 if durations[audio.name] <= REPEAT_LIMIT_S else 1)
            try:
                measured = measure_file(server, audio, durations[audio.name], repeat)
            except (requests.RequestException, RuntimeError) as exc:
                message = f"{audio.name}: {exc}"
                if server.proc is not None and server.proc.poll() is not None:
                    message += f"\nserver exited with {server.proc.returncode}:\n{server.log_tail()}"
                log(f"[{variant.name}] ERROR {message}")
                result["errors"].append(message)
                if server.proc is not None and server.proc.poll() is not None:
                    break
                continue
            result["files"][audio.name] = measured
            peaks.append(measured["server_hwm_mb"])
        # The resets split VmHWM by file; the largest reading is the process's peak over the whole run.
        result["hwm_whole_run_mb"] = max(peaks)
        result["rss_at_end_mb"] = round(status_bytes(server.pid, "VmRSS") / MB, 1)
    except (requests.RequestException, RuntimeError) as exc:
        log(f"[{variant.name}] ERROR {exc}")
        result["errors"].append(str(exc))
    finally:
        server.stop()
    return result


# -- report ------------------------------------------------------------------------------------------------

def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _wer_cell(m: dict) -> str:
    if m["wer"] is None:
        return "–"
    if m["wer_min"] != m["wer_max"]:
        return f"{m['wer']:.1%} ({m['wer_min']:.1%}–{m['wer_max']:.1%})"
    return f"{m['wer']:.1%}"


def environment(args) -> dict:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        except OSError:  # no git where the benchmark runs (a copy of the tree)
            return "unknown"
        return done.stdout.strip()

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 1024 / 1024
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem_gib, 1), "kernel": platform.release(),
        "python": platform.python_version(), "device": args.device,
        "commit": git("rev-parse", "--short", "HEAD") + (" (modified tree)" if git("status", "--porcelain") else ""),
        "versions": {d: version(d) for d in ("torch", "openai-whisper", "ctranslate2", "faster-whisper",
                                             "onnxruntime", "numpy", "pywhispercpp")},
    }


def goals(results: list[dict], files: dict[str, AudioFile], device: str) -> list[tuple[str, str, str]]:
    """(PASS|MISS|n/a, goal, the numbers) for our service with its default settings."""
    by_name = {r["variant"]: r for r in results}
    ours = by_name.get("ours", {}).get("files", {})
    original = by_name.get("original", {}).get("files", {})
    out = []

    goal_rtf = GOAL_RTF[device]
    goal = f"ours: real-time factor (median) <= {goal_rtf} on the long recordings ({device})"
    long_runs = {n: m for n, m in ours.items() if files[n].long}
    if long_runs:
        ok = all(m["rtf_median"] <= goal_rtf for m in long_runs.values())
        out.append(("PASS" if ok else "MISS", goal,
                    ", ".join(f"{n} {m['rtf_median']:.3f}" for n, m in long_runs.items())))
    else:
        out.append(("n/a", goal, "no long recording measured for ours in this run"))

    goal = f"ours: WER <= original's WER + {GOAL_WER_MARGIN * 100:.0f} point"
    pairs = {n: (m["wer"], original[n]["wer"]) for n, m in ours.items()
             if m["wer"] is not None and n in original and original[n]["wer"] is not None}
    if pairs:
        ok = all(w <= o + GOAL_WER_MARGIN + 1e-9 for w, o in pairs.values())
        out.append(("PASS" if ok else "MISS", goal,
                    ", ".join(f"{n} {w:.1%} vs {o:.1%}" for n, (w, o) in pairs.items())))
    else:
        out.append(("n/a", goal, "needs ours and the original on a file with a reference"))

    goal = f"ours: peak memory of the process tree <= {GOAL_PEAK_MB} MB (cpu)"
    if device != "cpu":
        out.append(("n/a", goal, "a goal of the CPU deployment"))
    elif ours:
        worst = max(ours.values(), key=lambda m: m["tree_peak_mb"])
        hwm = by_name["ours"].get("hwm_whole_run_mb")
        out.append(("PASS" if worst["tree_peak_mb"] <= GOAL_PEAK_MB else "MISS", goal,
                    f"{worst['tree_peak_mb']:.0f} MB on {worst['file']} (server VmHWM over the run {hwm:.0f} MB)"))
    else:
        out.append(("n/a", goal, "ours not measured in this run"))

    long_names = [n for n in ours if files[n].long]
    for peer in (r for r in results if VARIANTS[r["variant"]].whispercpp_args is not None):
        goal = (f"ours against {peer['variant']}: at least {GOAL_PEER_SPEEDUP}x its speed (best request of each), "
                "equal or better WER, lower tree peak, on the long recordings")
        pairs = [(n, ours[n], peer["files"][n]) for n in long_names if n in peer["files"]]
        if not pairs:
            out.append(("n/a", goal, "needs ours and this peer on a long recording"))
            continue
        ok = all(p["rtf_min"] >= GOAL_PEER_SPEEDUP * m["rtf_min"] and m["wer"] <= p["wer"] + 1e-9
                 and m["tree_peak_mb"] < p["tree_peak_mb"] for _, m, p in pairs)
        out.append(("PASS" if ok else "MISS", goal, ", ".join(
            f"{n} {p['rtf_min'] / m['rtf_min']:.2f}x (RTF {m['rtf_min']:.3f} vs {p['rtf_min']:.3f}), WER "
            f"{m['wer']:.1%} vs {p['wer']:.1%}, peak {m['tree_peak_mb']:.0f} vs {p['tree_peak_mb']:.0f} MB"
            for n, m, p in pairs)))
    return out


def render(meta: dict, results: list[dict], files: dict[str, AudioFile], goal_lines) -> str:
    env = meta["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        f"# Benchmark {meta['started']}",
        "",
        f"{env['cpu']}, {env['cpus']} CPUs, {env['memory_gib']} GiB; device {env['device']}; "
        f"commit {env['commit']}; Python {env['python']}, {versions}.",
        f"Command: `{meta['command']}`",
        "",
        "RTF: wall time of the request / audio duration (lower is faster). Tree peak: the largest sum of the "
        "resident memory of the server and its children, sampled every 20 ms. VmHWM: the server process's own "
        "peak, reset before each file. WER: word-error rate against the reference. CPU: cores kept busy during "
        "the requests by the server, and by everything else on the machine (a busy machine slows the server).",
        "",
        "## Servers",
        "",
        "| server | what | ready after (s) | VmHWM after loading (MB) | VmHWM whole run (MB) | RSS at end (MB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['variant']} | {r['description']} | {_num(r.get('load_s'), '.1f')} | "
                     f"{_num(r.get('hwm_after_load_mb'), '.0f')} | {_num(r.get('hwm_whole_run_mb'), '.0f')} | "
                     f"{_num(r.get('rss_at_end_mb'), '.0f')} |")
    for name, audio in files.items():
        measured = [(r["variant"], r["files"][name]) for r in results if name in r["files"]]
        if not measured:
            continue
        first = measured[0][1]
        lines += ["", f"## {name} ({first['duration_s']:.0f} s, {audio.language}, sent {first['repeat']}x)", ""]
        invented = audio.invented_after_s is not None
        header = ("| server | RTF median | RTF min | tree peak (MB) | server VmHWM (MB) | WER "
                  "| server CPU (cores) | other CPU (cores) |")
        rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        if invented:
            after = "whole file" if audio.invented_after_s == 0 else f"after {audio.invented_after_s:.0f} s"
            header += f" invented words ({after}) |"
            rule += " ---: |"
        lines += [header, rule]
        for variant, m in measured:
            row = (f"| {variant} | {m['rtf_median']:.3f} | {m['rtf_min']:.3f} | {m['tree_peak_mb']:.0f} | "
                   f"{m['server_hwm_mb']:.0f} | {_wer_cell(m)} | {m['server_cores']:.2f} | {m['other_cores']:.2f} |")
            if invented:
                row += f" {m['invented_words']} |"
            lines.append(row)
    lines += ["", "## Goals", ""]
    lines += [f"- **{status}** {goal}: {numbers}" for status, goal, numbers in goal_lines]
    errors = [f"- {r['variant']}: {e}" for r in results for e in r["errors"]]
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    assets_default = os.environ.get("PILOTYS_WHISPER_ASSETS") or str(CACHE / "assets")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", help=f"comma-separated, from: {', '.join(VARIANTS)} (default: "
                                          f"{','.join(CPU_VARIANTS)}; with --device cuda, {','.join(CUDA_VARIANTS)})")
    parser.add_argument("--files", help="comma-separated audio names (default: all)")
    parser.add_argument("--repeat", type=int, help="requests per file (default: 3, or 1 for files over 3 min)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: our variants with WHISPER_DEVICE=cuda, float16 (the original stays on the CPU)")
    parser.add_argument("--assets", type=Path, default=Path(assets_default), help="scripts/fetch-assets' output")
    parser.add_argument("--work-dir", type=Path, default=CACHE / "bench",
                        help="where bench/run built the long recording and the warm-up clip")
    parser.add_argument("--openai-model", type=Path, help="the converted checkpoint "
                                                          "(default: ASSETS/models/base-openai.pt)")
    parser.add_argument("--ggml-model", type=Path, help="the converted whisper.cpp model "
                                                        "(default: ASSETS/models/ggml-base.bin)")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.openai_model = args.openai_model or args.assets / "models" / "base-openai.pt"
    args.ggml_model = args.ggml_model or args.assets / "models" / "ggml-base.bin"
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    default_servers = list(CUDA_VARIANTS if args.device == "cuda" else CPU_VARIANTS)
    args.server_names = args.servers.split(",") if args.servers else default_servers
    unknown = [n for n in args.server_names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown server {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    catalogue = audio_files(args.assets, args.work_dir)
    args.file_names = args.files.split(",") if args.files else list(catalogue)
    unknown = [n for n in args.file_names if n not in catalogue]
    if unknown:
        parser.error(f"unknown audio {', '.join(unknown)}: choose from {', '.join(catalogue)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Stopped from outside (Ctrl-C, kill): unwind, so that the server being measured is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    catalogue = audio_files(args.assets, args.work_dir)
    files = {n: catalogue[n] for n in catalogue if n in args.file_names}
    needed = [a.path for a in files.values()] + [args.work_dir / f"{WARMUP_NAME}.wav"]
    needed += [a.reference for a in files.values() if a.reference]
    if "original" in args.server_names or "ours-openai" in args.server_names:
        needed.append(args.openai_model)
    if any(VARIANTS[name].whispercpp_args is not None for name in args.server_names):
        needed.append(args.ggml_model)
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        sys.exit("bench: missing " + ", ".join(missing) + "\n(run `make assets`, then bench/run, which builds the "
                 "long recording, the warm-up clip, the openai-whisper checkpoint and the ggml model)")

    started = datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = args.results_dir / f"{stamp}-logs"
    log_dir.mkdir()
    durations = {name: duration_s(a.path) for name, a in files.items()}
    meta = {"started": started.isoformat(timespec="seconds"), "command": " ".join(["bench/bench.py", *sys.argv[1:]]),
            "environment": environment(args), "sample_interval_s": SAMPLE_INTERVAL_S}
    log(f"bench: {len(args.server_names)} servers x {len(files)} files; server logs in {log_dir}")

    results = [run_variant(VARIANTS[name], list(files.values()), durations, args, log_dir)
               for name in args.server_names]
    goal_lines = goals(results, files, args.device)
    report = render(meta, results, files, goal_lines)
    md_path = args.results_dir / f"{stamp}.md"
    md_path.write_text(report)
    payload = {**meta, "goals": [{"status": s, "goal": g, "numbers": n} for s, g, n in goal_lines],
               "files": {n: {**asdict(a), "path": str(a.path), "reference": str(a.reference) if a.reference else None,
                             "duration_s": durations[n]} for n, a in files.items()},
               "results": results}
    (args.results_dir / f"{stamp}.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    print(report)
    print(f"bench: written {md_path} and {md_path.with_suffix('.json')}")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
