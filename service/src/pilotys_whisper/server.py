"""Serve the app with waitress; errors waitress answers by itself (body too large...) are JSON too."""

from __future__ import annotations

import json
import logging
import signal
import threading

from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from .app import MULTIPART_OVERHEAD

log = logging.getLogger("pilotys_whisper")


class _JsonErrorTask(ErrorTask):
    """waitress refuses an oversized or malformed request before the app sees it; answer in JSON."""

    def execute(self):
        err = self.request.error
        if err.code == 413:
            code, message = "file_too_large", "the upload is larger than this server accepts"
        else:
            code = err.reason.lower().replace(" ", "_")
            message = str(err.body)
        body = json.dumps({"error": {"code": code, "message": message,
                                     "type": "invalid_request_error"}}).encode()
        self.status = f"{err.code} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JsonErrorChannel(HTTPChannel):
    error_task_class = _JsonErrorTask


def make_server(app, settings):
    server = create_server(
        app,
        host=settings.host,
        port=settings.port,
        threads=settings.effective_http_threads,
        # A hard cap before the app: bodies over it are refused as soon as their length is known.
        max_request_body_size=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        channel_timeout=300,
        connection_limit=200,
        ident="whisper-service",
        clear_untrusted_proxy_headers=True,
    )
    server.channel_class = _JsonErrorChannel
    return server


def run(app, settings) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and let the app finish its background work."""
    server = make_server(app, settings)
    stopping = threading.Event()

    def _stop(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            log.info("received %s, shutting down", signal.Signals(signum).name)
            server.close()
            raise SystemExit(0)

    def _drain(_signum, _frame):
        app.extensions["whisper"].draining.set()
        log.info("received SIGUSR1, draining: /ready answers 503 until the restart")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGUSR1, _drain)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    try:
        server.run()
    except SystemExit:
        pass
    finally:
        state = app.extensions["whisper"]
        if state.jobs is not None:
            state.jobs.stop()
