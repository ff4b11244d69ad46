"""whisper.cpp as a peer: the `pywhispercpp` package from PyPI behind a minimal Flask app, as bench.py runs servers.

Same shape as original_server.py (one model loaded at start, each upload saved to a temporary file and given
to the library), so that the benchmark compares engines, not HTTP layers. The model is the ggml file that
scripts/ct2_to_ggml.py converts from our own `base` weights. Decoding uses pywhispercpp's defaults (greedy,
best of 5 samples on fallback, temperatures in steps of 0.2, no conditioning on previous text) unless
--beam-size asks for beam search, as whisper.cpp's command-line tool does by default (beam 5).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from flask import Flask, jsonify, request
from pywhispercpp.model import Model
from waitress import serve

CENTISECONDS = 100  # whisper.cpp's segment times are in units of 10 ms


def create_app(model_path: str, threads: int, beam_size: int) -> Flask:
    app = Flask("whispercpp_server")
    options = {"n_threads": threads, "print_progress": False, "print_realtime": False}
    if beam_size > 1:
        # As whisper.cpp's command-line tool sets them: the beam, and the best of 5 samples on fallback.
        options.update(beam_search={"beam_size": beam_size, "patience": -1.0}, greedy={"best_of": 5})
    # redirect_whispercpp_logs_to=None: whisper.cpp's own logs go to /dev/null instead of the server's log.
    model = Model(model_path, params_sampling_strategy=1 if beam_size > 1 else 0, redirect_whispercpp_logs_to=None,
                  **options)

    @app.get("/ready")
    def ready():
        return jsonify(status="ready")  # the model is loaded before the port opens

    @app.post("/transcribe")
    def transcribe():
        upload = request.files["file"]
        language = request.form.get("language") or "fr"
        suffix = os.path.splitext(upload.filename or "")[1]
        with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
            upload.save(tmp.name)
            segments = model.transcribe(tmp.name, language=language)
        return jsonify(text=" ".join(s.text for s in segments), language=language,
                       segments=[{"start": s.t0 / CENTISECONDS, "end": s.t1 / CENTISECONDS, "text": s.text}
                                 for s in segments])

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="whisper.cpp ggml model file (scripts/ct2_to_ggml.py)")
    parser.add_argument("--threads", type=int, default=2, help="whisper.cpp's n_threads (ours uses 2 on 2 cores)")
    parser.add_argument("--beam-size", type=int, default=1, help="1: greedy (pywhispercpp's default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    serve(create_app(args.model, args.threads, args.beam_size), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
