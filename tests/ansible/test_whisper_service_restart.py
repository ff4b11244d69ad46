"""The whisper_service role's restart (its handler: tasks/restart.yml), run by Ansible on the controller against
a real service process on loopback: drained first, restarted only once nothing is in flight, and the play goes
on only once the new process answers /ready. systemd is stood in for by a small `systemctl` on the PATH that
starts, signals and restarts that process (this machine has no systemd); the service runs a gated engine, so
that a request stays in flight exactly as long as the test wants, without a model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from local_play import ANSIBLE_PLAYBOOK, MANAGED, ROOT

KEY = "restart-test-key-0123456789"
ASSETS = Path(os.environ.get("PILOTYS_WHISPER_ASSETS", Path.home() / ".cache" / "pilotys-whisper" / "assets"))
AUDIO = ASSETS / "audio" / "fr_meeting.webm"

# The service with an engine that holds each transcription until the gate file exists.
LAUNCHER = """
import sys, time
from pathlib import Path
from pilotys_whisper.app import create_app
from pilotys_whisper.cli import _configure_logging
from pilotys_whisper.engines import Segment, Transcription
from pilotys_whisper.server import run
from pilotys_whisper.settings import Settings

GATE = Path(sys.argv[1])

class GatedEngine:
    name, device = "gated", "cpu"

    def load(self):
        pass

    def transcribe(self, path, options, progress=None, should_stop=None, on_segments=None):
        while not GATE.exists():
            time.sleep(0.05)
        return Transcription(text="Bonjour.", language="fr", duration=1.0,
                             segments=[Segment(id=0, start=0.0, end=1.0, text=" Bonjour.")])

settings = Settings.from_env()
_configure_logging("INFO")
run(create_app(settings, GatedEngine()), settings)
"""

# systemctl for one unit, whisper-service: what the role's tasks call (kill, daemon-reload, show, restart), each
# call logged; the service's process is a new session, its pid in UNIT/pid.
SYSTEMCTL = """#!{python}
import json, os, signal, subprocess, sys, time
from pathlib import Path

UNIT = Path({unit!r})
args = sys.argv[1:]
with open(UNIT / "calls.log", "a") as log:
    log.write(" ".join(args) + "\\n")

def pid():
    return int((UNIT / "pid").read_text())

def alive(number):
    try:
        return Path(f"/proc/{{number}}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False

def start():
    with open(UNIT / "service.log", "ab") as out:
        process = subprocess.Popen([sys.executable, str(UNIT / "launcher.py"), str(UNIT / "gate")],
                                   env=json.loads((UNIT / "env.json").read_text()), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    (UNIT / "pid").write_text(str(process.pid))

if args[0] == "kill":
    assert args[1:] == ["--kill-whom=main", "--signal=SIGUSR1", "whisper-service"], args
    os.kill(pid(), signal.SIGUSR1)
elif args[0] == "show":
    print("Id=whisper-service.service\\nLoadState=loaded\\nActiveState=active\\nSubState=running")
elif args[0] == "restart":
    old = pid()
    try:
        os.kill(old, signal.SIGTERM)
    except ProcessLookupError:  # not running: a restart starts it
        pass
    while alive(old):
        time.sleep(0.05)
    start()
elif args[0] == "start":
    start()
elif args[0] != "daemon-reload":
    sys.exit(f"systemctl: {{args}} is not stood in for")
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()


def ready(port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code
    except requests.RequestException:
        return 0


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def unit(tmp_path):
    """A stand-in whisper-service unit: (its directory, its port, the bin directory holding systemctl)."""
    if not AUDIO.is_file():
        pytest.skip("needs the test audio (make assets)")
    unit_dir, bin_dir, port = tmp_path / "unit", tmp_path / "bin", free_port()
    unit_dir.mkdir()
    bin_dir.mkdir()
    (unit_dir / "launcher.py").write_text(LAUNCHER)
    (unit_dir / "env.json").write_text(json.dumps({
        **os.environ, "PYTHONPATH": str(ROOT / "service" / "src"), "WHISPER_API_KEY": KEY,
        "WHISPER_PORT": str(port), "WHISPER_TMP_DIR": str(tmp_path)}))
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(SYSTEMCTL.format(python=sys.executable, unit=str(unit_dir)))
    systemctl.chmod(0o755)
    subprocess.run([str(systemctl), "start", "whisper-service"], check=True)
    try:
        wait_until(lambda: ready(port) == 200, f"the service did not start:\n{(unit_dir / 'service.log').read_text()}")
        yield unit_dir, port, bin_dir
    finally:
        (unit_dir / "gate").touch()
        try:
            os.killpg(int((unit_dir / "pid").read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_restart(tmp_path, port: int, bin_dir: Path) -> tuple[subprocess.Popen, Path]:
    """The role's restart tasks on the local host, in the background: (the process, its output file)."""
    play = [{"name": "Restart under test", "hosts": "all", "gather_facts": False,
             "environment": {"PATH": f"{bin_dir}:{os.environ['PATH']}"},
             "tasks": [{"name": "Restart the service as the handler does", "ansible.builtin.include_role": {
                 "name": "whisper_service", "tasks_from": "restart"}}]}]
    (tmp_path / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": {"testhost": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    (tmp_path / "vars.json").write_text(json.dumps({
        "ansible_managed": MANAGED, "whisper_service_port": port, "whisper_service_drain_before_restart": True,
        "whisper_service_drain_notice_s": 1, "whisper_service_ready_timeout_s": 120}))
    output = tmp_path / "play.out"
    with open(output, "w") as out:
        process = subprocess.Popen(
            [ANSIBLE_PLAYBOOK, "-i", str(tmp_path / "inventory.yml"), "-e", f"@{tmp_path / 'vars.json'}",
             str(tmp_path / "play.yml")], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"})
    return process, output


def transcribe(port: int, results: list) -> None:
    with open(AUDIO, "rb") as f:
        r = requests.post(f"http://127.0.0.1:{port}/transcribe", headers={"Authorization": f"Bearer {KEY}"},
                          files={"file": (AUDIO.name, f)}, data={"language": "fr"}, timeout=300)
    results.append((r.status_code, r.text))


def test_the_restart_drains_waits_for_the_request_in_flight_then_for_ready(unit, tmp_path):
    unit_dir, port, bin_dir = unit
    calls = unit_dir / "calls.log"
    old_pid = (unit_dir / "pid").read_text()
    results: list = []
    request = threading.Thread(target=transcribe, args=(port, results))
    request.start()
    wait_until(lambda: health(port)["in_flight"] == 1, "the request never reached the engine")

    play, output = start_restart(tmp_path, port, bin_dir)
    try:
        # The play drained the service, then waits on the request: it has not restarted anything.
        wait_until(lambda: "RETRYING" in output.read_text() and "nothing in flight" in output.read_text(),
                   f"the play never waited for the request in flight:\n{output.read_text()}", timeout=180)
        assert health(port)["draining"] is True
        assert calls.read_text().splitlines()[-1] == "kill --kill-whom=main --signal=SIGUSR1 whisper-service"
        assert results == [], "the request ended before the gate opened"

        (unit_dir / "gate").touch()  # the transcription ends; only now may the restart go on
        assert play.wait(300) == 0, output.read_text()
    finally:
        if play.poll() is None:
            play.kill()
    request.join(60)
    assert [status for status, _ in results] == [200], results
    lines = calls.read_text().splitlines()
    assert lines.index("kill --kill-whom=main --signal=SIGUSR1 whisper-service") < lines.index(
        "restart whisper-service"), lines
    assert lines.count("restart whisper-service") == 1, lines
    # The play returned with the new process serving (a Type=exec restart returns before the model is loaded).
    assert (unit_dir / "pid").read_text() != old_pid
    assert ready(port) == 200, (unit_dir / "service.log").read_text()
    assert health(port)["draining"] is False


def test_a_service_that_is_not_serving_is_restarted_without_a_drain(unit, tmp_path):
    """A worker whose model is not loaded yet (or that is down) gets no traffic: nothing to drain or wait for."""
    unit_dir, port, bin_dir = unit
    os.killpg(int((unit_dir / "pid").read_text()), signal.SIGKILL)
    wait_until(lambda: ready(port) == 0, "the service did not stop")
    play, output = start_restart(tmp_path, port, bin_dir)
    assert play.wait(300) == 0, output.read_text()
    lines = (unit_dir / "calls.log").read_text().splitlines()
    assert not [line for line in lines if line.startswith("kill")], lines
    assert "restart whisper-service" in lines
    assert ready(port) == 200
