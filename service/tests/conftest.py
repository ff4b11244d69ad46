"""Shared fixtures: the fetched assets, a fake engine for the HTTP layer, the real model, a real server process."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from pilotys_whisper.engines import Cancelled, Segment, TranscribeOptions, Transcription, Word
from pilotys_whisper.settings import Settings

HERE = Path(__file__).parent
DATA = HERE / "data"
SCRIPTS = HERE.parents[1] / "scripts"
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


class PostgresServer:
    """A throwaway PostgreSQL server (Debian's binaries), password-authenticated on 127.0.0.1, for the queue tests."""

    USER, PASSWORD = "whisper", "queue-test-password"

    def __init__(self, root: Path):
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            pytest.fail("PostgreSQL server binaries missing: run `make deps` (scripts/install-host-deps)",
                        pytrace=False)
        self.root, self.bindir, self.data, self.port = root, found[-1].parent, root / "pgdata", free_port()
        # PostgreSQL refuses to run as root: as root (CI), run it as Debian's postgres user.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.data.mkdir()
        pwfile = root / "pgpass"
        pwfile.write_text(self.PASSWORD + "\n")
        if self.as_user:
            os.chmod(root, 0o755)
            subprocess.run(["chown", "postgres", self.data, pwfile], check=True)
        self._pg("initdb", "-D", self.data, "-U", self.USER, f"--pwfile={pwfile}", "-A", "scram-sha-256",
                 "--no-sync")
        self._pg("pg_ctl", "-D", self.data, "-l", self.data / "log", "-w", "-o",
                 f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self._databases = 0

    def _pg(self, tool: str, *args) -> None:
        subprocess.run([*self.as_user, self.bindir / tool, *map(str, args)], check=True, capture_output=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database: each test starts from nothing."""
        import psycopg

        self._databases += 1
        name = f"jobs_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    # Not under pytest's tmp dir: that one is private to root, and the server may run as the postgres user.
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="pilotys-whisper-pg-")))
    yield server
    server.stop()


def normalize(text: str) -> list[str]:
    """Words for a word-error rate: lower case, no punctuation, % spelled out."""
    text = text.lower().replace("’", "'").replace("%", " percent")
    return re.sub(r"[^\w' ]+", " ", text).split()


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(" ".join(normalize(reference)), " ".join(normalize(hypothesis)))


def reference(name: str) -> str:
    return (DATA / f"{name}.txt").read_text()


def load_script(name: str):
    """A Python script of scripts/ as a module; the converters import their shared reader by name, as when run."""
    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))
    return importlib.import_module(name)


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

    def transcribe(self, path, options, progress=None, should_stop=None, on_segments=None,
                   hold=None, on_speech=None) -> Transcription:
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
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow on a loaded machine
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


@contextlib.contextmanager
def https_receiver(directory: Path, failures: int = 0):
    """An HTTPS webhook receiver on 127.0.0.1 with its own certificate, answering 500 to the first FAILURES
    deliveries and 204 after; yields (url, its certificate, [(headers, body, monotonic time), ...])."""
    import http.server
    import ssl

    cert_path, key_path = make_certificate(directory)
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body, time.monotonic()))
            self.send_response(500 if len(received) <= failures else 204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/pilotys/webhook", cert_path, received
    finally:
        server.shutdown()


def make_certificate(directory: Path, names=("127.0.0.1",)) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for the given IPs and host names: for local HTTPS receivers."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def alt_name(name: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            return x509.DNSName(name)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([alt_name(n) for n in names]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "hook.crt", directory / "hook.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class RawTLSServer:
    """A TLS server on a loopback address whose handler gets the raw connection: for receivers that answer
    badly (a broken status line, too many headers, a byte at a time)."""

    def __init__(self, cert: tuple[Path, Path], handler, host: str = "127.0.0.1", port: int = 0):
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*cert)
        self.handler = handler
        self.connections = 0
        self.sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self.sock.getsockname()[1]
        self.handled = threading.Semaphore(0)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            with self.context.wrap_socket(conn, server_side=True) as tls:
                self.handler(tls)
        except OSError:
            pass
        finally:
            conn.close()
            self.handled.release()

    def close(self) -> None:
        self.sock.close()


def read_request(sock) -> tuple[dict[str, str], bytes]:
    """The headers (lower-case names) and body of one HTTP request read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the client closed before the end of the headers")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    headers = {name.lower(): value for name, value in headers.items()}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return headers, body
