"""Asynchronous jobs for long recordings: accepted once safely stored, run in the background, survive restarts.

Two backends behind one API (WHISPER_JOB_BACKEND):
- sqlite (default, one host): an embedded SQLite database (WAL, synchronous=FULL) and a spool directory under
  WHISPER_STATE_DIR; this process's threads run the jobs (sqlite.py).
- postgresql (several workers): jobs, their audio and the queue in one PostgreSQL database that every worker
  reaches; Procrastinate dispatches the jobs (postgres.py).
A job's audio is deleted as soon as the job ends; results expire after WHISPER_JOB_RETENTION_S. A job
interrupted by a crash runs again (at most MAX_ATTEMPTS times), and only the attempt that started last can
record a result: the caller sees one. The HTTP routes (routes/jobs.py) call this; it knows nothing of HTTP.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from .. import speakers
from ..engines import Cancelled, Segment, TranscribeOptions, Transcription
from ..errors import ApiError
from .deliveries import Deliveries
from .events import SEGMENT, JobEvents
from .live_storage import fsync_dir
from .schema import FINISHED, MAX_ATTEMPTS, STATUSES, DuplicateJob, dump_result, iso, load_result
from .sqlite import SqliteBackend
from .webhooks import WebhookPolicy

log = logging.getLogger("pilotys_whisper.jobs")

PROGRESS_EVERY_S = 1.0


class _Shutdown(Exception):
    """The service is stopping: the running job goes back to the queue."""


class _Replay(Exception):
    """An idempotency key already names a job: roll back and answer with it."""

    def __init__(self, row):
        super().__init__(row["id"])
        self.row = row


class JobManager:
    def __init__(self, state):
        self.state = state
        settings = state.settings
        self.settings = settings
        self.root = Path(settings.state_dir)
        self.spool = self.root / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.policy = WebhookPolicy(settings.webhook_allow_private, settings.webhook_ca_file,
                                    settings.webhook_timeout_s)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        if settings.job_backend == "postgresql":
            from .postgres import PostgresBackend

            self.store = PostgresBackend(self)
        else:
            self.store = SqliteBackend(self)
        self.events = JobEvents(self.store)  # live results: see events.py and routes/event_stream.py
        self.deliveries = Deliveries(self)

    # -- life cycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Requeue what a crash interrupted (one host only), then start the workers and the housekeeping loop."""
        if not self.store.shared:
            requeued = self.store.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'")
            if requeued:
                log.warning("%d interrupted job(s) queued again", requeued)
        self.adopt_key_owned_jobs()
        self.store.start()
        self.spawn(self._housekeeping, "job-housekeeping")

    def spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def request_stop(self) -> None:
        """Stop taking jobs; a running one stops at its next chunk and goes back to the queue."""
        self.stopping.set()
        self.wake.set()

    def stop(self, timeout: float = 25.0) -> list[str]:
        """request_stop(), then wait for the workers (up to timeout) and close the store; the names of the
        threads still running (inside the model, the VAD or FFmpeg: see server.run)."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.store.close()
        return [thread.name for thread in self._threads if thread.is_alive()]

    # -- what the routes ask -------------------------------------------------------------------------------

    def accept(self, owner: str, *, upload_path: str, size: int, options: TranscribeOptions,
               speaker_options: speakers.SpeakerOptions | None, filename: str, response_format: str,
               callback_url: str | None, idempotency_key: str | None):
        """Store the upload in the spool and queue its job, in one step; (the job's row, replayed): replayed when
        the idempotency key named a job by then (that job's row, nothing stored)."""
        self.check_free_space(size)
        job_id = "job_" + uuid.uuid4().hex
        stored = {k: v for k, v in asdict(options).items() if k != "max_duration_s"}
        if speaker_options is not None:  # the known speakers' voice prints, not their clips
            stored["speakers"] = speaker_options.as_json()
        try:
            with self.store.accept(job_id, upload_path) as db:
                if idempotency_key:
                    # A concurrent retry with the same key may have won the race: answer with its job.
                    row = db.execute("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                     (owner, idempotency_key)).fetchone()
                    if row is not None:
                        raise _Replay(row)
                db.execute(
                    "INSERT INTO jobs (id, owner, status, created_at, filename, size, duration, options, "
                    "response_format, callback_url, idempotency_key, webhook_status) "
                    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, owner, time.time(), filename[:255], size, options.duration_hint, json.dumps(stored),
                     response_format, callback_url, idempotency_key, "pending" if callback_url else "none"))
                self.store.enqueue(db, job_id)
        except _Replay as replay:
            return replay.row, True
        except DuplicateJob:
            # The other submission with this key committed while this one waited for it (PostgreSQL): its job.
            existing = self.by_idempotency_key(owner, idempotency_key)
            if existing is None:
                raise
            return existing, True
        log.info("job %s queued (%.0f s of audio)", job_id, options.duration_hint or 0)
        return self.get(job_id), False

    def listed(self, owner: str, status: str | None, limit: int) -> list:
        """The owner's newest jobs, at most limit, of one status if given."""
        sql, args = "SELECT * FROM jobs WHERE owner = ?", [owner]
        if status:
            sql, args = sql + " AND status = ?", args + [status]
        return self.store.query(sql + " ORDER BY created_at DESC LIMIT ?", [*args, limit])

    def owned(self, owner: str, job_id: str):
        row = self.one("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner))
        if row is None:  # another key's job looks exactly like a missing one
            raise ApiError(404, "job_not_found", f"no job {job_id!r} for this API key")
        return row

    def cancel(self, row):
        """Cancel the job: a queued one (or a live one still receiving) at once, a running one by its worker (on
        any host) at its next chunk. Its row afterwards."""
        if row["status"] in FINISHED:
            raise ApiError(409, "job_finished", f"the job is already {row['status']}")
        job_id = row["id"]
        now = time.time()
        # A cancelled job sends no webhook (as in finish): a 'pending' one would never be sent nor purged.
        waiting = "status IN ('queued', 'receiving')"
        self.store.execute(f"UPDATE jobs SET status = CASE WHEN {waiting} THEN 'cancelled' ELSE status END, "  # noqa: S608
                           f"finished_at = CASE WHEN {waiting} THEN ? ELSE finished_at END, "
                           f"expires_at = CASE WHEN {waiting} THEN ? ELSE expires_at END, "
                           f"webhook_status = CASE WHEN {waiting} AND webhook_status = 'pending' "
                           "THEN 'skipped' ELSE webhook_status END, "
                           "cancel_requested = 1 WHERE id = ?", (now, now + self.settings.job_retention_s, job_id))
        row = self.get(job_id)
        if row["status"] == "cancelled":
            self.store.delete_audio(job_id)
            self.publish_outcome(job_id)
        return row

    def check_callback(self, principal, callback_url: str) -> None:
        if not principal.webhook_secret:
            raise ApiError(400, "webhook_secret_missing",
                           "no webhook secret is configured for this API key: ask the operator to set one "
                           "(webhook_secret= in the keys file) or poll the job instead", param="callback_url")
        self.policy.check(callback_url)

    def by_idempotency_key(self, owner: str, key: str):
        return self.one("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key))

    def update_metrics(self) -> None:
        rows = self.store.query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        counts = {r["status"]: r["n"] for r in rows}
        for status in STATUSES:
            self.state.metrics.jobs.labels(status=status).set(counts.get(status, 0))

    # -- helpers -----------------------------------------------------------------------------------------

    def one(self, sql: str, args):
        rows = self.store.query(sql, args)
        return rows[0] if rows else None

    def get(self, job_id: str):
        return self.one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def check_free_space(self, size: int) -> None:
        """The audio passes through this host's spool (both backends): refuse what would fill its disk."""
        free = shutil.disk_usage(self.spool).free
        if free - size < self.settings.spool_min_free_mb * 1024 * 1024:
            raise ApiError(507, "insufficient_storage",
                           f"not enough disk space to accept this job ({free // (1024 * 1024)} MB free); "
                           "retry later or ask the operator to free space", headers={"Retry-After": "60"})

    def spool_copy(self, upload_path: str, target: Path) -> Path:
        """Copy an upload into the spool and fsync it (file and directory)."""
        partial = target.with_suffix(".part")
        try:
            with open(upload_path, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(partial, target)
            fsync_dir(self.spool)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ApiError(507, "insufficient_storage", "the disk is full: the job was not accepted",
                               headers={"Retry-After": "60"}) from exc
            raise
        return target

    def view(self, row, *, with_speakers: bool = False) -> dict:
        """The job as the API shows it; with_speakers adds a diarized job's speakers and their talk time (it
        reads the result: for one job and its webhook, not for lists)."""
        job_id = row["id"]
        error = {"code": row["error_code"], "message": row["error_message"]} if row["error_code"] else None
        webhook = None
        if row["callback_url"]:
            webhook = {"url": row["callback_url"], "status": row["webhook_status"],
                       "attempts": json.loads(row["webhook_attempts"])}
        view = {
            "id": job_id,
            "object": "transcription.job",
            "status": row["status"],
            "progress": round(row["progress"], 4),
            "created_at": iso(row["created_at"]),
            "started_at": iso(row["started_at"]),
            "finished_at": iso(row["finished_at"]),
            "expires_at": iso(row["expires_at"]),
            "filename": row["filename"],
            "duration": row["duration"],
            "attempts": row["attempts"],
            "error": error,
            "webhook": webhook,
            "links": {"self": f"/v1/jobs/{job_id}", "result": f"/v1/jobs/{job_id}/result",
                      "cancel": f"/v1/jobs/{job_id}"},
        }
        if with_speakers and row["status"] == "succeeded" and row["result"] and \
                "speakers" in json.loads(row["options"]):
            view["speakers"] = speakers.totals(load_result(row["result"])) or []
        return view

    # -- running a job (called by the backend's workers) --------------------------------------------------

    def begin(self, db, row):
        """In the caller's transaction: mark the job running for one more attempt; None if there is nothing to run."""
        if row["status"] in FINISHED:
            return None
        now = time.time()
        if row["attempts"] >= MAX_ATTEMPTS:
            db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, expires_at = ?, error_code = ?, "
                       "error_message = ?, webhook_next_at = ? WHERE id = ?",
                       (now, now + self.settings.job_retention_s, "interrupted",
                        f"the job was interrupted {MAX_ATTEMPTS} times (the service stopped while running it)",
                        now, row["id"]))
            self.store.delete_audio(row["id"])
            self.wake.set()  # look at the next one
            self.publish_outcome(row["id"], db=db)
            return None
        db.execute("UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1, progress = 0 "
                   "WHERE id = ?", (now, row["id"]))
        return db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()

    def run(self, row) -> str:
        """Transcribe a job begun by begin(); returns its new status ('queued' when the service is stopping)."""
        job_id, attempt = row["id"], row["attempts"]
        stored = json.loads(row["options"])
        speaker_options = stored.pop("speakers", None)
        options = TranscribeOptions(**stored, max_duration_s=self.settings.max_duration_s)
        last = {"at": 0.0, "progress": 0.0, "checked": time.monotonic()}

        def progress(done: float, total: float) -> None:
            total = total or row["duration"] or 0
            if not total:
                return
            value = min(done / total, 1.0)
            now = time.monotonic()
            if value > last["progress"] and (now - last["at"] >= PROGRESS_EVERY_S or value >= 1.0):
                last.update(at=now, progress=value)
                with contextlib.suppress(ApiError):  # progress is best effort: a database blip does not fail the job
                    self.store.execute("UPDATE jobs SET progress = ? WHERE id = ? AND attempts = ?",
                                       (value, job_id, attempt))

        def should_stop() -> bool:
            if self.stopping.is_set():
                raise _Shutdown()
            now = time.monotonic()
            if now - last["checked"] < PROGRESS_EVERY_S:
                return False
            last["checked"] = now  # a cancel may have reached another host: ask the database, once a second
            try:
                row = self.one("SELECT cancel_requested, attempts FROM jobs WHERE id = ?", (job_id,))
            except ApiError:  # the database is unreachable for a moment: carry on, ask again later
                return False
            return row is None or bool(row["cancel_requested"]) or row["attempts"] != attempt

        final: list[Segment] = []  # handed by the engine, not yet published: published in order

        def on_segments(segments: list[Segment]) -> None:
            final.extend(segments)
            try:
                while final:
                    self.publish_segments(job_id, final[:1])
                    final.pop(0)
            except Exception:  # noqa: BLE001 - live results are best effort; the rest goes out with the outcome
                log.warning("job %s: live segments not stored for now", job_id, exc_info=True)

        started = time.monotonic()
        log.info("job %s running (attempt %d)", job_id, attempt)
        try:
            with self.state.admission.slot(bounded_queue=False), self.store.audio(job_id) as path:
                # A diarized job's segments are split and renumbered once its speakers are known: its stream
                # gets them from the result, at the end, with their speakers.
                live = on_segments if speaker_options is None else None
                if speaker_options is not None and self.state.diarizer is None:  # turned off since it was accepted
                    raise speakers.unavailable()
                chosen = None if speaker_options is None else speakers.SpeakerOptions.from_json(speaker_options)
                result = speakers.transcribe(self.state.engine, self.state.diarizer, path, options, chosen,
                                             progress=progress, should_stop=should_stop, on_segments=live)
        except _Shutdown:
            self.store.execute("UPDATE jobs SET status = 'queued' WHERE id = ? AND attempts = ?", (job_id, attempt))
            log.info("job %s back in the queue: the service is stopping", job_id)
            return "queued"
        except Cancelled:
            return self.finish(job_id, attempt, "cancelled")
        except ApiError as exc:
            return self.finish(job_id, attempt, "failed", error=(exc.code, exc.message))
        except Exception as exc:  # noqa: BLE001 - the job fails, the worker lives on
            log.exception("job %s failed", job_id)
            return self.finish(job_id, attempt, "failed",
                                error=("internal_error", f"transcription failed: {type(exc).__name__}"))
        elapsed = time.monotonic() - started
        self.state.metrics.observe_transcription(result.duration, elapsed)
        status = self.finish(job_id, attempt, "succeeded", result=result)
        log.info("job %s %s: %.1f s of audio in %.1f s", job_id, status, result.duration, elapsed)
        return status

    def finish(self, job_id: str, attempt: int, status: str, *, result: Transcription | None = None,
                error: tuple[str, str] | None = None) -> str:
        now = time.time()
        fields = dict(status=status, finished_at=now, expires_at=now + self.settings.job_retention_s,
                      webhook_next_at=now)
        if result is not None:
            fields.update(result=dump_result(result), progress=1.0, duration=result.duration)
        if error is not None:
            fields.update(error_code=error[0], error_message=error[1])
        row = self.get(job_id)
        if row is None:
            return status
        if status == "cancelled" or row["callback_url"] is None:
            fields["webhook_status"] = "none" if row["callback_url"] is None else "skipped"
        names = ", ".join(f"{name} = ?" for name in fields)
        # Only the attempt that started last records its outcome: a worker that was given up for dead and
        # comes back cannot overwrite the result of the one that took its job over.
        done = self.store.execute(f"UPDATE jobs SET {names} WHERE id = ? AND attempts = ? AND status = 'running'",  # noqa: S608
                                  [*fields.values(), job_id, attempt])
        if not done:
            log.warning("job %s attempt %d: the job was taken over or cancelled meanwhile, outcome dropped",
                        job_id, attempt)
            return (self.get(job_id) or {"status": status})["status"]
        self.store.delete_audio(job_id)  # audio leaves the disk as soon as the job ends
        self.wake.set()
        self.publish_outcome(job_id, result)
        return status

    # -- live results (events.py) ------------------------------------------------------------------------

    def publish_segments(self, job_id: str, segments: list[Segment]) -> None:
        """Publish final segments, in order, numbered as in the result: each number is stored once."""
        for seg in segments:
            self.events.publish(job_id, SEGMENT, seg.as_dict(), key=f"{SEGMENT}:{seg.id}")

    def publish_outcome(self, job_id: str, result: Transcription | None = None, db=None) -> None:
        """The job's outcome event (job.succeeded, job.failed, job.cancelled), after the segments of its result
        not published yet. Best effort: without it, a stream reads the outcome from the row."""
        try:
            if result is not None:
                self.publish_segments(job_id, result.segments)
            row = (db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone() if db is not None
                   else self.get(job_id))
            if row is not None and row["status"] in FINISHED:
                self.events.publish(job_id, f"job.{row['status']}", self.view(row), db=db)
        except Exception:  # noqa: BLE001 - the job's outcome is recorded already; the stream falls back to it
            log.exception("job %s: its outcome event could not be stored", job_id)

    # -- webhooks and cleanup --------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        last_purge = 0.0
        while not self.stopping.is_set():
            # Each step on its own: one that fails (a database blip) does not skip the others for the round.
            for step in (self.store.housekeeping, self.deliveries.due):
                try:
                    step()
                except Exception:  # noqa: BLE001 - keep the loop alive; the next round retries
                    log.exception("job housekeeping failed")
            if time.monotonic() - last_purge >= self.settings.job_purge_interval_s:
                try:
                    self.adopt_key_owned_jobs()  # rows a worker of the previous version wrote meanwhile
                    self.purge()
                except Exception:  # noqa: BLE001 - as above
                    log.exception("job purge failed")
                last_purge = time.monotonic()
            self.stopping.wait(0.5)

    def purge(self) -> int:
        """Delete expired jobs, their results, and audio no job owns any more."""
        with self.store.transaction() as db:
            # A webhook still to send keeps its job; only succeeded and failed jobs send one (deliveries.py), so
            # a cancelled job left 'pending' by an earlier version goes too.
            expired = [r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? AND "
                "(webhook_status != 'pending' OR status NOT IN ('succeeded', 'failed'))", (time.time(),)).fetchall()]
            for job_id in expired:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                JobEvents.delete(db, job_id)
            live = {r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE status IN ('receiving', 'queued', 'running')")}
        for path in self.spool.iterdir():
            job_id = path.name.split(".", 1)[0]
            if job_id not in live and time.time() - path.stat().st_mtime > 60:
                path.unlink(missing_ok=True)
        if expired:
            log.info("purged %d expired job(s)", len(expired))
        return len(expired)

    def adopt_key_owned_jobs(self) -> int:
        """Give the jobs that earlier versions stored under a key's id to the key's client (its label), so that
        they survive the key's rotation. Runs at start and with each purge: in a cluster upgraded one worker at a
        time, the workers not yet upgraded still write such rows."""
        pairs = dict(self.state.keyring.adoptions())
        if not pairs:
            return 0
        marks = ", ".join("?" * len(pairs))
        found = [r["owner"] for r in self.store.query(
            f"SELECT DISTINCT owner FROM jobs WHERE owner IN ({marks})", list(pairs))]  # noqa: S608 - only ?s
        moved = 0
        for key_owner in found:
            owner = pairs[key_owner]
            with self.store.transaction() as db:
                moved += db.execute(
                    "UPDATE jobs SET owner = ? WHERE owner = ? AND (idempotency_key IS NULL OR idempotency_key "
                    "NOT IN (SELECT idempotency_key FROM jobs WHERE owner = ? AND idempotency_key IS NOT NULL))",
                    (owner, key_owner, owner)).rowcount
                # Two keys of the client used the same idempotency key: the job the client has already seen
                # keeps it, this one stays readable without it.
                moved += db.execute("UPDATE jobs SET owner = ?, idempotency_key = NULL WHERE owner = ?",
                                    (owner, key_owner)).rowcount
        if moved:
            log.info("%d job(s) stored under a key's id now belong to its client", moved)
        return moved
