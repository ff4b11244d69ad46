"""The HTTP API: the original /transcribe contract, OpenAI's /v1/audio/*, health, readiness and metrics."""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from flask import Flask, Request, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from . import __version__, forms, grants, speakers
from .admission import Admission
from .audio import probe, too_long
from .auth import KeyRing, Principal
from .engines import Engine, TranscribeOptions, build_engine
from .errors import ApiError, http_error
from .event_stream import ClosingBody, event_stream_response
from .formats import RESPONSE_FORMATS, render, to_legacy
from .grants import is_grant
from .live import REQUEST_HEADERS as TUS_REQUEST_HEADERS
from .live import RESPONSE_HEADERS as TUS_RESPONSE_HEADERS
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openai_stream import transcription_events
from .openapi import served as served_openapi
from .settings import LANGUAGES, Settings

log = logging.getLogger("pilotys_whisper")
access_log = logging.getLogger("pilotys_whisper.access")

# Room for the multipart envelope and the small form fields around the file itself.
MULTIPART_OVERHEAD = 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
GRANULARITIES = ("segment", "word")
# What a proxy asks before it sends a request's body (Caddy's forward_auth): see auth_check.
AUTH_CHECK = "/v1/auth/check"
# The views that verify an upload grant themselves (jobs.py): a grant is refused everywhere else.
GRANT_ENDPOINTS = frozenset({"jobs.submit", "live.create", "live.status", "live.append", "live.terminate"})
# Methods counted by name in the metrics; any other becomes "other": a client (no key needed) must not be able
# to create new, permanent series with made-up methods.
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class UploadRequest(Request):
    """Uploaded files go straight to named temporary files (ffmpeg needs a path; nothing sits in memory).

    They are deleted when the request ends, whatever happened.
    """

    upload_dir: str | None = None
    form_data_parser_class = forms.BoundedFormParser  # the fields that are not files: MAX_FORM_FIELDS_BYTES in all
    max_form_memory_size = forms.DECODER_BUFFER_BYTES
    max_form_parts = forms.MAX_FORM_PARTS

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return tempfile.NamedTemporaryFile(dir=self.upload_dir, prefix=_upload_prefix())


def _upload_prefix() -> str:
    # The process id in the name: at shutdown this process removes the uploads it still holds, never another's.
    return f"whisper-upload-{os.getpid()}-"


def remove_own_uploads(app: Flask) -> int:
    """Delete this process's uploads still on disk: those of requests a shutdown cut off (their threads die
    with the process, before they could delete them)."""
    removed = 0
    for path in Path(app.request_class.upload_dir).glob(_upload_prefix() + "*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


@dataclass
class ServiceState:
    settings: Settings
    engine: Engine
    keyring: KeyRing
    admission: Admission
    metrics: Metrics
    ready: threading.Event = field(default_factory=threading.Event)
    # Set by SIGUSR1 before a rolling restart: /ready answers 503 so that a gateway sends nothing new, while
    # every request that still arrives is served as usual.
    draining: threading.Event = field(default_factory=threading.Event)
    load_error: str | None = None
    jobs: object | None = None  # JobManager when WHISPER_STATE_DIR is set
    diarizer: object | None = None  # diarization.Diarizer when WHISPER_DIARIZATION is on, once loaded

    def load_model(self, on_error: Callable[[BaseException], None] | None = None) -> None:
        started = time.monotonic()
        try:
            self.engine.load()
            if self.settings.diarization:
                from .diarization import Diarizer

                self.diarizer = Diarizer.load(model_path=self.settings.diarization_model,
                                              threads=self.settings.cpu_threads)
        except BaseException as exc:  # noqa: BLE001 - reported, then the caller decides
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", self.settings.model_label, self.load_error)
            if on_error is not None:
                on_error(exc)
            return
        self.metrics.ready.set(1)
        self.ready.set()
        log.info("ready: model %s loaded in %.1f s%s", self.settings.model_label, time.monotonic() - started,
                 ", with speaker diarization" if self.diarizer is not None else "")

    def start_loading(self, on_error: Callable[[BaseException], None] | None = None) -> threading.Thread:
        thread = threading.Thread(target=self.load_model, args=(on_error,), name="model-loader", daemon=True)
        thread.start()
        return thread

    def authenticate(self) -> Principal:
        if is_grant(request.headers.get("Authorization")):
            # A forged or expired grant is 401 invalid_token; a valid one lacks the right to do this: 403
            # insufficient_scope (RFC 6750 section 3.1), not 401, which would tell the client to authenticate.
            grants.verify(self.keyring, request.headers["Authorization"])
            raise grants.not_accepted("an upload grant only creates a job (POST /v1/jobs, or /v1/live and its "
                                      "upload); use the API key here")
        principal = self.keyring.authenticate(request.headers.get("Authorization"))
        if principal is None:
            presented = bool(request.headers.get("Authorization"))
            challenge = 'Bearer realm="whisper"' + (', error="invalid_token"' if presented else "")
            raise ApiError(401, "invalid_api_key" if presented else "missing_api_key",
                           "the API key is not valid" if presented else
                           "send the API key as 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": challenge})
        g.principal = principal
        return principal

    def require_ready(self) -> None:
        if not self.ready.is_set():
            if self.load_error:
                raise ApiError(503, "model_unavailable", f"the model failed to load ({self.load_error})")
            raise ApiError(503, "model_loading", "the model is still loading; retry shortly",
                           headers={"Retry-After": "5"})


def create_app(settings: Settings, engine: Engine | None = None, *, load_model: bool = True,
               on_load_error: Callable[[BaseException], None] | None = None) -> Flask:
    # No static folder: Flask would otherwise add a GET /static/<path> route that is no part of the API.
    app = Flask("pilotys_whisper", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + MULTIPART_OVERHEAD
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    upload_dir = str(settings.tmp_dir or tempfile.gettempdir())
    app.request_class = type("UploadRequest", (UploadRequest,), {"upload_dir": upload_dir})

    engine = engine or build_engine(settings)
    admission = Admission(settings.concurrency, settings.queue_size)
    state = ServiceState(
        settings=settings, engine=engine,
        keyring=KeyRing(settings.api_key, settings.api_keys_file, webhook_secret=settings.webhook_secret),
        admission=admission,
        metrics=Metrics(admission, settings.model_label, engine.name),
    )
    app.extensions["whisper"] = state
    if settings.state_dir is not None:
        from .jobs import JobManager
        from .live import LiveUploads

        state.jobs = JobManager(state)
        live = LiveUploads(state.jobs)
        app.register_blueprint(state.jobs.blueprint())
        app.register_blueprint(live.blueprint())
    if load_model:
        state.start_loading(on_load_error)
        if state.jobs is not None:
            state.jobs.start()
            live.start()

    _install_request_hooks(app, state)
    _install_error_handlers(app)
    _install_routes(app, state)
    return app


# -- request life cycle -----------------------------------------------------------------------------------

def _install_request_hooks(app: Flask, state: ServiceState) -> None:
    origins = state.settings.cors_origins

    @app.before_request
    def start_request():
        g.started = time.monotonic()
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex[:16]
        if request.mimetype != "multipart/form-data":
            # Fields only (an upload grant's JSON, a url-encoded form), read into memory whole: a few KB.
            request.max_content_length = forms.MAX_FIELDS_BODY_BYTES
        if request.method == "OPTIONS" and origins and request.headers.get("Access-Control-Request-Method"):
            return Response(status=204)
        return None

    @app.after_request
    def finish_request(response: Response):
        response.headers["X-Request-ID"] = g.get("request_id", "-")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        origin = request.headers.get("Origin")
        if origins and origin:
            _cors(response, origin.rstrip("/"), origins)
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in METRIC_METHODS else "other"
        state.metrics.requests.labels(route=route, method=method, status=str(response.status_code)).inc()
        # An auth check that lets a request in is followed by that request, which is logged itself.
        let_in = route == AUTH_CHECK and response.status_code == 204
        if route not in ("/health", "/ready", "/metrics") and not let_in:
            _log_request(response)
        return response


def _cors(response: Response, origin: str, allowed: tuple[str, ...]) -> None:
    headers = cors_headers(origin, allowed, preflight=request.method == "OPTIONS")
    if "Vary" in headers:
        response.vary.add(headers.pop("Vary"))
    response.headers.update(headers)


def cors_headers(origin: str, allowed: tuple[str, ...], *, preflight: bool) -> dict[str, str]:
    """The CORS headers for a request from origin (none for an origin not allowed): the app's responses and
    the errors waitress answers itself (server.py) carry the same."""
    if allowed == ("*",):
        headers = {"Access-Control-Allow-Origin": "*"}  # never with credentials
    elif origin in allowed:
        headers = {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true",
                   "Vary": "Origin"}
    else:
        return {}
    if preflight:
        # HEAD, PATCH and the tus headers: a browser's resumable upload (live.py).
        headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, PATCH, DELETE, OPTIONS"
        headers["Access-Control-Allow-Headers"] = ("Authorization, Content-Type, Idempotency-Key, X-Request-ID, "
                                                   + ", ".join(TUS_REQUEST_HEADERS))
        headers["Access-Control-Max-Age"] = "600"
    else:
        headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After, " + ", ".join(TUS_RESPONSE_HEADERS)
    return headers


def _log_request(response: Response) -> None:
    elapsed_ms = (time.monotonic() - g.get("started", time.monotonic())) * 1000
    principal = g.get("principal")
    access_log.info(
        "request id=%s %s %s status=%d audio_s=%s processing_s=%s ms=%.0f client=%s",
        g.get("request_id", "-"), _loggable(request.method), _loggable(request.path), response.status_code,
        _fmt(g.get("audio_s")), _fmt(g.get("processing_s")), elapsed_ms,
        principal.label if principal else "-",
    )


def _loggable(text: str) -> str:
    """What a client sent, as one field of a log line: anything outside the characters a URL path may carry as
    they are (newlines, spaces, non-ASCII) is percent-encoded, so that a request cannot forge a line or a field
    of its own (`GET /x%0aINFO forged...` is decoded to a path holding a newline)."""
    return quote(text, safe="/!$&'()*+,;=:@-._~")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(err: ApiError):
        response = jsonify(err.body())
        response.status_code = err.status
        response.headers.update(err.headers)
        return response

    @app.errorhandler(HTTPException)
    def http_exception(exc: HTTPException):
        if exc.code == 413:
            err = _too_large()
        else:
            err = http_error(exc.code or 500, exc.description if exc.code not in (404, 405) else None)
        response = api_error(err)
        for name, value in exc.get_headers():
            if name.lower() == "allow":
                response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unexpected error on %s %s (request %s)", _loggable(request.method), _loggable(request.path),
                      g.get("request_id"))
        return api_error(ApiError(500, "internal_error", "the server failed to process the request; it was logged"))


def _too_large() -> ApiError:
    """Which limit a 413 from Werkzeug is about: all of them raise the same bare exception."""
    if request.mimetype != "multipart/form-data":
        return forms.fields_body_too_large()
    max_content_length = request.max_content_length
    if request.content_length is not None:
        body_too_large = request.content_length > max_content_length
    else:  # chunked: too large if the parser read up to the limit
        body_too_large = getattr(request.stream, "is_exhausted", True)
    if body_too_large:
        limit = max_content_length - MULTIPART_OVERHEAD
        return ApiError(413, "file_too_large", f"the upload is larger than {limit // (1024 * 1024)} MB")
    # The body is within bounds: the form itself is not (too many parts, or a part's headers too large).
    return forms.form_too_large()


# -- routes ---------------------------------------------------------------------------------------------

def _install_routes(app: Flask, state: ServiceState) -> None:
    settings = state.settings

    @app.get("/health")
    def health():
        return jsonify(status="ok", model=settings.model_label, engine=state.engine.name,
                       device=state.engine.device, ready=state.ready.is_set(), draining=state.draining.is_set(),
                       in_flight=state.admission.running + state.admission.waiting, version=__version__,
                       diarization=_diarization_health(state))

    @app.get("/ready")
    def ready():
        state.require_ready()
        if state.draining.is_set():
            raise ApiError(503, "draining", "this instance is draining before a restart; it still serves what it "
                           "receives", headers={"Retry-After": "5"})
        return jsonify(status="ready", model=settings.model_label)

    @app.get("/metrics")
    def metrics():
        if state.jobs is not None:
            state.jobs.update_metrics()
        return Response(state.metrics.render(), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json")
    def openapi():
        # No key, like /health: the same public contract on every instance, no secret in it, and tools read it
        # before they are given a key.
        return jsonify(served_openapi(tuple(sorted(settings.model_aliases))))

    @app.get(AUTH_CHECK)
    def auth_check():
        """For the proxy in front (Caddy's forward_auth): would the request that X-Forwarded-Method and
        X-Forwarded-Uri describe (by default, this one) be let in with this Authorization header? 204 if so, or
        the 401/403 that request would get. Nothing but headers is read: the proxy sends the body only after."""
        method = request.headers.get("X-Forwarded-Method", request.method).upper()
        path = unquote(urlsplit(request.headers.get("X-Forwarded-Uri", request.full_path)).path)
        authorization = request.headers.get("Authorization")
        if is_grant(authorization) and _accepts_grants(app, method, path):
            g.principal = grants.verify(state.keyring, authorization).principal
        else:
            state.authenticate()
        return Response(status=204)

    @app.get("/v1/models")
    def models():
        state.authenticate()
        created = 1700000000
        data = [{"id": name, "object": "model", "created": created, "owned_by": "pilotys-whisper"}
                for name in (settings.model_label, "whisper-1")]
        return jsonify(object="list", data=data)

    @app.post("/transcribe")
    def transcribe_legacy():
        state.authenticate()
        state.admission.refuse_if_full()
        params = TranscriptionParams.parse(state, legacy=True)
        result = run_transcription(state, params)
        return jsonify(to_legacy(result))

    @app.post("/v1/audio/transcriptions")
    def transcriptions():
        return _openai_route(state, task="transcribe")

    @app.post("/v1/audio/translations")
    def translations():
        return _openai_route(state, task="translate")


def _diarization_health(state: ServiceState) -> dict:
    settings = state.settings
    if not settings.diarization:
        return {"enabled": False}
    model = settings.diarization_model.name if settings.diarization_model is not None else "default"
    return {"enabled": True, "loaded": state.diarizer is not None, "model": model}


def _accepts_grants(app: Flask, method: str, path: str) -> bool:
    """Whether the route at METHOD PATH takes an upload grant instead of the key (creating its one job)."""
    try:
        endpoint, _ = app.url_map.bind("localhost").match(path, method=method)
    except HTTPException:
        return False
    return endpoint in GRANT_ENDPOINTS


def _openai_route(state: ServiceState, task: str):
    state.authenticate()
    state.admission.refuse_if_full()
    stream = task == "transcribe" and _stream_requested(request.form.get("stream"))
    params = TranscriptionParams.parse(state, task=task)
    if stream:
        return _streamed(state, params)
    result = run_transcription(state, params)
    body, content_type = render(result, params.response_format, task, params.granularities)
    if isinstance(body, dict):
        response = jsonify(body)
    else:
        response = Response(body, content_type=content_type)
    return response


def _stream_requested(raw: str | None) -> bool:
    value = (raw or "").strip().lower()
    if value not in ("", "true", "false", "1", "0"):
        raise ApiError(400, "invalid_stream", "stream must be true or false", param="stream")
    return value in ("true", "1")


def _streamed(state: ServiceState, params: TranscriptionParams) -> Response:
    """OpenAI's streamed transcription (openai_stream.py). The admission slot is taken before the 200 (a full
    service still answers 429) and held until the stream is closed."""
    # The request ends (and werkzeug deletes its uploads) before the stream is read: the stream owns the upload.
    upload = request.files["file"]
    held, upload.stream = upload.stream, io.BytesIO()
    try:
        slot = state.admission.slot()
        slot.__enter__()
    except BaseException:
        held.close()
        raise

    def release() -> None:
        try:
            slot.__exit__(None, None, None)
        finally:
            held.close()

    return event_stream_response(ClosingBody(transcription_events(state, params), release))


@dataclass(frozen=True)
class TranscriptionParams:
    path: str
    size: int
    options: TranscribeOptions
    response_format: str = "json"
    granularities: tuple[str, ...] = ("segment",)
    filename: str = ""
    speakers: speakers.SpeakerOptions | None = None  # None: no diarization asked

    @classmethod
    def parse(cls, state: ServiceState, *, legacy: bool = False, task: str = "transcribe",
              require_ready: bool = True, fields=None) -> TranscriptionParams:
        """Validate the form fields (or those an upload grant fixed) and the uploaded file (everything cheap,
        before queueing)."""
        settings = state.settings
        upload = request.files.get("file")
        if upload is None and "file" in request.form:  # a part without a filename is a plain text field
            raise ApiError(400, "missing_file", "the 'file' field came as a plain form field: send the audio as "
                           "a file part, with a filename (as curl -F file=@audio.wav does)", param="file")
        if upload is None:
            raise ApiError(400, "missing_file", "send the audio as a multipart/form-data field named 'file'",
                           param="file")
        form = request.form if fields is None else fields
        # Reference clips come with the request itself, never from an upload grant's fixed fields.
        clips = request.files if fields is None else None
        checked = FormFields.check(state, form, clips)
        path, size = _saved_upload(upload, settings)
        if require_ready or checked.speaker_names:
            state.require_ready()  # voice prints need the diarizer loaded
        speaker_options = None
        if checked.diarize:
            prints = speakers.voice_prints(state.diarizer, list(checked.speaker_names),
                                           speakers.reference_clips(form, request.files), request.upload_dir)
            num, low, high = checked.speaker_counts
            speaker_options = speakers.SpeakerOptions(num_speakers=num, min_speakers=low, max_speakers=high,
                                                      references=prints)
        info = probe(path)
        if info.duration is not None and info.duration > settings.max_duration_s + 1:
            raise too_long(settings.max_duration_s)
        options = TranscribeOptions(
            language=checked.language, task=task, prompt=checked.prompt, temperature=checked.temperature,
            # Speakers are attributed word by word: a segment is split where the speaker changes.
            word_timestamps=("word" in checked.granularities and not legacy) or checked.diarize,
            max_duration_s=settings.max_duration_s, duration_hint=info.duration)
        return cls(path=path, size=size, options=options, response_format=checked.response_format,
                   granularities=checked.granularities, filename=upload.filename or "", speakers=speaker_options)


@dataclass(frozen=True)
class FormFields:
    """A transcription's form fields, checked (shared by uploads and upload grants)."""

    response_format: str
    granularities: tuple[str, ...]
    language: str | None
    temperature: float
    prompt: str | None
    diarize: bool = False
    speaker_counts: tuple[int | None, int | None, int | None] = (None, None, None)  # num, min, max
    speaker_names: tuple[str, ...] = ()

    @classmethod
    def check(cls, state: ServiceState, form, files=None) -> FormFields:
        response_format = form.get("response_format", "json").strip() or "json"
        if response_format not in RESPONSE_FORMATS:
            raise ApiError(400, "invalid_response_format",
                           f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", param="response_format")
        granularities = tuple(dict.fromkeys(
            g.strip() for g in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
            if g.strip())) or ("segment",)
        for item in granularities:
            if item not in GRANULARITIES:
                raise ApiError(400, "invalid_timestamp_granularity",
                               "timestamp_granularities[] takes segment and/or word", param="timestamp_granularities")
        model = form.get("model", "").strip()
        if model and model not in state.settings.model_aliases:
            raise ApiError(400, "model_not_found",
                           f"this server serves {state.settings.model_label} (also accepted as whisper-1); "
                           f"got {model!r}", param="model")
        prompt = form.get("prompt") or None
        if prompt is not None and len(prompt) > 4000:
            raise ApiError(400, "prompt_too_long", "prompt must be at most 4000 characters", param="prompt")
        diarize = speakers.requested(form, response_format)
        if diarize and not state.settings.diarization:
            raise speakers.unavailable()
        num, low, high, names = speakers.check_fields(form, files) if diarize else (None, None, None, [])
        return cls(response_format=response_format, granularities=granularities,
                   language=_language(state, form.get("language")), temperature=_temperature(form.get("temperature")),
                   prompt=prompt, diarize=diarize, speaker_counts=(num, low, high), speaker_names=tuple(names))


def _language(state: ServiceState, raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return state.settings.language
    value = raw.strip().lower()
    if value == "auto":
        return None
    if value not in LANGUAGES:
        raise ApiError(400, "unsupported_language",
                       f"language {raw!r} is not one Whisper knows; use an ISO 639-1 code such as fr, or auto",
                       param="language")
    return value


def _temperature(raw: str | None) -> float:
    if raw is None or not raw.strip():
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ApiError(400, "invalid_temperature", "temperature must be a number between 0 and 1",
                       param="temperature")
    return value


def _saved_upload(upload, settings: Settings) -> tuple[str, int]:
    stream = upload.stream
    stream.flush()
    path = getattr(stream, "name", None)
    if not isinstance(path, str) or not os.path.exists(path):
        raise ApiError(400, "missing_file", "the 'file' field must be a file upload", param="file")
    size = os.fstat(stream.fileno()).st_size
    if size == 0:
        raise ApiError(400, "empty_file", "the uploaded file is empty", param="file")
    if size > settings.max_upload_bytes:
        raise ApiError(413, "file_too_large", f"the upload is larger than {settings.max_upload_mb} MB")
    return path, size


def run_transcription(state: ServiceState, params: TranscriptionParams):
    started = time.monotonic()
    with state.admission.slot():
        began = time.monotonic()
        try:
            result = speakers.transcribe(state.engine, state.diarizer, params.path, params.options, params.speakers)
        except ApiError:
            state.metrics.transcriptions.labels(outcome="rejected").inc()
            raise
        except Exception:
            state.metrics.transcriptions.labels(outcome="failed").inc()
            raise
    processing = time.monotonic() - began
    state.metrics.transcriptions.labels(outcome="ok").inc()
    state.metrics.observe_transcription(result.duration, processing)
    g.audio_s, g.processing_s = result.duration, processing
    g.queued_s = began - started
    return result
