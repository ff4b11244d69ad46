"""Serve the app with waitress; errors waitress answers by itself (body too large...) are JSON too."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import threading
import time

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from .app import MULTIPART_OVERHEAD, cors_headers, remove_own_uploads

log = logging.getLogger("pilotys_whisper")


class _JsonErrorTask(ErrorTask):
    """waitress refuses an oversized or malformed request before the app sees it; answer in JSON, with the
    app's CORS headers: without them a browser shows its script a network error instead of this answer."""

    cors_origins: tuple[str, ...] = ()

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
        origin = self.request.headers.get("ORIGIN")
        if self.cors_origins and origin:
            cors = cors_headers(origin.rstrip("/"), self.cors_origins, preflight=False)
            self.response_headers.extend(cors.items())
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _JsonErrorChannel(HTTPChannel):
    error_task_class = _JsonErrorTask


# Open connections, idle ones included (keep-alive, or a client that never finishes its headers), count against
# this; past it waitress accepts nothing more, /health included. 200 slow clients used to stop the service
# (bench/load.py). Each costs a socket and a buffer, not a thread; the units allow 4096 descriptors.
CONNECTION_LIMIT = 1000


def _allow_open_files(wanted: int) -> None:
    """Raise the soft limit on descriptors (often 1024 outside the units) up to the hard one if it is lower
    than the connections allowed: past it accept() fails and the service stops taking connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def make_server(app, settings):
    server = create_server(
        app,
        host=settings.host,
        port=settings.port,
        threads=settings.effective_http_threads,
        # A hard cap before the app: bodies over it are refused as soon as their length is known.
        max_request_body_size=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        channel_timeout=300,
        # Keep reading a connection while its request runs: a client that leaves an event stream is noticed at
        # once (waitress.client_disconnected), and its stream's slot and HTTP thread come back.
        channel_request_lookahead=1,
        connection_limit=CONNECTION_LIMIT,
        asyncore_use_poll=True,  # select() cannot watch a descriptor past 1023: poll() has no such limit
        ident="whisper-service",
        clear_untrusted_proxy_headers=True,
    )
    error_task = type("JsonErrorTask", (_JsonErrorTask,), {"cors_origins": settings.cors_origins})
    server.channel_class = type("JsonErrorChannel", (_JsonErrorChannel,), {"error_task_class": error_task})
    return server


# On SIGTERM, requests already received get this long to finish. The units stop the service within
# TimeoutStopSec=30 (podman stop --time 25 in a container): the drain and the jobs' stop fit below both.
DRAIN_S = 20.0
STOP_BUDGET_S = 24.0


def _busy(channel) -> bool:
    """A connection with a request being read, run or answered; an idle keep-alive one is not."""
    return bool(channel.request is not None or channel.requests or channel.total_outbufs_len)


def run(app, settings) -> None:
    """Serve until SIGTERM/SIGINT; then stop accepting, let the requests in flight finish (up to DRAIN_S), stop
    the background work and remove what is left of the uploads."""
    _allow_open_files(CONNECTION_LIMIT + 256)  # the connections, plus the model, uploads, logs and the database
    server = make_server(app, settings)
    state = app.extensions["whisper"]
    stopping, hurry = threading.Event(), threading.Event()

    def _stop(signum, _frame):
        if stopping.is_set():  # a second signal: no more waiting
            hurry.set()
            return
        stopping.set()
        log.info("received %s, shutting down: no new connections, finishing the requests in flight",
                 signal.Signals(signum).name)
        if state.jobs is not None:
            state.jobs.request_stop()  # a running job goes back to the queue meanwhile
        server.pull_trigger()  # wake the loop now rather than at its next timeout

    def _drain(_signum, _frame):
        state.draining.set()
        log.info("received SIGUSR1, draining: /ready answers 503 until the restart")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGUSR1, _drain)
    log.info("listening on http://%s:%d", settings.host, settings.port)

    def poll_once() -> None:
        # The loop itself, one round at a time (at most asyncore_loop_timeout, 1 s): waitress's own run()
        # leaves only by an exception, which would drop every response not yet sent.
        server.asyncore.loop(timeout=server.adj.asyncore_loop_timeout, map=server._map,
                             use_poll=server.adj.asyncore_use_poll, count=1)

    stopped_at = None
    try:
        while not stopping.is_set():
            poll_once()
        stopped_at = time.monotonic()
        wasyncore.dispatcher.close(server)  # the listening socket only; the loop still carries the responses
        while not hurry.is_set() and time.monotonic() - stopped_at < DRAIN_S:
            channels = [c for c in list(server._map.values()) if isinstance(c, HTTPChannel)]
            busy = [c for c in channels if _busy(c)]
            if not busy:
                break
            for channel in channels:
                if channel not in busy:
                    channel.will_close = True  # idle keep-alive: closed by the loop, no request is lost
            poll_once()
        else:
            log.warning("stopping with requests still running after %.0f s", time.monotonic() - stopped_at)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=0.5)
    finally:
        running = []
        if state.jobs is not None:
            spent = 0.0 if stopped_at is None else time.monotonic() - stopped_at
            running = state.jobs.stop(timeout=max(1.0, STOP_BUDGET_S - spent))
        removed = remove_own_uploads(app)
        if removed:
            log.warning("removed %d upload(s) of requests cut off by the shutdown", removed)
        if running:
            # A thread still inside CTranslate2, ONNX Runtime (VAD) or FFmpeg when the interpreter finalizes takes
            # the process down (SIGSEGV or SIGABRT "terminate called without an active exception", reproduced):
            # leave without finalizing. Their jobs are queued again at start-up, as after any stop.
            log.warning("stopping with %s still running after the stop budget: exiting at once",
                        ", ".join(running))
            logging.shutdown()
            os._exit(0)
