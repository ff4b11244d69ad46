"""The cluster as PILOTYS and an operator see it: transcriptions through the gateway, spread over the workers,
a worker that stops gets no traffic, and the workers answer HTTPS to the gateway only."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from itertools import pairwise
from pathlib import Path

import pytest
import requests
import testinfra
from conftest import port_open  # molecule/scenario_fixtures.py, shared by the scenarios

SCENARIO = Path(__file__).resolve().parent.parent
INVENTORY = SCENARIO / "inventory"
PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", SCENARIO.parent.parent))
ASSETS = Path(os.environ.get("PILOTYS_WHISPER_ASSETS", Path.home() / ".cache" / "pilotys-whisper" / "assets"))
FRENCH = ASSETS / "audio" / "fr_meeting.webm"
NEWS = ASSETS / "audio" / "news_en_169s.wav"
NEWS_REFERENCE = PROJECT / "service" / "tests" / "data" / "news_en_169s.txt"
WORKERS = ["wc-w1", "wc-w2"]  # the default pool
SECOND, SECOND_MODEL = "wc-g1", "whisper-second"  # a pool serving another model (group whisper_gpu_workers)
ACCESS_LOG = "/var/log/caddy/access.log"
UPSTREAM_CAS = "/etc/caddy/upstream-cas"
# The gateway's active health checks (caddy role defaults): interval 5 s, timeout 3 s, plus a margin.
HEALTH_CHECK_WINDOW_S = 12


@pytest.fixture(scope="module")
def gateway(host):
    return host


@pytest.fixture(scope="module")
def workers() -> dict:
    return {name: testinfra.get_host(f"ansible://{name}", ansible_inventory=str(INVENTORY / "hosts.yml")) for name in WORKERS}


@pytest.fixture(scope="module")
def second_worker():
    return testinfra.get_host(f"ansible://{SECOND}", ansible_inventory=str(INVENTORY / "hosts.yml"))


@pytest.fixture(scope="module")
def worker_addresses(workers) -> dict:
    return {name: w.ansible.get_variables()["ansible_host"] for name, w in workers.items()}


def journals(gateway, workers) -> str:
    out = ["== gateway", gateway.run("journalctl -u caddy --no-pager -n 40").stdout]
    for name, w in workers.items():
        out += [f"== {name}", w.run("journalctl -u whisper-service -u caddy --no-pager -n 40").stdout]
    return "\n".join(out)


def requests_seen(workers, marker: str) -> dict:
    """How many requests carrying MARKER each worker's Caddy logged."""
    return {name: int(w.run(f"grep -c -- {marker} {ACCESS_LOG} || true").stdout.strip() or 0)
            for name, w in workers.items()}


def probe(address: str, ca: str, count: int) -> tuple[str, list[int]]:
    """COUNT GET /health through the gateway, each marked in its query string; returns the marker and statuses."""
    marker = f"probe-{uuid.uuid4().hex}"
    statuses = [requests.get(f"https://{address}/health?{marker}={i}", verify=ca, timeout=60).status_code
                for i in range(count)]
    return marker, statuses


def wait_seen(workers, marker: str, total: int) -> dict:
    deadline = time.monotonic() + 10
    while True:
        seen = requests_seen(workers, marker)
        if sum(seen.values()) >= total or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def transcribe(address: str, key: str | None, ca: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with open(FRENCH, "rb") as f:
        return requests.post(f"https://{address}/transcribe", headers=headers, files={"file": (FRENCH.name, f)},
                             data={"language": "fr"}, verify=ca, timeout=300)


def wer(reference: str, hypothesis: str) -> float:
    import re

    import jiwer

    def words(text: str) -> str:
        return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())
    return jiwer.wer(words(reference), words(hypothesis))


def submit_job(address: str, key: str, ca: str) -> str:
    with open(NEWS, "rb") as f:
        r = requests.post(f"https://{address}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                          files={"file": (NEWS.name, f)}, data={"language": "en"}, verify=ca, timeout=120)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def get_job(address: str, key: str, ca: str, job_id: str) -> dict:
    """The job as a client polling it sees it: a 502/503 with Retry-After (the gateway has not yet noticed that
    a worker died) means ask again, as PILOTYS's client does."""
    while True:
        r = requests.get(f"https://{address}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"},
                         verify=ca, timeout=30)
        if r.status_code not in (502, 503):
            assert r.status_code == 200, r.text
            return r.json()
        assert r.headers.get("Retry-After"), r.text
        time.sleep(1)


def wait_job(address: str, key: str, ca: str, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (state := get_job(address, key, ca, job_id))["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, state
        time.sleep(1)
    return state


def times_taken(worker, job_id: str) -> int:
    """How many times this worker's service started the job (its log line when the queue hands it a job)."""
    out = worker.run(f"journalctl -u whisper-service --no-pager | grep -c 'job {job_id} taken by' || true")
    return int(out.stdout.strip() or 0)


def worker_ready_from_gateway(gateway, name: str, worker_address: str) -> int:
    out = gateway.run(f"curl -sS -o /dev/null -w '%{{http_code}}' --max-time 10 "
                      f"--cacert {UPSTREAM_CAS}/{name}-caddy-root-ca.crt https://{worker_address}/ready")
    return int(out.stdout.strip() or 0)


def restart_worker(gateway, workers, worker_addresses, name: str) -> None:
    """Start a stopped worker's service again and wait until the gateway sends it traffic again."""
    workers[name].run("systemctl start whisper-service")
    deadline = time.monotonic() + 180
    while worker_ready_from_gateway(gateway, name, worker_addresses[name]) != 200:
        assert time.monotonic() < deadline, journals(gateway, workers)
        time.sleep(1)
    time.sleep(HEALTH_CHECK_WINDOW_S)  # the gateway's next health check finds it ready again


# -- TLS between the gateway and the workers --------------------------------------------------------------

def test_gateway_trusts_each_worker_by_its_own_root_certificate(gateway, worker_addresses):
    config = gateway.file("/etc/caddy/Caddyfile").content_string
    assert "tls_trusted_ca_certs" in config and "insecure" not in config
    for name, worker_address in worker_addresses.items():
        assert worker_ready_from_gateway(gateway, name, worker_address) == 200
    # The other worker's CA does not vouch for this one: each worker's certificate really is checked.
    w1, w2 = WORKERS
    wrong = gateway.run(f"curl -sS -o /dev/null --max-time 10 --cacert {UPSTREAM_CAS}/{w2}-caddy-root-ca.crt "
                        f"https://{worker_addresses[w1]}/ready")
    assert wrong.rc == 60, (wrong.rc, wrong.stderr)  # curl: peer certificate cannot be authenticated


def test_workers_answer_https_to_the_gateway_only(gateway, worker_addresses):
    for worker_address in worker_addresses.values():
        # This machine is neither the gateway nor a worker: refused, though the admins' SSH still answers.
        assert port_open(worker_address, 22)
        assert not port_open(worker_address, 443)
        assert not port_open(worker_address, 80)
        reached = gateway.run(f"timeout 5 bash -c 'exec 3<>/dev/tcp/{worker_address}/443'")
        assert reached.rc == 0, reached.stderr


# -- what PILOTYS does ------------------------------------------------------------------------------------

def test_transcription_through_the_gateway(gateway, workers, address, api_key, ca_bundle):
    r = transcribe(address, api_key, ca_bundle)
    assert r.status_code == 200, (r.text, journals(gateway, workers))
    text = r.json()["text"].lower()
    assert "bonjour" in text and "réunion" in text, text


def test_key_is_required_through_the_gateway(address, ca_bundle):
    r = transcribe(address, None, ca_bundle)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_a_job_through_the_gateway_survives_its_worker_being_killed(gateway, workers, worker_addresses, address,
                                                                   api_key, ca_bundle):
    """The shared queue: a job accepted by the gateway runs on a worker; SIGKILL that worker (and keep it down)
    mid-job, and the other worker takes the job over; the caller sees one job and one result."""
    headers = {"Authorization": f"Bearer {api_key}"}
    job_id = submit_job(address, api_key, ca_bundle)
    deadline = time.monotonic() + 120
    while get_job(address, api_key, ca_bundle, job_id)["progress"] <= 0:
        assert time.monotonic() < deadline, journals(gateway, workers)
        time.sleep(0.5)
    running_on = [name for name, w in workers.items() if times_taken(w, job_id)]
    assert len(running_on) == 1, (running_on, journals(gateway, workers))
    killed, other = running_on[0], next(name for name in WORKERS if name != running_on[0])
    # SIGKILL (nothing goes back to the queue by itself), then stop: systemd must not restart it meanwhile.
    workers[killed].run("systemctl kill --signal=SIGKILL whisper-service; systemctl stop whisper-service")
    try:
        state = wait_job(address, api_key, ca_bundle, job_id, 240)
        assert state["status"] == "succeeded" and state["attempts"] == 2, (state, journals(gateway, workers))
        assert times_taken(workers[other], job_id) == 1, journals(gateway, workers)
        text = requests.get(f"https://{address}/v1/jobs/{job_id}/result?format=text", headers=headers,
                            verify=ca_bundle, timeout=30).text
        assert wer(NEWS_REFERENCE.read_text(), text) <= 0.1, text
        listed = requests.get(f"https://{address}/v1/jobs?limit=100", headers=headers, verify=ca_bundle,
                              timeout=30).json()["data"]
        assert [j["id"] for j in listed].count(job_id) == 1
    finally:
        restart_worker(gateway, workers, worker_addresses, killed)


def tus(key: str, **headers) -> dict:
    return {"Authorization": f"Bearer {key}", "Tus-Resumable": "1.0.0", **headers}


def live_offset(address: str, key: str, ca: str, location: str) -> int:
    """HEAD through the gateway, asked again while it still sends traffic to a worker that died (502/503)."""
    while True:
        try:
            r = requests.head(f"https://{address}{location}", headers=tus(key), verify=ca, timeout=30)
        except requests.ConnectionError:
            r = None
        if r is not None and r.status_code not in (502, 503):
            assert r.status_code == 200, r.status_code
            return int(r.headers["Upload-Offset"])
        time.sleep(1)


def live_send(address: str, key: str, ca: str, location: str, data: bytes, offset: int, end: int) -> int:
    """PATCH data[offset:end] through the gateway in 16 kB timeslices, as tus-js-client does: after an error
    (a 502 from a dead worker, a 409 when an answer was lost) ask HEAD for the offset and go on from there."""
    while offset < end:
        piece = data[offset:min(offset + 16_000, end)]
        try:
            r = requests.patch(f"https://{address}{location}", data=piece, verify=ca, timeout=60,
                               headers=tus(key, **{"Upload-Offset": str(offset),
                                                   "Content-Type": "application/offset+octet-stream"}))
        except requests.ConnectionError:
            r = None
        if r is not None and r.status_code == 204:
            offset = int(r.headers["Upload-Offset"])
            continue
        assert r is None or r.status_code in (409, 502, 503), r.text
        time.sleep(1)
        offset = live_offset(address, key, ca, location)
    return offset


def test_a_live_upload_survives_its_worker_being_killed_mid_meeting(gateway, workers, worker_addresses, address,
                                                                   api_key, ca_bundle):
    """A live upload (tus) through the gateway lives in PostgreSQL: kill -9 the worker that created it in the
    middle of the meeting (and keep it down), the recording goes on through the gateway on the other worker,
    the job is queued once the length is declared and succeeds with the whole recording."""
    data = FRENCH.read_bytes()
    r = requests.post(f"https://{address}/v1/live", data=data[:16_000], verify=ca_bundle, timeout=60,
                      headers=tus(api_key, **{"Upload-Defer-Length": "1", "Upload-Metadata": "language ZnI=",
                                              "Content-Type": "application/offset+octet-stream"}))
    assert r.status_code == 201, (r.text, journals(gateway, workers))
    location, job_id = r.headers["Location"], r.headers["Whisper-Job-Id"]
    upload_id = location.rsplit("/", 1)[1]
    half = live_send(address, api_key, ca_bundle, location, data, 16_000, len(data) // 2)
    created_on = [name for name, w in workers.items() if w.run(
        f"journalctl -u whisper-service --no-pager | grep -c 'live upload {upload_id} created' || true"
    ).stdout.strip() not in ("", "0")]
    assert len(created_on) == 1, (created_on, journals(gateway, workers))
    killed, other = created_on[0], next(name for name in WORKERS if name != created_on[0])
    workers[killed].run("systemctl kill --signal=SIGKILL whisper-service; systemctl stop whisper-service")
    try:
        assert live_offset(address, api_key, ca_bundle, location) == half  # nothing acknowledged was lost
        assert get_job(address, api_key, ca_bundle, job_id)["status"] == "receiving"
        assert live_send(address, api_key, ca_bundle, location, data, half, len(data)) == len(data)
        # Recording stops: the length is declared (an empty PATCH), and the job goes to the queue.
        r = requests.patch(f"https://{address}{location}", data=b"", verify=ca_bundle, timeout=60,
                           headers=tus(api_key, **{"Upload-Offset": str(len(data)), "Upload-Length": str(len(data)),
                                                   "Content-Type": "application/offset+octet-stream"}))
        assert r.status_code == 204, r.text
        state = wait_job(address, api_key, ca_bundle, job_id, 240)
        assert state["status"] == "succeeded" and state["attempts"] == 1, (state, journals(gateway, workers))
        assert times_taken(workers[other], job_id) == 1, journals(gateway, workers)
        text = requests.get(f"https://{address}/v1/jobs/{job_id}/result?format=text", verify=ca_bundle,
                            headers={"Authorization": f"Bearer {api_key}"}, timeout=30).text.lower()
        assert "bonjour" in text and "réunion" in text, text
    finally:
        restart_worker(gateway, workers, worker_addresses, killed)


def test_the_queue_answers_the_workers_only_and_over_tls(gateway, workers):
    queue = gateway.ansible.get_variables()["ansible_host"]
    assert not port_open(queue, 5432)  # this machine is no worker: the firewall drops it
    python = "/opt/whisper-service/venv/bin/python"
    for name, w in workers.items():
        # The service's own connection string works (verify-full against the fetched certificate)...
        ok = w.run(f"{python} -c \"import psycopg,sys; psycopg.connect(open(sys.argv[1]).read()).close()\" "
                   "/etc/whisper-service/job-database")
        assert ok.rc == 0, (name, ok.stderr)
        # ...the same without TLS is refused by pg_hba (hostssl only), even with the right password.
        plain = w.run(f"{python} -c \"import psycopg,sys; psycopg.connect(open(sys.argv[1]).read() + "
                      "' sslmode=disable').close()\" /etc/whisper-service/job-database")
        assert plain.rc != 0 and "no encryption" in plain.stderr, (name, plain.stderr)


def test_each_model_is_served_by_its_own_pool(gateway, workers, second_worker, address, api_key, ca_bundle):
    """/models/<model>/ reaches the workers serving that model and only them; everything else goes to the
    default pool; a job for that model runs on its workers (its own queue) and is visible from any route."""
    everyone = {**workers, SECOND: second_worker}
    headers = {"Authorization": f"Bearer {api_key}"}
    marker = f"model-{uuid.uuid4().hex}"
    for i in range(3):  # what an OpenAI client does with base_url https://GATEWAY/models/whisper-second/v1
        with open(FRENCH, "rb") as f:
            r = requests.post(f"https://{address}/models/{SECOND_MODEL}/v1/audio/transcriptions?{marker}={i}",
                              headers=headers, files={"file": (FRENCH.name, f)},
                              data={"model": SECOND_MODEL, "language": "fr"}, verify=ca_bundle, timeout=300)
        assert r.status_code == 200 and "bonjour" in r.json()["text"].lower(), r.text
    assert wait_seen(everyone, marker, 3) == {**{name: 0 for name in WORKERS}, SECOND: 3}
    health = requests.get(f"https://{address}/models/{SECOND_MODEL}/health", verify=ca_bundle, timeout=30).json()
    assert health["model"] == SECOND_MODEL
    default_marker, statuses = probe(address, ca_bundle, 10)
    assert statuses == [200] * 10
    seen = wait_seen(everyone, default_marker, 10)
    assert seen[SECOND] == 0 and sum(seen.values()) == 10, seen
    r = requests.get(f"https://{address}/models/whisper-nothing/health", verify=ca_bundle, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text

    with open(FRENCH, "rb") as f:
        r = requests.post(f"https://{address}/models/{SECOND_MODEL}/v1/jobs", headers=headers,
                          files={"file": (FRENCH.name, f)}, data={"language": "fr"}, verify=ca_bundle, timeout=120)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    state = wait_job(address, api_key, ca_bundle, job_id, 180)  # polled through the default route
    assert state["status"] == "succeeded", state
    taken = {name: times_taken(w, job_id) for name, w in everyone.items()}
    assert taken == {**{name: 0 for name in WORKERS}, SECOND: 1}, taken


def test_metrics_are_not_published_by_the_gateway(address, ca_bundle):
    assert requests.get(f"https://{address}/metrics", verify=ca_bundle, timeout=10).status_code == 404


# -- load balancing and health checks ---------------------------------------------------------------------

def test_requests_are_spread_over_the_workers(workers, address, ca_bundle):
    marker, statuses = probe(address, ca_bundle, 20)
    assert statuses == [200] * 20, statuses
    seen = wait_seen(workers, marker, 20)
    assert sum(seen.values()) == 20, seen
    assert all(count > 0 for count in seen.values()), f"one worker got everything: {seen}"


def test_a_stopped_worker_gets_no_traffic_and_comes_back(gateway, workers, worker_addresses, address, api_key,
                                                        ca_bundle):
    up, down = WORKERS
    workers[down].run("systemctl stop whisper-service")
    try:
        time.sleep(HEALTH_CHECK_WINDOW_S)  # the gateway's next health check of that worker fails
        marker, statuses = probe(address, ca_bundle, 10)
        assert statuses == [200] * 10, (statuses, journals(gateway, workers))
        r = transcribe(address, api_key, ca_bundle)
        assert r.status_code == 200 and "bonjour" in r.json()["text"].lower(), r.text
        seen = wait_seen(workers, marker, 10)
        assert seen == {up: 10, down: 0}, seen
    finally:
        restart_worker(gateway, workers, worker_addresses, down)
    marker, statuses = probe(address, ca_bundle, 20)
    assert statuses == [200] * 20, statuses
    seen = wait_seen(workers, marker, 20)
    assert seen[down] > 0, f"the restarted worker gets no traffic again: {seen}"


def invocation(worker) -> str:
    return worker.run("systemctl show --property=InvocationID --value whisper-service").stdout.strip()


def restarts_since(worker, since: float) -> list[tuple[float, float]]:
    """The worker's service restarts since SINCE (Unix time), from its journal: for each drain (its SIGUSR1 line),
    the time of the drain and of the next "ready" line, the new process's model loaded."""
    out = worker.run(f"journalctl -u whisper-service --since @{int(since)} -o short-unix --no-pager").stdout
    windows, drained = [], None
    for line in out.splitlines():
        stamp, _, message = line.partition(" ")
        if "received SIGUSR1, draining" in message:
            drained = float(stamp)
        elif drained is not None and "ready: model" in message:
            windows.append((drained, float(stamp)))
            drained = None
    if drained is not None:
        windows.append((drained, float("inf")))  # drained and never ready again
    return windows


def roll_during_stream(gateway, workers, address, api_key, ca_bundle, playbook: str, *args: str,
                       with_job: bool = False) -> dict:
    """Run PLAYBOOK (with ARGS) while transcriptions keep arriving through the gateway, two at a time (both
    default workers are busy whenever one is restarted, so a worker cut off mid-request fails this), and, WITH_JOB,
    a job is queued; asserts the play passed, every transcription succeeded and the job too. Returns each worker's
    restarts during the play (restarts_since)."""
    outcomes: list = []
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            try:
                r = transcribe(address, api_key, ca_bundle)
                outcomes.append(r.status_code if r.status_code != 200 or "bonjour" in r.json()["text"].lower()
                                else "200 without the words")
            except requests.RequestException as exc:
                outcomes.append(repr(exc))

    senders = [threading.Thread(target=stream, name=f"steady-stream-{i}") for i in range(2)]
    started = time.time() - 1
    for sender in senders:
        sender.start()
    job_id = submit_job(address, api_key, ca_bundle) if with_job else None
    try:
        run = subprocess.run(
            [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(INVENTORY / "hosts.yml"), playbook,
             *args], cwd=PROJECT, capture_output=True, text=True, timeout=1800, check=False)
    finally:
        stop.set()
        for sender in senders:
            sender.join(320)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    failures = [o for o in outcomes if o != 200]
    assert len(outcomes) >= 10 and not failures, (outcomes, journals(gateway, workers))
    if job_id is not None:
        state = wait_job(address, api_key, ca_bundle, job_id, 300)
        assert state["status"] == "succeeded", (state, journals(gateway, workers))
    return {name: restarts_since(w, started) for name, w in workers.items()}


def assert_one_at_a_time(restarts: dict) -> None:
    """Each worker restarted once, drained first, and the next one drained only after it was ready again."""
    assert all(len(windows) == 1 for windows in restarts.values()), restarts
    windows = sorted(w[0] for w in restarts.values())
    for (_, ready), (next_drained, _) in pairwise(windows):
        assert ready < next_drained, f"two workers were out at once: {restarts}"


def test_a_rolling_deploy_loses_no_request_and_no_job(gateway, workers, second_worker, address, api_key, ca_bundle):
    """playbooks/deploy.yml drains and restarts the workers one after the other while transcriptions keep
    arriving through the gateway: every one of them succeeds, a job queued meanwhile succeeds, and every
    worker was restarted, each after the one before was ready again."""
    everyone = {**workers, SECOND: second_worker}
    before = {name: invocation(w) for name, w in everyone.items()}
    restarts = roll_during_stream(gateway, everyone, address, api_key, ca_bundle, "playbooks/deploy.yml",
                                  with_job=True)
    after = {name: invocation(w) for name, w in everyone.items()}
    assert all(before[name] != after[name] for name in everyone), f"a worker was not restarted: {before} {after}"
    assert_one_at_a_time(restarts)


def test_a_changed_setting_restarts_the_workers_one_at_a_time(gateway, workers, address, api_key, ca_bundle):
    """cluster.yml run again with a setting changed (the job retention, in the environment file): the handler
    restarts each worker drained and ready again before the next one (serial 1), and no request fails. Before,
    every worker reloaded its model at once (a Type=exec restart returns at exec) and requests failed."""
    before = {name: invocation(w) for name, w in workers.items()}
    line = workers[WORKERS[0]].run("grep ^WHISPER_JOB_RETENTION_S= /etc/whisper-service/environment").stdout
    retention = int(line.split("=", 1)[1].strip().strip('"')) - 1
    restarts = roll_during_stream(gateway, workers, address, api_key, ca_bundle, "playbooks/cluster.yml",
                                  "--limit", ",".join(WORKERS), "-e", f"whisper_service_job_retention_s={retention}")
    after = {name: invocation(w) for name, w in workers.items()}
    assert all(before[name] != after[name] for name in workers), f"a worker was not restarted: {before} {after}"
    assert_one_at_a_time(restarts)
