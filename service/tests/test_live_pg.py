"""Live uploads on the PostgreSQL backend (the cluster): two real service processes share one database, as two
workers behind the gateway; any of them takes the next PATCH or HEAD, and a worker killed mid-meeting loses
nothing it acknowledged. The real model transcribes the result."""

import base64
import contextlib
import hashlib
import os
import signal
import threading
import time

import psycopg
import pytest
import requests
from test_live import (  # noqa: F401 - lecture_webm is a fixture
    AUTH,
    CHUNK,
    LECTURE_WER,
    TUS,
    create,
    cuts,
    env_for,
    head,
    job,
    lecture_webm,
    patch,
    transcript,
    wait_finished,
)

from conftest import ServerProcess, reference, wer

pytestmark = [pytest.mark.model, pytest.mark.server]


def worker(model_dir, root, database) -> ServerProcess:
    (root / "uploads").mkdir(parents=True)
    env = env_for(model_dir, root / "state", WHISPER_JOB_BACKEND="postgresql", WHISPER_JOB_DATABASE_URL=database)
    server = ServerProcess(env, root / "uploads")
    server.root = root
    return server


def sha1(data: bytes) -> dict[str, str]:
    return {"Upload-Checksum": "sha1 " + base64.b64encode(hashlib.sha1(data).digest()).decode()}


def stored(database, job_id) -> bytes:
    """The upload's bytes as the jobs database holds them, in order."""
    with psycopg.connect(database) as conn:
        rows = conn.execute("SELECT data FROM job_audio WHERE job_id = %s ORDER BY seq", (job_id,)).fetchall()
    return b"".join(bytes(row[0]) for row in rows)


def waiting_on_locks(database) -> int:
    with psycopg.connect(database) as conn:
        return conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                            "datname = current_database()").fetchone()[0]


def same_offset_at_once(database, upload_id, workers, location, offset, piece) -> list[int]:
    """The same PATCH sent to both workers at once (a client retrying on another worker while the first one
    still reads it): the upload's row is held locked until both wait on it, so that they really overlap."""
    statuses = []
    with psycopg.connect(database) as conn, conn.transaction():
        conn.execute("SELECT 1 FROM live_uploads WHERE id = %s FOR UPDATE", (upload_id,))
        threads = [threading.Thread(target=lambda w=w: statuses.append(patch(w, location, offset, piece).status_code))
                   for w in workers]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while waiting_on_locks(database) < len(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
    for thread in threads:
        thread.join(60)
    return sorted(statuses)


def test_any_worker_continues_a_live_upload_and_a_killed_one_loses_nothing(model_dir, tmp_path, postgres,
                                                                          lecture_webm):  # noqa: F811
    database = postgres.new_database()
    a = worker(model_dir, tmp_path / "a", database).start()
    b = worker(model_dir, tmp_path / "b", database).start()
    try:
        pieces = cuts(lecture_webm, seed=16)
        r = create(a, headers={"Upload-Defer-Length": "1"}, data=pieces[0])
        assert r.status_code == 201, r.text
        location, job_id = r.headers["Location"], r.headers["Whisper-Job-Id"]
        upload_id = location.rsplit("/", 1)[1]
        offset = len(pieces[0])
        half = len(pieces) // 2
        for number, piece in enumerate(pieces[1:half], start=1):  # the gateway hands each PATCH to any worker
            r = patch((a, b)[number % 2], location, offset, piece, headers=sha1(piece))
            assert r.status_code == 204, r.text
            offset += len(piece)
            assert r.headers["Upload-Offset"] == str(offset)
        for w in (a, b):
            r = head(w, location)
            assert r.status_code == 200 and r.headers["Upload-Offset"] == str(offset)
            assert r.headers["Upload-Defer-Length"] == "1" and r.headers["Whisper-Job-Id"] == job_id
        # tus's errors on this backend too: a chunk sent again 409, a corrupted one 460; the offset stays.
        r = patch(b, location, offset - len(pieces[half - 1]), pieces[half - 1])
        assert r.status_code == 409 and r.json()["error"]["code"] == "offset_mismatch", r.text
        r = patch(a, location, offset, pieces[half], headers=sha1(b"something else"))
        assert r.status_code == 460 and r.json()["error"]["code"] == "checksum_mismatch", r.text
        assert head(b, location).headers["Upload-Offset"] == str(offset)
        # One PATCH on two workers at once: one appends, the other sees the new offset.
        assert same_offset_at_once(database, upload_id, (a, b), location, offset, pieces[half]) == [204, 409]
        offset += len(pieces[half])
        assert stored(database, job_id) == lecture_webm[:offset]

        # Worker a dies in the middle of a PATCH: what it had read of it was never acknowledged.
        sent = threading.Event()

        def stalled_body():
            yield lecture_webm[offset:offset + 5000]
            sent.set()
            time.sleep(30)  # the connection dies with the worker before this ends
            yield b""

        def send_to_a():
            with contextlib.suppress(requests.ConnectionError):  # no answer: a is killed while it reads
                requests.patch(a.url + location, data=stalled_body(), timeout=60,
                               headers={**AUTH, **TUS, **CHUNK, "Upload-Offset": str(offset)})

        cut = threading.Thread(target=send_to_a, daemon=True)
        cut.start()
        assert sent.wait(30)
        time.sleep(1)  # a has read the first bytes by now (the assertions below hold either way)
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        assert stored(database, job_id) == lecture_webm[:offset]  # nothing acknowledged lost, nothing else kept
        assert head(b, location).headers["Upload-Offset"] == str(offset)
        assert job(b, job_id)["status"] == "receiving"

        # The meeting goes on at b; when recording stops an empty PATCH declares the length (tus-js-client's
        # last request with a deferred length), and the job is queued as any job.
        for piece in pieces[half + 1:]:
            assert patch(b, location, offset, piece).status_code == 204
            offset += len(piece)
        assert job(b, job_id)["status"] == "receiving"
        r = patch(b, location, offset, b"", headers={"Upload-Length": str(len(lecture_webm))})
        assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(lecture_webm)), r.text
        state = wait_finished(b, job_id)
        assert state["status"] == "succeeded", (state, b.logs()[-3000:])
        assert state["attempts"] == 1  # the job never ran before the upload was complete
        assert wer(reference("lecture_en_60s"), transcript(b, job_id)) <= LECTURE_WER
        assert f"job {job_id} taken by" in b.logs()
        assert patch(b, location, len(lecture_webm), b"x").status_code == 403
        assert stored(database, job_id) == b""  # the audio leaves the database with the job's end
        assert list((tmp_path / "b" / "state" / "spool").iterdir()) == []
        assert list((tmp_path / "b" / "uploads").iterdir()) == []
        # Termination on another worker than the one that created the upload: the job cancelled, no audio left.
        gone = create(b, headers={"Upload-Defer-Length": "1"}, data=lecture_webm[:30_000])
        assert stored(database, gone.headers["Whisper-Job-Id"]) == lecture_webm[:30_000]
        restarted = worker(model_dir, tmp_path / "a2", database).start()
        try:
            r = requests.delete(restarted.url + gone.headers["Location"], headers={**AUTH, **TUS}, timeout=10)
            assert r.status_code == 204
        finally:
            assert restarted.stop() == 0
        assert job(b, gone.headers["Whisper-Job-Id"])["status"] == "cancelled"
        assert stored(database, gone.headers["Whisper-Job-Id"]) == b""
    finally:
        a.stop()
        assert b.stop() == 0


def test_an_idle_upload_is_finalized_once(model_dir, tmp_path, postgres,
                                                                             lecture_webm):  # noqa: F811
    """Both workers look for idle uploads: the job is queued once and runs once; an empty one fails once."""
    database = postgres.new_database()
    workers = [worker(model_dir, tmp_path / name, database) for name in ("a", "b")]
    for w in workers:
        w.env["WHISPER_LIVE_IDLE_TIMEOUT_S"] = "2"
        w.start()
    a, b = workers
    try:
        r = create(a, headers={"Upload-Defer-Length": "1"}, data=lecture_webm)
        job_id = r.headers["Whisper-Job-Id"]
        empty = create(b, headers={"Upload-Defer-Length": "1"}).headers["Whisper-Job-Id"]
        state = wait_finished(b, job_id)
        assert state["status"] == "succeeded" and state["attempts"] == 1, state
        assert wer(reference("lecture_en_60s"), transcript(b, job_id)) <= LECTURE_WER
        logs = a.logs() + b.logs()
        assert logs.count(f"complete with {len(lecture_webm)} bytes: job {job_id} queued") == 1, logs[-3000:]
        assert logs.count(f"job {job_id} taken by") == 1
        # An upload that received nothing fails, once, with one job.failed event.
        state = wait_finished(a, empty, timeout=60)
        assert state["status"] == "failed" and state["error"]["code"] == "no_audio", state
        assert (a.logs() + b.logs()).count(f"job {empty} failed (no_audio)") == 1
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT COUNT(*) FROM job_events WHERE job_id = %s AND type = 'job.failed'",
                                (empty,)).fetchone()[0] == 1
    finally:
        for w in workers:
            assert w.stop() == 0


def test_one_idempotency_key_on_two_workers_at_once_makes_one_upload(model_dir, tmp_path, postgres):
    """A browser retrying POST /v1/live on another worker while the first still creates it: one job, one upload,
    the second answered with the first's Location. The test holds live_uploads locked until both creations
    wait (the first on that lock, the second on the first's uncommitted job row), so that they really overlap."""
    database = postgres.new_database()
    workers = [worker(model_dir, tmp_path / name, database).start() for name in ("a", "b")]
    try:
        answers = []
        with psycopg.connect(database) as conn, conn.transaction():
            conn.execute("LOCK TABLE live_uploads IN EXCLUSIVE MODE")
            threads = [threading.Thread(target=lambda w=w: answers.append(create(
                w, headers={"Upload-Defer-Length": "1"}, idempotency_key="meeting-42"))) for w in workers]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while waiting_on_locks(database) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
        for thread in threads:
            thread.join(60)
        assert sorted(r.status_code for r in answers) == [201, 201], [r.text for r in answers]
        assert len({r.headers["Location"] for r in answers}) == 1
        assert [r.headers.get("Idempotent-Replayed") for r in answers].count("true") == 1
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
            assert conn.execute("SELECT COUNT(*) FROM live_uploads").fetchone()[0] == 1
    finally:
        for w in workers:
            assert w.stop() == 0
