"""pilotys-whisper: a private speech-to-text service (faster-whisper behind a small Flask API)."""
# The one place the project's version is written (semantic versioning; CHANGELOG.md at the root): the wheel
# reads it (pyproject.toml), /health and /openapi.json serve it, scripts/version prints it for the image label
# and the Ansible collection.

__version__ = "0.2.0"
