"""The caddy role's Caddyfile as Ansible renders it: which site a gateway asks its workers for, CORS on Caddy's own
errors, and the key checked with the service before a body is sent on (run in front of the real service)."""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from local_play import ROOT, render

GATEWAY = {
    "caddy_site_address": "gw.example.com",
    "caddy_tls_mode": "internal",
    "caddy_upstreams": ["10.0.0.1:443", "10.0.0.2:443"],
    "caddy_upstreams_tls_ca_certs": ["/ctl/w1-ca.crt", "/ctl/w2-ca.crt"],
    "caddy_upstream_pools": [{"model": "whisper-large-v3", "upstreams": ["10.0.0.3:443"],
                              "tls_ca_certs": ["/ctl/g1-ca.crt"]}],
}


def proxies(caddyfile: str) -> list[str]:
    """The body of each reverse_proxy block (they end at the first line that closes them: one tab, '}')."""
    return re.findall(r"^\treverse_proxy [^\n]*\{\n(.*?)^\t\}$", caddyfile, re.MULTILINE | re.DOTALL)


def validate(caddyfile: str, tmp_path):
    """`caddy validate`, where this machine has caddy (the paths of the workers' CAs must then exist)."""
    caddy = shutil.which("caddy")
    if caddy is None:
        return
    for path in set(re.findall(r"/etc/caddy/upstream-cas/\S+", caddyfile)):
        local = tmp_path / "cas" / path.rsplit("/", 1)[1]
        local.parent.mkdir(exist_ok=True)
        caddyfile = caddyfile.replace(path, str(local))
        if not local.exists():
            # Any certificate will do for validation: Caddy only loads it.
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-subj", "/CN=test", "-keyout", str(tmp_path / "key.pem"), "-out",
                            str(local), "-days", "1"], check=True, capture_output=True)
    caddyfile = re.sub(r"output file \S+", f"output file {tmp_path}/access.log", caddyfile)
    (tmp_path / "Caddyfile.validate").write_text(caddyfile)
    # HOME and XDG dirs in tmp_path: validating "tls internal" provisions a throwaway local CA there.
    done = subprocess.run([caddy, "validate", "--adapter", "caddyfile", "--config", str(tmp_path / "Caddyfile.validate")],
                          check=False, capture_output=True, text=True,
                          env={"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
                               "XDG_CONFIG_HOME": str(tmp_path / "config"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_gateway_asks_for_the_dialled_address_by_default(tmp_path):
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, GATEWAY)
    blocks = proxies(caddyfile)
    assert len(blocks) == 2  # the model pool, then the default workers
    for block in blocks:
        assert "header_up Host {upstream_hostport}" in block
        assert "health_headers" not in block
        assert "tls_server_name" not in block
    validate(caddyfile, tmp_path)


def test_gateway_asks_for_the_workers_certified_name(tmp_path):
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path,
                       {**GATEWAY, "caddy_upstreams_tls_server_name": "worker.internal"})
    blocks = proxies(caddyfile)
    assert len(blocks) == 2
    for block in blocks:
        assert "tls_server_name worker.internal" in block
        assert "header_up Host worker.internal" in block
        assert "{upstream_hostport}" not in block
        assert re.search(r"health_headers \{\n\s*Host worker\.internal\n\s*\}", block), block
    validate(caddyfile, tmp_path)


@pytest.mark.parametrize("server_name", ["", "worker.internal"])
def test_single_host_sets_no_host_header(tmp_path, server_name):
    """Without caddy_upstreams the proxy to the local service is the plain one, whatever the gateway settings."""
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, {
        "caddy_site_address": "whisper.example.com", "caddy_tls_mode": "internal",
        "caddy_upstreams_tls_server_name": server_name})
    (block,) = proxies(caddyfile)
    assert "reverse_proxy 127.0.0.1:8000 {" in caddyfile
    assert "header_up" not in block and "health_" not in block and "tls" not in block
    validate(caddyfile, tmp_path)


SINGLE = {"caddy_site_address": "whisper.example.com", "caddy_tls_mode": "internal"}


def errors_block(caddyfile: str) -> str:
    return re.search(r"^\thandle_errors \{\n(.*?)^\t\}$", caddyfile, re.MULTILINE | re.DOTALL).group(1)


def test_caddys_own_errors_carry_cors_for_the_allowed_origins(tmp_path):
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, {
        **SINGLE, "caddy_cors_origins": ["https://app.pilotys.fr/", "https://staging.pilotys.fr"]})
    block = errors_block(caddyfile)
    assert ('@cors_origin expression {http.request.header.Origin} in ["https://app.pilotys.fr", '
            '"https://staging.pilotys.fr"]\n') in block
    assert "Access-Control-Allow-Origin {http.request.header.Origin}" in block
    validate(caddyfile, tmp_path)
    anyone = errors_block(render("caddy", "Caddyfile.j2", tmp_path, {**SINGLE, "caddy_cors_origins": ["*"]}))
    assert "header Access-Control-Allow-Origin *" in anyone
    assert "Access-Control" not in errors_block(render("caddy", "Caddyfile.j2", tmp_path, SINGLE))


def forward_auth(caddyfile: str) -> str | None:
    match = re.search(r"^\tforward_auth (.*?)^\t\}$", caddyfile, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def test_a_single_host_asks_the_service_before_it_sends_a_body(tmp_path):
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, SINGLE)
    keyless = '{method} == "OPTIONS" || {path} in ["/health", "/ready", "/metrics", "/openapi.json"]'
    assert f"@needs_key not expression {keyless}\n" in caddyfile
    block = forward_auth(caddyfile)
    assert block.startswith("@needs_key 127.0.0.1:8000 {"), block
    assert "uri /v1/auth/check\n" in block and "header_up -Expect\n" in block
    assert "lb_try_duration 15s" in block  # a check during a restart waits, like the request itself
    assert f"@keyless expression {keyless}\n\trequest_body @keyless {{\n\t\tmax_size 4096\n" in caddyfile
    assert '"body_not_accepted"' in errors_block(caddyfile)
    validate(caddyfile, tmp_path)


def test_a_gateway_leaves_the_check_to_its_workers(tmp_path):
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, GATEWAY)
    assert forward_auth(caddyfile) is None and "@keyless" not in caddyfile
    assert "body_not_accepted" not in caddyfile


def test_a_gateway_without_a_shared_queue_refuses_what_lives_on_one_worker(tmp_path):
    """The sqlite backend keeps jobs and live uploads on the worker that took them: the gateway refuses them
    (the defaults); with a shared queue (PostgreSQL holds both) it passes them on."""
    refused = re.search(r"^\t@refused path (.*)$", render("caddy", "Caddyfile.j2", tmp_path, GATEWAY), re.MULTILINE)
    assert refused is not None
    assert set(refused.group(1).split()) == {"/v1/jobs", "/v1/jobs/*", "/v1/uploads", "/v1/live", "/v1/live/*"}
    shared = render("caddy", "Caddyfile.j2", tmp_path, {**GATEWAY, "caddy_upstreams_refused_paths": []})
    assert "@refused" not in shared


# -- the rendered Caddyfile in front of the real service ---------------------------------------------------------

KEY = "edge-test-key-0123456789"
ORIGIN = "https://app.pilotys.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingRelay:
    """A TCP relay between Caddy and the service that counts the bytes sent towards the service: what the service
    received, measured outside both."""

    def __init__(self, upstream: int):
        self.upstream, self.received, self._lock = upstream, 0, threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            service = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, service, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(service, client, False), daemon=True).start()

    def _pump(self, source, sink, counted: bool) -> None:
        try:
            while data := source.recv(65536):
                if counted:
                    with self._lock:
                        self.received += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()


def _wait_http(url: str, process: subprocess.Popen, log: Path, **kwargs) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        with contextlib.suppress(requests.RequestException):
            requests.get(url, timeout=2, **kwargs)
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer:\n{log.read_text()}")


@pytest.fixture
def edge(tmp_path):
    """The service (a real process, `python -m pilotys_whisper serve`), the counting relay, and Caddy with the
    role's Caddyfile (tls internal, loopback ports) in front: (https URL, CA file, relay)."""
    caddy = shutil.which("caddy")
    models = Path(os.environ.get("PILOTYS_WHISPER_ASSETS", Path.home() / ".cache/pilotys-whisper/assets")) / "models"
    if caddy is None or not (models / "base" / "model.bin").is_file():
        pytest.skip("needs caddy on the PATH and the base model (make assets)")
    service_port, https_port, http_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "service" / "src"), "WHISPER_MODEL": str(models / "base"),
           "WHISPER_API_KEY": KEY, "WHISPER_PORT": str(service_port), "WHISPER_CORS_ORIGINS": ORIGIN,
           "WHISPER_TMP_DIR": str(tmp_path)}
    service_log = tmp_path / "service.log"
    with open(service_log, "wb") as out:
        service = subprocess.Popen([sys.executable, "-m", "pilotys_whisper", "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    relay = CountingRelay(service_port)
    caddyfile = render("caddy", "Caddyfile.j2", tmp_path, {
        **SINGLE, "caddy_site_address": "127.0.0.1", "caddy_upstream": f"127.0.0.1:{relay.port}",
        "caddy_cors_origins": [ORIGIN], "caddy_log_dir": str(tmp_path)})
    caddyfile = caddyfile.replace("https://127.0.0.1 {", f"https://127.0.0.1:{https_port} {{").replace(
        "http://127.0.0.1 {", f"http://127.0.0.1:{http_port} {{").replace(
        "\tskip_install_trust\n", f"\tskip_install_trust\n\tadmin off\n\thttp_port {http_port}\n"
        f"\thttps_port {https_port}\n")
    (tmp_path / "Caddyfile").write_text(caddyfile)
    caddy_log = tmp_path / "caddy.log"
    with open(caddy_log, "wb") as out:
        proxy = subprocess.Popen([caddy, "run", "--adapter", "caddyfile", "--config", str(tmp_path / "Caddyfile")],
                                 stdout=out, stderr=subprocess.STDOUT, env={
                                     "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
                                     "XDG_CONFIG_HOME": str(tmp_path / "config"), "PATH": "/usr/bin:/bin"})
    try:
        _wait_http(f"http://127.0.0.1:{service_port}/health", service, service_log)
        ca = tmp_path / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
        url = f"https://127.0.0.1:{https_port}"
        deadline = time.monotonic() + 30
        while not ca.is_file():
            assert time.monotonic() < deadline and proxy.poll() is None, caddy_log.read_text()
            time.sleep(0.2)
        _wait_http(url + "/health", proxy, caddy_log, verify=str(ca))
        yield url, str(ca), relay
    finally:
        proxy.terminate()
        service.terminate()
        relay.close()
        proxy.wait(10)
        service.wait(30)


def curl(url: str, ca: str, *args: str) -> tuple[int, str]:
    """curl's status and body. Over HTTP/2 Caddy answers an upload it refuses early in full, then resets the stream
    (RST_STREAM NO_ERROR, RFC 9113 8.1): curl 7.88 then often drops the answer's body (exit 18), not its status
    and headers."""
    done = subprocess.run(["curl", "--silent", "--cacert", ca, "--max-time", "60", "--write-out", "\n%{http_code}",
                           *args, url], capture_output=True, text=True, check=False, timeout=90)
    assert done.returncode == 0 or (done.returncode == 18 and "--http1.1" not in args), done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


@pytest.mark.parametrize("protocol", ["--http1.1", "--http2"])
def test_a_body_without_a_valid_key_never_reaches_the_service(edge, tmp_path, protocol):
    """200 MB with a wrong key: the service gets the check's headers and nothing of the body. Over HTTP/1.1 curl
    sends "Expect: 100-continue" with it, which must not reach the check (waitress would wait for a body)."""
    url, ca, relay = edge
    big = tmp_path / "meeting.webm"
    with open(big, "wb") as f:
        f.truncate(200 * 1024 * 1024)
    before = relay.received
    status, body = curl(url + "/v1/audio/transcriptions", ca, protocol, "-H", "Authorization: Bearer wrong-key-0000000000",
                        "-H", f"Origin: {ORIGIN}", "--dump-header", str(tmp_path / "headers"), "-F", f"file=@{big}")
    assert status == 401 and ('"invalid_api_key"' in body or protocol == "--http2"), body
    headers = (tmp_path / "headers").read_text().lower()
    assert f"access-control-allow-origin: {ORIGIN}" in headers and "www-authenticate: bearer" in headers, headers
    assert relay.received - before < 64 * 1024, relay.received - before
    # With the key, the check lets it in and the whole body goes on (not audio: 415 once the service read it).
    junk = tmp_path / "junk.bin"
    # Not random bytes: 2 MB of those now and then hold enough MPEG frame syncs for ffmpeg to see an MP3 stream
    # with nothing decodable in it (a 422 no_audio). A byte ramp is no format at all.
    junk.write_bytes(bytes(range(256)) * (8 * 1024))
    before = relay.received
    status, body = curl(url + "/v1/audio/transcriptions", ca, protocol, "-H", f"Authorization: Bearer {KEY}",
                        "-F", f"file=@{junk}")
    assert status == 415, body
    assert relay.received - before > 2 * 1024 * 1024


def test_what_needs_no_key_still_answers_and_takes_no_body(edge, tmp_path):
    url, ca, relay = edge
    assert curl(url + "/health", ca)[0] == 200
    status, body = curl(url + "/openapi.json", ca)
    assert status == 200 and '"openapi": "3.1.0"' in body.replace('":"', '": "'), body[:200]
    status, _ = curl(url + "/v1/jobs", ca, "-X", "OPTIONS", "-H", f"Origin: {ORIGIN}", "-H",
                     "Access-Control-Request-Method: POST", "--dump-header", str(tmp_path / "preflight"))
    assert status == 204 and f"access-control-allow-origin: {ORIGIN}" in (tmp_path / "preflight").read_text().lower()
    assert curl(url + "/metrics", ca)[0] == 404
    status, body = curl(url + "/v1/auth/check", ca, "-H", f"Authorization: Bearer {KEY}")
    assert status == 204 and body == ""
    # A body where no key is asked for is cut short.
    big = tmp_path / "body.bin"
    with open(big, "wb") as f:
        f.truncate(20 * 1024 * 1024)
    before = relay.received
    status, body = curl(url + "/health", ca, "--http1.1", "-X", "GET", "--data-binary", f"@{big}")
    assert status == 413 and '"body_not_accepted"' in body, body
    assert relay.received - before < 1024 * 1024, relay.received - before
