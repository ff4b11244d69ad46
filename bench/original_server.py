"""The original server, as PILOTYS's guide wrote it: openai-whisper behind a minimal Flask app (the baseline).

Kept deliberately naive: one model loaded at start, each upload saved to a temporary file and passed to
`model.transcribe` with openai-whisper's defaults (greedy with temperature fallback, conditioned on the
previous text), fp32 on a CPU. Do not improve it: the benchmark measures our service against this.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import whisper
from flask import Flask, jsonify, request
from waitress import serve


def create_app(model_path: str) -> Flask:
    app = Flask("original_server")
    model = whisper.load_model(model_path, device="cpu")

    @app.post("/transcribe")
    def transcribe():
        upload = request.files["file"]
        suffix = os.path.splitext(upload.filename or "")[1]
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            upload.save(tmp.name)
            result = model.transcribe(tmp.name, language=request.form.get("language") or "fr", fp16=False)
        return jsonify(text=result["text"], language=result["language"], segments=result["segments"])

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="openai-whisper checkpoint (.pt) or model name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    # The model is loaded before the port opens: once it answers, it is ready.
    serve(create_app(args.model), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
