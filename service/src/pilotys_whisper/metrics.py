"""Prometheus metrics: requests by route and status, queue depth, in-flight work, audio and processing time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class Metrics:
    def __init__(self, admission, model_label: str, engine: str):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("whisper_http_requests_total", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.audio_seconds = Counter("whisper_audio_seconds_total", "Seconds of audio transcribed", registry=r)
        self.processing_seconds = Counter("whisper_processing_seconds_total",
                                          "Seconds spent transcribing (decode, VAD, model)", registry=r)
        self.real_time_factor = Histogram(
            "whisper_real_time_factor", "Processing time divided by audio duration, per transcription",
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0), registry=r)
        self.transcriptions = Counter("whisper_transcriptions_total", "Transcriptions by outcome",
                                      ["outcome"], registry=r)
        queue = Gauge("whisper_queue_depth", "Synchronous requests waiting for a transcription slot", registry=r)
        queue.set_function(lambda: admission.waiting)
        in_flight = Gauge("whisper_in_flight", "Transcriptions running now", registry=r)
        in_flight.set_function(lambda: admission.running)
        self.ready = Gauge("whisper_model_ready", "1 once the model is loaded", registry=r)
        info = Gauge("whisper_model_info", "The served model", ["model", "engine"], registry=r)
        info.labels(model=model_label, engine=engine).set(1)
        self.jobs = Gauge("whisper_jobs", "Jobs by status", ["status"], registry=r)

    def observe_transcription(self, audio_s: float, processing_s: float) -> None:
        self.audio_seconds.inc(audio_s)
        self.processing_seconds.inc(processing_s)
        if audio_s > 0:
            self.real_time_factor.observe(processing_s / audio_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
