"""Live uploads over tus 1.0 at /v1/live (https://tus.io/protocols/resumable-upload): the protocol's headers,
requests and answers. What an upload is and how it is kept: jobs/live.py."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from email.utils import formatdate

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.datastructures import MultiDict

from .. import grants
from ..engines import TranscribeOptions
from ..errors import ApiError
from ..fields import FormFields, idempotency_key
from ..jobs import LiveUploads
from ..jobs.live import not_found
from ..state import ServiceState

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = ("creation", "creation-with-upload", "creation-defer-length", "termination", "expiration",
                  "checksum")
CHECKSUMS = {"sha1": hashlib.sha1}
CHUNK_CONTENT_TYPE = "application/offset+octet-stream"
# Upload-Metadata keys: the fields of POST /v1/jobs, and those tus clients add on their own (ignored).
METADATA_FIELDS = ("language", "model", "prompt", "response_format", "temperature", "timestamp_granularities",
                   "callback_url", "idempotency_key")
METADATA_IGNORED = ("filename", "filetype", "name", "type", "relativePath")
# Headers a browser must be allowed to send and to read (CORS, app.py).
REQUEST_HEADERS = ("Tus-Resumable", "Upload-Length", "Upload-Offset", "Upload-Metadata", "Upload-Defer-Length",
                   "Upload-Checksum", "Upload-Concat")
RESPONSE_HEADERS = ("Location", "Upload-Offset", "Upload-Length", "Upload-Defer-Length", "Upload-Expires",
                    "Tus-Resumable", "Tus-Version", "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm",
                    "Whisper-Job-Id", "Whisper-Transcribed-S")


def blueprint(state: ServiceState, live: LiveUploads) -> Blueprint:
    bp = Blueprint("live", __name__)
    settings = state.settings

    @bp.after_request
    def tus_headers(response: Response) -> Response:
        if request.method != "OPTIONS":
            response.headers["Tus-Resumable"] = TUS_VERSION
        response.headers["Cache-Control"] = "no-store"
        return response

    def options(upload_id: str | None = None):
        """The server's capabilities (no key needed, as tus clients ask before anything else)."""
        response = Response(status=204)
        response.headers.update({"Tus-Version": TUS_VERSION, "Tus-Extension": ",".join(TUS_EXTENSIONS),
                                 "Tus-Max-Size": str(settings.max_upload_bytes),
                                 "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)})
        return response

    bp.add_url_rule("/v1/live", view_func=options, methods=["OPTIONS"], provide_automatic_options=False)
    bp.add_url_rule("/v1/live/<upload_id>", view_func=options, methods=["OPTIONS"],
                    provide_automatic_options=False)

    @bp.post("/v1/live")
    def create():
        _check_request()
        authorization = request.headers.get("Authorization")
        grant_key = None
        if grants.is_grant(authorization):
            grant = grants.verify(state.keyring, authorization)
            if not grant.live:
                raise _one_shot_grant()
            g.principal = principal = grant.principal
            key = grant_key = grant.idempotency_key
            fields, metadata = MultiDict(grant.fields), _metadata()
        else:
            principal = state.authenticate()
            metadata = _metadata()
            key = idempotency_key(metadata.pop("idempotency_key", None) or request.headers.get("Idempotency-Key"),
                                  param=None)
            fields = MultiDict({k: v for k, v in metadata.items() if k in METADATA_FIELDS})
            if "timestamp_granularities" in fields:
                fields.setlist("timestamp_granularities[]", fields.pop("timestamp_granularities").split(","))
        length = _integer("Upload-Length")
        deferred = request.headers.get("Upload-Defer-Length")
        if deferred is not None and deferred.strip() != "1":
            raise ApiError(400, "invalid_upload_defer_length", "Upload-Defer-Length may only be 1")
        if (length is None) == (deferred is None):
            raise ApiError(400, "missing_upload_length",
                           "send either Upload-Length or Upload-Defer-Length: 1 (length declared later)")
        if length is not None and length > settings.max_upload_bytes:
            raise ApiError(413, "file_too_large", f"the upload is larger than {settings.max_upload_mb} MB")
        if key:
            existing = live.manager.by_idempotency_key(principal.owner, key)
            if existing is not None:
                return _replayed(live.upload_of_job(existing))
        checked = FormFields.check(state, fields)
        callback_url = (fields.get("callback_url") or "").strip() or None
        if callback_url:
            live.manager.check_callback(principal, callback_url)
        transcribe = TranscribeOptions(language=checked.language, prompt=checked.prompt,
                                       temperature=checked.temperature,
                                       word_timestamps="word" in checked.granularities)
        upload, replayed = live.create(principal.owner, options=transcribe, response_format=checked.response_format,
                                       filename=metadata.get("filename") or "live", length=length,
                                       callback_url=callback_url, idempotency_key=key, grant_key=grant_key)
        if replayed:
            return _replayed(upload)
        status, error = 201, None
        if request.mimetype == CHUNK_CONTENT_TYPE and (request.content_length or request.headers.get(
                "Transfer-Encoding")):
            try:
                upload = _append(upload["id"], offset=0)
            except ApiError as exc:  # the upload exists: say where it is, with the error
                error = exc
                upload = live.row(upload["id"])
        if error is not None:
            response = jsonify(error.body())
            status = error.status
        else:
            response = Response(status=status)
        response.status_code = status
        response.headers.update(_upload_headers(upload))
        response.headers["Location"] = f"/v1/live/{upload['id']}"
        return response

    @bp.route("/v1/live/<upload_id>", methods=["HEAD"])
    def status(upload_id: str):
        _check_request()
        response = Response(status=200)
        response.headers.update(_upload_headers(_owned(upload_id)))
        return response

    @bp.patch("/v1/live/<upload_id>")
    def append(upload_id: str):
        _check_request()
        _owned(upload_id)
        if request.mimetype != CHUNK_CONTENT_TYPE:
            raise ApiError(415, "unsupported_media_type", f"a PATCH carries Content-Type: {CHUNK_CONTENT_TYPE}")
        offset = _integer("Upload-Offset")
        if offset is None:
            raise ApiError(400, "missing_upload_offset", "send the offset the data starts at as Upload-Offset")
        response = Response(status=204)
        response.headers.update(_upload_headers(_append(upload_id, offset)))
        return response

    @bp.delete("/v1/live/<upload_id>")
    def terminate(upload_id: str):
        """tus termination: the job is cancelled (a running one at its next chunk) and the audio deleted."""
        _check_request()
        live.terminate(_owned(upload_id))
        return Response(status=204)

    def _append(upload_id: str, offset: int):
        # live.append bounds the body itself (the room the upload has left): the app's bound on bodies that are
        # not files (form fields, a few KB) does not apply.
        request.max_content_length = None
        return live.append(upload_id, offset, request.stream.read, content_length=request.content_length,
                           declared_length=_integer("Upload-Length"), checksum=_checksum())

    def _owned(upload_id: str):
        """The upload, if the API key's client owns it or the live grant that created it is presented."""
        authorization = request.headers.get("Authorization")
        upload = live.row(upload_id)
        if grants.is_grant(authorization):
            grant = grants.verify(state.keyring, authorization)
            g.principal = grant.principal
            if not grant.live:
                raise _one_shot_grant()
            if upload is None or (upload["owner"], upload["grant_key"]) != (grant.principal.owner,
                                                                           grant.idempotency_key):
                raise not_found()
            return upload
        principal = state.authenticate()
        if upload is None or upload["owner"] != principal.owner:
            raise not_found()
        return upload

    def _upload_headers(upload) -> dict[str, str]:
        headers = {"Upload-Offset": str(upload["received"]), "Whisper-Job-Id": upload["job_id"]}
        transcribed = live.transcribed_s.get(upload["id"])
        if transcribed is not None:  # how far the live transcription has gone, in seconds of audio
            headers["Whisper-Transcribed-S"] = f"{transcribed:.1f}"
        if upload["length"] is not None:
            headers["Upload-Length"] = str(upload["length"])
        else:
            headers["Upload-Defer-Length"] = "1"
        if upload["state"] == "receiving":
            expires = upload["updated_at"] + settings.live_idle_timeout_s
            headers["Upload-Expires"] = formatdate(expires, usegmt=True)
        return headers

    def _replayed(upload):
        """The upload an idempotency key already created (a retried POST): where it is, as tus expects."""
        response = Response(status=201)
        response.headers.update(_upload_headers(upload))
        response.headers["Location"] = f"/v1/live/{upload['id']}"
        response.headers["Idempotent-Replayed"] = "true"
        return response

    return bp


def parse_metadata(header: str | None) -> dict[str, str]:
    """Upload-Metadata: comma-separated `key base64(value)` pairs (a key alone: an empty value)."""
    out: dict[str, str] = {}
    for item in (header or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition(" ")
        try:
            out[key] = base64.b64decode(value.strip(), validate=True).decode() if value.strip() else ""
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_upload_metadata",
                           f"Upload-Metadata: the value of {key!r} is not base64 of UTF-8 text") from exc
    return out


def _metadata() -> dict[str, str]:
    metadata = parse_metadata(request.headers.get("Upload-Metadata"))
    unknown = sorted(set(metadata) - set(METADATA_FIELDS) - set(METADATA_IGNORED))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown Upload-Metadata key(s) {', '.join(unknown)}; a live upload "
                       f"takes {', '.join(METADATA_FIELDS)}", param=unknown[0])
    return metadata


def _integer(name: str, low: int = 0) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    if not re.fullmatch(r"[0-9]{1,19}", raw.strip()) or int(raw) < low:
        raise ApiError(400, "invalid_" + name.lower().replace("-", "_"), f"{name} must be a whole number of bytes")
    return int(raw)


def _check_request() -> None:
    version = request.headers.get("Tus-Resumable")
    if version is None:  # not a tus request at all; 412 is for a version the server does not speak (tus 1.0)
        raise ApiError(400, "tus_resumable_required", f"send Tus-Resumable: {TUS_VERSION} (tus 1.0)",
                       headers={"Tus-Version": TUS_VERSION})
    if version != TUS_VERSION:
        raise ApiError(412, "unsupported_tus_version", f"send Tus-Resumable: {TUS_VERSION} (tus 1.0)",
                       headers={"Tus-Version": TUS_VERSION})


def _checksum():
    raw = request.headers.get("Upload-Checksum")
    if raw is None:
        return None
    algorithm, _, value = raw.strip().partition(" ")
    if algorithm not in CHECKSUMS:
        raise ApiError(400, "unsupported_checksum_algorithm",
                       f"Upload-Checksum: this server checks {', '.join(CHECKSUMS)}")
    try:
        return CHECKSUMS[algorithm], base64.b64decode(value.strip(), validate=True)
    except binascii.Error as exc:
        raise ApiError(400, "invalid_upload_checksum", "Upload-Checksum: the value is not base64") from exc


def _one_shot_grant() -> ApiError:
    return grants.not_accepted("this upload grant creates a job with POST /v1/jobs; ask for one with live=true")
