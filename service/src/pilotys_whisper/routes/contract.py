"""The original contract: POST /transcribe with a multipart file and the key, answering {text, language, segments}."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ..formats import to_legacy
from ..state import ServiceState
from .transcription import TranscriptionParams, run_transcription


def blueprint(state: ServiceState) -> Blueprint:
    bp = Blueprint("contract", __name__)

    @bp.post("/transcribe")
    def transcribe_legacy():
        state.authenticate()
        state.admission.refuse_if_full()
        params = TranscriptionParams.parse(state, legacy=True)
        result = run_transcription(state, params)
        return jsonify(to_legacy(result))

    return bp
