"""What an operator would check on a freshly provisioned host, and what PILOTYS gets from it over HTTPS."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import port_open  # molecule/scenario_fixtures.py, shared by the scenarios

SCENARIO = Path(os.environ.get("MOLECULE_SCENARIO_DIRECTORY") or Path(__file__).resolve().parent.parent)
PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", SCENARIO.parent.parent))
ASSETS = Path(os.environ.get("PILOTYS_WHISPER_ASSETS", Path.home() / ".cache" / "pilotys-whisper" / "assets"))
FRENCH = ASSETS / "audio" / "fr_meeting.webm"  # what Chrome's MediaRecorder uploads
ORIGIN = "https://app.pilotys.example"  # whisper_service_cors_origins in the scenario's inventory


def journal(host) -> str:
    return host.run("journalctl -u whisper-service -u caddy --no-pager -n 80").stdout





def transcribe(address: str, key: str | None, ca: str, path: Path = FRENCH) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with open(path, "rb") as f:
        return requests.post(f"https://{address}/v1/audio/transcriptions", headers=headers, timeout=300,
                             files={"file": (path.name, f)}, data={"model": "whisper-1", "language": "fr"},
                             verify=ca)


def wait_https(address: str, ca: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"https://{address}/ready", verify=ca, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"https://{address}/ready did not answer 200 within {timeout}s")


def wait_job_end(url: str, headers: dict, ca: str, timeout: float = 300) -> dict:
    """The job once it has ended, or as last seen after TIMEOUT; a service restarting meanwhile is waited for."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = requests.get(url, headers=headers, verify=ca, timeout=10).json()
        except requests.RequestException:
            job = {"status": "unreachable"}
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def run_site(tags: str, extra: str) -> tuple[int, str]:
    """site.yml on the scenario's host, only TAGS, with extra vars EXTRA: its exit code and output."""
    done = subprocess.run(
        ["ansible-playbook", "-i", str(SCENARIO / "inventory"), str(PROJECT / "playbooks" / "site.yml"),
         "--tags", tags, "-e", extra], capture_output=True, text=True, cwd=PROJECT, timeout=300, check=False,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1"})
    return done.returncode, done.stdout + done.stderr


# -- packages and files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ffmpeg", "caddy", "ufw", "python3-venv", "unattended-upgrades"])
def test_packages(host, name):
    assert host.package(name).is_installed


@pytest.mark.parametrize("name", ["environment"])  # the keys file: test_key_rotation.py
def test_secrets_and_settings_are_root_only(host, name):
    path = host.file(f"/etc/whisper-service/{name}")
    assert path.user == "root" and path.group == "root" and path.mode == 0o600


def test_model_is_verified_on_the_host(host):
    check = host.run("cd /opt/whisper-service/models/base && sha256sum --check --strict SHA256SUMS")
    assert check.rc == 0, check.stdout + check.stderr


def test_network_hardening_and_security_upgrades(host):
    assert host.sysctl("net.ipv4.tcp_syncookies") == 1
    assert host.sysctl("net.ipv4.conf.all.accept_redirects") == 0
    origins = host.run("apt-config dump Unattended-Upgrade::Origins-Pattern").stdout.splitlines()[1:]
    assert origins and all("label=Debian-Security" in line for line in origins), origins


# -- the service ------------------------------------------------------------------------------------------

def test_service_runs_unprivileged_on_loopback(host):
    service = host.service("whisper-service")
    assert service.is_running and service.is_enabled, journal(host)
    props = service.systemd_properties
    assert props["DynamicUser"] == "yes" and props["NoNewPrivileges"] == "yes"
    pid = props["MainPID"]
    user = host.run(f"ps -o user= -p {pid}").stdout.strip()
    assert user and user != "root", f"the service runs as {user!r}"
    assert host.socket("tcp://127.0.0.1:8000").is_listening
    assert not host.socket("tcp://0.0.0.0:8000").is_listening


def test_systemd_sandbox_exposure_is_low(host):
    out = host.run("systemd-analyze security whisper-service.service --no-pager").stdout
    match = re.search(r"Overall exposure level for whisper-service\.service: ([0-9.]+)", out)
    assert match, out
    assert float(match.group(1)) < 3.0, out


# -- the network ------------------------------------------------------------------------------------------

def test_firewall_is_active(host):
    status = host.run("ufw status verbose")
    assert "Status: active" in status.stdout
    assert "Default: deny (incoming)" in status.stdout


def test_only_ssh_and_web_reach_the_host(host, address):
    # Something listening on every address, as a careless change might do: the firewall still refuses it.
    host.run("systemd-run --unit=probe-8000 python3 -m http.server 8001 --bind 0.0.0.0")
    try:
        assert host.socket("tcp://0.0.0.0:8001").is_listening or _wait_listen(host, 8001)
        assert not port_open(address, 8001)
        assert not port_open(address, 8000)
        assert port_open(address, 22) and port_open(address, 443)
    finally:
        host.run("systemctl stop probe-8000")


def _wait_listen(host, port: int) -> bool:
    for _ in range(20):
        if host.socket(f"tcp://0.0.0.0:{port}").is_listening:
            return True
        time.sleep(0.25)
    return False


def test_https_with_the_internal_ca(address, ca_bundle):
    r = requests.get(f"https://{address}/health", verify=ca_bundle, timeout=10)
    assert r.status_code == 200 and r.json()["model"] == "whisper-base"
    assert "max-age=" in r.headers.get("Strict-Transport-Security", "")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"https://{address}/health", timeout=10)  # unknown CA: refused, as it should be


def test_http_redirects_to_https(address):
    r = requests.get(f"http://{address}/health", allow_redirects=False, timeout=10)
    assert r.status_code in (301, 308) and r.headers["Location"].startswith("https://")


def test_oversized_upload_is_refused_before_it_is_read(address, api_key, ca_bundle):
    import ssl

    context = ssl.create_default_context(cafile=ca_bundle)
    with socket.create_connection((address, 443), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=address) as tls:
        # 600 MB announced, nothing sent: Caddy answers from the headers alone.
        tls.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {address}\r\n"
                    f"Authorization: Bearer {api_key}\r\n"
                    "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 600000000\r\n\r\n".encode())
        reply = tls.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"file_too_large"' in reply and "application/json" in reply


def test_a_browser_can_read_caddys_own_errors(address, api_key, ca_bundle):
    """PILOTYS's browser uploads itself: an error Caddy answers (413 here, to an upload with a grant) must carry
    CORS, or the browser reports a network failure instead of the JSON error."""
    token = requests.post(f"https://{address}/v1/uploads", headers={"Authorization": f"Bearer {api_key}"},
                          json={"language": "fr"}, verify=ca_bundle, timeout=10).json()["token"]
    grant = {"Authorization": f"Bearer {token}", "Content-Length": "600000000"}
    r = requests.post(f"https://{address}/v1/jobs", headers={**grant, "Origin": ORIGIN}, data=b"", verify=ca_bundle,
                      timeout=10)
    assert r.status_code == 413 and r.headers.get("Access-Control-Allow-Origin") == ORIGIN, r.headers
    other = requests.post(f"https://{address}/v1/jobs", headers={**grant, "Origin": "https://evil.example"},
                          data=b"", verify=ca_bundle, timeout=10)
    assert other.status_code == 413 and "Access-Control-Allow-Origin" not in other.headers


@contextlib.contextmanager
def bytes_to_the_service(host):
    """A function that tells how many bytes the kernel has delivered to the service's port on the host since the
    block began, whoever sent them: what the service received, measured outside it and outside Caddy (an
    iptables rule that only counts)."""
    rule = "INPUT -i lo -p tcp --dport 8000 -m comment --comment molecule-bytes-to-the-service"

    def received() -> int:
        listing = host.run("iptables -L INPUT -v -x -n").stdout
        (line,) = [row for row in listing.splitlines() if "molecule-bytes-to-the-service" in row]
        return int(line.split()[1])

    assert host.run(f"iptables -I {rule}").rc == 0
    try:
        yield received
    finally:
        host.run(f"iptables -D {rule}")


def curl_upload(address: str, ca: str, path: Path, key: str, protocol: str) -> tuple[int, dict, str]:
    """POST PATH as a file with curl (which streams it, and reads an answer that comes before the end of its
    upload): the status, the headers and the body of the answer."""
    answer = path.with_suffix(".answer")
    done = subprocess.run(["curl", "--silent", "--cacert", ca, "--max-time", "120", protocol,
                           "--output", str(answer), "--dump-header", str(answer) + ".headers", "--write-out",
                           "%{http_code}", "-H", f"Authorization: Bearer {key}", "-H", f"Origin: {ORIGIN}",
                           "-F", f"file=@{path}", f"https://{address}/v1/audio/transcriptions"],
                          capture_output=True, text=True, check=False, timeout=180)
    # 18: over HTTP/2 Caddy answers an upload it refuses early in full, then resets the stream (RST_STREAM
    # NO_ERROR, RFC 9113 8.1); curl 7.88 then often drops the answer's body (no file), not its status and headers.
    assert done.returncode == 0 or (done.returncode == 18 and protocol == "--http2"), (done.returncode, done.stderr)
    # The last block: a "100 Continue" may come first.
    block = Path(str(answer) + ".headers").read_bytes().decode().strip().split("\r\n\r\n")[-1]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in block.split("\r\n")[1:])}
    return int(done.stdout), headers, answer.read_text() if answer.exists() else ""


@pytest.mark.parametrize("protocol", ["--http1.1", "--http2"])
def test_an_upload_without_a_valid_key_never_reaches_the_service(host, address, api_key, ca_bundle, tmp_path,
                                                                  protocol):
    """waitress reads a whole body before the app sees a header: Caddy asks the service about the Authorization
    header alone (forward_auth), and a wrong key's 200 MB upload is refused before any of it is sent on."""
    big = tmp_path / "meeting.webm"
    with open(big, "wb") as f:
        f.truncate(200 * 1024 * 1024)
    with bytes_to_the_service(host) as received_so_far:
        status, headers, body = curl_upload(address, ca_bundle, big, "not-the-right-key-000000", protocol)
        received = received_so_far()
    assert status == 401 and ('"invalid_api_key"' in body or protocol == "--http2"), (status, body, journal(host))
    assert headers["www-authenticate"].startswith("Bearer") and headers["access-control-allow-origin"] == ORIGIN
    print(f"{protocol}: 200 MB with a wrong key, {received} bytes delivered to the service")
    assert received < 1024 * 1024, f"the service received {received} bytes of a refused upload"
    # The same counter sees what a valid key sends on (not audio: 415 once the service has read all of it).
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(5 * 1024 * 1024))
    with bytes_to_the_service(host) as received_so_far:
        status, _, body = curl_upload(address, ca_bundle, junk, api_key, protocol)
        received = received_so_far()
    print(f"{protocol}: 5 MB with the key, {received} bytes delivered to the service")
    assert status == 415, body
    assert received > 5 * 1024 * 1024, received


def test_metrics_are_not_published(address, ca_bundle):
    assert requests.get(f"https://{address}/metrics", verify=ca_bundle, timeout=10).status_code == 404


# -- what PILOTYS does ------------------------------------------------------------------------------------

def test_transcription_over_https(host, address, api_key, ca_bundle):
    r = transcribe(address, api_key, ca_bundle)
    assert r.status_code == 200, (r.text, journal(host))
    text = r.json()["text"].lower()
    assert "bonjour" in text and "réunion" in text, text


def test_key_is_required(address, ca_bundle):
    r = transcribe(address, None, ca_bundle)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = transcribe(address, "not-the-right-key-000000", ca_bundle)
    assert r.status_code == 401


def test_browser_upload_with_a_grant(host, address, api_key, ca_bundle):
    """What PILOTYS on Vercel does for a meeting (a route cannot receive more than 4.5 MB): its route asks for a
    grant with the key, and the browser uploads over HTTPS with the grant alone, from PILOTYS's origin."""
    r = requests.post(f"https://{address}/v1/uploads", headers={"Authorization": f"Bearer {api_key}"},
                      json={"language": "fr", "response_format": "text", "idempotency_key": "meeting-9"},
                      verify=ca_bundle, timeout=10)
    assert r.status_code == 201, r.text
    grant = r.json()
    preflight = requests.options(f"https://{address}{grant['upload_url']}", verify=ca_bundle, timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.headers.get("Access-Control-Allow-Origin") == ORIGIN, preflight.headers
    with open(FRENCH, "rb") as f:
        r = requests.post(f"https://{address}{grant['upload_url']}", files={"file": (FRENCH.name, f)},
                          headers={"Authorization": f"Bearer {grant['token']}", "Origin": ORIGIN},
                          verify=ca_bundle, timeout=120)
    assert r.status_code in (200, 202) and r.headers.get("Access-Control-Allow-Origin") == ORIGIN, r.text
    url = f"https://{address}/v1/jobs/{r.json()['id']}"
    headers = {"Authorization": f"Bearer {api_key}"}
    job = wait_job_end(url, headers, ca_bundle)
    assert job["status"] == "succeeded", (job, journal(host))
    text = requests.get(url + "/result", headers=headers, verify=ca_bundle, timeout=10).text
    assert "bonjour" in text.lower(), text


def test_access_log_never_holds_the_key(host, address, api_key, ca_bundle):
    requests.get(f"https://{address}/v1/models", headers={"Authorization": f"Bearer {api_key}"},
                 verify=ca_bundle, timeout=10)
    logs = host.run("cat /var/log/caddy/*.log; journalctl --no-pager -n 500").stdout
    assert api_key not in logs


def test_a_job_survives_the_service_being_killed(host, address, api_key, ca_bundle):
    """A long meeting sent as a job: the service is killed mid-job (SIGKILL), systemd restarts it, and the
    job starts again by itself and finishes; the state lives in the unit's StateDirectory."""
    headers = {"Authorization": f"Bearer {api_key}"}
    news = ASSETS / "audio" / "news_en_169s.wav"
    with open(news, "rb") as f:
        r = requests.post(f"https://{address}/v1/jobs", headers=headers, files={"file": (news.name, f)},
                          data={"language": "en"}, verify=ca_bundle, timeout=120)
    assert r.status_code == 202, r.text
    url = f"https://{address}/v1/jobs/{r.json()['id']}"
    deadline = time.monotonic() + 120
    while requests.get(url, headers=headers, verify=ca_bundle, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    assert host.run("systemctl kill --signal=SIGKILL whisper-service").rc == 0
    job = wait_job_end(url, headers, ca_bundle)
    assert job["status"] == "succeeded", (job, journal(host))
    assert job["attempts"] >= 2, job  # it really was interrupted, and ran again
    text = requests.get(url + "/result?format=text", headers=headers, verify=ca_bundle, timeout=10).text
    assert "trump" in text.lower() and "palin" in text.lower(), text
    assert host.file("/var/lib/whisper-service").is_directory


# -- the play refuses what would lock the operator out ----------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    ("firewall_ssh_port=2222", "would cut the SSH session"),
    ('{"firewall_admin_allowed": ["192.0.2.0/24"]}', "would cut the SSH session"),
    ('{"firewall_extra_rules": [{"port": "7000:9000", "proto": "tcp", "from": "any"}]}', "would open 8000"),
])
def test_play_refuses_settings_that_lock_out_or_expose(host, extra, message):
    before = host.run("ufw status numbered").stdout
    returncode, output = run_site("firewall", extra)
    assert returncode != 0, output[-2000:]
    assert message in output, output[-2000:]
    assert host.run("ufw status numbered").stdout == before, "a refused run changed the firewall"


def test_play_refuses_a_setting_the_service_would_refuse(host):
    """A value the preflight lets through but the service refuses (a language Whisper does not know): the
    service's own check fails the play before the running settings are replaced; nothing restarts."""
    settings = host.file("/etc/whisper-service/environment")
    before, pid = settings.sha256sum, host.run("systemctl show -p MainPID --value whisper-service").stdout
    returncode, output = run_site("whisper_configure", "whisper_service_language=xx")
    assert returncode != 0 and "WHISPER_LANGUAGE" in output, output[-2000:]
    assert settings.sha256sum == before
    assert host.run("systemctl show -p MainPID --value whisper-service").stdout == pid
    assert host.service("whisper-service").is_running


# -- restarts ---------------------------------------------------------------------------------------------

def test_back_after_a_service_restart(host, address, api_key, ca_bundle):
    host.run("systemctl restart whisper-service")
    wait_https(address, ca_bundle)
    assert transcribe(address, api_key, ca_bundle).status_code == 200


def test_caddy_rides_over_a_restart_and_says_when_the_service_is_down(host, address, ca_bundle):
    host.run("systemctl stop whisper-service")
    try:
        started = time.monotonic()
        down = requests.get(f"https://{address}/health", verify=ca_bundle, timeout=60)
        assert down.status_code == 502 and down.json()["error"]["code"], down.text
        assert down.headers.get("Retry-After")
        assert time.monotonic() - started >= 10, "Caddy gave up before its retry window"
        # A request that arrives while the service restarts waits for it instead of failing.
        import threading

        answer = {}
        thread = threading.Thread(target=lambda: answer.update(
            r=requests.get(f"https://{address}/health", verify=ca_bundle, timeout=60)))
        thread.start()
        time.sleep(2)
        host.run("systemctl start whisper-service")
        thread.join(60)
        assert answer["r"].status_code == 200
    finally:
        host.run("systemctl start whisper-service")
        wait_https(address, ca_bundle)


def test_back_after_a_host_reboot(host, address, api_key, ca_bundle):
    name = host.ansible.get_variables()["inventory_hostname"]
    host.run("systemctl reboot")
    time.sleep(3)
    subprocess.run([str(PROJECT / "rig" / "rig"), "wait", name, "180"], check=True)
    wait_https(address, ca_bundle)
    assert host.service("whisper-service").is_running
    assert "Status: active" in host.run("ufw status").stdout
    assert not port_open(address, 8000)
    r = transcribe(address, api_key, ca_bundle)
    assert r.status_code == 200 and "bonjour" in r.json()["text"].lower()
