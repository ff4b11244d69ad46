"""Jobs for long meetings: acceptance, idempotency, isolation, cancel, progress, webhooks, purge, disk full."""

import hashlib
import json
import threading
import time

import pytest

from pilotys_whisper.app import create_app
from pilotys_whisper.errors import ApiError
from pilotys_whisper.jobs.webhooks import WebhookPolicy, verify

from conftest import FakeEngine, RawTLSServer, free_port, https_receiver, make_certificate, make_settings, read_request

ALICE = "alice-key-0123456789"
BOB = "bob-key-0123456789ab"
SECRET = "whsec-test-secret-0123"


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{ALICE} label=alice webhook_secret={SECRET}\n{BOB} label=bob\n")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request):
    """Every test here runs on both job backends: the embedded one and the queue shared by several workers."""
    if request.param == "sqlite":
        return {}
    return {"WHISPER_JOB_BACKEND": "postgresql",
            "WHISPER_JOB_DATABASE_URL": request.getfixturevalue("postgres").new_database()}


@pytest.fixture
def make_app(tmp_path, keys_file, backend):
    def make(engine=None, **settings):
        env = dict(WHISPER_API_KEY="", WHISPER_API_KEYS_FILE=keys_file, WHISPER_STATE_DIR=tmp_path / "state",
                   WHISPER_TMP_DIR=tmp_path, WHISPER_WEBHOOK_BACKOFF_S=1, WHISPER_JOB_PURGE_INTERVAL_S=1,
                   **backend)
        env.update(settings)
        app = create_app(make_settings(**env), engine or FakeEngine())
        app.extensions["whisper"].ready.wait(5)
        return app
    return make


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def app(make_app, engine):
    app = make_app(engine)
    yield app
    engine.release.set()
    app.extensions["whisper"].jobs.stop()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def submit(client, audio, key=ALICE, headers=None, **fields):
    with open(audio("fr_meeting.wav"), "rb") as f:
        return client.post("/v1/jobs", data={"file": (f, "meeting.wav"), **fields},
                           headers={**auth(key), **(headers or {})}, content_type="multipart/form-data")


def wait_status(client, job_id, statuses, key=ALICE, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).get_json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job stayed {job['status']}")


def test_submit_poll_and_fetch_every_format(app, audio):
    client = app.test_client()
    r = submit(client, audio, response_format="verbose_json", language="fr")
    assert r.status_code == 202
    job = r.get_json()
    assert job["status"] in ("queued", "running") and job["id"].startswith("job_")
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["duration"] == pytest.approx(37.9, abs=0.2)
    done = wait_status(client, job["id"], ("succeeded",))
    assert done["progress"] == 1.0 and done["finished_at"] and done["expires_at"]
    body = client.get(f"/v1/jobs/{job['id']}/result", headers=auth(ALICE)).get_json()
    assert body["language"] == "french" and body["segments"]  # the format chosen at submission
    assert client.get(f"/v1/jobs/{job['id']}/result?format=text", headers=auth(ALICE)).get_data(
        as_text=True).startswith("Bonjour")
    srt = client.get(f"/v1/jobs/{job['id']}/result?format=srt", headers=auth(ALICE)).get_data(as_text=True)
    assert srt.startswith("1\n00:00:00,000 --> ")
    bad = client.get(f"/v1/jobs/{job['id']}/result?format=pdf", headers=auth(ALICE))
    assert bad.status_code == 400


def test_audio_is_deleted_when_the_job_ends(app, audio, tmp_path):
    client = app.test_client()
    job = submit(client, audio).get_json()
    wait_status(client, job["id"], ("succeeded",))
    assert list((tmp_path / "state" / "spool").iterdir()) == []


def test_bad_input_is_refused_before_acceptance(app, audio):
    client = app.test_client()
    r = client.post("/v1/jobs", data={"file": (open(audio("video_no_audio.mp4"), "rb"), "x.mp4")},
                    headers=auth(ALICE), content_type="multipart/form-data")
    assert r.status_code == 422
    assert client.get("/v1/jobs", headers=auth(ALICE)).get_json()["data"] == []


def test_audio_too_long_for_a_job_does_not_say_to_send_a_job(make_app, audio):
    app = make_app(WHISPER_MAX_DURATION_S=10)
    try:
        r = submit(app.test_client(), audio)
        assert r.status_code == 413 and r.get_json()["error"]["code"] == "audio_too_long"
        message = r.get_json()["error"]["message"]
        assert "10 s" in message and "split it" in message and "job" not in message
    finally:
        app.extensions["whisper"].jobs.stop()


def test_idempotency_key_returns_the_same_job(app, audio):
    client = app.test_client()
    first = submit(client, audio, headers={"Idempotency-Key": "upload-42"})
    again = submit(client, audio, headers={"Idempotency-Key": "upload-42"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    other = submit(client, audio, key=BOB, headers={"Idempotency-Key": "upload-42"})
    assert other.status_code == 202 and other.get_json()["id"] != first.get_json()["id"]
    assert len(client.get("/v1/jobs", headers=auth(ALICE)).get_json()["data"]) == 1


def grant(client, key=ALICE, **body):
    r = client.post("/v1/uploads", json=body, headers=auth(key))
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def upload_with(client, audio, token, name="fr_meeting.wav", **fields):
    """What the browser does: the file (and whatever else it tries) with the grant, no API key."""
    with open(audio(name), "rb") as f:
        return client.post("/v1/jobs", data={"file": (f, name), **fields},
                           headers={"Authorization": f"Bearer {token}"}, content_type="multipart/form-data")


def test_an_upload_grant_creates_one_job_with_the_options_it_fixed(app, audio, engine, keys_file):
    client = app.test_client()
    issued = grant(client, language="en", response_format="text", idempotency_key="meeting-42", expires_in=120)
    assert issued["token"].startswith("wug1.") and ALICE not in issued["token"]
    # Stateless: another worker holding the same keys accepts it (behind a gateway, any worker gets the upload).
    from pilotys_whisper import grants
    from pilotys_whisper.auth import KeyRing

    elsewhere = grants.verify(KeyRing(keys_file=keys_file), f"Bearer {issued['token']}")
    assert elsewhere.principal.label == "alice" and elsewhere.fields == {"language": "en", "response_format": "text"}
    # The browser reads the grant's claims: the kid there is no part of a hash of the key.
    kid = json.loads(grants._unb64(issued["token"].split(".")[1]))["kid"]
    assert kid not in hashlib.sha256(ALICE.encode()).hexdigest()
    assert issued["upload_url"] == "/v1/jobs" and issued["idempotency_key"] == "meeting-42"
    # The browser cannot change what the grant fixed.
    first = upload_with(client, audio, issued["token"], language="de", response_format="srt")
    assert first.status_code == 202, first.get_json()
    job = wait_status(client, first.get_json()["id"], ("succeeded",))
    assert engine.calls[-1][1].language == "en"
    assert client.get(f"/v1/jobs/{job['id']}/result", headers=auth(ALICE)).content_type.startswith("text/plain")
    # Used again (a retry, or a leaked token): the same job, never a second transcription.
    again = upload_with(client, audio, issued["token"])
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == job["id"] and len(engine.calls) == 1
    # The job is the key's, like one it uploaded itself: same idempotency key, same job.
    assert submit(client, audio, headers={"Idempotency-Key": "meeting-42"}).get_json()["id"] == job["id"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(BOB)).status_code == 404
    # Without an idempotency key, the grant makes one up: still one job per grant.
    fresh = grant(client)
    one, two = upload_with(client, audio, fresh["token"]), upload_with(client, audio, fresh["token"])
    assert one.status_code == 202 and two.get_json()["id"] == one.get_json()["id"]


def test_an_upload_grant_is_refused_forged_expired_revoked_or_elsewhere(app, audio, keys_file, engine):
    from pilotys_whisper import grants

    client = app.test_client()
    state = app.extensions["whisper"]
    token = grant(client, language="fr")["token"]
    claims, _, signature = token.rpartition(".")
    forged_claims = claims.replace(claims[len("wug1."):], grants._b64(
        grants._unb64(claims[len("wug1."):]).replace(b'"fr"', b'"en"')))
    for bad in (forged_claims + "." + signature, token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
                "wug1.garbage", "wug1." + grants._b64(b'{"kid":1}') + ".AAAA"):
        r = upload_with(client, audio, bad)
        assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_upload_grant", bad
        assert "invalid_token" in r.headers["WWW-Authenticate"]
    alice = state.keyring.authenticate(f"Bearer {ALICE}")
    expired, _ = grants.issue(state.keyring, alice, {}, idempotency_key=None, ttl_s=-1)
    r = upload_with(client, audio, expired)
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "upload_grant_expired"
    # A grant creates a job and does nothing else.
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/uploads"), ("POST", "/v1/audio/transcriptions"),
                         ("POST", "/transcribe"), ("GET", "/v1/models")):
        r = client.open(path, method=method, headers={"Authorization": f"Bearer {token}"})
        # A valid token that does not allow this: 403 insufficient_scope (RFC 6750 section 3.1), not 401.
        assert r.status_code == 403 and r.get_json()["error"]["code"] == "upload_grant_not_accepted", path
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="whisper", error="insufficient_scope"'
    # A forged grant is no valid token anywhere: 401.
    r = client.get("/v1/jobs", headers={"Authorization": f"Bearer {forged_claims}.{signature}"})
    assert r.status_code == 401 and "invalid_token" in r.headers["WWW-Authenticate"]
    assert engine.calls == []
    # Removing the key revokes its grants.
    keys_file.write_text(f"{BOB} label=bob\n")
    time.sleep(1.1)  # the keys file is looked at again after a second
    r = upload_with(client, audio, token)
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_upload_grant"
    assert client.get("/v1/jobs", headers=auth(BOB)).get_json()["data"] == []


def test_an_upload_grant_checks_its_options_when_issued(app):
    client = app.test_client()
    cases = [({"language": "xx"}, "unsupported_language"), ({"response_format": "pdf"}, "invalid_response_format"),
             ({"expires_in": 5}, "invalid_expires_in"), ({"expires_in": 86400}, "invalid_expires_in"),
             ({"colour": "blue"}, "unknown_field"), ({"idempotency_key": "x" * 300}, "invalid_idempotency_key"),
             ({"callback_url": "https://10.0.0.1/hook"}, "invalid_callback_url")]
    for body, code in cases:
        r = client.post("/v1/uploads", json=body, headers=auth(ALICE))
        assert r.status_code == 400 and r.get_json()["error"]["code"] == code, (body, r.get_json())
    r = client.post("/v1/uploads", json={"callback_url": "https://example.com/hook"}, headers=auth(BOB))
    assert r.get_json()["error"]["code"] == "webhook_secret_missing"
    assert client.post("/v1/uploads", json={}).status_code == 401


def test_a_key_sees_only_its_own_jobs(app, audio):
    client = app.test_client()
    job_id = submit(client, audio).get_json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(BOB)).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/result", headers=auth(BOB)).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(BOB)).status_code == 404
    assert client.get("/v1/jobs", headers=auth(BOB)).get_json()["data"] == []
    assert client.get(f"/v1/jobs/{job_id}").status_code == 401


def test_cancel_a_queued_and_a_running_job(app, audio, engine):
    engine.release.clear()
    client = app.test_client()
    running = submit(client, audio).get_json()["id"]
    assert engine.started.wait(10)
    queued = submit(client, audio).get_json()["id"]
    assert client.get(f"/v1/jobs/{queued}", headers=auth(ALICE)).get_json()["status"] == "queued"
    assert client.delete(f"/v1/jobs/{queued}", headers=auth(ALICE)).get_json()["status"] == "cancelled"
    r = client.delete(f"/v1/jobs/{running}", headers=auth(ALICE))
    assert r.status_code == 202
    assert wait_status(client, running, ("cancelled",))["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{running}", headers=auth(ALICE)).status_code == 409
    r = client.get(f"/v1/jobs/{running}/result", headers=auth(ALICE))
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "job_not_succeeded"


def test_full_disk_is_507_and_leaves_nothing(make_app, tmp_path, audio):
    app = make_app(WHISPER_SPOOL_MIN_FREE_MB=10**8)
    try:
        r = submit(app.test_client(), audio)
        assert r.status_code == 507 and r.get_json()["error"]["code"] == "insufficient_storage"
        assert r.headers["Retry-After"]
        assert list((tmp_path / "state" / "spool").iterdir()) == []
        assert app.test_client().get("/v1/jobs", headers=auth(ALICE)).get_json()["data"] == []
    finally:
        app.extensions["whisper"].jobs.stop()


def test_results_expire_and_are_purged(make_app, audio):
    app = make_app(WHISPER_JOB_RETENTION_S=1)
    try:
        client = app.test_client()
        job_id = submit(client, audio).get_json()["id"]
        wait_status(client, job_id, ("succeeded",))
        deadline = time.monotonic() + 15
        while client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).status_code != 404:
            assert time.monotonic() < deadline, "the expired job was not purged"
            time.sleep(0.2)
    finally:
        app.extensions["whisper"].jobs.stop()


def test_a_cancelled_queued_job_with_a_callback_sends_nothing_and_is_purged(make_app, engine, audio):
    engine.release.clear()
    app = make_app(engine, WHISPER_JOB_RETENTION_S=1, WHISPER_WEBHOOK_ALLOW_PRIVATE="127.0.0.0/8")
    try:
        client = app.test_client()
        submit(client, audio)
        assert engine.started.wait(10)  # the only worker is busy: the next job stays queued
        job_id = submit(client, audio, callback_url="https://127.0.0.1:9/hook").get_json()["id"]
        job = client.delete(f"/v1/jobs/{job_id}", headers=auth(ALICE)).get_json()
        assert job["status"] == "cancelled" and job["webhook"]["status"] == "skipped"
        deadline = time.monotonic() + 15
        while client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).status_code != 404:
            assert time.monotonic() < deadline, "the cancelled job was not purged"
            time.sleep(0.2)
    finally:
        engine.release.set()
        app.extensions["whisper"].jobs.stop()


# -- webhooks -----------------------------------------------------------------------------------------------

def test_callback_urls_that_would_reach_inside_are_refused():
    policy = WebhookPolicy()
    for url in ("http://example.com/hook", "https://127.0.0.1/hook", "https://localhost:8443/x",
                "https://10.1.2.3/hook", "https://192.168.1.10/hook", "https://169.254.169.254/latest",
                "https://[::1]/hook", "https://user:pw@127.0.0.1/", "ftp://example.com/"):
        with pytest.raises(ApiError) as err:
            policy.check(url)
        assert err.value.status == 400 and err.value.code == "invalid_callback_url", url
    assert WebhookPolicy(("127.0.0.0/8",)).check("https://127.0.0.1:9443/hook").addresses == ("127.0.0.1",)


def test_callback_needs_a_secret_for_the_key(app, audio):
    r = submit(app.test_client(), audio, key=BOB, callback_url="https://127.0.0.1:9/hook")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "webhook_secret_missing"


@pytest.fixture
def receiver(tmp_path):
    """An HTTPS endpoint on 127.0.0.1 with its own certificate; fails the first two deliveries."""
    with https_receiver(tmp_path, failures=2) as endpoint:
        yield endpoint


def test_signed_webhook_with_retries(make_app, audio, receiver):
    url, ca, received = receiver
    app = make_app(WHISPER_WEBHOOK_ALLOW_PRIVATE="127.0.0.0/8", WHISPER_WEBHOOK_CA_FILE=ca)
    try:
        client = app.test_client()
        job_id = submit(client, audio, callback_url=url).get_json()["id"]
        deadline = time.monotonic() + 30
        while len(received) < 3:
            assert time.monotonic() < deadline, f"only {len(received)} deliveries"
            time.sleep(0.1)
        headers, body, _ = received[-1]
        # One event, the same on every attempt: receivers deduplicate on its id.
        assert len({json.loads(b)["id"] for _, b, _ in received} | {h["Whisper-Event-Id"] for h, _, _ in received}) == 1
        assert len({b for _, b, _ in received}) == 3  # ...whose data (the attempts so far) is current
        assert verify(SECRET, headers["Whisper-Signature"], body)
        assert not verify("another-secret", headers["Whisper-Signature"], body)
        assert not verify(SECRET, headers["Whisper-Signature"], body + b" ")
        event = json.loads(body)
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
        gaps = [b[2] - a[2] for a, b in zip(received, received[1:])]
        assert gaps[1] > gaps[0] * 1.5, f"no exponential backoff: {gaps}"
        deadline = time.monotonic() + 5
        while (job := client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).get_json())["webhook"]["status"] != \
                "delivered":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert [a.get("status_code") for a in job["webhook"]["attempts"]] == [500, 500, 204]
    finally:
        app.extensions["whisper"].jobs.stop()


def test_each_model_has_its_own_queue(postgres, tmp_path, keys_file, audio):
    """Workers serving another model (a GPU group with a larger one) share the database but not the queue."""
    database = postgres.new_database()
    engines = {"whisper-base": FakeEngine(), "whisper-large-v3": FakeEngine()}
    def worker(label, engine):
        return create_app(make_settings(
            WHISPER_API_KEY="", WHISPER_API_KEYS_FILE=keys_file, WHISPER_STATE_DIR=tmp_path / label,
            WHISPER_TMP_DIR=tmp_path, WHISPER_JOB_BACKEND="postgresql", WHISPER_JOB_DATABASE_URL=database,
            WHISPER_MODEL_LABEL=label), engine)
    apps = {label: worker(label, engine) for label, engine in engines.items()}
    try:
        ids = [submit(apps["whisper-large-v3"].test_client(), audio).get_json()["id"] for _ in range(3)]
        for job_id in ids:  # the status is visible from any worker, whichever model it serves
            wait_status(apps["whisper-base"].test_client(), job_id, ("succeeded",))
        assert len(engines["whisper-large-v3"].calls) == 3 and engines["whisper-base"].calls == []
    finally:
        for app in apps.values():
            app.extensions["whisper"].jobs.stop()


def test_callback_urls_that_cannot_be_sent_are_refused_at_submission(make_app, audio):
    app = make_app(WHISPER_WEBHOOK_ALLOW_PRIVATE="127.0.0.0/8")
    try:
        client = app.test_client()
        for url in ("https://127.0.0.1:9443/hook with space", "https://127.0.0.1:9443/réunion",
                    "https://127.0.0.1:9443/a\r\nX-Injected: 1"):
            for r in (submit(client, audio, callback_url=url),
                      client.post("/v1/uploads", json={"callback_url": url}, headers=auth(ALICE))):
                error = r.get_json()["error"]
                assert r.status_code == 400 and error["code"] == "invalid_callback_url", (url, r.get_json())
                assert "plain ASCII" in error["message"] and error["param"] == "callback_url"
        r = submit(client, audio, callback_url="https://8.8.8.8:25/hook")
        assert r.status_code == 400 and "port 443 or 8443" in r.get_json()["error"]["message"]
        assert client.get("/v1/jobs", headers=auth(ALICE)).get_json()["data"] == []
    finally:
        app.extensions["whisper"].jobs.stop()


def trickle_answer(tls):
    """A byte every 0.25 s: each read gets its byte well within a 1 s timeout, the answer takes 30 s."""
    read_request(tls)
    for byte in b"HTTP/1.1 204 No Content\r\nX-Padding: " + b"x" * 100 + b"\r\n\r\n":
        time.sleep(0.25)
        tls.sendall(bytes([byte]))


def answering(raw: bytes):
    def answer(tls):
        read_request(tls)
        tls.sendall(raw)
    return answer


@pytest.mark.parametrize("answer, reason", [
    (answering(b"HTTP/1.1 two hundred OK\r\n\r\n"), "BadStatusLine"),
    (answering(b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n"), "more than 100 headers"),
    (answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nnot-hex\r\n"), "IncompleteRead"),
    (trickle_answer, "timed out"),
    (None, "plain ASCII"),  # a URL stored by an earlier version, which did not check for this
], ids=["status-line", "headers", "chunking", "trickle", "stored-url"])
def test_every_delivery_failure_is_recorded_and_the_job_still_purged(make_app, engine, audio, tmp_path, answer,
                                                                    reason):
    cert = make_certificate(tmp_path)
    server = RawTLSServer(cert, answer or answering(b"HTTP/1.1 204 No Content\r\n\r\n"))
    app = make_app(engine, WHISPER_WEBHOOK_ALLOW_PRIVATE="127.0.0.0/8", WHISPER_WEBHOOK_CA_FILE=cert[0],
                   WHISPER_WEBHOOK_MAX_ATTEMPTS=1, WHISPER_WEBHOOK_TIMEOUT_S=1, WHISPER_JOB_RETENTION_S=2)
    try:
        client, store = app.test_client(), app.extensions["whisper"].jobs.store
        url = f"https://127.0.0.1:{server.port}/hook"
        engine.release.clear()
        job_id = submit(client, audio, callback_url=url).get_json()["id"]
        if answer is None:
            assert engine.started.wait(10)
            store.execute("UPDATE jobs SET callback_url = ? WHERE id = ?", (url + "/réunion café", job_id))
        engine.release.set()
        deadline = time.monotonic() + 20
        while (job := client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).get_json())["webhook"]["status"] != \
                "failed":
            assert time.monotonic() < deadline, f"the failed delivery was not recorded: {job['webhook']}"
            time.sleep(0.1)
        [attempt] = job["webhook"]["attempts"]
        assert reason in attempt["error"] and "status_code" not in attempt
        while client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).status_code != 404:
            assert time.monotonic() < deadline, "the job was not purged"
            time.sleep(0.2)
    finally:
        engine.release.set()
        server.close()
        app.extensions["whisper"].jobs.stop()


def test_a_job_whose_event_cannot_be_built_fails_its_webhook_and_is_purged(make_app, audio, tmp_path):
    """A stored result that cannot be read (written by another version, or damaged) must end the delivery as a
    recorded failure, not raise on every round, keeping the job pending and never purged."""
    port = free_port()  # nothing listens: the first attempt fails at once and the next is an hour away
    app = make_app(WHISPER_WEBHOOK_ALLOW_PRIVATE="127.0.0.0/8", WHISPER_WEBHOOK_TIMEOUT_S=1,
                   WHISPER_WEBHOOK_BACKOFF_S=3600, WHISPER_WEBHOOK_MAX_ATTEMPTS=3, WHISPER_JOB_RETENTION_S=2)
    store = app.extensions["whisper"].jobs.store
    try:
        client = app.test_client()
        job_id = submit(client, audio, callback_url=f"https://127.0.0.1:{port}/hook").get_json()["id"]
        deadline = time.monotonic() + 30
        while len(wait_status(client, job_id, ("succeeded",))["webhook"]["attempts"]) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        store.execute("UPDATE jobs SET options = ?, result = ?, webhook_next_at = ? WHERE id = ?",
                      (json.dumps({"speakers": {}}), "{not json", time.time(), job_id))
        while (row := store.query("SELECT webhook_status, webhook_attempts FROM jobs WHERE id = ?",
                                  (job_id,)))[0]["webhook_status"] != "failed":
            assert time.monotonic() < deadline, f"the unreadable job's delivery was not recorded: {dict(row[0])}"
            time.sleep(0.1)
        attempts = json.loads(row[0]["webhook_attempts"])
        assert len(attempts) == 2 and "could not be read" in attempts[-1]["error"], attempts
        while store.query("SELECT id FROM jobs WHERE id = ?", (job_id,)):
            assert time.monotonic() < deadline, "the job was not purged"
            time.sleep(0.2)
    finally:
        app.extensions["whisper"].jobs.stop()


def test_each_delivery_is_claimed_from_its_own_start(make_app, audio, tmp_path):
    """Ten deliveries due at once, each taking 0.8 s: the last ones must not start on a claim that has run out
    (another worker would send them too); the claim is counted from when each one is taken."""
    cert = make_certificate(tmp_path)
    port = free_port()
    app = make_app(WHISPER_WEBHOOK_ALLOW_PRIVATE="127.0.0.0/8", WHISPER_WEBHOOK_CA_FILE=cert[0],
                   WHISPER_WEBHOOK_TIMEOUT_S=1, WHISPER_WEBHOOK_BACKOFF_S=3600)
    store = app.extensions["whisper"].jobs.store
    claims_left = {}

    def slow_receiver(tls):
        _, body = read_request(tls)
        job_id = json.loads(body)["data"]["id"]
        [row] = store.query("SELECT webhook_next_at FROM jobs WHERE id = ?", (job_id,))
        claims_left[job_id] = row["webhook_next_at"] - time.time()
        time.sleep(0.8)
        tls.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = None
    try:
        client = app.test_client()
        # Nothing listens yet: each first attempt fails at once and the next is an hour away.
        ids = [submit(client, audio, callback_url=f"https://127.0.0.1:{port}/hook").get_json()["id"]
               for _ in range(10)]
        deadline = time.monotonic() + 30
        while sum(len(wait_status(client, i, ("succeeded",))["webhook"]["attempts"]) for i in ids) < 10:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        server = RawTLSServer(cert, slow_receiver, port=port)
        store.execute("UPDATE jobs SET webhook_next_at = ? WHERE webhook_status = 'pending'", (time.time(),))
        while len(claims_left) < 10:
            assert time.monotonic() < deadline, f"{len(claims_left)} deliveries"
            time.sleep(0.1)
        assert min(claims_left.values()) > 1.0, sorted(claims_left.values())  # more than a whole delivery left
        for job_id in ids:
            while (job := wait_status(client, job_id, ("succeeded",)))["webhook"]["status"] == "pending":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert [a.get("status_code") for a in job["webhook"]["attempts"]][1:] == [204], job["webhook"]
        assert server.connections == 10
    finally:
        if server is not None:
            server.close()
        app.extensions["whisper"].jobs.stop()


def thread_cpu_s(threads) -> float:
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident)) for t in threads if t.is_alive())


def test_draining_workers_wait_without_spinning(app, audio, engine):
    """SIGUSR1 sets draining (server.py): the workers take no job, and wait for the restart without using CPU."""
    state = app.extensions["whisper"]
    client = app.test_client()
    state.draining.set()
    job_id = submit(client, audio).get_json()["id"]
    threads = state.jobs._threads
    before = thread_cpu_s(threads)
    time.sleep(2)
    used = thread_cpu_s(threads) - before
    assert used < 0.2, f"the job threads used {used:.2f} s of CPU in a 2 s drain"
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).get_json()["status"] == "queued"
    assert engine.calls == []
    state.draining.clear()  # the restart did not come: back to work
    wait_status(client, job_id, ("succeeded",))


def test_simultaneous_submissions_with_one_idempotency_key_make_one_job(postgres, tmp_path, keys_file, audio):
    """The first holds its transaction open until the second waits on the unique index (PostgreSQL shows it
    in pg_stat_activity): the second did not see the first's row and must still answer with its job."""
    import psycopg

    database = postgres.new_database()
    app = create_app(make_settings(
        WHISPER_API_KEY="", WHISPER_API_KEYS_FILE=keys_file, WHISPER_STATE_DIR=tmp_path / "state",
        WHISPER_TMP_DIR=tmp_path, WHISPER_JOB_BACKEND="postgresql", WHISPER_JOB_DATABASE_URL=database),
        FakeEngine())
    store = app.extensions["whisper"].jobs.store
    enqueue, first = store.enqueue, threading.Lock()

    def enqueue_once_the_other_waits(db, job_id):
        if first.acquire(blocking=False):
            with psycopg.connect(database, autocommit=True) as watcher:
                deadline = time.monotonic() + 20
                while not watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                          "AND wait_event_type = 'Lock'").fetchone()[0]:
                    assert time.monotonic() < deadline, "the second submission never waited for the first"
                    time.sleep(0.05)
        enqueue(db, job_id)

    store.enqueue = enqueue_once_the_other_waits
    barrier, responses = threading.Barrier(2), []

    def submit_once():
        client = app.test_client()
        barrier.wait()
        r = submit(client, audio, headers={"Idempotency-Key": "meeting-7"})
        responses.append((r.status_code, r.get_json(), r.headers.get("Idempotent-Replayed")))

    try:
        threads = [threading.Thread(target=submit_once) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted((status, replayed) for status, _, replayed in responses) == [(200, "true"), (202, None)], \
            responses
        assert responses[0][1]["id"] == responses[1][1]["id"]
        assert len(app.test_client().get("/v1/jobs", headers=auth(ALICE)).get_json()["data"]) == 1
    finally:
        app.extensions["whisper"].jobs.stop()


NEW_ALICE = "alice-new-key-9876543210"


def stop(app):
    app.extensions["whisper"].jobs.stop()


def test_a_key_rotation_keeps_the_clients_jobs_and_webhooks(make_app, keys_file, audio, receiver):
    """The rotation of the README: the new key next to the old one (same label and webhook secret), restart,
    the client switches, the old key removed, restart. A job sent with the old key and still running
    throughout is read, and its webhook signed, for the new key."""
    url, ca, received = receiver
    hooks = {"WHISPER_WEBHOOK_ALLOW_PRIVATE": "127.0.0.0/8", "WHISPER_WEBHOOK_CA_FILE": ca}
    engine = FakeEngine()
    engine.release.clear()
    app = make_app(engine, **hooks)
    try:
        job_id = submit(app.test_client(), audio, callback_url=url,
                        headers={"Idempotency-Key": "meeting-1"}).get_json()["id"]
        assert engine.started.wait(10)
    finally:
        stop(app)  # the running job goes back to the queue
    keys_file.write_text(f"{ALICE} label=alice webhook_secret={SECRET}\n"
                         f"{NEW_ALICE} label=alice webhook_secret={SECRET}\n{BOB} label=bob\n")
    app = make_app(engine, **hooks)
    try:
        client = app.test_client()
        assert client.get(f"/v1/jobs/{job_id}", headers=auth(NEW_ALICE)).get_json()["status"] in ("queued", "running")
        # The same client: a retry with the new key is the same job, not a second one.
        again = submit(client, audio, key=NEW_ALICE, headers={"Idempotency-Key": "meeting-1"})
        assert again.status_code == 200 and again.get_json()["id"] == job_id
    finally:
        stop(app)
    keys_file.write_text(f"{NEW_ALICE} label=alice webhook_secret={SECRET}\n{BOB} label=bob\n")
    engine.release.set()
    app = make_app(engine, **hooks)
    try:
        client = app.test_client()
        assert client.get(f"/v1/jobs/{job_id}", headers=auth(ALICE)).status_code == 401
        wait_status(client, job_id, ("succeeded",), key=NEW_ALICE)
        assert [j["id"] for j in client.get("/v1/jobs", headers=auth(NEW_ALICE)).get_json()["data"]] == [job_id]
        assert client.get(f"/v1/jobs/{job_id}/result", headers=auth(NEW_ALICE)).status_code == 200
        deadline = time.monotonic() + 30
        while (job := client.get(f"/v1/jobs/{job_id}", headers=auth(NEW_ALICE)).get_json())["webhook"]["status"] \
                == "pending":
            assert time.monotonic() < deadline, job["webhook"]
            time.sleep(0.1)
        assert job["webhook"]["status"] == "delivered", job["webhook"]
        headers, body, _ = received[-1]
        assert verify(SECRET, headers["Whisper-Signature"], body) and json.loads(body)["data"]["id"] == job_id
        assert client.get(f"/v1/jobs/{job_id}", headers=auth(BOB)).status_code == 404
    finally:
        stop(app)


def test_jobs_stored_under_a_key_id_by_an_earlier_version_follow_the_rotation(make_app, keys_file, audio):
    """Earlier versions stored a job's owner as the key's id (16 hex digits of its SHA-256): at start, and with
    each purge (workers not yet upgraded still write such rows), they go to the key's client."""
    key_id = hashlib.sha256(ALICE.encode()).hexdigest()[:16]
    app = make_app()
    try:
        client = app.test_client()
        store = app.extensions["whisper"].jobs.store
        seen = submit(client, audio, headers={"Idempotency-Key": "same"}).get_json()["id"]
        old = submit(client, audio, headers={"Idempotency-Key": "other"}).get_json()["id"]
        clash = submit(client, audio).get_json()["id"]
        for job_id in (seen, old, clash):
            wait_status(client, job_id, ("succeeded",))
        # As an earlier version wrote them; the last one reused an idempotency key under the other owner.
        store.execute("UPDATE jobs SET owner = ? WHERE id IN (?, ?)", (key_id, old, clash))
        store.execute("UPDATE jobs SET idempotency_key = 'same' WHERE id = ?", (clash,))
    finally:
        stop(app)
    app = make_app()  # the upgrade
    try:
        client = app.test_client()
        store = app.extensions["whisper"].jobs.store
        assert store.query("SELECT owner FROM jobs WHERE owner = ?", (key_id,)) == []
        # A worker of the previous version writes one more while this one runs: adopted at the next purge.
        store.execute("UPDATE jobs SET owner = ? WHERE id = ?", (key_id, seen))
        deadline = time.monotonic() + 10
        while store.query("SELECT owner FROM jobs WHERE owner = ?", (key_id,)):
            assert time.monotonic() < deadline, "not adopted by the housekeeping"
            time.sleep(0.1)
    finally:
        stop(app)
    keys_file.write_text(f"{NEW_ALICE} label=alice webhook_secret={SECRET}\n{BOB} label=bob\n")  # the rotation
    app = make_app()
    try:
        client = app.test_client()
        for job_id in (seen, old, clash):
            assert client.get(f"/v1/jobs/{job_id}", headers=auth(NEW_ALICE)).get_json()["status"] == "succeeded"
        again = submit(client, audio, key=NEW_ALICE, headers={"Idempotency-Key": "same"})
        assert again.status_code == 200 and again.get_json()["id"] == seen
        assert len(client.get("/v1/jobs", headers=auth(NEW_ALICE)).get_json()["data"]) == 3
    finally:
        stop(app)


def test_a_new_whisper_api_key_keeps_the_jobs_of_the_old_one(make_app, audio):
    """One key from the environment is the client "default": replacing the variable keeps its jobs."""
    old_key, new_key = "env-old-key-0123456789", "env-new-key-0123456789"
    app = make_app(WHISPER_API_KEYS_FILE="", WHISPER_API_KEY=old_key)
    try:
        job_id = submit(app.test_client(), audio, key=old_key).get_json()["id"]
        wait_status(app.test_client(), job_id, ("succeeded",), key=old_key)
    finally:
        stop(app)
    app = make_app(WHISPER_API_KEYS_FILE="", WHISPER_API_KEY=new_key)
    try:
        assert app.test_client().get(f"/v1/jobs/{job_id}", headers=auth(new_key)).status_code == 200
    finally:
        stop(app)
