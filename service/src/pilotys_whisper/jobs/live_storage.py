"""Where a live upload's bytes are kept, per job backend: a file in this host's spool (SQLite, one host) or rows
of the jobs database (PostgreSQL, several workers: any worker takes the next PATCH, and a worker lost
mid-meeting loses nothing it acknowledged).

Both keep the same promise to live.py: append() returns only once the bytes and the new offset are durable
(committed together), and an append that fails (too large, checksum mismatch, a dropped connection) leaves
nothing behind, so that the offset HEAD answers is always exactly the bytes stored.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable


def _record(db, upload_id: str, job_id: str, received: int, length: int | None) -> None:
    """In db's transaction: the upload's new offset (and declared length), and its job's size."""
    db.execute("UPDATE live_uploads SET received = ?, length = ?, updated_at = ? WHERE id = ?",
               (received, length, time.time(), upload_id))
    db.execute("UPDATE jobs SET size = ? WHERE id = ?", (received, job_id))


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolStorage:
    """One host: the upload is the job's audio file in the spool (the SQLite backend's own place for it), fsynced
    at each PATCH before its offset is committed. One process serves the upload, so live.py's lock per upload
    orders the appends. After a crash, bytes past the committed offset (written, never acknowledged) are cut
    off by the next append."""

    growing_file = True  # the live transcription can read the file as it grows (live.GrowingFile)

    def __init__(self, store, spool):
        self.store, self.spool = store, spool

    def path(self, job_id: str):
        return self.spool / f"{job_id}.audio"

    def create(self, job_id: str) -> None:
        path = self.path(job_id)
        with open(path, "xb") as f:  # the file, then its name, are safe before the upload exists
            os.fsync(f.fileno())
        fsync_dir(path.parent)

    def discard(self, job_id: str) -> None:
        """The upload was not created after all (its transaction rolled back)."""
        self.path(job_id).unlink(missing_ok=True)

    def append(self, upload_id: str, job_id: str, offset: int, length: int | None, chunks: Iterable[bytes],
               check: Callable) -> int:
        """Write chunks at offset, fsync, commit the new offset; returns it. check is live.py's, already passed
        under its lock (one process): it is not asked again here. FileNotFoundError: the job's audio is gone."""
        with open(self.path(job_id), "r+b") as f:
            f.truncate(offset)  # what a crash left past the acknowledged offset is not part of the upload
            f.seek(offset)
            try:
                for chunk in chunks:
                    f.write(chunk)
            except BaseException:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
                raise
            f.flush()
            os.fsync(f.fileno())
            received = f.tell()
        with self.store.transaction() as db:
            _record(db, upload_id, job_id, received, length)
        return received

    @contextlib.contextmanager
    def local(self, job_id: str):
        """A path to what was received, to probe it."""
        yield str(self.path(job_id))


class DatabaseStorage:
    """Several workers: each PATCH's bytes become rows of job_audio (the PostgreSQL backend's table for a job's
    audio, read back in order by its workers when the job runs), inserted in the transaction that moves the
    offset. That transaction first locks the upload's row (and its job's): two workers given PATCHes of one
    upload at once append one after the other, and the second sees the first's offset (409)."""

    growing_file = False  # no file grows anywhere: the job is transcribed once the upload is complete

    def __init__(self, store, chunk_bytes: int):
        self.store, self.chunk_bytes = store, chunk_bytes

    def create(self, job_id: str) -> None:
        pass  # the rows come with the data

    def discard(self, job_id: str) -> None:
        pass  # nothing was written outside the rolled-back transaction

    def append(self, upload_id: str, job_id: str, offset: int, length: int | None, chunks: Iterable[bytes],
               check: Callable) -> int:
        """Insert chunks at offset and commit them with the new offset; returns it. check(row) is asked again
        under the row lock (row: received, state and the job's status) and raises if another worker moved on."""
        with self.store.transaction() as db:
            row = db.execute("SELECT u.received, u.state, j.status FROM live_uploads u JOIN jobs j ON j.id = u.job_id "
                             "WHERE u.id = ? FOR UPDATE", (upload_id,)).fetchone()
            check(row)
            seq = db.execute("SELECT COALESCE(MAX(seq) + 1, 0) AS n FROM job_audio WHERE job_id = ?",
                             (job_id,)).fetchone()["n"]
            pending, received = bytearray(), offset
            for chunk in chunks:  # at most one chunk in memory, whatever the PATCH's size
                pending += chunk
                received += len(chunk)
                while len(pending) >= self.chunk_bytes:
                    self._insert(db, job_id, seq, pending[:self.chunk_bytes])
                    del pending[:self.chunk_bytes]
                    seq += 1
            if pending:
                self._insert(db, job_id, seq, pending)
            _record(db, upload_id, job_id, received, length)
        return received

    @staticmethod
    def _insert(db, job_id: str, seq: int, data: bytearray) -> None:
        db.execute("INSERT INTO job_audio (job_id, seq, data) VALUES (?, ?, ?)", (job_id, seq, bytes(data)))

    @contextlib.contextmanager
    def local(self, job_id: str):
        """What was received, copied to the spool for as long as it is probed."""
        with self.store.audio(job_id) as path:
            yield path


def storage_for(manager):
    """The storage that goes with the manager's job backend."""
    if manager.store.shared:
        from .postgres import CHUNK

        return DatabaseStorage(manager.store, CHUNK)
    return SpoolStorage(manager.store, manager.spool)
