"""The OpenAPI contract (openapi.yaml): it lists exactly the app's routes, and schemathesis finds no 5xx and no
answer outside it on a live service with the real model."""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
import subprocess
import sys
import time
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi import checks as contract_checks

from pilotys_whisper import __version__
from pilotys_whisper.app import create_app
from pilotys_whisper.errors import ApiError
from pilotys_whisper.openapi import document
from pilotys_whisper.settings import LANGUAGES

from conftest import HERE, KEY, FakeEngine, ServerProcess, make_settings

AUTH = {"Authorization": f"Bearer {KEY}"}


def _spec_operations(spec: dict) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
    return {(path, method.upper()) for path, item in spec["paths"].items() for method in item if method in methods}


def _declared_methods(rule) -> set[str]:
    """A rule's methods without those Flask adds by itself: HEAD beside GET (Werkzeug), and OPTIONS where the
    route did not declare its own (tus's OPTIONS and HEAD on /v1/live are operations of their own)."""
    methods = set(rule.methods)
    if "GET" in methods:
        methods.discard("HEAD")
    if rule.provide_automatic_options:
        methods.discard("OPTIONS")
    return methods


def _app_operations(app) -> set[tuple[str, str]]:
    # Flask writes /v1/jobs/<job_id>, OpenAPI /v1/jobs/{job_id}.
    return {(re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule), method)
            for rule in app.url_map.iter_rules() for method in _declared_methods(rule)}


@pytest.fixture
def full_app(tmp_path):
    """The app with every optional part switched on (jobs need WHISPER_STATE_DIR)."""
    return create_app(make_settings(WHISPER_STATE_DIR=tmp_path / "state", WHISPER_TMP_DIR=tmp_path),
                      FakeEngine(), load_model=False)


def test_every_route_of_the_app_is_in_the_spec_and_back(full_app):
    in_app, in_spec = _app_operations(full_app), _spec_operations(document())
    assert in_app - in_spec == set(), "routes missing from openapi.yaml"
    assert in_spec - in_app == set(), "openapi.yaml describes routes the app does not have"


def test_the_spec_is_valid_openapi_3_1(full_app):
    served = full_app.test_client().get("/openapi.json").get_json()
    for spec in (document(), served):
        schema = schemathesis.openapi.from_dict(copy.deepcopy(spec))
        schema.validate()  # against the OpenAPI 3.1 meta-schema
        operations = list(schema.get_all_operations())
        assert all(result.ok() for result in operations) and len(operations) == len(_spec_operations(spec))
    broken = copy.deepcopy(document())
    broken["paths"]["/health"]["get"]["responses"]["200"].pop("description")
    with pytest.raises(Exception, match="description"):  # the check itself can fail
        schemathesis.openapi.from_dict(broken).validate()


def test_openapi_json_is_served_without_a_key(full_app):
    response = full_app.test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    served = response.get_json()
    assert served["paths"] == document()["paths"] and served["info"]["version"] == __version__


def test_the_built_wheel_ships_the_spec(tmp_path):
    """The roles install the wheel: /openapi.json must work there, not only from a source checkout."""
    source = tmp_path / "source"  # a copy, as the role builds it: no build/ or egg-info in the checkout
    shutil.copytree(HERE.parent, source, ignore=shutil.ignore_patterns("tests", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("pilotys_whisper-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "pilotys_whisper/openapi.yaml" in archive.namelist()


def test_the_served_document_lists_the_model_names_this_instance_accepts(full_app):
    settings = full_app.extensions["whisper"].settings
    served = full_app.test_client().get("/openapi.json").get_json()
    assert served["components"]["schemas"]["ModelName"]["enum"] == sorted(settings.model_aliases)
    assert "enum" not in document()["components"]["schemas"]["ModelName"], "the cached document was changed"


def test_the_languages_are_the_service_s_own():
    assert set(document()["components"]["schemas"]["Language"]["enum"]) == LANGUAGES | {"auto"}


def test_the_error_schema_is_what_api_error_renders():
    schema = schemathesis.openapi.from_dict(copy.deepcopy(document()))
    error = document()["components"]["schemas"]["Error"]
    for err in (ApiError(429, "server_busy", "busy", headers={"Retry-After": "3"}),
                ApiError(400, "invalid_temperature", "temperature must be...", param="temperature")):
        assert set(err.body()) == {"error"} and err.body()["error"]["type"] in error["properties"]["error"][
            "properties"]["type"]["enum"]
    request = requests.Request("POST", "http://127.0.0.1/v1/audio/transcriptions").prepare()

    def answer(headers):
        return schemathesis.Response(status_code=429, headers={"content-type": ["application/json"], **headers},
                                     content=ApiError(429, "server_busy", "busy").json_bytes(), request=request,
                                     elapsed=0.0, verify=False)

    with pytest.raises(FailureGroup) as broken:  # a 429 without Retry-After breaks the contract
        _conforms(schema, "POST", "/v1/audio/transcriptions", answer({}))
    assert "Retry-After" in str(broken.value.exceptions[0])
    _conforms(schema, "POST", "/v1/audio/transcriptions", answer({"retry-after": ["3"]}))


# -- the live service: real model, real process ------------------------------------------------------------

@pytest.fixture(scope="module")
def media(tmp_path_factory, audio) -> Path:
    """What the contract run uploads: cheap for the model (silence, which the VAD drops, and files refused
    before decoding), so that its budget goes to many requests rather than to a few transcriptions."""
    root = tmp_path_factory.mktemp("media")
    silence = _wav(np.zeros(16000, dtype=np.int16))
    (root / "silence.wav").write_bytes(silence)
    (root / "truncated.wav").write_bytes(silence[:3000])  # its header announces 1 s, 0.09 s follow
    (root / "unknown-codec.wav").write_bytes(silence[:20] + b"\x34\x12" + silence[22:200])  # format tag 0x1234
    shutil.copy(audio("video_no_audio.mp4"), root / "no-audio.mp4")
    return root


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """Two seconds of French that the model gets right at its first decode (a few seconds of CPU)."""
    path = tmp_path_factory.mktemp("speech") / "bonjour.wav"
    subprocess.run(["espeak-ng", "-v", "fr+m3", "-s", "125", "-w", str(path), "Bonjour à tous, la réunion commence."],
                   check=True)
    return path


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


@pytest.fixture(scope="module")
def live(model_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    uploads = tmp_path_factory.mktemp("uploads")
    proc = ServerProcess({"WHISPER_MODEL": str(model_dir), "WHISPER_API_KEY": KEY, "WHISPER_STATE_DIR": str(state),
                          "WHISPER_JOB_PURGE_INTERVAL_S": "1"}, uploads).start()
    yield proc
    code = proc.stop()
    logs = proc.logs()
    assert code == 0, f"SIGTERM must stop the service cleanly:\n{logs}"
    assert list(uploads.iterdir()) == [], "temporary uploads left behind"
    assert "Traceback" not in logs and "unexpected error" not in logs, logs


@pytest.fixture(scope="module")
def contract(live):
    """The document the live service serves, ready to validate responses with."""
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


# What "in the contract" means for one answer: a documented status, content type and headers, and a body of
# the documented schema.
CONFORMANCE = [contract_checks.status_code_conformance, contract_checks.content_type_conformance,
               contract_checks.response_headers_conformance, contract_checks.response_schema_conformance]


def _conforms(schema, method: str, path: str, response) -> None:
    schema[path][method].Case().validate_response(response, checks=CONFORMANCE)


def _check(contract, method: str, path: str, response: requests.Response, status: int) -> requests.Response:
    assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text[:500]}"
    _conforms(contract, method, path, response)
    return response


@pytest.mark.model
@pytest.mark.server
def test_real_transcripts_and_jobs_match_the_contract(live, contract, speech, media):
    """What schemathesis rarely reaches by chance: real speech through every kind of 2xx, each answer checked
    against the document the service serves (status, content type, headers, body schema)."""
    url, audio = live.url, speech.read_bytes()
    silence = (media / "silence.wav").read_bytes()

    def post(path, data=None, file=audio, headers=AUTH):
        return requests.post(url + path, headers=headers, data=data, files={"file": ("a.wav", file)}, timeout=120)

    legacy = _check(contract, "POST", "/transcribe", post("/transcribe"), 200)
    assert "bonjour" in legacy.json()["text"].lower()
    verbose = _check(contract, "POST", "/v1/audio/transcriptions",
                     post("/v1/audio/transcriptions", {"response_format": "verbose_json", "language": "fr",
                                                       "timestamp_granularities[]": ["word", "segment"]}), 200)
    assert verbose.json()["words"], "word timestamps asked for"
    for fmt in ("json", "text", "srt", "vtt"):
        _check(contract, "POST", "/v1/audio/transcriptions",
               post("/v1/audio/transcriptions", {"response_format": fmt}, file=silence), 200)
    _check(contract, "POST", "/v1/audio/translations", post("/v1/audio/translations", file=silence), 200)
    _check(contract, "GET", "/v1/models", requests.get(url + "/v1/models", headers=AUTH, timeout=5), 200)

    # A job on real speech, then every view of it.
    created = _check(contract, "POST", "/v1/jobs", post("/v1/jobs", {"response_format": "srt"},
                                                       headers={**AUTH, "Idempotency-Key": "contract-1"}), 202)
    job = created.json()
    _check(contract, "POST", "/v1/jobs", post("/v1/jobs", headers={**AUTH, "Idempotency-Key": "contract-1"}), 200)
    deadline = time.monotonic() + 120
    while job["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = _check(contract, "GET", "/v1/jobs/{job_id}",
                     requests.get(url + created.headers["Location"], headers=AUTH, timeout=5), 200).json()
    assert job["status"] == "succeeded", job
    for fmt in ("json", "text", "srt", "vtt", "verbose_json"):
        _check(contract, "GET", "/v1/jobs/{job_id}/result",
               requests.get(url + job["links"]["result"], params={"format": fmt}, headers=AUTH, timeout=5), 200)
    _check(contract, "GET", "/v1/jobs", requests.get(url + "/v1/jobs", headers=AUTH, timeout=5), 200)
    _check(contract, "DELETE", "/v1/jobs/{job_id}", requests.delete(url + job["links"]["cancel"], headers=AUTH,
                                                                     timeout=5), 409)

    # An upload grant: the browser's job, its replay, and the grant refused elsewhere.
    grant = _check(contract, "POST", "/v1/uploads", requests.post(url + "/v1/uploads", headers=AUTH, timeout=5,
                                                                  json={"language": "fr", "expires_in": 60}), 201)
    as_browser = {"Authorization": f"Bearer {grant.json()['token']}"}
    _check(contract, "POST", "/v1/jobs", post("/v1/jobs", file=silence, headers=as_browser), 202)
    _check(contract, "POST", "/v1/jobs", post("/v1/jobs", file=silence, headers=as_browser), 200)
    refused = requests.get(url + "/v1/models", headers=as_browser, timeout=5)
    assert refused.status_code == 403  # a valid token without the scope: insufficient_scope (RFC 6750 3.1)
    _check(contract, "GET", "/v1/models", refused, 403)
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        _check(contract, "GET", path, requests.get(url + path, timeout=5), 200)


# Bounded work: each of the 21 operations gets at most this many generated requests per phase (examples,
# coverage, fuzzing, stateful): about 1600 requests, most refused before any decoding.
MAX_EXAMPLES = 30
SEED = int(os.environ.get("PILOTYS_CONTRACT_SEED", "20261201"))  # fixed: the same run each time, unless asked
# Every check but three that do not fit this API: positive_data_acceptance (the document cannot tell audio from
# other bytes: a valid form with a PNG gets 415), negative_data_rejection (an empty form field means "absent",
# as in OpenAI's API) and use_after_free (DELETE cancels a job, which stays readable).
CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "missing_required_header", "unsupported_method", "allow_header_conformance",
    "ensure_resource_availability", "ignored_auth",
])


@pytest.mark.model
@pytest.mark.server
def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_contract(live, media):
    run = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", live.url + "/openapi.json",
         "--header", f"Authorization: Bearer {KEY}", "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES),
         "--phases", "examples,coverage,fuzzing,stateful", "--workers", "1", "--seed", str(SEED),
         "--request-timeout", "30", "--generation-database", "none", "--no-color"],
        env={**os.environ, "SCHEMATHESIS_HOOKS": "contract_hooks", "PILOTYS_CONTRACT_MEDIA": str(media),
             "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])},
        capture_output=True, text=True, timeout=300, cwd=media)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated.group(1)) >= 500, report  # it did run, at about its usual size
    print(report[report.find("SUMMARY"):])  # with -s: the phases, warnings and the number of requests
    health = requests.get(live.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["ready"], "the service must be up and ready afterwards"
