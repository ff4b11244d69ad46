"""Operations: health, readiness, metrics, the OpenAPI document, and the auth check a proxy asks before a body."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .. import __version__, grants
from ..errors import ApiError
from ..grants import is_grant
from ..metrics import CONTENT_TYPE_LATEST
from ..openapi import served as served_openapi
from ..state import ServiceState

# What a proxy asks before it sends a request's body (Caddy's forward_auth): see auth_check.
AUTH_CHECK = "/v1/auth/check"
# The views that verify an upload grant themselves (routes/jobs.py, routes/live.py): refused everywhere else.
GRANT_ENDPOINTS = frozenset({"jobs.submit", "live.create", "live.status", "live.append", "live.terminate"})


def blueprint(state: ServiceState) -> Blueprint:
    bp = Blueprint("ops", __name__)
    settings = state.settings

    @bp.get("/health")
    def health():
        return jsonify(status="ok", model=settings.model_label, engine=state.engine.name,
                       device=state.engine.device, ready=state.ready.is_set(), draining=state.draining.is_set(),
                       in_flight=state.admission.running + state.admission.waiting, version=__version__,
                       diarization=_diarization_health(state))

    @bp.get("/ready")
    def ready():
        state.require_ready()
        if state.draining.is_set():
            raise ApiError(503, "draining", "this instance is draining before a restart; it still serves what it "
                           "receives", headers={"Retry-After": "5"})
        return jsonify(status="ready", model=settings.model_label)

    @bp.get("/metrics")
    def metrics():
        if state.jobs is not None:
            state.jobs.update_metrics()
        return Response(state.metrics.render(), mimetype=CONTENT_TYPE_LATEST)

    @bp.get("/openapi.json")
    def openapi():
        # No key, like /health: the same public contract on every instance, no secret in it, and tools read it
        # before they are given a key.
        return jsonify(served_openapi(tuple(sorted(settings.model_aliases))))

    @bp.get(AUTH_CHECK)
    def auth_check():
        """For the proxy in front (Caddy's forward_auth): would the request that X-Forwarded-Method and
        X-Forwarded-Uri describe (by default, this one) be let in with this Authorization header? 204 if so, or
        the 401/403 that request would get. Nothing but headers is read: the proxy sends the body only after."""
        method = request.headers.get("X-Forwarded-Method", request.method).upper()
        path = unquote(urlsplit(request.headers.get("X-Forwarded-Uri", request.full_path)).path)
        authorization = request.headers.get("Authorization")
        if is_grant(authorization) and _accepts_grants(method, path):
            g.principal = grants.verify(state.keyring, authorization).principal
        else:
            state.authenticate()
        return Response(status=204)

    return bp


def _diarization_health(state: ServiceState) -> dict:
    settings = state.settings
    if not settings.diarization:
        return {"enabled": False}
    model = settings.diarization_model.name if settings.diarization_model is not None else "default"
    return {"enabled": True, "loaded": state.diarizer is not None, "model": model}


def _accepts_grants(method: str, path: str) -> bool:
    """Whether the route at METHOD PATH takes an upload grant instead of the key (creating its one job)."""
    try:
        endpoint, _ = current_app.url_map.bind("localhost").match(path, method=method)
    except HTTPException:
        return False
    return endpoint in GRANT_ENDPOINTS
