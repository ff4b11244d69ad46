#!/usr/bin/env python3
"""Convert a CTranslate2 (faster-whisper) Whisper model directory to an openai-whisper checkpoint (.pt).

Why: the only Whisper weights the tests may fetch come from PyPI packages that carry a CTranslate2 model
(scripts/fetch-assets); the openai-whisper engine needs a PyTorch checkpoint {"dims", "model_state_dict"}.
The test of that engine (service/tests/test_openai_engine.py) builds one from the same `base` weights.

Usage: scripts/ct2_to_openai_whisper.py CT2_DIR OUT.pt    (needs numpy, torch and openai-whisper)

Adapted from the team's shared/tools/ct2_to_openai_whisper.py (used by bench/run; its header carries no
licence notice, it was written for this project), without its numerical comparison with CTranslate2:
the engine's test checks the converted model on real speech instead. Only float16/float32 models convert
(an int8-quantised model.bin cannot give back the weights).

The CTranslate2 weights are read by ct2_whisper.py beside this script (shared with ct2_to_ggml.py),
which also says how their names map to openai-whisper's. Alignment heads (word timings) are not in
model.bin: the engine sets the official ones for a checkpoint named after an official model (base.pt).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ct2_whisper import read_whisper


def write_checkpoint(ct2_dir: Path, out: Path) -> Path:
    """Convert CT2_DIR/model.bin to the checkpoint OUT, checked against openai-whisper's own model layout."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims, arrays = read_whisper(ct2_dir)
    sd = {key: torch.from_numpy(arr) for key, arr in arrays.items()}
    expected = Whisper(ModelDimensions(**dims)).state_dict()
    if set(expected) != set(sd):
        raise ValueError(f"state_dict mismatch: missing {sorted(set(expected) - set(sd))[:5]}, "
                         f"unexpected {sorted(set(sd) - set(expected))[:5]}")
    for key, tensor in expected.items():
        if tuple(tensor.shape) != tuple(sd[key].shape):
            raise ValueError(f"shape mismatch for {key}: {tuple(sd[key].shape)} vs {tuple(tensor.shape)}")
    partial = Path(out).with_name(Path(out).name + ".partial")
    torch.save({"dims": dims, "model_state_dict": sd}, partial)
    partial.replace(out)
    return Path(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: scripts/ct2_to_openai_whisper.py CT2_DIR OUT.pt")
    print(write_checkpoint(Path(sys.argv[1]), Path(sys.argv[2])))
