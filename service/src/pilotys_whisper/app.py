"""The HTTP application: create_app() builds the service's state, registers the routes of each surface (routes/),
and handles every request's life cycle (ids, CORS, metrics, the access log) and its errors in one place."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from flask import Flask, Request, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from . import forms
from .admission import Admission
from .auth import KeyRing
from .engines import Engine, build_engine
from .errors import ApiError, http_error
from .metrics import Metrics
from .routes import register
from .routes.live import REQUEST_HEADERS as TUS_REQUEST_HEADERS
from .routes.live import RESPONSE_HEADERS as TUS_RESPONSE_HEADERS
from .routes.ops import AUTH_CHECK
from .settings import Settings
from .state import ServiceState

log = logging.getLogger("pilotys_whisper")
access_log = logging.getLogger("pilotys_whisper.access")

# Room for the multipart envelope and the small form fields around the file itself.
MULTIPART_OVERHEAD = 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
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
    live = None
    if settings.state_dir is not None:
        from .jobs import JobManager, LiveUploads

        state.jobs = JobManager(state)
        live = LiveUploads(state.jobs)
    register(app, state, live)
    if load_model:
        state.start_loading(on_load_error)
        if state.jobs is not None:
            state.jobs.start()
            live.start()

    _install_request_hooks(app, state)
    _install_error_handlers(app)
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
        # HEAD, PATCH and the tus headers: a browser's resumable upload (routes/live.py).
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
