"""The HTTP layer with a fake engine: every bad-input case, auth, CORS, the queue, temp files, logs.

Uploads are still probed by the real decoder (PyAV): only the model is replaced.
"""

import collections
import io
import json
import logging
import threading
import time

import pytest
import requests

from pilotys_whisper.app import create_app
from pilotys_whisper.forms import MAX_FIELDS_BODY_BYTES, MAX_FORM_FIELDS_BYTES, MAX_FORM_PARTS
from pilotys_whisper.routes import transcription
from pilotys_whisper.server import make_server

from conftest import KEY, FakeEngine, make_settings

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def tmp_uploads(tmp_path):
    path = tmp_path / "uploads"
    path.mkdir()
    return path


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def app(engine, tmp_uploads):
    app = create_app(make_settings(WHISPER_TMP_DIR=tmp_uploads, WHISPER_MAX_UPLOAD_MB=2,
                                   WHISPER_MAX_DURATION_S=60), engine, load_model=False)
    state = app.extensions["whisper"]
    state.load_model()
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, path="/v1/audio/transcriptions", file=None, headers=AUTH, **fields):
    data = dict(fields)
    if file is not None:
        data["file"] = file
    return client.post(path, data=data, headers=headers, content_type="multipart/form-data")


def upload(audio, name):
    return (open(audio(name), "rb"), name)


def assert_error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json, response.headers
    assert response.get_json()["error"]["code"] == code
    assert response.get_json()["error"]["message"]


def test_health_answers_without_key_and_says_which_model(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.get_json()["status"] == "ok" and r.get_json()["model"] == "whisper-base"


def test_ready_is_503_until_the_model_is_loaded(tmp_uploads):
    engine = FakeEngine(load_delay=0.5)
    app = create_app(make_settings(WHISPER_TMP_DIR=tmp_uploads), engine)
    client = app.test_client()
    r = client.get("/ready")
    assert_error(r, 503, "model_loading")
    assert r.headers["Retry-After"]
    assert client.get("/health").status_code == 200
    app.extensions["whisper"].ready.wait(5)
    assert client.get("/ready").status_code == 200


def test_transcribe_legacy_contract(client, audio, engine):
    r = post(client, "/transcribe", upload(audio, "fr_meeting.wav"))
    assert r.status_code == 200
    body = r.get_json()
    assert body["text"].startswith("Bonjour") and body["language"] == "fr"
    assert {"id", "start", "end", "text"} <= set(body["segments"][0])
    assert engine.calls[0][1].language == "fr"  # French by default


def test_openai_fields_reach_the_engine(client, audio, engine):
    r = post(client, file=upload(audio, "fr_meeting.wav"), model="whisper-1", language="EN", prompt="PILOTYS",
             temperature="0.2", response_format="verbose_json", **{"timestamp_granularities[]": ["word", "segment"]})
    assert r.status_code == 200
    options = engine.calls[0][1]
    assert (options.language, options.prompt, options.temperature, options.word_timestamps) == ("en", "PILOTYS", 0.2,
                                                                                               True)
    assert r.get_json()["words"][0] == {"word": "Bonjour", "start": 0.0, "end": 0.5}


def test_language_auto(client, audio, engine):
    assert post(client, file=upload(audio, "fr_meeting.wav"), language="auto").status_code == 200
    assert engine.calls[0][1].language is None


@pytest.mark.parametrize("fmt, ctype", [("text", "text/plain"), ("srt", "application/x-subrip"),
                                         ("vtt", "text/vtt"), ("json", "application/json")])
def test_response_formats(client, audio, fmt, ctype):
    r = post(client, file=upload(audio, "fr_meeting.wav"), response_format=fmt)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(ctype)


def test_missing_file(client):
    assert_error(post(client, model="whisper-1"), 400, "missing_file")


def test_file_sent_as_a_text_field(client):
    assert_error(post(client, file="not a file"), 400, "missing_file")


def test_empty_file(client):
    assert_error(post(client, file=(io.BytesIO(b""), "empty.wav")), 400, "empty_file")


def test_not_audio(client):
    assert_error(post(client, file=(io.BytesIO(b"hello, this is text\n" * 50), "notes.wav")), 415,
                 "unsupported_media")


def test_random_bytes_named_mp3(client):
    assert_error(post(client, file=(io.BytesIO(bytes(range(256)) * 64), "song.mp3")), 415, "unsupported_media")


def test_video_without_sound(client, audio):
    assert_error(post(client, file=upload(audio, "video_no_audio.mp4")), 422, "no_audio")


def test_too_large_is_413_json(client):
    big = io.BytesIO(b"\0" * (3 * 1024 * 1024))
    assert_error(post(client, file=(big, "big.wav")), 413, "file_too_large")


def test_a_form_over_its_limits_is_413_form_too_large(client, audio, engine):
    many = {f"field{i}": "x" for i in range(MAX_FORM_PARTS)}  # with the file: one part too many
    r = post(client, file=upload(audio, "fr_meeting.wav"), **many)
    assert_error(r, 413, "form_too_large")
    assert f"{MAX_FORM_PARTS} parts" in r.get_json()["error"]["message"]
    del many["field0"]
    assert post(client, file=upload(audio, "fr_meeting.wav"), **many).status_code == 200
    r = post(client, file=upload(audio, "fr_meeting.wav"), prompt="x" * (MAX_FORM_FIELDS_BYTES + 1))
    assert_error(r, 413, "form_too_large")
    assert f"{MAX_FORM_FIELDS_BYTES // 1024} KB in all" in r.get_json()["error"]["message"]
    # The longest prompt allowed, in four-byte characters (16 KB), next to every other field: within bounds.
    r = post(client, file=upload(audio, "fr_meeting.wav"), prompt="🎙" * 4000, model="whisper-1", language="fr",
             temperature="0.2", response_format="verbose_json", **{"timestamp_granularities[]": ["word", "segment"]})
    assert r.status_code == 200 and engine.calls[-1][1].prompt == "🎙" * 4000
    # The audio without a filename is a plain field: above the fields' budget it breaks it, below it is no file.
    wav = audio("fr_meeting.wav").read_bytes()
    r = post(client, file=(io.BytesIO(wav), None))
    assert_error(r, 413, "form_too_large")
    assert "file part" in r.get_json()["error"]["message"]
    r = post(client, file=(io.BytesIO(wav[:50_000]), None))
    assert_error(r, 400, "missing_file")
    assert "file part" in r.get_json()["error"]["message"]


class CountedBody(io.RawIOBase):
    """A request body made of PIECES, read as the server asks for it (the test holds no copy of a large body),
    that counts the bytes the server read."""

    def __init__(self, pieces: list[bytes]):
        self._pieces = collections.deque(memoryview(piece) for piece in pieces)
        self.length = sum(len(piece) for piece in pieces)
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pieces and not len(self._pieces[0]):
            self._pieces.popleft()
        if not self._pieces:
            return 0
        piece = self._pieces[0]
        n = min(len(buffer), len(piece))
        buffer[:n] = piece[:n]
        self._pieces[0] = piece[n:]
        self.read_bytes += n
        return n


BOUNDARY = "test-boundary-7f3a"


def multipart(parts: list[tuple[str, str | None, bytes]]) -> CountedBody:
    """A multipart/form-data body of (name, filename or None, data) parts."""
    pieces = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        pieces += [f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode(), data, b"\r\n"]
    pieces.append(f"--{BOUNDARY}--\r\n".encode())
    return CountedBody(pieces)


def send(app, path, body: CountedBody, content_type: str, headers=AUTH):
    """POST BODY to APP as a WSGI server would hand it over (the test client wants a seekable body)."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    environ = EnvironBuilder(path, method="POST", headers=headers).get_environ()
    environ.update({"wsgi.input": body, "CONTENT_LENGTH": str(body.length), "CONTENT_TYPE": content_type})
    app_iter, status, response_headers = run_wsgi_app(app, environ, buffered=True)
    return app.response_class(b"".join(app_iter), status=status, headers=response_headers)


def test_the_fields_that_are_not_files_are_bounded_together(audio, tmp_uploads, engine):
    """Issue 14: 200 text fields of 500 KB next to a file were all held in memory (200 OK, +100 MB per request).
    The parser now stops at the fields' budget: it reads little more than that budget of the body."""
    app = create_app(make_settings(WHISPER_TMP_DIR=tmp_uploads, WHISPER_MAX_UPLOAD_MB=200), engine,
                     load_model=False)
    app.extensions["whisper"].load_model()
    junk = b"x" * 500_000
    body = multipart([("file", "fr_meeting.wav", audio("fr_meeting.wav").read_bytes()),
                      *((f"note{i}", None, junk) for i in range(200))])
    r = send(app, "/v1/audio/transcriptions", body, f"multipart/form-data; boundary={BOUNDARY}")
    assert_error(r, 413, "form_too_large")
    # The file, then a few times the fields' budget (the parser reads 64 KB at a time): not the 100 MB sent.
    assert body.read_bytes < audio("fr_meeting.wav").stat().st_size + 4 * MAX_FORM_FIELDS_BYTES, body.read_bytes
    assert not engine.calls and list(tmp_uploads.iterdir()) == []


def test_bodies_of_fields_only_are_bounded_before_they_are_read(app):
    """JSON and url-encoded bodies are read into memory whole: anything over a few KB is refused unread."""
    fields = CountedBody([b"prompt=" + b"x" * 1_000_000])
    r = send(app, "/v1/audio/transcriptions", fields, "application/x-www-form-urlencoded")
    assert_error(r, 413, "body_too_large")
    assert f"{MAX_FIELDS_BODY_BYTES // 1024} KB" in r.get_json()["error"]["message"]
    assert fields.read_bytes == 0


@pytest.fixture
def jobs_app(tmp_path, tmp_uploads):
    """Jobs enabled (upload grants), nothing running in the background."""
    app = create_app(make_settings(WHISPER_TMP_DIR=tmp_uploads, WHISPER_STATE_DIR=tmp_path / "state"), FakeEngine(),
                     load_model=False)
    app.extensions["whisper"].load_model()
    yield app
    app.extensions["whisper"].jobs.stop()


def test_an_upload_grants_json_is_bounded_before_it_is_read(jobs_app):
    client = jobs_app.test_client()
    body = CountedBody([json.dumps({"language": "fr", "prompt": "x" * 1_000_000}).encode()])
    r = send(jobs_app, "/v1/uploads", body, "application/json")
    assert_error(r, 413, "body_too_large")
    assert body.read_bytes == 0
    # The longest prompt, each character escaped (\uXXXX, as Python's json does by default), fits.
    r = client.post("/v1/uploads", data=json.dumps({"language": "ja", "prompt": "会" * 4000}),
                    content_type="application/json", headers=AUTH)
    assert r.status_code == 201, r.get_json()


def test_too_long_is_413(app, audio, tmp_uploads):
    short = create_app(make_settings(WHISPER_TMP_DIR=tmp_uploads, WHISPER_MAX_DURATION_S=10), FakeEngine(),
                       load_model=False)
    short.extensions["whisper"].load_model()
    r = post(short.test_client(), file=upload(audio, "fr_meeting.wav"))
    assert_error(r, 413, "audio_too_long")
    assert "job" not in r.get_json()["error"]["message"]  # jobs have the same limit


@pytest.mark.parametrize("field, value, code", [
    ("response_format", "docx", "invalid_response_format"),
    ("language", "klingon", "unsupported_language"),
    ("language", "xx", "unsupported_language"),  # two letters, but no language Whisper knows
    ("temperature", "hot", "invalid_temperature"),
    ("temperature", "1.5", "invalid_temperature"),
    ("model", "gpt-4o-transcribe", "model_not_found"),
    ("timestamp_granularities[]", "sentence", "invalid_timestamp_granularity"),
])
def test_bad_fields_are_400(client, audio, engine, field, value, code):
    r = post(client, file=upload(audio, "fr_meeting.wav"), **{field: value})
    assert_error(r, 400, code)
    assert r.get_json()["error"]["param"]
    assert not engine.calls


def test_missing_key_is_401_with_challenge(client, audio):
    r = post(client, file=upload(audio, "fr_meeting.wav"), headers={})
    assert_error(r, 401, "missing_api_key")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_wrong_key_is_401(client, audio, engine):
    r = post(client, file=upload(audio, "fr_meeting.wav"), headers={"Authorization": "Bearer wrong-key-000000000"})
    assert_error(r, 401, "invalid_api_key")
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert client.get("/v1/models").status_code == 401
    assert not engine.calls


def test_models_list(client):
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert {m["id"] for m in r.get_json()["data"]} == {"whisper-base", "whisper-1"}


def test_unknown_route_and_wrong_method_are_json(client):
    assert_error(client.get("/nothing-here"), 404, "not_found")
    r = client.get("/transcribe")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]


def test_temporary_files_are_always_removed(client, audio, tmp_uploads):
    post(client, file=upload(audio, "fr_meeting.wav"))
    post(client, file=(io.BytesIO(b"text" * 100), "x.wav"))
    post(client, file=upload(audio, "video_no_audio.mp4"))
    post(client, file=upload(audio, "fr_meeting.wav"), response_format="docx")
    assert list(tmp_uploads.iterdir()) == []


def test_request_id_is_echoed_or_made(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    assert len(client.get("/health", headers={"X-Request-ID": "bad id!"}).headers["X-Request-ID"]) == 16


def test_one_log_line_per_request_without_key_or_text(client, audio, caplog):
    caplog.set_level(logging.INFO, logger="pilotys_whisper")
    post(client, file=upload(audio, "fr_meeting.wav"))
    post(client, file=upload(audio, "fr_meeting.wav"), headers={"Authorization": "Bearer wrong-key-000000000"})
    lines = [r.getMessage() for r in caplog.records if r.name == "pilotys_whisper.access"]
    assert len(lines) == 2
    assert "status=200" in lines[0] and "audio_s=2.00" in lines[0] and "processing_s=" in lines[0]
    assert "status=401" in lines[1]
    everything = caplog.text
    assert KEY not in everything and "wrong-key" not in everything and "Bonjour" not in everything


def test_a_path_cannot_forge_a_log_line(client, caplog):
    caplog.set_level(logging.INFO, logger="pilotys_whisper")
    forged = "INFO pilotys_whisper.access: request id=0 POST /v1/audio/transcriptions status=200"
    client.get("/x%0a" + forged.replace(" ", "%20") + "%0d%0aé")
    [line] = [r.getMessage() for r in caplog.records if r.name == "pilotys_whisper.access"]
    assert "\n" not in line and "\r" not in line, line
    assert " GET /x%0AINFO%20pilotys_whisper.access:%20request%20id=0%20POST" in line and "status=404" in line
    assert "%0D%0A%C3%A9 status=404 " in line


def test_metrics(client, audio):
    post(client, file=upload(audio, "fr_meeting.wav"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'whisper_http_requests_total{method="POST",route="/v1/audio/transcriptions",status="200"} 1.0' in text
    assert "whisper_audio_seconds_total 2.0" in text
    assert "whisper_queue_depth 0.0" in text and "whisper_in_flight 0.0" in text
    assert "whisper_real_time_factor_count 1.0" in text
    assert "whisper_model_ready 1.0" in text


def test_made_up_methods_share_one_metrics_series(client):
    for method in ("FOO1", "FOO2", "PROPFIND"):
        assert client.open("/health", method=method).status_code == 405
    text = client.get("/metrics").get_data(as_text=True)
    assert 'whisper_http_requests_total{method="other",route="unmatched",status="405"} 3.0' in text
    assert "FOO" not in text and "PROPFIND" not in text


# -- CORS -----------------------------------------------------------------------------------------------

def _cors_client(tmp_uploads, origins):
    app = create_app(make_settings(WHISPER_TMP_DIR=tmp_uploads, WHISPER_CORS_ORIGINS=origins), FakeEngine(),
                     load_model=False)
    return app.test_client()


def test_no_cors_unless_configured(client):
    r = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_cors_allowlist(tmp_uploads):
    client = _cors_client(tmp_uploads, "https://app.pilotys.fr")
    r = client.options("/v1/audio/transcriptions", headers={
        "Origin": "https://app.pilotys.fr", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.pilotys.fr"
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert r.headers["Vary"] == "Origin"
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_cors_wildcard_never_with_credentials(tmp_uploads):
    r = _cors_client(tmp_uploads, "*").get("/health", headers={"Origin": "https://any.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in r.headers


# -- over real HTTP (waitress in this process) -------------------------------------------------------------

@pytest.fixture
def served(tmp_uploads):
    engine = FakeEngine()
    settings = make_settings(WHISPER_TMP_DIR=tmp_uploads, WHISPER_CONCURRENCY=1, WHISPER_QUEUE_SIZE=1,
                             WHISPER_MAX_UPLOAD_MB=2, WHISPER_PORT=0)
    app = create_app(settings, engine, load_model=False)
    app.extensions["whisper"].load_model()
    server = make_server(app, settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.effective_port}"
    yield url, engine
    engine.release.set()
    server.close()


def _post_file(url, audio, results, index):
    with open(audio("fr_meeting.wav"), "rb") as f:
        results[index] = requests.post(url + "/transcribe", files={"file": f}, headers=AUTH, timeout=30)


def test_queue_full_gives_429_and_health_stays_fast(served, audio, monkeypatch):
    url, engine = served
    engine.release.clear()
    results = [None, None, None]
    first = threading.Thread(target=_post_file, args=(url, audio, results, 0))
    first.start()
    assert engine.started.wait(10)
    second = threading.Thread(target=_post_file, args=(url, audio, results, 1))
    second.start()
    deadline = time.monotonic() + 10
    while "whisper_queue_depth 1.0" not in requests.get(url + "/metrics", timeout=5).text:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.05)
    probed = []
    real_probe = transcription.probe
    monkeypatch.setattr(transcription, "probe", lambda path: probed.append(path) or real_probe(path))
    _post_file(url, audio, results, 2)
    busy = results[2]
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy"
    # Refused before its form is parsed and its audio probed: a saturated service spends nothing on a 429.
    assert probed == []
    assert int(busy.headers["Retry-After"]) >= 1
    started = time.monotonic()
    assert requests.get(url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 1.0, "/health must not wait behind transcriptions"
    engine.release.set()
    first.join(30)
    second.join(30)
    assert results[0].status_code == 200 and results[1].status_code == 200


def _declare_too_much(url: str, extra_headers: bytes = b"") -> str:
    """A request that declares 50 MB but sends none of it; waitress's whole reply."""
    import socket
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /transcribe HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 52428800\r\n" + extra_headers + b"\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # until waitress closes: headers and body may come apart
            reply += chunk
    return reply.decode()


def test_oversized_body_is_refused_before_the_app_reads_it(served):
    url, engine = served
    # waitress must answer at once, in JSON, without reading the body.
    reply = _declare_too_much(url)
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"code": "file_too_large"' in reply and "application/json" in reply
    assert "Access-Control-Allow-Origin" not in reply  # no CORS configured
    assert not engine.calls


def test_what_waitress_refuses_carries_the_cors_headers(tmp_uploads):
    """A browser shows its script a response without CORS headers as a network error: the 413 must have them."""
    settings = make_settings(WHISPER_TMP_DIR=tmp_uploads, WHISPER_MAX_UPLOAD_MB=2, WHISPER_PORT=0,
                             WHISPER_CORS_ORIGINS="https://app.pilotys.fr")
    server = make_server(create_app(settings, FakeEngine(), load_model=False), settings)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{server.effective_port}"
    try:
        reply = _declare_too_much(url, b"Origin: https://app.pilotys.fr\r\n")
        head = reply.split("\r\n\r\n", 1)[0].split("\r\n")
        assert head[0].startswith("HTTP/1.1 413") and '"code": "file_too_large"' in reply
        assert "Access-Control-Allow-Origin: https://app.pilotys.fr" in head
        assert "Access-Control-Allow-Credentials: true" in head and "Vary: Origin" in head
        other = _declare_too_much(url, b"Origin: https://evil.example\r\n")
        assert other.startswith("HTTP/1.1 413") and "Access-Control-Allow-Origin" not in other
    finally:
        server.close()


# -- the check a proxy makes before it sends a body (Caddy's forward_auth) -------------------------------------

def auth_check(client, authorization=None, method=None, uri=None, **headers):
    """GET /v1/auth/check as Caddy's forward_auth asks it: the request's headers, its method and URI, no body."""
    if authorization:
        headers["Authorization"] = authorization
    if method:
        headers.update({"X-Forwarded-Method": method, "X-Forwarded-Uri": uri})
    return client.get("/v1/auth/check", headers=headers)


def test_the_auth_check_answers_what_the_route_would(jobs_app):
    """Keys for every route, an upload grant for creating its job only: the check lets in what the route itself
    would let in, and refuses the rest with the route's own status, error and challenge."""
    from pilotys_whisper import grants

    client = jobs_app.test_client()
    state = jobs_app.extensions["whisper"]
    token = client.post("/v1/uploads", json={"language": "fr"}, headers=AUTH).get_json()["token"]
    expired, _ = grants.issue(state.keyring, state.keyring.authenticate(f"Bearer {KEY}"), {}, idempotency_key=None,
                              ttl_s=-1)
    key, grant = f"Bearer {KEY}", f"Bearer {token}"
    cases = [  # (Authorization, method, URI, what the check answers)
        (key, "POST", "/v1/audio/transcriptions", 204),
        (key, "POST", "/v1/jobs?x=1", 204),
        (key, "GET", "/v1/jobs/job_123/result?format=srt", 204),
        (key, "DELETE", "/v1/jobs/job_123", 204),
        (grant, "POST", "/v1/jobs", 204),
        (grant, "POST", "/v1/%6Aobs", 204),  # what the router sees, decoded
        (None, "POST", "/v1/audio/transcriptions", 401),
        ("Bearer wrong-key-000000000", "POST", "/transcribe", 401),
        ("Basic dXNlcjpwYXNz", "POST", "/v1/jobs", 401),
        (grant, "POST", "/v1/audio/transcriptions", None),  # a grant anywhere else: what the route says
        (grant, "GET", "/v1/jobs", None),
        (grant, "POST", "/v1/uploads", None),
        (grant[:-4] + "AAAA", "POST", "/v1/jobs", 401),
        (f"Bearer {expired}", "POST", "/v1/jobs", 401),
        (None, "POST", "/nothing-here", 401),  # unknown routes are no way around the check
    ]
    for authorization, method, uri, expected in cases:
        check = auth_check(client, authorization, method, uri)
        route = client.open(uri, method=method, headers={"Authorization": authorization} if authorization else {})
        if check.status_code == 204:
            assert expected == 204 and check.get_data() == b"", (authorization, uri)
            assert route.status_code not in (401, 403), (uri, route.get_json())
            continue
        assert expected in (None, check.status_code), (authorization, uri, check.get_json())
        assert check.status_code in (401, 403) and check.is_json and check.headers["WWW-Authenticate"].startswith(
            "Bearer")
        if uri != "/nothing-here":
            assert (route.status_code, route.get_json()["error"]["code"], route.headers["WWW-Authenticate"]) == (
                check.status_code, check.get_json()["error"]["code"], check.headers["WWW-Authenticate"]), uri


def test_the_auth_check_alone_checks_itself_and_needs_no_model(tmp_uploads):
    """Asked directly (no X-Forwarded-* headers), the check is about itself: a key passes, a grant does not; and it
    answers while the model is still loading (the proxy must not hold uploads back for that)."""
    app = create_app(make_settings(WHISPER_TMP_DIR=tmp_uploads), FakeEngine(load_delay=30), load_model=False)
    client = app.test_client()
    assert not app.extensions["whisper"].ready.is_set()
    assert auth_check(client, f"Bearer {KEY}").status_code == 204
    assert_error(auth_check(client), 401, "missing_api_key")
    assert_error(auth_check(client, "Bearer wrong-key-000000000"), 401, "invalid_api_key")
    from pilotys_whisper import grants

    keyring = app.extensions["whisper"].keyring
    token, _ = grants.issue(keyring, keyring.authenticate(f"Bearer {KEY}"), {}, idempotency_key=None, ttl_s=60)
    refused = auth_check(client, f"Bearer {token}")
    assert refused.status_code in (401, 403) and "insufficient_scope" in refused.headers["WWW-Authenticate"]


def test_the_auth_checks_refusal_is_readable_by_the_browser_and_logged(tmp_uploads, caplog):
    """The proxy hands the check's refusal to the client as it is: with CORS for an allowed origin (a browser
    otherwise sees a network error), and in the log; a check that lets the request in leaves no line of its own."""
    caplog.set_level(logging.INFO, logger="pilotys_whisper")
    client = _cors_client(tmp_uploads, "https://app.pilotys.fr")
    r = auth_check(client, "Bearer wrong-key-000000000", "POST", "/v1/jobs", Origin="https://app.pilotys.fr")
    assert_error(r, 401, "invalid_api_key")
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.pilotys.fr"
    assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
    assert auth_check(client, f"Bearer {KEY}", "POST", "/v1/jobs").status_code == 204
    lines = [r.getMessage() for r in caplog.records if r.name == "pilotys_whisper.access"]
    assert len(lines) == 1 and "GET /v1/auth/check status=401" in lines[0], lines
    assert "wrong-key" not in caplog.text
