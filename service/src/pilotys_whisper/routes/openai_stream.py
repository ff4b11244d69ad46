"""OpenAI's streamed transcription (`stream=true` on /v1/audio/transcriptions): `transcript.text.delta` events as
segments become final, then one `transcript.text.done` with the whole text, as data-only Server-Sent Events."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator

from ..errors import ApiError
from .event_stream import sse

log = logging.getLogger("pilotys_whisper")


def transcription_events(state, params) -> Iterator[str]:
    """Transcribe in a thread of its own (the HTTP thread writes the events meanwhile); the caller holds the
    admission slot. Closing the iterator (the client left) stops the transcription at its next batch."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            result = state.engine.transcribe(params.path, params.options, should_stop=stop.is_set,
                                             on_segments=lambda segments: events.put(("segments", segments)))
            events.put(("done", result))
        except BaseException as exc:  # noqa: BLE001 - handed to the HTTP thread, which reports it
            events.put(("error", exc))

    began = time.monotonic()
    worker = threading.Thread(target=work, name="transcription-stream", daemon=True)
    worker.start()
    try:
        started = False  # the first delta starts the text: no leading space (as the text of `done`)
        while True:
            kind, value = events.get()
            if kind == "segments":
                for segment in value:
                    delta = segment.text if started else segment.text.lstrip()
                    if delta:
                        started = True
                        yield _event({"type": "transcript.text.delta", "delta": delta})
            elif kind == "done":
                state.metrics.transcriptions.labels(outcome="ok").inc()
                state.metrics.observe_transcription(value.duration, time.monotonic() - began)
                yield _event({"type": "transcript.text.done", "text": value.text})
                return
            else:
                # The status line has gone: the error travels as an event, which OpenAI's clients raise.
                if not isinstance(value, ApiError):
                    log.error("streamed transcription failed", exc_info=value)
                error = value if isinstance(value, ApiError) else ApiError(500, "internal_error",
                                                                           "the transcription failed")
                state.metrics.transcriptions.labels(outcome="rejected" if error.status < 500 else "failed").inc()
                yield _event(error.body())
                return
    finally:
        stop.set()
        worker.join()


def _event(data: dict) -> str:
    return sse(json.dumps(data, ensure_ascii=False))
