"""Speaker diarization: who speaks when, and each transcript segment's speaker (the [diarization] extra)."""

from .attribution import attribute, speaker_totals
from .engine import Diarizer, default_model_path
from .result import Diarization, DiarizationUnavailable, Turn

__all__ = ["Diarization", "DiarizationUnavailable", "Diarizer", "Turn", "attribute", "default_model_path",
           "speaker_totals"]
