"""pilotys-whisper: a private speech-to-text service (faster-whisper behind a small Flask API)."""

__version__ = "0.1.0"
