"""Live uploads: a meeting recorded as it goes, sent with the tus 1.0 resumable upload protocol at /v1/live
(the routes: routes/live.py; this module knows nothing of HTTP).

POST /v1/live creates an upload and its job at once (the job's options in Upload-Metadata); the browser then
appends each MediaRecorder timeslice with PATCH at the server's Upload-Offset, and declares the final
Upload-Length when recording stops (Upload-Defer-Length: 1 until then). The job waits in the status `receiving`
while the audio arrives, and is queued as soon as the declared length is reached.

Extensions: creation, creation-with-upload, creation-defer-length, termination, expiration, checksum (sha1).

Durable (live_storage.py): each PATCH's bytes and its new offset are committed together before the 204 that
acknowledges it; what an interrupted PATCH had written is dropped, so the client that resumes at the offset
HEAD answers sends it again, with no gap and no duplicate. SQLite backend: the job's audio file in the spool,
fsynced (the file, and its directory when created). PostgreSQL backend: rows of the jobs database, so that
any worker takes the next PATCH or HEAD and a worker lost mid-meeting loses nothing it acknowledged.
An upload idle longer than WHISPER_LIVE_IDLE_TIMEOUT_S is finalized (what was received is transcribed and the
job ends normally); DELETE cancels the job and deletes the audio.

Transcribed as it arrives (WHISPER_LIVE_INCREMENTAL, off by default): once the first data is known to be audio, a
thread runs the engine on the growing file (GrowingFile: it reads only acknowledged bytes and waits for more until
the upload is complete), so the engine's own pipeline (decode, VAD, chunks) transcribes each stretch as soon as VAD
closes it (TranscribeOptions.live) and only the tail remains when the upload ends; the log says how many seconds
of audio that tail held. That thread takes a transcription slot for each chunk the model decodes, not while it
waits for audio. If it fails, the job falls back to the ordinary worker on the whole file. SQLite backend only:
on PostgreSQL the complete upload is queued as any job (a worker takes it from the queue).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict

from .. import audio
from ..engines import Cancelled, TranscribeOptions
from ..errors import ApiError
from . import live_storage

log = logging.getLogger("pilotys_whisper.live")

# The data is checked as audio once this much has arrived (or the upload is complete): a browser's first blob
# holds the container's header; what FFmpeg cannot open by then fails the job at once, not at the end.
PROBE_BYTES = 64 * 1024
READ_BYTES = 1 << 20

SCHEMA = """
CREATE TABLE IF NOT EXISTS live_uploads (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    grant_key TEXT,
    state TEXT NOT NULL,
    length BIGINT,
    received BIGINT NOT NULL DEFAULT 0,
    probed INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS live_uploads_by_state ON live_uploads (state, updated_at);
"""
# receiving: PATCH appends; finished: the job has all it will get (length reached, idle, too large, bad data).


class _Stopping(Exception):
    """The service is stopping: the live transcription ends here and starts again from the file at start-up."""


class GrowingFile:
    """The upload's file as the engine reads it: acknowledged bytes only; at their end, wait for more until the
    upload is complete (then end of file). Not seekable, as a pipe: a streaming demuxer reads it in order."""

    def __init__(self, live: LiveUploads, upload_id: str, path):
        self.live, self.upload_id = live, upload_id
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(), after the engine is done
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        live = self.live
        while True:
            with live._cond:
                available, finished = live._progress[self.upload_id]
                if self._pos >= available and not finished:
                    if live.manager.stopping.is_set():
                        raise _Stopping()
                    if self.upload_id in live._cancelled:
                        raise Cancelled()
                    live._cond.wait(2.0)
                    available, finished = live._progress[self.upload_id]
            if self._pos < available:
                break
            if finished:
                return b""
            # A while without data: ask the job (a cancel through DELETE /v1/jobs reaches only the database).
            job = live.manager.one("SELECT status, cancel_requested FROM jobs WHERE id = "
                                    "(SELECT job_id FROM live_uploads WHERE id = ?)", (self.upload_id,))
            if job is None or job["cancel_requested"] or job["status"] != "receiving":
                raise Cancelled()
        want = available - self._pos if size is None or size < 0 else min(size, available - self._pos)
        self._file.seek(self._pos)
        data = self._file.read(want)
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._file.close()


class LiveUploads:
    def __init__(self, manager):
        self.manager = manager
        self.state = manager.state
        self.settings = manager.settings
        self.storage = live_storage.storage_for(manager)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Live transcription: per upload, (acknowledged bytes, complete?) for its GrowingFile; the uploads a thread
        # transcribes now; those whose job was cancelled meanwhile. All under _cond.
        self._cond = threading.Condition()
        self._progress: dict[str, tuple[int, bool]] = {}
        self._transcribing: set[str] = set()
        self._cancelled: set[str] = set()
        self.incremental = self.settings.live_incremental and self.storage.growing_file
        self.transcribed_s: dict[str, float] = {}  # seconds of audio transcribed so far, per live upload
        self._transcribed_at_end: dict[str, float] = {}  # ... when the upload became complete (the tail follows)
        self.manager.store.create_tables(SCHEMA)

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self.manager.spawn(self._housekeeping, "live-housekeeping")
        # Uploads whose live transcription the last stop (or crash) cut off start again from the file.
        if self.incremental:
            for row in self.manager.store.query(
                    "SELECT u.* FROM live_uploads u JOIN jobs j ON j.id = u.job_id "
                    "WHERE j.status = 'receiving' AND u.probed = 1"):
                self._start_transcribing(row)

    def _housekeeping(self) -> None:
        interval = min(5.0, max(self.settings.live_idle_timeout_s / 4, 0.2))
        while not self.manager.stopping.wait(interval):
            try:
                self.expire_idle()
            except Exception:  # noqa: BLE001 - keep the loop alive; the next round retries
                log.exception("live upload housekeeping failed")

    def expire_idle(self) -> int:
        """Finalize the uploads idle longer than the timeout: what they received is transcribed."""
        cutoff = time.time() - self.settings.live_idle_timeout_s
        rows = self.manager.store.query(
            "SELECT id FROM live_uploads WHERE state = 'receiving' AND updated_at <= ?", (cutoff,))
        for row in rows:
            with self._lock(row["id"]):
                upload = self.row(row["id"])
                if upload is not None and upload["state"] == "receiving" and upload["updated_at"] <= cutoff:
                    log.info("live upload %s idle for %d s: finalized with %d bytes", upload["id"],
                             self.settings.live_idle_timeout_s, upload["received"])
                    self._finalize(upload, idle_before=cutoff)
        # Uploads whose job is gone (purged after its retention) go too.
        self.manager.store.execute("DELETE FROM live_uploads WHERE job_id NOT IN (SELECT id FROM jobs)")
        return len(rows)

    # -- what the routes ask (routes/live.py) --------------------------------------------------------------

    def create(self, owner: str, *, options: TranscribeOptions, response_format: str, filename: str,
               length: int | None, callback_url: str | None, idempotency_key: str | None,
               grant_key: str | None = None):
        """A new upload and its job, waiting for audio; (the upload's row, replayed): replayed when the
        idempotency key named a live upload by then (that one, nothing created). The route looks the key up
        before checking the fields; this catches a creation with the same key that committed meanwhile."""
        manager = self.manager
        manager.check_free_space(length or 0)
        stored = {k: v for k, v in asdict(options).items() if k != "max_duration_s"}
        job_id = "job_" + uuid.uuid4().hex
        upload_id = "up_" + uuid.uuid4().hex
        self.storage.create(job_id)
        now = time.time()
        try:
            with manager.store.transaction() as db:
                if idempotency_key and db.execute("SELECT 1 FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                                  (owner, idempotency_key)).fetchone():
                    raise _Replay()
                db.execute(
                    "INSERT INTO jobs (id, owner, status, created_at, filename, size, options, response_format, "
                    "callback_url, idempotency_key, webhook_status) VALUES (?, ?, 'receiving', ?, ?, 0, ?, ?, ?, ?, ?)",
                    (job_id, owner, now, (filename or "live")[:255], json.dumps(stored), response_format,
                     callback_url, idempotency_key, "pending" if callback_url else "none"))
                db.execute("INSERT INTO live_uploads (id, job_id, owner, grant_key, state, length, created_at, "
                           "updated_at) VALUES (?, ?, ?, ?, 'receiving', ?, ?, ?)",
                           (upload_id, job_id, owner, grant_key, length, now, now))
        except _Replay:
            self.storage.discard(job_id)
            return self.upload_of_job(manager.by_idempotency_key(owner, idempotency_key)), True
        except Exception:
            self.storage.discard(job_id)
            existing = None
            if idempotency_key:  # PostgreSQL: a creation with this key committed while this one waited for it
                with contextlib.suppress(ApiError):
                    existing = manager.by_idempotency_key(owner, idempotency_key)
            if existing is None:
                raise
            return self.upload_of_job(existing), True
        except BaseException:
            self.storage.discard(job_id)
            raise
        log.info("live upload %s created for job %s (%s)", upload_id, job_id,
                 f"{length} bytes" if length is not None else "length deferred")
        upload = self.row(upload_id)
        if length == 0:  # complete at creation, with nothing in it
            self._finalize(upload)
            upload = self.row(upload_id)
        return upload, False

    def append(self, upload_id: str, offset: int, body: Callable[[int], bytes], *, content_length: int | None,
               declared_length: int | None = None, checksum=None):
        """Append what body(n) reads (up to its end) at offset, durably; the upload's row afterwards.
        declared_length: Upload-Length, when this request declares it; checksum: (hash factory, digest)."""
        with self._lock(upload_id):
            return self._append(self.row(upload_id), offset, body, content_length, declared_length, checksum)

    def terminate(self, upload) -> None:
        """tus termination: the job is cancelled (a running one at its next chunk) and the audio deleted."""
        upload_id = upload["id"]
        with self._lock(upload_id):
            now = time.time()
            with self.manager.store.transaction() as db:
                db.execute(
                    "UPDATE jobs SET status = CASE WHEN status IN ('queued', 'receiving') THEN 'cancelled' "
                    "ELSE status END, finished_at = CASE WHEN status IN ('queued', 'receiving') THEN ? "
                    "ELSE finished_at END, expires_at = CASE WHEN status IN ('queued', 'receiving') THEN ? "
                    "ELSE expires_at END, webhook_status = CASE WHEN webhook_status = 'pending' AND status IN "
                    "('queued', 'receiving', 'running') THEN 'skipped' ELSE webhook_status END, "
                    "cancel_requested = 1 WHERE id = ?",
                    (now, now + self.settings.job_retention_s, upload["job_id"]))
                db.execute("DELETE FROM live_uploads WHERE id = ?", (upload_id,))
            with self._cond:
                if upload_id in self._transcribing:
                    self._cancelled.add(upload_id)
                    self._cond.notify_all()
            job = self.manager.get(upload["job_id"])
            if job is not None and job["status"] == "cancelled":
                self.manager.store.delete_audio(upload["job_id"])
        log.info("live upload %s terminated (job %s)", upload_id, upload["job_id"])

    def row(self, upload_id: str):
        rows = self.manager.store.query("SELECT * FROM live_uploads WHERE id = ?", (upload_id,))
        return rows[0] if rows else None

    def upload_of_job(self, job):
        """The live upload a job was created with (an idempotency key's replay)."""
        rows = self.manager.store.query("SELECT * FROM live_uploads WHERE job_id = ?", (job["id"],))
        if not rows:
            raise ApiError(409, "idempotency_key_in_use", "this idempotency key names a job that is not a live upload")
        return rows[0]

    # -- the work -------------------------------------------------------------------------------------------

    def _append(self, upload, offset: int, read: Callable[[int], bytes], content_length: int | None,
                declared: int | None, checksum):
        """Append what read() gives at offset; returns the upload's row afterwards. Holds the upload's lock."""
        if upload is None:
            raise not_found()
        job = self.manager.get(upload["job_id"])
        _check_appendable(upload["received"], upload["state"], job["status"] if job else None, offset)
        length = upload["length"]
        if declared is not None:
            if length is not None and declared != length:
                raise ApiError(400, "upload_length_changed", f"the upload's length is already {length} bytes")
            if declared < upload["received"]:
                raise ApiError(400, "invalid_upload_length",
                               f"Upload-Length {declared} is less than the {upload['received']} bytes received")
            length = declared
        max_bytes = self.settings.max_upload_bytes
        limit = min(length, max_bytes) if length is not None else max_bytes
        room = limit - offset
        if content_length is not None and content_length > room:
            if length is not None and content_length > length - offset:
                raise ApiError(400, "exceeds_upload_length",
                               f"the data goes past the upload's length of {length} bytes")
            self._finalize(upload)
            raise too_large(max_bytes, upload["received"])
        if length is not None and length > max_bytes:
            self._finalize(upload)
            raise too_large(max_bytes, upload["received"])

        def body():
            """The request's body in pieces; raises (and the storage keeps none of it) past the room left or
            when it does not match Upload-Checksum."""
            written, digest = 0, checksum[0]() if checksum else None
            while chunk := read(READ_BYTES):
                written += len(chunk)
                if written > room:
                    raise _TooLarge()
                if digest is not None:
                    digest.update(chunk)
                yield chunk
            if digest is not None and digest.digest() != checksum[1]:
                raise ApiError(460, "checksum_mismatch", "the data does not match Upload-Checksum: it was dropped; "
                               f"send it again from offset {offset}")

        def check(row) -> None:  # asked again by a storage shared by several workers, under its row lock
            if row is None:
                raise not_found()
            _check_appendable(row["received"], row["state"], row["status"], offset)

        try:
            received = self.storage.append(upload["id"], upload["job_id"], offset, length, body(), check)
        except _TooLarge:
            self._finalize(upload)
            raise too_large(max_bytes, upload["received"]) from None
        except FileNotFoundError:  # the job ended meanwhile (its live transcription failed) and its audio went
            raise ApiError(403, "upload_finished", "this upload's job has ended: it takes no more data") from None
        upload = self.row(upload["id"])
        with self._cond:
            if upload["id"] in self._progress:
                self._progress[upload["id"]] = (received, False)
                self._cond.notify_all()
        complete = length is not None and received >= length
        if not upload["probed"] and (received >= PROBE_BYTES or (complete and received)):
            self._probe(upload)
            self._start_transcribing(self.row(upload["id"]))
        if complete:
            self._finalize(upload)
            upload = self.row(upload["id"])
        return upload

    def _probe(self, upload) -> None:
        """Open what arrived as audio: undecodable data fails the job now, at its first chunk."""
        try:
            with self.storage.local(upload["job_id"]) as path:
                audio.probe(path)
        except ApiError as exc:
            message = f"the live upload is not audio this service can decode: {exc.message}"
            self._fail(upload, "undecodable_audio", message)
            raise ApiError(422, "undecodable_audio", message) from exc
        self.manager.store.execute("UPDATE live_uploads SET probed = 1 WHERE id = ?", (upload["id"],))

    def _finalize(self, upload, idle_before: float | None = None) -> None:
        """The upload has all it will get: its live transcription ends with the tail, or (without one) its job is
        queued with what was received. idle_before: only if no PATCH came since (another worker's, meanwhile)."""
        if not upload["received"]:
            self._fail(upload, "no_audio", "the live upload ended before any audio was received")
            return
        with self._cond:
            live = upload["id"] in self._transcribing
            sql = "UPDATE live_uploads SET state = 'finished', updated_at = ? WHERE id = ? AND state = 'receiving'"
            args = [time.time(), upload["id"]]
            if idle_before is not None:
                sql, args = sql + " AND updated_at <= ?", [*args, idle_before]
            with self.manager.store.transaction() as db:
                if not db.execute(sql, args).rowcount:
                    return  # finalized already (by another worker), or it received data meanwhile
                if not live:
                    self._queue(upload["job_id"], db)
            if live:
                self._progress[upload["id"]] = (upload["received"], True)
                self._transcribed_at_end[upload["id"]] = self.transcribed_s.get(upload["id"], 0.0)
                self._cond.notify_all()
        log.info("live upload %s complete with %d bytes: job %s %s", upload["id"], upload["received"],
                 upload["job_id"], "transcribes its tail" if live else "queued")

    # -- live transcription ------------------------------------------------------------------------------

    def _start_transcribing(self, upload) -> None:
        if not self.incremental:
            return
        with self._cond:
            if upload["id"] in self._transcribing:
                return
            self._transcribing.add(upload["id"])
            self._progress[upload["id"]] = (upload["received"], upload["state"] != "receiving")
        self.manager.spawn(lambda: self._transcribe(upload["id"], upload["job_id"]), f"live-{upload['id'][3:11]}")

    def _transcribe(self, upload_id: str, job_id: str) -> None:
        """The engine on the growing file; at its end the job succeeds (or fails) as a worker's would."""
        manager = self.manager
        job = manager.get(job_id)
        options = TranscribeOptions(**{**json.loads(job["options"]), "live": True},
                                    max_duration_s=self.settings.max_duration_s)
        last = {"checked": time.monotonic()}

        def should_stop() -> bool:
            if manager.stopping.is_set():
                raise _Stopping()
            if time.monotonic() - last["checked"] >= 1.0:
                last["checked"] = time.monotonic()
                row = manager.one("SELECT status, cancel_requested FROM jobs WHERE id = ?", (job_id,))
                if row is None or row["cancel_requested"] or row["status"] != "receiving":
                    with self._cond:
                        self._cancelled.add(upload_id)
                    return True
            return False

        def progress(done: float, total: float) -> None:
            self.transcribed_s[upload_id] = done

        outcome, result, error, source = None, None, None, None
        log.info("live upload %s: transcribing as it arrives", upload_id)
        try:
            source = GrowingFile(self, upload_id, self._path(job_id))
            while not self.state.ready.wait(1.0):  # after a restart, the model may still be loading
                if manager.stopping.is_set():
                    raise _Stopping()
            # A slot only while the model works: waiting for the meeting's audio, it leaves the slot to others.
            result = self.state.engine.transcribe(
                source, options, progress, should_stop,
                on_segments=lambda segments: manager.publish_segments(job_id, segments),
                hold=lambda: self.state.admission.slot(bounded_queue=False))
            outcome = "succeeded"
        except (_Stopping, Cancelled):
            outcome = None  # stopping: again at start-up; cancelled: the job already says so
        except ApiError as exc:
            outcome, error = "failed", (exc.code, exc.message)
        except Exception:  # noqa: BLE001 - the ordinary worker takes the job over
            log.exception("live upload %s: live transcription failed; the whole file is transcribed at the end",
                          upload_id)
        finally:
            if source is not None:
                source.close()
        with self._cond:
            self._transcribing.discard(upload_id)
            self._cancelled.discard(upload_id)
            finished = self._progress.pop(upload_id, (0, False))[1]
            if outcome == "succeeded" and not finished:
                # The decoder stopped before the data did: what follows is not audio it can read.
                outcome, result = "failed", None
                error = ("undecodable_audio", f"the live upload could not be decoded past "
                         f"{self.transcribed_s.get(upload_id, 0.0):.0f} s of audio; what came after is not audio")
                manager.store.execute("UPDATE live_uploads SET state = 'finished' WHERE id = ?", (upload_id,))
        self.transcribed_s.pop(upload_id, None)
        transcribed_at_end = self._transcribed_at_end.pop(upload_id, None)
        if result is not None and transcribed_at_end is not None:
            # The work the end of the meeting still cost: audio the model had not reached when the upload ended
            # (logged before the job ends, so that whoever sees the result finds it).
            log.info("live upload %s: %.1f s of its %.1f s of audio transcribed after the upload ended", upload_id,
                     max(0.0, result.duration - transcribed_at_end), result.duration)
        if outcome is None:
            if finished and not manager.stopping.is_set():
                self._queue(job_id)  # the upload is complete: let the worker have it
            return
        now = time.time()
        with manager.store.transaction() as db:
            attempt = None
            if db.execute("UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1 "
                          "WHERE id = ? AND status = 'receiving'", (now, job_id)).rowcount:
                attempt = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()["attempts"]
        if attempt is None:
            return
        status = manager.finish(job_id, attempt, outcome, result=result, error=error)
        if result is not None:
            self.state.metrics.observe_transcription(result.duration, time.time() - now)
        log.info("live upload %s: job %s %s", upload_id, job_id, status)

    def _queue(self, job_id: str, db=None) -> None:
        """In db's transaction (or one of its own): the complete upload's job goes to the queue, as any job."""
        if db is None:
            with self.manager.store.transaction() as db:
                self._queue(job_id, db)
            return
        if db.execute("UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'receiving'", (job_id,)).rowcount:
            self.manager.store.enqueue(db, job_id)

    def _fail(self, upload, code: str, message: str) -> None:
        now = time.time()
        with self.manager.store.transaction() as db:
            db.execute("UPDATE live_uploads SET state = 'finished', updated_at = ? WHERE id = ?", (now, upload["id"]))
            failed = db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, expires_at = ?, error_code = ?, "
                                "error_message = ?, webhook_next_at = ? WHERE id = ? AND status = 'receiving'",
                                (now, now + self.settings.job_retention_s, code, message, now,
                                 upload["job_id"])).rowcount
        if not failed:  # ended already (another worker found the same idle upload): one outcome, one event
            return
        self.manager.store.delete_audio(upload["job_id"])
        self.manager.publish_outcome(upload["job_id"])  # the event stream ends with job.failed, as a job's does
        log.info("live upload %s: job %s failed (%s)", upload["id"], upload["job_id"], code)

    # -- helpers -------------------------------------------------------------------------------------------

    def _path(self, job_id: str):
        return self.storage.path(job_id)  # the live transcription's GrowingFile: the spool's storage only

    @contextlib.contextmanager
    def _lock(self, upload_id: str):
        with self._locks_guard:
            lock = self._locks.setdefault(upload_id, threading.Lock())
        with lock:
            yield


class _Replay(Exception):
    """A concurrent creation with the same idempotency key committed first."""


class _TooLarge(Exception):
    """A PATCH's body went past the room left: none of it is kept."""


def _check_appendable(received: int, state: str, job_status: str | None, offset: int) -> None:
    """A PATCH at offset may append to the upload (its offset, its state and its job's status as read)."""
    if job_status is None or job_status == "cancelled":
        raise ApiError(410, "upload_cancelled", "this upload's job was cancelled: its audio is deleted")
    if state != "receiving" or job_status != "receiving":
        raise ApiError(403, "upload_finished", f"this upload is complete ({received} bytes): its job is {job_status}")
    if offset != received:
        raise ApiError(409, "offset_mismatch", f"the upload is at offset {received}, not {offset}: "
                       "ask HEAD for the offset and resume from there")


def not_found() -> ApiError:
    return ApiError(404, "upload_not_found", "no such live upload for this API key (or it was terminated)")


def too_large(max_bytes: int, received: int) -> ApiError:
    return ApiError(413, "upload_too_large",
                    f"a live upload holds at most {max_bytes // (1024 * 1024)} MB: this data was refused, and the "
                    f"job goes on with the {received} bytes received before it")
