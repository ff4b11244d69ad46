"""The jobs API: POST /v1/jobs, its list, status, result, cancellation and event stream, and upload grants
(POST /v1/uploads) that let a browser create one job without the key."""

from __future__ import annotations

import json

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.datastructures import MultiDict

from .. import grants
from ..errors import ApiError
from ..fields import FormFields, idempotency_key
from ..formats import RESPONSE_FORMATS, render
from ..jobs import FINISHED, STATUSES, JobManager
from ..jobs.schema import iso, load_result
from ..state import ServiceState
from .event_stream import StreamSlots, event_stream_response, job_events, last_event_id
from .transcription import TranscriptionParams


def blueprint(state: ServiceState, manager: JobManager) -> Blueprint:
    bp = Blueprint("jobs", __name__)
    stream_slots = StreamSlots(state.settings.max_event_streams)

    @bp.post("/v1/uploads")
    def grant_upload():
        """An upload grant (grants.py): a token a browser uses to create one job without the API key."""
        principal = state.authenticate()
        body = request.get_json(silent=True) if request.is_json else request.form.to_dict(flat=False)
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_body", "send the grant's options as a JSON object (or a form)")
        body = {k: (v[0] if isinstance(v, list) and len(v) == 1 and k != "timestamp_granularities[]" else v)
                for k, v in body.items()}
        fields = grants.requested_fields(body)
        FormFields.check(state, MultiDict(fields))
        if fields.get("callback_url"):
            manager.check_callback(principal, str(fields["callback_url"]))
        key = idempotency_key(body.get("idempotency_key"), param="idempotency_key")
        live = body.get("live") in (True, "true", "1")
        token, grant = grants.issue(state.keyring, principal, fields, idempotency_key=key,
                                    ttl_s=grants.ttl(body), live=live)
        return jsonify(object="upload_grant", token=token, upload_url="/v1/live" if live else "/v1/jobs",
                       method="POST", live=live,
                       expires_at=iso(grant.expires_at), idempotency_key=grant.idempotency_key), 201

    @bp.post("/v1/jobs")
    def submit():
        authorization = request.headers.get("Authorization")
        if grants.is_grant(authorization):
            # A browser with an upload grant: the options and the idempotency key are the grant's, not the form's.
            grant = grants.verify(state.keyring, authorization)
            if grant.live:
                raise grants.not_accepted("this upload grant is for a live upload (POST /v1/live)")
            g.principal = principal = grant.principal
            key, fields = grant.idempotency_key, MultiDict(grant.fields)
        else:
            principal = state.authenticate()
            key = idempotency_key(request.headers.get("Idempotency-Key"), param=None)
            fields = request.form
        if key:
            existing = manager.by_idempotency_key(principal.owner, key)
            if existing is not None:
                return _replayed(manager, existing)
        callback_url = (fields.get("callback_url") or "").strip() or None
        if callback_url:
            manager.check_callback(principal, callback_url)
        params = TranscriptionParams.parse(state, require_ready=False, fields=fields)
        row, replayed = manager.accept(
            principal.owner, upload_path=params.path, size=params.size, options=params.options,
            speaker_options=params.speakers, filename=params.filename, response_format=params.response_format,
            callback_url=callback_url, idempotency_key=key)
        if replayed:
            return _replayed(manager, row)
        g.audio_s = params.options.duration_hint
        response = jsonify(manager.view(row))
        response.headers["Location"] = f"/v1/jobs/{row['id']}"
        return response, 202

    @bp.get("/v1/jobs")
    def list_jobs():
        principal = state.authenticate()
        try:
            limit = min(max(int(request.args.get("limit", 20)), 1), 100)
        except ValueError as exc:
            raise ApiError(400, "invalid_limit", "limit must be a number from 1 to 100", param="limit") from exc
        status = request.args.get("status")
        if status is not None and status not in STATUSES:
            raise ApiError(400, "invalid_status", f"status must be one of {', '.join(STATUSES)}", param="status")
        return jsonify(object="list", data=[manager.view(r) for r in manager.listed(principal.owner, status, limit)])

    def owned(job_id: str):
        return manager.owned(state.authenticate().owner, job_id)

    @bp.get("/v1/jobs/<job_id>")
    def show(job_id: str):
        return jsonify(manager.view(owned(job_id), with_speakers=True))

    @bp.get("/v1/jobs/<job_id>/events")
    def stream_events(job_id: str):
        """Server-Sent Events: the job's final segments, its progress and its outcome (event_stream.py)."""
        owned(job_id)
        after = last_event_id(request.headers.get("Last-Event-ID") or request.args.get("last_event_id"))
        outcome = manager.events.outcome_seq(job_id) if after else None
        if outcome is not None and after >= outcome:
            return Response(status=204)  # the client saw the outcome: 204 tells an EventSource not to reconnect
        gone = request.environ.get("waitress.client_disconnected", lambda: False)
        return event_stream_response(stream_slots.hold(job_events(manager, job_id, after, gone)))

    @bp.delete("/v1/jobs/<job_id>")
    def cancel(job_id: str):
        row = manager.cancel(owned(job_id))
        return jsonify(manager.view(row)), 200 if row["status"] in FINISHED else 202

    @bp.get("/v1/jobs/<job_id>/result")
    def result(job_id: str):
        row = owned(job_id)
        fmt = request.args.get("format", row["response_format"])
        if fmt not in RESPONSE_FORMATS:
            raise ApiError(400, "invalid_response_format",
                           f"format must be one of {', '.join(RESPONSE_FORMATS)}", param="format")
        if row["status"] != "succeeded":
            raise ApiError(409, "job_not_succeeded", f"the job is {row['status']}; its result is available once "
                           "it has succeeded", headers={"Retry-After": "5"} if row["status"] not in FINISHED else {})
        options = json.loads(row["options"])
        transcription = load_result(row["result"])
        if fmt == "diarized_json" and "speakers" not in options:
            raise ApiError(400, "job_not_diarized", "the job was not diarized: submit it with diarize=true to get "
                           "diarized_json", param="format")
        granularities = ("segment", "word") if options.get("word_timestamps") else ("segment",)
        body, content_type = render(transcription, fmt, options.get("task", "transcribe"), granularities)
        if isinstance(body, dict):
            return jsonify(body)
        return Response(body, content_type=content_type)

    return bp


def _replayed(manager: JobManager, row):
    response = jsonify(manager.view(row))
    response.headers["Idempotent-Replayed"] = "true"
    return response, 200
