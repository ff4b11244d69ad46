"""The one-host backend: the jobs table in SQLite, the audio in the local spool, this process's threads as
workers."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .schema import SCHEMA

if TYPE_CHECKING:
    from .manager import JobManager


class SqliteBackend:
    """One host: the jobs table in SQLite, the audio in the local spool, this process's threads as workers.

    One connection per thread; every write is its own transaction.
    """

    shared = False  # only this process runs these jobs: what was running at start-up was interrupted

    def __init__(self, manager: JobManager):
        self.manager = manager
        self.path = manager.root / "jobs.sqlite3"
        self._local = threading.local()
        self._conn().executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def transaction(self):
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def create_tables(self, sql: str) -> None:
        """Tables of another module (live uploads), with IF NOT EXISTS."""
        self._conn().executescript(sql)

    def query(self, sql: str, args=()) -> list:
        return self._conn().execute(sql, args).fetchall()

    def execute(self, sql: str, args=()) -> int:
        return self._conn().execute(sql, args).rowcount

    # -- audio: a file in the spool, fsynced before the job is accepted -----------------------------------

    @contextlib.contextmanager
    def accept(self, job_id: str, upload_path: str):
        """A transaction in which to insert the job, its audio already safe in the spool."""
        audio = self.manager.spool_copy(upload_path, self._audio_path(job_id))
        try:
            with self.transaction() as db:
                yield db
        except BaseException:
            audio.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def audio(self, job_id: str):
        yield str(self._audio_path(job_id))

    def delete_audio(self, job_id: str) -> None:
        self._audio_path(job_id).unlink(missing_ok=True)

    def _audio_path(self, job_id: str) -> Path:
        return self.manager.spool / f"{job_id}.audio"

    # -- dispatch: worker threads claim the oldest queued job --------------------------------------------

    def enqueue(self, db, job_id: str) -> None:
        self.manager.wake.set()

    def start(self) -> None:
        for number in range(self.manager.settings.job_workers):
            self.manager.spawn(self._work, f"job-worker-{number}")

    def _work(self) -> None:
        manager = self.manager
        while not manager.stopping.is_set():
            if not manager.state.ready.wait(1.0):
                continue
            if manager.state.draining.is_set():
                manager.stopping.wait(1.0)  # take nothing before the restart, without spinning (ready stays set)
                continue
            with self.transaction() as db:
                row = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created_at LIMIT 1").fetchone()
                row = manager.begin(db, row) if row is not None else None
            if row is None:
                manager.wake.wait(2.0)
                manager.wake.clear()
                continue
            manager.run(row)

    def housekeeping(self) -> None:
        pass

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

