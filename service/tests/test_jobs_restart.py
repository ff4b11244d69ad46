"""Nothing accepted is lost: a job survives SIGKILL of the service (real process, real model)."""

import os
import signal
import time

import pytest
import requests

from conftest import KEY, ServerProcess, reference, wer

pytestmark = [pytest.mark.model, pytest.mark.server]
AUTH = {"Authorization": f"Bearer {KEY}"}


def job(server, job_id):
    return requests.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()


def start_job_then_kill(server: ServerProcess, audio, before_kill=None) -> str:
    """Submit the 169 s news as a job and SIGKILL the service once the job has begun; returns the job's id."""
    try:
        with open(audio("news_en_169s.wav"), "rb") as f:
            r = requests.post(f"{server.url}/v1/jobs", files={"file": f}, data={"language": "en"}, headers=AUTH,
                              timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while job(server, job_id)["progress"] <= 0:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.1)
        if before_kill is not None:
            before_kill()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.stop()
    return job_id


def test_job_survives_sigkill_and_progress_is_monotonic(model_dir, audio, tmp_path):
    env = {"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": KEY, "WHISPER_STATE_DIR": str(tmp_path / "state")}
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    job_id = start_job_then_kill(ServerProcess(env, uploads).start(), audio)

    second = ServerProcess(env, uploads).start()
    try:
        seen = []
        deadline = time.monotonic() + 120
        while (state := job(second, job_id))["status"] not in ("succeeded", "failed"):
            seen.append(state["progress"])
            assert time.monotonic() < deadline, second.logs()
            time.sleep(0.2)
        assert state["status"] == "succeeded", state
        assert state["attempts"] == 2
        assert seen == sorted(seen), f"progress went backwards: {seen}"
        text = requests.get(f"{second.url}/v1/jobs/{job_id}/result?format=text", headers=AUTH, timeout=10).text
        assert wer(reference("news_en_169s"), text) <= 0.08
        assert list((tmp_path / "state" / "spool").iterdir()) == []
        assert "interrupted job(s) queued again" in second.logs()
    finally:
        assert second.stop() == 0


def test_a_worker_killed_mid_job_another_finishes_it(model_dir, audio, tmp_path, postgres):
    """Two workers share a PostgreSQL queue: SIGKILL the one running a job, the other takes it over."""
    import psycopg

    database = postgres.new_database()
    env = {"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": KEY, "WHISPER_JOB_BACKEND": "postgresql",
           "WHISPER_JOB_DATABASE_URL": database}
    workers = []
    for name in ("a", "b"):
        (tmp_path / name / "uploads").mkdir(parents=True)
        workers.append(ServerProcess({**env, "WHISPER_STATE_DIR": str(tmp_path / name / "state")},
                                     tmp_path / name / "uploads"))
    first, second = workers
    # The second worker starts once the first one holds the job, so that the first one surely had it.
    job_id = start_job_then_kill(first.start(), audio, before_kill=second.start)

    try:
        deadline = time.monotonic() + 150
        while (state := job(second, job_id))["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, second.logs()
            time.sleep(0.5)
        assert state["status"] == "succeeded", state
        assert state["attempts"] == 2, state
        assert "its worker stopped answering, queued again" in second.logs()
        text = requests.get(f"{second.url}/v1/jobs/{job_id}/result?format=text", headers=AUTH, timeout=10).text
        assert wer(reference("news_en_169s"), text) <= 0.08
        listed = requests.get(f"{second.url}/v1/jobs", headers=AUTH, timeout=10).json()["data"]
        assert [j["id"] for j in listed] == [job_id]  # one job, one result
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT COUNT(*) FROM job_audio").fetchone()[0] == 0  # the audio is gone
        assert list((tmp_path / "b" / "state" / "spool").iterdir()) == []
    finally:
        assert second.stop() == 0
