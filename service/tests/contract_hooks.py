"""schemathesis hooks for test_openapi.py (loaded by the schemathesis CLI through SCHEMATHESIS_HOOKS).

The `file` parts it sends: the media files the test wrote into $PILOTYS_CONTRACT_MEDIA (audio/wav, video/mp4,
silence.wav among them), or random bytes (application/octet-stream), as openapi.yaml's encoding for `file` allows.
"""

from __future__ import annotations

import os
from pathlib import Path

import schemathesis
from hypothesis import strategies as st

_MEDIA = Path(os.environ["PILOTYS_CONTRACT_MEDIA"])


def _files(suffix: str) -> list[bytes]:
    return [path.read_bytes() for path in sorted(_MEDIA.glob(f"*{suffix}"))]


# Silence half the time: it passes every check and is transcribed (to nothing) in milliseconds, so that the
# stateful phase gets jobs to follow; the hostile files the other half.
schemathesis.openapi.media_type("audio/wav", st.one_of(st.just((_MEDIA / "silence.wav").read_bytes()),
                                                       st.sampled_from(_files(".wav"))))
schemathesis.openapi.media_type("video/mp4", st.sampled_from(_files(".mp4")))
schemathesis.openapi.media_type("application/octet-stream", st.binary(max_size=4096))
# tus's PATCH and creation-with-upload bodies (/v1/live): bytes, sent as they are.
schemathesis.openapi.media_type("application/offset+octet-stream", st.binary(max_size=4096))
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
