"""Server-Sent Events (WHATWG HTML, "Server-sent events"): a job's live events, and the bound on open streams.

Each open stream holds one HTTP thread of waitress for as long as it lasts (the response iterator runs in it),
so their number is bounded (WHISPER_MAX_EVENT_STREAMS) and the HTTP threads are sized to leave the others free.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator

from flask import Response

from ..errors import ApiError
from ..jobs.events import TERMINAL

KEEPALIVE_S = 15.0  # a comment line this often: proxies keep the connection, a gone client is noticed
POLL_S = 1.0  # events another worker published (PostgreSQL) are seen within this
RETRY_MS = 3000  # how long a browser's EventSource waits before it reconnects
FINISH_GRACE_S = 2.0  # a finished job's outcome event is published just after its row changes: wait for it


def sse(data: str, *, event: str | None = None, event_id: int | None = None) -> str:
    """One event in the text/event-stream format: a data line per line of data, then a blank line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return "\n".join(lines) + "\n\n"


def last_event_id(raw: str | None) -> int:
    """The seq to resume after: Last-Event-ID as this service sent it (a decimal seq); anything else: 0."""
    raw = (raw or "").strip()
    return int(raw) if raw.isdigit() and len(raw) < 12 else 0


def event_stream_response(body: Iterator[str]) -> Response:
    response = Response(body, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # proxies that buffer by default (nginx) pass it through
    return response


class StreamSlots:
    """At most `limit` event streams open at once; the next one gets 429 with Retry-After."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return self._open

    def take(self) -> None:
        with self._lock:
            if self._open >= self.limit:
                raise ApiError(429, "too_many_event_streams",
                               f"all {self.limit} event stream(s) of this server are open; retry later or poll "
                               "GET /v1/jobs/{id} instead", headers={"Retry-After": str(int(KEEPALIVE_S))})
            self._open += 1

    def give_back(self) -> None:
        with self._lock:
            self._open -= 1

    def hold(self, body: Iterator[str]) -> ClosingBody:
        """Take a slot for `body`, given back when the server closes the response (or it ends)."""
        self.take()
        return ClosingBody(body, self.give_back)


class ClosingBody:
    """A response body that calls `release` once, when closed or exhausted, even if never iterated (a
    generator's `finally` would not run then)."""

    def __init__(self, body: Iterator[str], release: Callable[[], None]):
        self._release, self._body, self._held = release, body, True

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._body)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._held:
            self._held = False
            try:
                with contextlib.suppress(Exception):
                    self._body.close()
            finally:
                self._release()


def job_events(manager, job_id: str, after: int, gone: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """The events of a job from seq `after` on, then those to come, until its outcome. A client that goes away
    is noticed by `gone` (waitress.client_disconnected) within POLL_S, or else at the next write."""
    yield f"retry: {RETRY_MS}\n\n"
    last_sent, last_state, finished_at = time.monotonic(), None, None
    while not gone():
        seen = manager.events.version
        events = manager.events.after(job_id, after)
        for event in events:
            yield sse(json.dumps(event.data, ensure_ascii=False), event=event.type, event_id=event.seq)
            after, last_sent = event.seq, time.monotonic()
            if event.type in TERMINAL:
                return
        if events:
            continue
        row = manager.get(job_id)
        if row is None:  # purged meanwhile
            return
        state = (row["status"], round(row["progress"], 4))
        if state != last_state:
            # Progress is not stored: sent without an id, so that a resumed stream starts where it was.
            yield sse(json.dumps({"status": state[0], "progress": state[1]}), event="progress")
            last_state, last_sent = state, time.monotonic()
        if row["status"] in ("succeeded", "failed", "cancelled"):
            finished_at = finished_at or time.monotonic()
            if time.monotonic() - finished_at >= FINISH_GRACE_S:
                # Finished without its event (it could not be stored): the outcome from the row, without id.
                yield sse(json.dumps(manager.view(row), ensure_ascii=False), event=f"job.{row['status']}")
                return
        if time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        manager.events.wait(seen, POLL_S if finished_at is None else 0.2)

