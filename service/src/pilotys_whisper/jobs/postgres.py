"""The jobs backend for several workers: one PostgreSQL database holds the jobs, their audio and the queue.

Why PostgreSQL and Procrastinate: the job row, its audio and its place in the queue are written in one
transaction (a job is either fully accepted or not at all), there is no second store to keep in step with the
first, PostgreSQL comes from Debian's packages with TLS and password authentication, and Procrastinate
(a maintained PostgreSQL task queue) gives what a cluster needs without a scheduler of our own: workers
take jobs with row locks, send heartbeats, and a job whose worker stopped sending them is found and retried.

Each worker process runs a Procrastinate worker in a thread of its own (asyncio); the transcription itself runs
in Procrastinate's thread pool, one job at a time per WHISPER_JOB_WORKERS. The audio is stored in 1 MiB
chunks and copied to the local spool while a job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid

import procrastinate
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import ApiError
from .schema import SCHEMA, DuplicateJob

log = logging.getLogger("pilotys_whisper.jobs")

TASK = "pilotys_whisper.transcribe_job"
CHUNK = 1 << 20
HEARTBEAT_S = 5.0
STALLED_AFTER_S = 20.0  # a worker silent this long is gone: its job runs elsewhere
STALLED_CHECK_EVERY_S = 5.0
SCHEMA_LOCK = 0x7069_6C6F  # pg_advisory_xact_lock key: one worker creates the tables, the others wait
AUDIO_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_audio (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


class _Requeue(Exception):
    """The job goes back to the queue (this worker is stopping or draining): Procrastinate retries it."""


class _Tx:
    """A connection with sqlite3's face (`?` placeholders, execute() returning a cursor): every query of the
    jobs code goes through it, in a transaction or not."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, args=()):
        return self.conn.execute(sql.replace("?", "%s"), args)


class PostgresBackend:
    shared = True  # other workers may be running jobs right now: never requeue 'running' at start-up

    def __init__(self, manager):
        self.manager = manager
        settings = manager.settings
        conninfo = str(settings.job_database)
        size = settings.concurrency + settings.queue_size + settings.job_workers + 4
        self.pool = ConnectionPool(conninfo, min_size=1, max_size=size, open=False, name="jobs", timeout=10,
                                   kwargs={"autocommit": True, "row_factory": dict_row},
                                   check=ConnectionPool.check_connection)
        try:
            self.pool.open(wait=True, timeout=30)
        except PoolTimeout as exc:
            raise RuntimeError(f"cannot reach the jobs database ({_describe(conninfo)}): {exc}") from exc
        self._create_schema()
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))
        # One queue per model: workers serving another model (a GPU group with a larger one) never take these.
        self.queue = f"transcriptions-{settings.model_label}"
        self.app.task(name=TASK, queue=self.queue, pass_context=True,
                      # Back to the queue when this worker stops or drains, or could not reach the database
                      # (ApiError 503); the job's own attempts (MAX_ATTEMPTS) bound how often it really runs.
                      retry=procrastinate.RetryStrategy(max_attempts=1000, wait=2,
                                                        retry_exceptions={_Requeue, ApiError}))(
            self._task)
        # Deferring happens in request threads, in our own transaction: a synchronous app of its own.
        self._defer_app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=conninfo))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_stalled_check = 0.0

    def _create_schema(self) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(SCHEMA + AUDIO_SCHEMA)
            exists = conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS ok").fetchone()["ok"]
            if not exists:
                conn.execute(procrastinate.schema.SchemaManager.get_schema())
                log.info("created the jobs schema (Procrastinate %s)", procrastinate.__version__)

    # -- the store -------------------------------------------------------------------------------------------

    def create_tables(self, sql: str) -> None:
        """Tables of another module (live uploads), with IF NOT EXISTS: one worker at a time, as the schema."""
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(sql)

    @contextlib.contextmanager
    def transaction(self):
        with _unavailable(), self.pool.connection() as conn, conn.transaction():
            yield _Tx(conn)

    def query(self, sql: str, args=()) -> list:
        with _unavailable(), self.pool.connection() as conn:
            return _Tx(conn).execute(sql, args).fetchall()

    def execute(self, sql: str, args=()) -> int:
        with _unavailable(), self.pool.connection() as conn:
            return _Tx(conn).execute(sql, args).rowcount

    # -- audio: chunks in the database, written in the transaction that accepts the job -------------------

    @contextlib.contextmanager
    def accept(self, job_id: str, upload_path: str):
        try:
            with self.transaction() as db:
                yield db
                with open(upload_path, "rb") as f:
                    for seq, chunk in enumerate(iter(lambda: f.read(CHUNK), b"")):
                        db.execute("INSERT INTO job_audio (job_id, seq, data) VALUES (?, ?, ?)",
                                   (job_id, seq, chunk))
        except psycopg.errors.UniqueViolation as exc:
            # Two submissions with one idempotency key at once: neither saw the other's uncommitted row, and this
            # one waited for the other's commit on the unique index. The caller answers with the other's job.
            raise DuplicateJob(job_id) from exc

    @contextlib.contextmanager
    def audio(self, job_id: str):
        """The job's audio copied to the local spool for the time of the transcription."""
        path = self.manager.spool / f"{job_id}.{uuid.uuid4().hex[:8]}.audio"
        try:
            with open(path, "wb") as f:
                chunks = self.query("SELECT COUNT(*) AS n FROM job_audio WHERE job_id = ?", (job_id,))[0]["n"]
                for seq in range(chunks):  # one chunk at a time: memory stays flat whatever the length
                    f.write(self.query("SELECT data FROM job_audio WHERE job_id = ? AND seq = ?",
                                       (job_id, seq))[0]["data"])
            yield str(path)
        finally:
            path.unlink(missing_ok=True)

    def delete_audio(self, job_id: str) -> None:
        self.execute("DELETE FROM job_audio WHERE job_id = ?", (job_id,))

    # -- dispatch: Procrastinate -------------------------------------------------------------------------------

    def enqueue(self, db: _Tx, job_id: str) -> None:
        """Queue the job in the transaction that inserts it: accepted and queued, or neither."""
        self._defer_app.configure_task(TASK, allow_unknown=True, connection=db.conn, queue=self.queue,
                                       queueing_lock=job_id).defer(job_id=job_id)

    def _task(self, context, job_id: str) -> None:
        manager = self.manager
        if manager.stopping.is_set() or manager.state.draining.is_set():
            raise _Requeue(job_id)
        with self.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? FOR UPDATE", (job_id,)).fetchone()
            row = manager.begin(db, row) if row is not None else None
        if row is None:
            return
        log.info("job %s taken by worker %s (queue attempt %d)", job_id, os.uname().nodename, context.job.attempts)
        if manager.run(row) == "queued":
            raise _Requeue(job_id)

    def start(self) -> None:
        self.manager.spawn(self._run_worker, "job-queue")

    def _run_worker(self) -> None:
        state = self.manager.state
        while not state.ready.wait(1.0):  # take jobs once the model is loaded
            if self.manager.stopping.is_set():
                return

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            async with self.app.open_async():
                worker = asyncio.create_task(self.app.run_worker_async(
                    queues=[self.queue], name=f"whisper-{os.uname().nodename}",
                    concurrency=self.manager.settings.job_workers,
                    install_signal_handlers=False, wait=True, listen_notify=True,
                    update_heartbeat_interval=HEARTBEAT_S, stalled_worker_timeout=STALLED_AFTER_S,
                    shutdown_graceful_timeout=20, delete_jobs="successful"))
                while not (self.manager.stopping.is_set() or worker.done()):
                    await asyncio.sleep(0.2)
                # A running job sees the stop at its next chunk and goes back to the queue (_Requeue).
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker

        asyncio.run(main())

    def housekeeping(self) -> None:
        """Give the jobs of workers that stopped sending heartbeats (killed, powered off) to the others."""
        loop, now = self._loop, time.monotonic()
        if loop is None or now - self._last_stalled_check < STALLED_CHECK_EVERY_S:
            return
        self._last_stalled_check = now
        asyncio.run_coroutine_threadsafe(self._retry_stalled(), loop).result(30)

    async def _retry_stalled(self) -> None:
        manager = self.app.job_manager
        for job in await manager.get_stalled_jobs(queue=self.queue, seconds_since_heartbeat=STALLED_AFTER_S):
            try:
                await manager.retry_job(job)
            except procrastinate.exceptions.ProcrastinateException as exc:  # another worker retried it first
                log.debug("stalled job %s: %s", job.id, exc)
                continue
            log.warning("job %s: its worker stopped answering, queued again", job.task_kwargs.get("job_id"))

    def close(self) -> None:
        self.pool.close()


@contextlib.contextmanager
def _unavailable():
    """The database cannot be reached: 503 with Retry-After for the client, not a 500."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise ApiError(503, "jobs_unavailable", "the jobs database cannot be reached; retry shortly",
                       headers={"Retry-After": "10"}) from exc


def _describe(conninfo: str) -> str:
    """Where the database is, without its password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "unparsable connection string"
    return f"host={params.get('host', '')} port={params.get('port', 5432)} dbname={params.get('dbname', '')}"
