"""What every part of the running service shares: its settings, the loaded model, the keys, admission."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import g, request

from . import grants
from .admission import Admission
from .auth import KeyRing, Principal
from .engines import Engine
from .errors import ApiError
from .grants import is_grant
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("pilotys_whisper")


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
