"""The jobs table, the states a job goes through, and a result as it is stored (both backends)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime

from ..engines import Segment, Transcription, Word
from .events import EVENTS_SCHEMA

# receiving: a live upload (live.py) whose audio is still arriving
STATUSES = ("receiving", "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3  # a job that keeps killing the process is failed rather than retried forever
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    expires_at DOUBLE PRECISION,
    filename TEXT,
    size BIGINT,
    duration DOUBLE PRECISION,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    options TEXT NOT NULL,
    response_format TEXT NOT NULL,
    callback_url TEXT,
    idempotency_key TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    result TEXT,
    webhook_status TEXT NOT NULL DEFAULT 'none',
    webhook_next_at DOUBLE PRECISION,
    webhook_attempts TEXT NOT NULL DEFAULT '[]',
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_webhook ON jobs (webhook_status, webhook_next_at);
""" + EVENTS_SCHEMA


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class DuplicateJob(Exception):
    """The backend refused the job: another one with the same owner and idempotency key committed first."""


def dump_result(result: Transcription) -> str:
    stored = asdict(result)
    stored.pop("speech")  # the VAD's regions serve the diarization, which has run by now
    return json.dumps(stored)


def load_result(data: str) -> Transcription:
    raw = json.loads(data)
    segments = []
    for seg in raw.pop("segments"):
        words = seg.pop("words", None)
        segments.append(Segment(**seg, words=None if words is None else [Word(**w) for w in words]))
    return Transcription(segments=segments, **raw)
