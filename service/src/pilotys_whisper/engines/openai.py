"""openai-whisper engine, for those who want the original implementation (optional dependency, PyTorch).

WHISPER_MODEL is a model name (downloaded by openai-whisper into WHISPER_MODEL_CACHE_DIR), the path of a
checkpoint (.pt), or a directory holding one checkpoint (what the Ansible role provisions, downloaded by
`whisper-service fetch-model NAME DIR --engine openai-whisper` or shipped from the controller).
Slower and heavier than faster-whisper on a CPU; it decodes the whole file in memory.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ..audio import SAMPLE_RATE, decode_all
from . import (
    Cancelled,
    HoldFn,
    ProgressFn,
    Segment,
    SegmentsFn,
    StopFn,
    TranscribeOptions,
    Transcription,
    Word,
    release_free_memory,
)

log = logging.getLogger(__name__)


def checkpoint_in(directory: Path) -> Path:
    """The one openai-whisper checkpoint (*.pt) in a model directory; ValueError saying what is wrong otherwise."""
    found = sorted(p for p in directory.glob("*.pt") if p.is_file())
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{directory} holds several checkpoints ({', '.join(p.name for p in found)}): keep one")
    hint = (": it is a faster-whisper (CTranslate2) model, set WHISPER_ENGINE=faster-whisper"
            if (directory / "model.bin").is_file() else "")
    raise ValueError(f"{directory} holds no openai-whisper checkpoint (*.pt){hint}")


def resolve_model(model: str) -> str:
    """What whisper.load_model accepts: a name, or a checkpoint file (a directory's one checkpoint)."""
    path = Path(model)
    return str(checkpoint_in(path)) if path.is_dir() else model


class OpenAIWhisperEngine:
    name = "openai-whisper"

    def __init__(self, settings):
        self.settings = settings
        self.device = settings.device
        self._model = None

    def load(self) -> None:
        try:
            import torch
            import whisper
        except ImportError as exc:
            raise RuntimeError("WHISPER_ENGINE=openai-whisper needs the optional dependency: "
                               "pip install 'pilotys-whisper[openai-whisper]'") from exc
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.settings.cpu_threads:
            torch.set_num_threads(self.settings.cpu_threads)
        root = str(self.settings.model_cache_dir) if self.settings.model_cache_dir else None
        model = resolve_model(self.settings.model)
        self._model = whisper.load_model(model, device=device, download_root=root)
        # A checkpoint loaded from a file loses the cross-attention heads that time words; a file named after an
        # official model (fetch-model writes NAME.pt) gets that model's heads back.
        heads = whisper._ALIGNMENT_HEADS.get(Path(model).stem) if model.endswith(".pt") else None  # noqa: SLF001
        if heads is not None:
            try:
                self._model.set_alignment_heads(heads)
            except (ValueError, RuntimeError):  # named like an official model, shaped otherwise
                log.warning("%s: not shaped like the official model of that name; word timings use the "
                            "default heads", model)
        self.device = device
        log.info("model %s loaded on %s with openai-whisper", self.settings.model_label, device)

    def transcribe(self, path: str, options: TranscribeOptions, progress: ProgressFn | None = None,
                   should_stop: StopFn | None = None, on_segments: SegmentsFn | None = None,
                   hold: HoldFn | None = None, on_speech=None) -> Transcription:
        assert self._model is not None, "load() first"  # no VAD of its own: on_speech is never called
        audio = decode_all(path, max_seconds=options.max_duration_s)
        if should_stop is not None and should_stop():
            raise Cancelled()
        duration = audio.shape[0] / SAMPLE_RATE
        temperatures = (options.temperature,) if options.temperature > 0 else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
        try:
            with hold() if hold is not None else contextlib.nullcontext():
                result = self._model.transcribe(
                    audio, language=options.language, task=options.task, initial_prompt=options.prompt,
                    temperature=temperatures, word_timestamps=options.word_timestamps,
                    fp16=self.device == "cuda", verbose=None)
        finally:
            del audio
            release_free_memory()  # the whole recording's spectrogram and the decoder's caches
        segments = []
        for index, seg in enumerate(result["segments"]):
            words = None
            if options.word_timestamps:
                words = [Word(start=round(w["start"], 3), end=round(w["end"], 3), word=w["word"],
                              probability=round(float(w["probability"]), 4)) for w in seg.get("words", [])]
            segments.append(Segment(
                id=index, start=round(seg["start"], 3), end=round(seg["end"], 3), text=seg["text"],
                tokens=list(seg["tokens"]), avg_logprob=round(seg["avg_logprob"], 4),
                compression_ratio=round(seg["compression_ratio"], 4), no_speech_prob=round(seg["no_speech_prob"], 4),
                temperature=seg["temperature"], seek=seg["seek"], words=words))
        if progress is not None:
            progress(duration, duration)
        if on_segments is not None and segments:
            on_segments(segments)  # openai-whisper tells nothing before the end
        return Transcription(text=result["text"].strip(), language=result.get("language"),
                             duration=round(duration, 3), segments=segments)
