"""Shared fixtures: the fetched assets, a fake engine for the HTTP layer, the real model, a real server process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from pilotys_whisper.engines import Cancelled, Segment, TranscribeOptions, Transcription, Word
from pilotys_whisper.settings import Settings

HERE = Path(__file__).parent
DATA = HERE / "data"
KEY = "test-key-0123456789abcdef"


def _assets() -> Path:
    root = Path(os.environ.get("PILOTYS_WHISPER_ASSETS")
                or Path.home() / ".cache" / "pilotys-whisper" / "assets")
    if not (root / "models" / "base" / "model.bin").is_file():
        pytest.fail(f"test assets missing in {root}: run `make assets` (scripts/fetch-assets)", pytrace=False)
    return root


@pytest.fixture(scope="session")
def assets() -> Path:
    return _assets()


@pytest.fixture(scope="session")
def model_dir(assets) -> Path:
    return assets / "models" / "base"


@pytest.fixture(scope="session")
def audio(assets):
    def path(name: str) -> Path:
        p = assets / "audio" / name
        assert p.is_file(), f"{p} missing: run `make assets`"
        return p
    return path


def normalize(text: str) -> list[str]:
    """Words for a word-error rate: lower case, no punctuation, % spelled out."""
    text = text.lower().replace("’", "'").replace("%", " percent")
    return re.sub(r"[^\w' ]+", " ", text).split()


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(" ".join(normalize(reference)), " ".join(normalize(hypothesis)))


def reference(name: str) -> str:
    return (DATA / f"{name}.txt").read_text()


class FakeEngine:
    """Stands in for the model to test the HTTP layer alone: returns a fixed result, can be made to wait."""

    name = "fake"
    device = "cpu"

    def __init__(self, text: str = "Bonjour à tous.", load_delay: float = 0.0):
        self.text = text
        self.load_delay = load_delay
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.calls: list[tuple[str, TranscribeOptions]] = []

    def load(self) -> None:
        time.sleep(self.load_delay)

    def transcribe(self, path, options, progress=None, should_stop=None) -> Transcription:
        self.calls.append((path, options))
        assert os.path.exists(path), "the upload must exist while it is transcribed"
        self.started.set()
        while not self.release.wait(0.05):
            if should_stop is not None and should_stop():
                raise Cancelled()
        words = [Word(0.0, 0.5, " Bonjour", 0.9), Word(0.5, 0.7, " à", 0.9), Word(0.7, 1.2, " tous.", 0.9)]
        segments = [
            Segment(id=0, start=0.0, end=1.2, text=" " + self.text, words=words if options.word_timestamps else None),
            Segment(id=1, start=3661.5, end=3663.0, text=" Deuxième phrase.",
                    words=[] if options.word_timestamps else None),
        ]
        if progress is not None:
            progress(2.0, 2.0)
        return Transcription(text=f"{self.text} Deuxième phrase.", language=options.language or "fr",
                             duration=2.0, segments=segments)


def make_settings(**overrides) -> Settings:
    env = {"WHISPER_MODEL": "base", "WHISPER_API_KEY": KEY}
    env.update({k: str(v) for k, v in overrides.items()})
    return Settings.from_env(env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The service started as a real process (`python -m pilotys_whisper`), as systemd would."""

    def __init__(self, env: dict[str, str], tmp_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp_dir = tmp_dir
        self.env = {**os.environ, **env, "WHISPER_PORT": str(self.port), "WHISPER_TMP_DIR": str(tmp_dir),
                    "PYTHONPATH": str(HERE.parent / "src"), "PYTHONUNBUFFERED": "1"}
        self.log_path = tmp_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> ServerProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pilotys_whisper", "serve"], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if requests.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.logs()}")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
