"""Asynchronous jobs for long recordings: accepted once safely stored, run in the background, survive restarts.

Two backends behind one API (WHISPER_JOB_BACKEND):
- sqlite (default, one host): an embedded SQLite database (WAL, synchronous=FULL) and a spool directory under
  WHISPER_STATE_DIR; this process's threads run the jobs.
- postgresql (several workers): jobs, their audio and the queue in one PostgreSQL database that every worker
  reaches; Procrastinate dispatches the jobs (see jobs_pg.py).
A job's audio is deleted as soon as the job ends; results expire after WHISPER_JOB_RETENTION_S. A job
interrupted by a crash runs again (at most MAX_ATTEMPTS times), and only the attempt that started last can
record a result: the caller sees one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.datastructures import MultiDict

from . import grants, speakers
from .engines import Cancelled, Segment, TranscribeOptions, Transcription, Word
from .errors import ApiError
from .event_stream import StreamSlots, event_stream_response, job_events, last_event_id
from .formats import RESPONSE_FORMATS, render
from .job_events import EVENTS_SCHEMA, SEGMENT, JobEvents
from .live_storage import fsync_dir
from .webhooks import DeliveryError, WebhookPolicy

log = logging.getLogger("pilotys_whisper.jobs")

# receiving: a live upload (live.py) whose audio is still arriving
STATUSES = ("receiving", "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
MAX_ATTEMPTS = 3  # a job that keeps killing the process is failed rather than retried forever
PROGRESS_EVERY_S = 1.0
# A worker that claims a webhook delivery holds it this long (a delivery ends within WHISPER_WEBHOOK_TIMEOUT_S;
# the rest is room for recording the attempt); after that another worker may send it.
WEBHOOK_CLAIM_FACTOR = 2
WEBHOOK_CLAIM_MARGIN_S = 5
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


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class _Shutdown(Exception):
    """The service is stopping: the running job goes back to the queue."""


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
            from .jobs_pg import PostgresBackend

            self.store = PostgresBackend(self)
        else:
            self.store = SqliteBackend(self)
        self.events = JobEvents(self.store)  # live results: see job_events.py and event_stream.py
        self.stream_slots = StreamSlots(settings.max_event_streams)

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

    # -- the API ---------------------------------------------------------------------------------------------

    def blueprint(self) -> Blueprint:
        bp = Blueprint("jobs", __name__)
        bp.add_url_rule("/v1/jobs", view_func=self.submit, methods=["POST"])
        bp.add_url_rule("/v1/jobs", view_func=self.list_jobs, methods=["GET"])
        bp.add_url_rule("/v1/jobs/<job_id>", view_func=self.show, methods=["GET"])
        bp.add_url_rule("/v1/jobs/<job_id>", view_func=self.cancel, methods=["DELETE"])
        bp.add_url_rule("/v1/jobs/<job_id>/result", view_func=self.result, methods=["GET"])
        bp.add_url_rule("/v1/jobs/<job_id>/events", view_func=self.stream_events, methods=["GET"])
        bp.add_url_rule("/v1/uploads", view_func=self.grant_upload, methods=["POST"])
        return bp

    def grant_upload(self):
        """An upload grant (grants.py): a token a browser uses to create one job without the API key."""
        from .app import FormFields

        principal = self.state.authenticate()
        body = request.get_json(silent=True) if request.is_json else request.form.to_dict(flat=False)
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_body", "send the grant's options as a JSON object (or a form)")
        body = {k: (v[0] if isinstance(v, list) and len(v) == 1 and k != "timestamp_granularities[]" else v)
                for k, v in body.items()}
        fields = grants.requested_fields(body)
        FormFields.check(self.state, MultiDict(fields))
        if fields.get("callback_url"):
            self._check_callback(principal, str(fields["callback_url"]))
        idempotency_key = self._idempotency_key(body.get("idempotency_key"), param="idempotency_key")
        live = body.get("live") in (True, "true", "1")
        token, grant = grants.issue(self.state.keyring, principal, fields, idempotency_key=idempotency_key,
                                    ttl_s=grants.ttl(body), live=live)
        return jsonify(object="upload_grant", token=token, upload_url="/v1/live" if live else "/v1/jobs",
                       method="POST", live=live,
                       expires_at=_iso(grant.expires_at), idempotency_key=grant.idempotency_key), 201

    def submit(self):
        from .app import TranscriptionParams

        authorization = request.headers.get("Authorization")
        if grants.is_grant(authorization):
            # A browser with an upload grant: the options and the idempotency key are the grant's, not the form's.
            grant = grants.verify(self.state.keyring, authorization)
            if grant.live:
                raise grants.not_accepted("this upload grant is for a live upload (POST /v1/live)")
            g.principal = principal = grant.principal
            idempotency_key, fields = grant.idempotency_key, MultiDict(grant.fields)
        else:
            principal = self.state.authenticate()
            idempotency_key = self._idempotency_key(request.headers.get("Idempotency-Key"), param=None)
            fields = request.form
        if idempotency_key:
            existing = self._by_idempotency_key(principal.owner, idempotency_key)
            if existing is not None:
                return self._replayed(existing)
        callback_url = (fields.get("callback_url") or "").strip() or None
        if callback_url:
            self._check_callback(principal, callback_url)
        params = TranscriptionParams.parse(self.state, require_ready=False, fields=fields)
        self._check_free_space(params.size)
        job_id = "job_" + uuid.uuid4().hex
        options = {k: v for k, v in asdict(params.options).items() if k != "max_duration_s"}
        if params.speakers is not None:  # the known speakers' voice prints, not their clips
            options["speakers"] = params.speakers.as_json()
        try:
            with self.store.accept(job_id, params.path) as db:
                if idempotency_key:
                    # A concurrent retry with the same key may have won the race: answer with its job.
                    row = db.execute("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?",
                                     (principal.owner, idempotency_key)).fetchone()
                    if row is not None:
                        raise _Replay(row)
                db.execute(
                    "INSERT INTO jobs (id, owner, status, created_at, filename, size, duration, options, "
                    "response_format, callback_url, idempotency_key, webhook_status) "
                    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, principal.owner, time.time(), params.filename[:255], params.size,
                     params.options.duration_hint, json.dumps(options), params.response_format, callback_url,
                     idempotency_key, "pending" if callback_url else "none"))
                self.store.enqueue(db, job_id)
        except _Replay as replay:
            return self._replayed(replay.row)
        except DuplicateJob:
            # The other submission with this key committed while this one waited for it (PostgreSQL): its job.
            existing = self._by_idempotency_key(principal.owner, idempotency_key)
            if existing is None:
                raise
            return self._replayed(existing)
        g.audio_s = params.options.duration_hint
        log.info("job %s queued (%.0f s of audio)", job_id, params.options.duration_hint or 0)
        response = jsonify(self._view(self._get(job_id)))
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return response, 202

    def list_jobs(self):
        principal = self.state.authenticate()
        try:
            limit = min(max(int(request.args.get("limit", 20)), 1), 100)
        except ValueError as exc:
            raise ApiError(400, "invalid_limit", "limit must be a number from 1 to 100", param="limit") from exc
        status = request.args.get("status")
        if status is not None and status not in STATUSES:
            raise ApiError(400, "invalid_status", f"status must be one of {', '.join(STATUSES)}", param="status")
        sql, args = "SELECT * FROM jobs WHERE owner = ?", [principal.owner]
        if status:
            sql, args = sql + " AND status = ?", args + [status]
        rows = self.store.query(sql + " ORDER BY created_at DESC LIMIT ?", [*args, limit])
        return jsonify(object="list", data=[self._view(r) for r in rows])

    def show(self, job_id: str):
        return jsonify(self._view(self._owned(job_id), with_speakers=True))

    def stream_events(self, job_id: str):
        """Server-Sent Events: the job's final segments, its progress and its outcome (event_stream.py)."""
        self._owned(job_id)
        after = last_event_id(request.headers.get("Last-Event-ID") or request.args.get("last_event_id"))
        outcome = self.events.outcome_seq(job_id) if after else None
        if outcome is not None and after >= outcome:
            return Response(status=204)  # the client saw the outcome: 204 tells an EventSource not to reconnect
        gone = request.environ.get("waitress.client_disconnected", lambda: False)
        return event_stream_response(self.stream_slots.hold(job_events(self, job_id, after, gone)))

    def cancel(self, job_id: str):
        row = self._owned(job_id)
        if row["status"] in FINISHED:
            raise ApiError(409, "job_finished", f"the job is already {row['status']}")
        now = time.time()
        # A queued job (or a live one still receiving) is cancelled at once; a running one by its worker (on any
        # host) at its next chunk. A cancelled job sends no webhook (as in _finish): a 'pending' one would never be
        # sent nor purged.
        waiting = "status IN ('queued', 'receiving')"
        self.store.execute(f"UPDATE jobs SET status = CASE WHEN {waiting} THEN 'cancelled' ELSE status END, "  # noqa: S608
                           f"finished_at = CASE WHEN {waiting} THEN ? ELSE finished_at END, "
                           f"expires_at = CASE WHEN {waiting} THEN ? ELSE expires_at END, "
                           f"webhook_status = CASE WHEN {waiting} AND webhook_status = 'pending' "
                           "THEN 'skipped' ELSE webhook_status END, "
                           "cancel_requested = 1 WHERE id = ?", (now, now + self.settings.job_retention_s, job_id))
        row = self._get(job_id)
        if row["status"] == "cancelled":
            self.store.delete_audio(job_id)
            self._publish_outcome(job_id)
        return jsonify(self._view(row)), 200 if row["status"] in FINISHED else 202

    def result(self, job_id: str):
        row = self._owned(job_id)
        fmt = request.args.get("format", row["response_format"])
        if fmt not in RESPONSE_FORMATS:
            raise ApiError(400, "invalid_response_format",
                           f"format must be one of {', '.join(RESPONSE_FORMATS)}", param="format")
        if row["status"] != "succeeded":
            raise ApiError(409, "job_not_succeeded", f"the job is {row['status']}; its result is available once "
                           "it has succeeded", headers={"Retry-After": "5"} if row["status"] not in FINISHED else {})
        options = json.loads(row["options"])
        result = _load_result(row["result"])
        if fmt == "diarized_json" and "speakers" not in options:
            raise ApiError(400, "job_not_diarized", "the job was not diarized: submit it with diarize=true to get "
                           "diarized_json", param="format")
        granularities = ("segment", "word") if options.get("word_timestamps") else ("segment",)
        body, content_type = render(result, fmt, options.get("task", "transcribe"), granularities)
        if isinstance(body, dict):
            return jsonify(body)
        return Response(body, content_type=content_type)

    def update_metrics(self) -> None:
        rows = self.store.query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        counts = {r["status"]: r["n"] for r in rows}
        for status in STATUSES:
            self.state.metrics.jobs.labels(status=status).set(counts.get(status, 0))

    # -- helpers -----------------------------------------------------------------------------------------

    def _one(self, sql: str, args):
        rows = self.store.query(sql, args)
        return rows[0] if rows else None

    def _get(self, job_id: str):
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def _owned(self, job_id: str):
        principal = self.state.authenticate()
        row = self._one("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, principal.owner))
        if row is None:  # another key's job looks exactly like a missing one
            raise ApiError(404, "job_not_found", f"no job {job_id!r} for this API key")
        return row

    @staticmethod
    def _idempotency_key(raw, param: str | None) -> str | None:
        key = raw.strip() if isinstance(raw, str) else None
        if (raw is not None and not isinstance(raw, str)) or (key is not None and len(key) > 255):
            raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be a string of at most 255 characters",
                           param=param)
        return key or None

    def _check_callback(self, principal, callback_url: str) -> None:
        if not principal.webhook_secret:
            raise ApiError(400, "webhook_secret_missing",
                           "no webhook secret is configured for this API key: ask the operator to set one "
                           "(webhook_secret= in the keys file) or poll the job instead", param="callback_url")
        self.policy.check(callback_url)

    def _by_idempotency_key(self, owner: str, key: str):
        return self._one("SELECT * FROM jobs WHERE owner = ? AND idempotency_key = ?", (owner, key))

    def _replayed(self, row):
        response = jsonify(self._view(row))
        response.headers["Idempotent-Replayed"] = "true"
        return response, 200

    def _check_free_space(self, size: int) -> None:
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

    def _view(self, row, *, with_speakers: bool = False) -> dict:
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
            "created_at": _iso(row["created_at"]),
            "started_at": _iso(row["started_at"]),
            "finished_at": _iso(row["finished_at"]),
            "expires_at": _iso(row["expires_at"]),
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
            view["speakers"] = speakers.totals(_load_result(row["result"])) or []
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
            self._publish_outcome(row["id"], db=db)
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
                row = self._one("SELECT cancel_requested, attempts FROM jobs WHERE id = ?", (job_id,))
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
            return self._finish(job_id, attempt, "cancelled")
        except ApiError as exc:
            return self._finish(job_id, attempt, "failed", error=(exc.code, exc.message))
        except Exception as exc:  # noqa: BLE001 - the job fails, the worker lives on
            log.exception("job %s failed", job_id)
            return self._finish(job_id, attempt, "failed",
                                error=("internal_error", f"transcription failed: {type(exc).__name__}"))
        elapsed = time.monotonic() - started
        self.state.metrics.observe_transcription(result.duration, elapsed)
        status = self._finish(job_id, attempt, "succeeded", result=result)
        log.info("job %s %s: %.1f s of audio in %.1f s", job_id, status, result.duration, elapsed)
        return status

    def _finish(self, job_id: str, attempt: int, status: str, *, result: Transcription | None = None,
                error: tuple[str, str] | None = None) -> str:
        now = time.time()
        fields = dict(status=status, finished_at=now, expires_at=now + self.settings.job_retention_s,
                      webhook_next_at=now)
        if result is not None:
            fields.update(result=_dump_result(result), progress=1.0, duration=result.duration)
        if error is not None:
            fields.update(error_code=error[0], error_message=error[1])
        row = self._get(job_id)
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
            return (self._get(job_id) or {"status": status})["status"]
        self.store.delete_audio(job_id)  # audio leaves the disk as soon as the job ends
        self.wake.set()
        self._publish_outcome(job_id, result)
        return status

    # -- live results (job_events.py) ------------------------------------------------------------------------

    def publish_segments(self, job_id: str, segments: list[Segment]) -> None:
        """Publish final segments, in order, numbered as in the result: each number is stored once."""
        for seg in segments:
            self.events.publish(job_id, SEGMENT, seg.as_dict(), key=f"{SEGMENT}:{seg.id}")

    def _publish_outcome(self, job_id: str, result: Transcription | None = None, db=None) -> None:
        """The job's outcome event (job.succeeded, job.failed, job.cancelled), after the segments of its result
        not published yet. Best effort: without it, a stream reads the outcome from the row."""
        try:
            if result is not None:
                self.publish_segments(job_id, result.segments)
            row = (db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone() if db is not None
                   else self._get(job_id))
            if row is not None and row["status"] in FINISHED:
                self.events.publish(job_id, f"job.{row['status']}", self._view(row), db=db)
        except Exception:  # noqa: BLE001 - the job's outcome is recorded already; the stream falls back to it
            log.exception("job %s: its outcome event could not be stored", job_id)

    def job_row(self, job_id: str):
        return self._get(job_id)

    def view(self, row) -> dict:
        return self._view(row)

    # -- webhooks and cleanup --------------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        last_purge = 0.0
        while not self.stopping.is_set():
            # Each step on its own: one that fails (a database blip) does not skip the others for the round.
            for step in (self.store.housekeeping, self._deliver_due):
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

    def _deliver_due(self) -> None:
        due = self.store.query(
            "SELECT * FROM jobs WHERE webhook_status = 'pending' AND status IN ('succeeded', 'failed') "
            "AND webhook_next_at <= ? ORDER BY webhook_next_at LIMIT 10", (time.time(),))
        for row in due:
            # Claim the delivery (workers share the table): whoever moves webhook_next_at first sends it. The
            # claim lasts from now, not from the start of the batch: the deliveries before this one took time,
            # and a claim already expired would let another worker send it too.
            claim_until = time.time() + WEBHOOK_CLAIM_FACTOR * self.settings.webhook_timeout_s + WEBHOOK_CLAIM_MARGIN_S
            if self.store.execute("UPDATE jobs SET webhook_next_at = ? WHERE id = ? AND webhook_next_at = ?",
                                  (claim_until, row["id"], row["webhook_next_at"])):
                self._deliver(row)

    def _deliver(self, row) -> None:
        principal = self.state.keyring.principal_for(row["owner"])
        attempts = json.loads(row["webhook_attempts"])
        record: dict = {"at": _iso(time.time())}
        delivered = unreadable = False
        event = None
        if principal is None or not principal.webhook_secret:
            record["error"] = "the API key or its webhook secret was removed"
        else:
            event_type = f"job.{row['status']}"
            try:
                # The same event on every attempt and from every worker (as Stripe's webhooks): receivers
                # deduplicate on its id.
                event = {"id": event_id(row["id"], event_type), "type": event_type,
                         "created_at": _iso(row["finished_at"]), "data": self._view(row, with_speakers=True)}
            except (ValueError, TypeError, KeyError):  # a stored result another version wrote, or damaged
                log.exception("job %s: its event could not be built", row["id"])
                record["error"] = "the job's stored result could not be read to build its event"
                unreadable = True
        if event is not None:
            body = json.dumps(event).encode()
            try:
                status = self.policy.deliver(row["callback_url"], principal.webhook_secret, body, event["id"])
                record["status_code"] = status
                delivered = 200 <= status < 300
            except DeliveryError as exc:
                record["error"] = str(exc)
        attempts.append(record)
        if delivered:
            status, next_at = "delivered", None
        elif len(attempts) >= self.settings.webhook_max_attempts or principal is None or unreadable:
            status, next_at = "failed", None
        else:
            delay = self.settings.webhook_backoff_s * 2 ** (len(attempts) - 1)
            status, next_at = "pending", time.time() + min(delay, 3600)
        self.store.execute("UPDATE jobs SET webhook_attempts = ?, webhook_status = ?, webhook_next_at = ? "
                           "WHERE id = ?", (json.dumps(attempts), status, next_at, row["id"]))
        log.info("job %s webhook attempt %d: %s", row["id"], len(attempts),
                 record.get("status_code", record.get("error")))

    def purge(self) -> int:
        """Delete expired jobs, their results, and audio no job owns any more."""
        with self.store.transaction() as db:
            # A webhook still to send keeps its job; only succeeded and failed jobs send one (_deliver_due), so
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


def event_id(job_id: str, event_type: str) -> str:
    """The id of a job's event: derived from the job, so it is the same on every attempt and every worker."""
    return "evt_" + hashlib.sha256(f"{job_id}/{event_type}".encode()).hexdigest()[:32]


class DuplicateJob(Exception):
    """The backend refused the job: another one with the same owner and idempotency key committed first."""


class _Replay(Exception):
    """An Idempotency-Key already names a job: roll back and answer with it."""

    def __init__(self, row):
        super().__init__(row["id"])
        self.row = row


def _dump_result(result: Transcription) -> str:
    stored = asdict(result)
    stored.pop("speech")  # the VAD's regions serve the diarization, which has run by now
    return json.dumps(stored)


def _load_result(data: str) -> Transcription:
    raw = json.loads(data)
    segments = []
    for seg in raw.pop("segments"):
        words = seg.pop("words", None)
        segments.append(Segment(**seg, words=None if words is None else [Word(**w) for w in words]))
    return Transcription(segments=segments, **raw)
