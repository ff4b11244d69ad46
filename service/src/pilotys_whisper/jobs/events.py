"""A job's events (final segments, its outcome) kept in the jobs database, so that a client's event stream can
resume after the last event it saw (Last-Event-ID), from any worker, and subscribers woken as they come."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

# Created with the jobs table in both backends (SQLite and PostgreSQL); rows go with their job (purge).
EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, seq),
    UNIQUE (job_id, key)
);
"""
SEGMENT = "segment"
TERMINAL = ("job.succeeded", "job.failed", "job.cancelled")


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: dict
    created_at: float


class JobEvents:
    """Append-only log of each job's events; `store` is the jobs backend (query/execute/transaction)."""

    def __init__(self, store):
        self.store = store
        self._published = threading.Condition()
        self.version = 0  # how many events this process published: a subscriber waits for it to change

    def publish(self, job_id: str, event_type: str, data: dict, *, key: str | None = None, db=None) -> int | None:
        """Append an event (in the caller's transaction `db` if given); returns its seq, or None when an event
        with the same key was published already (a retried attempt publishes its segments again: each is
        stored once)."""
        if db is None:
            with self.store.transaction() as tx:
                seq = self._insert(tx, job_id, event_type, data, key)
        else:
            seq = self._insert(db, job_id, event_type, data, key)  # seen once the caller commits (or polled)
        if seq is not None:
            with self._published:
                self.version += 1
                self._published.notify_all()
        return seq

    @staticmethod
    def _insert(db, job_id: str, event_type: str, data: dict, key: str | None) -> int | None:
        # One writer per job at a time (its running attempt), so the next seq is taken without a race.
        row = db.execute("SELECT COALESCE(MAX(seq), 0) AS last FROM job_events WHERE job_id = ?", (job_id,)).fetchone()
        seq = int(row["last"]) + 1
        inserted = db.execute(
            "INSERT INTO job_events (job_id, seq, key, type, data, created_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING", (job_id, seq, key or event_type, event_type, json.dumps(data), time.time()))
        return seq if inserted.rowcount else None

    def outcome_seq(self, job_id: str) -> int | None:
        """The seq of the job's outcome event, if it was published."""
        marks = ", ".join("?" * len(TERMINAL))
        rows = self.store.query(f"SELECT seq FROM job_events WHERE job_id = ? AND type IN ({marks})",  # noqa: S608
                                (job_id, *TERMINAL))
        return int(rows[0]["seq"]) if rows else None

    def after(self, job_id: str, seq: int, limit: int = 100) -> list[Event]:
        rows = self.store.query("SELECT seq, type, data, created_at FROM job_events WHERE job_id = ? AND seq > ? "
                                "ORDER BY seq LIMIT ?", (job_id, seq, limit))
        return [Event(int(r["seq"]), r["type"], json.loads(r["data"]), r["created_at"]) for r in rows]

    def wait(self, seen: int, timeout: float) -> None:
        """Until this process publishes after `version` was `seen`, or the timeout (other workers': poll)."""
        with self._published:
            self._published.wait_for(lambda: self.version != seen, timeout)

    @staticmethod
    def delete(db, job_id: str) -> None:
        db.execute("DELETE FROM job_events WHERE job_id = ?", (job_id,))
