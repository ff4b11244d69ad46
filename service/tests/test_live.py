"""Live uploads (tus 1.0 at /v1/live): the real service as a process, the real model, tuspy as the client.

tuspy 1.1.0 has no deferred length (it always sends Upload-Length): the deferred-length cases, as a browser's
MediaRecorder sends them, speak the protocol with requests.
"""

import base64
import hashlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from conftest import KEY, ServerProcess, reference, wer

pytestmark = [pytest.mark.model, pytest.mark.server]
AUTH = {"Authorization": f"Bearer {KEY}"}
TUS = {"Tus-Resumable": "1.0.0"}
CHUNK = {"Content-Type": "application/offset+octet-stream"}
ORIGIN = "https://pilotys.example"
LECTURE_WER = 0.08  # lecture_en_60s in one piece scores 0.06 (test_server.py); a gap or a duplicate costs more
# Speech a live transcription may not have reached when the upload ends: the 5 s block the VAD has not seen yet,
# the 3 s at its end where a region may go on, and a region still open there (engines/faster.py).
LIVE_OPEN_S = 15.0


def ffmpeg_stream(source: Path, *args: str) -> bytes:
    """The recording as a live encoder writes it: to a pipe, so no index, no duration, the header first."""
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(source), "-vn", *args, "pipe:1"],
                          check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def lecture_webm(audio) -> bytes:
    return ffmpeg_stream(audio("lecture_en_60s.wav"), "-c:a", "libopus", "-b:a", "24k", "-f", "webm")


@pytest.fixture(scope="module")
def lecture_fmp4(audio) -> bytes:
    # Safari's MediaRecorder: fragmented MP4, an empty moov first, then one fragment per timeslice.
    return ffmpeg_stream(audio("lecture_en_60s.wav"), "-c:a", "aac", "-b:a", "48k", "-movflags",
                         "frag_keyframe+empty_moov+default_base_moof", "-frag_duration", "1000000", "-f", "mp4")


def env_for(model_dir, state: Path, **extra) -> dict[str, str]:
    return {"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": KEY, "WHISPER_STATE_DIR": str(state),
            "WHISPER_MAX_UPLOAD_MB": "2", "WHISPER_CORS_ORIGINS": ORIGIN, "WHISPER_LIVE_INCREMENTAL": "true",
            **extra}


def new_server(model_dir, root: Path, **extra) -> ServerProcess:
    (root / "uploads").mkdir(parents=True, exist_ok=True)
    return ServerProcess(env_for(model_dir, root / "state", **extra), root / "uploads")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    proc = new_server(model_dir, root).start()
    proc.root = root
    yield proc
    assert proc.stop() == 0


def spool(server) -> Path:
    return server.root / "state" / "spool"


def metadata(**fields) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in fields.items())


def create(server, headers=None, data=None, **fields) -> requests.Response:
    fields.setdefault("language", "en")
    head = {**AUTH, **TUS, "Upload-Metadata": metadata(**fields), **(headers or {})}
    if data is not None:
        head.update(CHUNK)
    return requests.post(f"{server.url}/v1/live", headers=head, data=data, timeout=30)


def patch(server, location, offset, data, headers=None, auth=None) -> requests.Response:
    head = {**(auth or AUTH), **TUS, **CHUNK, "Upload-Offset": str(offset), **(headers or {})}
    return requests.patch(server.url + location, headers=head, data=data, timeout=60)


def head(server, location, auth=None) -> requests.Response:
    return requests.head(server.url + location, headers={**(auth or AUTH), **TUS}, timeout=10)


def job(server, job_id) -> dict:
    return requests.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()


def wait_finished(server, job_id, timeout=600) -> dict:
    deadline = time.monotonic() + timeout
    while (state := job(server, job_id))["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, (state, server.logs()[-3000:])
        time.sleep(0.3)
    return state


def transcript(server, job_id) -> str:
    return requests.get(f"{server.url}/v1/jobs/{job_id}/result?format=text", headers=AUTH, timeout=10).text


def cuts(data: bytes, seed: int, low=3000, high=40000) -> list[bytes]:
    """The stream cut at arbitrary byte offsets, as timeslices fall: only the first piece holds the header."""
    rng, pieces, at = random.Random(seed), [], 0
    while at < len(data):
        size = rng.randint(low, high)
        pieces.append(data[at:at + size])
        at += size
    return pieces


def assert_no_leftovers(server) -> None:
    assert list(spool(server).iterdir()) == [], "audio left in the spool"
    assert list((server.root / "uploads").iterdir()) == [], "temporary upload left behind"


# -- the protocol ------------------------------------------------------------------------------------------

def test_options_announce_the_tus_extensions(server):
    r = requests.options(f"{server.url}/v1/live", timeout=10)
    assert r.status_code == 204
    assert r.headers["Tus-Version"] == "1.0.0"
    assert set(r.headers["Tus-Extension"].split(",")) == {
        "creation", "creation-with-upload", "creation-defer-length", "termination", "expiration", "checksum"}
    assert r.headers["Tus-Max-Size"] == str(2 * 1024 * 1024)
    assert r.headers["Tus-Checksum-Algorithm"] == "sha1"


def test_tuspy_uploads_in_chunks_with_checksums(server, audio, lecture_webm, tmp_path):
    path = tmp_path / "lecture.webm"
    path.write_bytes(lecture_webm)
    uploader = tus_client.TusClient(f"{server.url}/v1/live", headers=AUTH).uploader(
        str(path), chunk_size=20_000, metadata={"language": "en", "filename": "lecture.webm"}, upload_checksum=True)
    uploader.upload()
    r = head(server, uploader.url.removeprefix(server.url))
    assert r.status_code == 200
    assert r.headers["Upload-Offset"] == r.headers["Upload-Length"] == str(len(lecture_webm))
    assert "Upload-Expires" not in r.headers  # complete: it no longer expires
    state = wait_finished(server, r.headers["Whisper-Job-Id"])
    assert state["status"] == "succeeded", state
    assert wer(reference("lecture_en_60s"), transcript(server, state["id"])) <= LECTURE_WER
    # The upload is complete: more data is refused, as tus says, and nothing was kept.
    more = patch(server, uploader.url.removeprefix(server.url), len(lecture_webm), b"x")
    assert more.status_code == 403 and more.json()["error"]["code"] == "upload_finished"
    assert_no_leftovers(server)


@pytest.mark.parametrize("container", ["webm", "fmp4"])
def test_deferred_length_timeslices_as_a_browser_records(server, container, lecture_webm, lecture_fmp4):
    """MediaRecorder: the length deferred, the first blob sent with the creation, the length declared at the end."""
    data = lecture_webm if container == "webm" else lecture_fmp4
    pieces = cuts(data, seed=len(data))
    r = create(server, headers={"Upload-Defer-Length": "1", "Origin": ORIGIN}, data=pieces[0])
    assert r.status_code == 201, r.text
    assert r.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in r.headers
    assert r.headers["Upload-Offset"] == str(len(pieces[0]))
    assert r.headers["Location"].startswith("/v1/live/up_")
    assert "Upload-Expires" in r.headers
    exposed = {h.strip() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Location", "Upload-Offset", "Upload-Length", "Whisper-Job-Id", "Tus-Resumable"} <= exposed
    location, job_id, offset = r.headers["Location"], r.headers["Whisper-Job-Id"], len(pieces[0])
    assert job(server, job_id)["status"] == "receiving"
    for number, piece in enumerate(pieces[1:], start=2):
        last = number == len(pieces)
        r = patch(server, location, offset, piece, headers={"Upload-Length": str(len(data))} if last else None)
        assert r.status_code == 204, r.text
        offset += len(piece)
        assert r.headers["Upload-Offset"] == str(offset)
        if not last:
            assert r.headers["Upload-Defer-Length"] == "1"
            assert job(server, job_id)["status"] == "receiving"
    assert r.headers["Upload-Length"] == str(len(data))
    state = wait_finished(server, job_id)
    assert state["status"] == "succeeded", state
    assert wer(reference("lecture_en_60s"), transcript(server, job_id)) <= LECTURE_WER
    assert_no_leftovers(server)


def one_shot(server, data: bytes) -> dict:
    r = requests.post(f"{server.url}/v1/jobs", headers=AUTH, files={"file": ("lecture.webm", data)},
                      data={"language": "en"}, timeout=60)
    assert r.status_code == 202, r.text
    return wait_finished(server, r.json()["id"], timeout=1800)


def segments(server, job_id) -> list[dict]:
    return requests.get(f"{server.url}/v1/jobs/{job_id}/result?format=verbose_json", headers=AUTH,
                        timeout=10).json()["segments"]


def test_transcribed_as_it_arrives_so_that_only_the_tail_remains(server, lecture_webm):
    """On by default: the recording sent in 2 s timeslices over time, the engine transcribes each stretch once VAD
    closes it (HEAD says how far: seconds of audio, counted, not timed), so that once the last timeslice arrives
    only its last seconds remain; the transcript is the one-shot job's, within a WER point, segments aligned."""
    seconds = 60.0
    per_slice = round(len(lecture_webm) * 2 / seconds)  # 2 s of Opus, cut where the bytes fall (one header, first)
    pieces = [lecture_webm[at:at + per_slice] for at in range(0, len(lecture_webm), per_slice)]
    *body, tail = pieces
    r = create(server, headers={"Upload-Defer-Length": "1"}, data=body[0])
    location, job_id, offset = r.headers["Location"], r.headers["Whisper-Job-Id"], len(body[0])
    for piece in body[1:]:
        assert patch(server, location, offset, piece).status_code == 204
        offset += len(piece)
        time.sleep(0.25)  # 8x real time: the upload is spread over the transcription, not sent at once
    # Before the last timeslice, let the model reach what it can: all but the speech VAD has not closed yet.
    sent_s, deadline = seconds - 2, time.monotonic() + 1800  # a guard against a hang: a loaded machine is slow
    while (reached := float(head(server, location).headers.get("Whisper-Transcribed-S", "0"))) < sent_s - LIVE_OPEN_S:
        assert time.monotonic() < deadline, (reached, server.logs()[-3000:])
        assert job(server, job_id)["status"] == "receiving"
        time.sleep(0.5)
    r = patch(server, location, offset, tail, headers={"Upload-Length": str(len(lecture_webm))})
    assert r.status_code == 204, r.text
    state = wait_finished(server, job_id, timeout=1800)
    assert state["status"] == "succeeded", state
    assert state["attempts"] == 1
    upload_id = location.rsplit("/", 1)[1]
    logged = re.search(rf"live upload {upload_id}: ([0-9.]+) s of its ([0-9.]+) s of audio transcribed after the "
                       "upload ended", server.logs())
    assert logged, server.logs()[-3000:]
    assert float(logged[1]) <= LIVE_OPEN_S + 2, logged[0]  # the tail: the open speech and the last timeslice
    assert abs(float(logged[2]) - seconds) < 1
    live_text, live_segments = transcript(server, job_id), segments(server, job_id)
    whole = one_shot(server, lecture_webm)
    assert whole["status"] == "succeeded", whole
    whole_text, whole_segments = transcript(server, whole["id"]), segments(server, whole["id"])
    truth = reference("lecture_en_60s")
    # Complete: no gap, no duplicate (LECTURE_WER, as every live test here). Issue 16's goal, within one point of
    # the one-shot job, is not met on a quiet machine, where the model keeps up and the chunks stay short (live
    # 4.3 % against 2.6 %; 0.9 % when loaded, with longer chunks): why incremental is off by default.
    assert wer(truth, live_text) <= LECTURE_WER, (live_text, whole_text)
    assert wer(whole_text, live_text) <= 0.05, (live_text, whole_text)  # the same words, not only as many errors
    # Aligned: in order, not overlapping, over the same span of the recording.
    assert all(a["end"] <= b["start"] + 0.05 for a, b in zip(live_segments, live_segments[1:], strict=False))
    assert abs(live_segments[0]["start"] - whole_segments[0]["start"]) < 1.0
    assert abs(live_segments[-1]["end"] - whole_segments[-1]["end"]) < 1.0
    assert f"complete with {len(lecture_webm)} bytes: job {job_id} transcribes its tail" in server.logs()
    assert_no_leftovers(server)


def test_cors_preflight_allows_the_tus_methods_and_headers(server):
    r = requests.options(f"{server.url}/v1/live/up_x", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable, upload-offset, content-type"}, timeout=10)
    assert r.status_code == 204
    assert "PATCH" in r.headers["Access-Control-Allow-Methods"] and "HEAD" in r.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"tus-resumable", "upload-offset", "upload-length", "upload-metadata", "upload-defer-length",
            "upload-checksum"} <= allowed


def test_offset_mismatch_checksum_and_version_errors(server, lecture_webm):
    r = create(server, headers={"Upload-Length": str(len(lecture_webm))})
    assert r.status_code == 201, r.text
    location, job_id = r.headers["Location"], r.headers["Whisper-Job-Id"]
    first = lecture_webm[:10_000]
    assert patch(server, location, 0, first).status_code == 204
    # A chunk sent again (a retry after a lost answer) or one that skips ahead: 409, nothing written.
    for offset in (0, 20_000):
        r = patch(server, location, offset, lecture_webm[offset:offset + 5000])
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "offset_mismatch" and r.headers["Tus-Resumable"] == "1.0.0"
    # A corrupted chunk: 460, dropped; the offset did not move.
    wrong = base64.b64encode(hashlib.sha1(b"something else").digest()).decode()
    r = patch(server, location, 10_000, lecture_webm[10_000:20_000], headers={"Upload-Checksum": f"sha1 {wrong}"})
    assert r.status_code == 460 and r.json()["error"]["code"] == "checksum_mismatch"
    assert head(server, location).headers["Upload-Offset"] == "10000"
    r = patch(server, location, 10_000, b"x", headers={"Upload-Checksum": "md5 AAAA"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_checksum_algorithm"
    r = requests.head(server.url + location, headers={**AUTH, "Tus-Resumable": "0.2.2"}, timeout=10)
    assert r.status_code == 412 and r.headers["Tus-Version"] == "1.0.0"
    assert requests.head(server.url + location, headers=AUTH, timeout=10).status_code == 400  # not a tus request
    r = requests.patch(server.url + location, headers={**AUTH, "Upload-Offset": "10000",
                                                       "Content-Type": "application/offset+octet-stream"},
                       data=b"x", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "tus_resumable_required"
    r = requests.patch(server.url + location, headers={**AUTH, **TUS, "Upload-Offset": "10000",
                                                       "Content-Type": "audio/webm"}, data=b"x", timeout=10)
    assert r.status_code == 415
    # What was on disk is exactly what was acknowledged.
    assert (spool(server) / f"{job_id}.audio").read_bytes() == first
    assert requests.delete(server.url + location, headers={**AUTH, **TUS}, timeout=10).status_code == 204
    assert_no_leftovers(server)


def test_another_key_and_unauthenticated_requests_see_nothing(server):
    location = create(server, headers={"Upload-Defer-Length": "1"}).headers["Location"]
    assert head(server, location, auth={"Authorization": "Bearer not-the-key"}).status_code == 401
    assert requests.head(server.url + location, headers=TUS, timeout=10).status_code == 401
    assert create(server, headers={"Upload-Defer-Length": "1", "Authorization": ""}).status_code == 401
    assert requests.delete(server.url + location, headers={**AUTH, **TUS}, timeout=10).status_code == 204


def test_termination_cancels_the_job_and_deletes_the_audio(server, lecture_webm):
    r = create(server, headers={"Upload-Defer-Length": "1"}, data=lecture_webm[:30_000])
    location, job_id = r.headers["Location"], r.headers["Whisper-Job-Id"]
    assert (spool(server) / f"{job_id}.audio").stat().st_size == 30_000
    r = requests.delete(server.url + location, headers={**AUTH, **TUS}, timeout=10)
    assert r.status_code == 204 and r.headers["Tus-Resumable"] == "1.0.0"
    assert job(server, job_id)["status"] == "cancelled"
    assert head(server, location).status_code == 404
    assert patch(server, location, 30_000, b"more").status_code == 404
    assert_no_leftovers(server)


def test_too_large_ends_the_job_with_what_it_has(server, lecture_webm):
    assert create(server, headers={"Upload-Length": str(3 * 1024 * 1024)}).status_code == 413
    r = create(server, headers={"Upload-Defer-Length": "1"}, data=lecture_webm)
    location, job_id = r.headers["Location"], r.headers["Whisper-Job-Id"]
    r = patch(server, location, len(lecture_webm), b"\0" * (2 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large", r.text
    assert "job goes on with" in r.json()["error"]["message"]
    state = wait_finished(server, job_id)
    assert state["status"] == "succeeded", state  # the job ends normally, with the audio received before
    assert wer(reference("lecture_en_60s"), transcript(server, job_id)) <= LECTURE_WER
    assert patch(server, location, len(lecture_webm), b"x").status_code == 403
    assert_no_leftovers(server)


def test_undecodable_data_fails_the_job_at_its_first_chunk(server):
    garbage = b"%PDF-1.4 this is no recording\n" * 4000
    r = create(server, headers={"Upload-Defer-Length": "1"})
    location, job_id = r.headers["Location"], r.headers["Whisper-Job-Id"]
    r = patch(server, location, 0, garbage)
    assert r.status_code == 422 and r.json()["error"]["code"] == "undecodable_audio", r.text
    state = job(server, job_id)
    assert state["status"] == "failed" and state["error"]["code"] == "undecodable_audio", state
    assert state["error"]["message"].startswith("the live upload is not audio this service can decode")
    assert patch(server, location, len(garbage), b"x").status_code == 403
    assert_no_leftovers(server)


def test_a_live_upload_grant_creates_and_feeds_only_its_upload(server, lecture_webm):
    r = requests.post(f"{server.url}/v1/uploads", headers=AUTH, json={"language": "en", "live": True}, timeout=10)
    assert r.status_code == 201 and r.json()["upload_url"] == "/v1/live", r.text
    grant = {"Authorization": "Bearer " + r.json()["token"]}
    one_shot = requests.post(f"{server.url}/v1/uploads", headers=AUTH, json={"language": "en"}, timeout=10).json()
    refused = create(server, headers={"Upload-Defer-Length": "1", "Authorization": "Bearer " + one_shot["token"]})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "upload_grant_not_accepted"
    r = create(server, headers={"Upload-Defer-Length": "1", **grant}, data=lecture_webm[:5000])
    assert r.status_code == 201, r.text
    location = r.headers["Location"]
    # The same grant again (a retried POST): the same upload, never a second job.
    again = create(server, headers={"Upload-Defer-Length": "1", **grant})
    assert again.status_code == 201 and again.headers["Location"] == location
    assert again.headers["Idempotent-Replayed"] == "true"
    assert head(server, location, auth=grant).headers["Upload-Offset"] == "5000"
    assert patch(server, location, 5000, lecture_webm[5000:9000], auth=grant).status_code == 204
    other = requests.post(f"{server.url}/v1/uploads", headers=AUTH, json={"live": True}, timeout=10).json()
    assert head(server, location, auth={"Authorization": "Bearer " + other["token"]}).status_code == 404
    assert head(server, location, auth={"Authorization": "Bearer " + one_shot["token"]}).status_code == 403
    assert requests.delete(server.url + location, headers={**grant, **TUS}, timeout=10).status_code == 204


# -- durability and expiry: a server of their own ----------------------------------------------------------

def test_kill_9_mid_upload_resumes_at_the_acknowledged_offset(model_dir, tmp_path, lecture_webm):
    path = tmp_path / "lecture.webm"
    path.write_bytes(lecture_webm)
    first = new_server(model_dir, tmp_path / "s").start()
    try:
        uploader = tus_client.TusClient(f"{first.url}/v1/live", headers=AUTH).uploader(
            str(path), chunk_size=16_000, metadata={"language": "en"}, upload_checksum=True)
        uploader.upload(stop_at=len(lecture_webm) // 2)
        acknowledged = uploader.offset
        job_id = head(first, uploader.url.removeprefix(first.url)).headers["Whisper-Job-Id"]
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    audio_file = tmp_path / "s" / "state" / "spool" / f"{job_id}.audio"
    assert audio_file.read_bytes() == lecture_webm[:acknowledged]
    # A PATCH the crash cut short: written, never acknowledged. It must not become part of the upload.
    with open(audio_file, "ab") as f:
        f.write(lecture_webm[acknowledged:acknowledged + 7000])
    second = new_server(model_dir, tmp_path / "s")
    second.port, second.url = first.port, first.url  # the client comes back to the same address
    second.env["WHISPER_PORT"] = str(first.port)
    second.start()
    try:
        # tuspy, given the upload's URL, asks HEAD for the offset and goes on from there.
        resumed = tus_client.TusClient(f"{second.url}/v1/live", headers=AUTH).uploader(
            str(path), url=uploader.url, chunk_size=16_000, upload_checksum=True)
        assert resumed.offset == acknowledged
        resumed.upload()
        state = wait_finished(second, job_id)
        assert state["status"] == "succeeded", state
        assert wer(reference("lecture_en_60s"), transcript(second, job_id)) <= LECTURE_WER
        assert list(audio_file.parent.iterdir()) == []
        assert state["attempts"] == 1  # the job never ran before the upload was complete
    finally:
        assert second.stop() == 0


def test_an_idle_upload_is_finalized_with_what_it_received(model_dir, tmp_path, lecture_webm):
    server = new_server(model_dir, tmp_path / "s", WHISPER_LIVE_IDLE_TIMEOUT_S="2").start()
    try:
        r = create(server, headers={"Upload-Defer-Length": "1"}, data=lecture_webm)
        location, job_id = r.headers["Location"], r.headers["Whisper-Job-Id"]
        state = wait_finished(server, job_id)  # nobody declares the length: the idle timeout ends the upload
        assert state["status"] == "succeeded", state
        assert wer(reference("lecture_en_60s"), transcript(server, job_id)) <= LECTURE_WER
        r = head(server, location)
        assert r.headers["Upload-Offset"] == str(len(lecture_webm)) and "Upload-Expires" not in r.headers
        assert patch(server, location, len(lecture_webm), b"x").status_code == 403
        assert "idle for 2 s: finalized" in server.logs()
        # An upload that received nothing ends as a failed job, not as a silent one.
        empty = create(server, headers={"Upload-Defer-Length": "1"}).headers["Whisper-Job-Id"]
        state = wait_finished(server, empty, timeout=30)
        assert state["status"] == "failed" and state["error"]["code"] == "no_audio"
        assert list((tmp_path / "s" / "state" / "spool").iterdir()) == []
    finally:
        assert server.stop() == 0


def test_tuspy_sees_the_servers_errors(server, tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"\0" * (3 * 1024 * 1024))
    with pytest.raises(TusCommunicationError) as raised:
        tus_client.TusClient(f"{server.url}/v1/live", headers=AUTH).uploader(str(path)).upload()
    assert raised.value.status_code == 413
