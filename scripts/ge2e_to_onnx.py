#!/usr/bin/env python3
"""Convert Resemblyzer's GE2E speaker encoder (pretrained.pt, PyTorch) to ONNX once, and check the parity.

The service runs the encoder on onnxruntime only: PyTorch is needed here, at build time, never at serve time.
Run by scripts/fetch-assets with the project's virtualenv (which has torch and onnx).

Usage: ge2e_to_onnx.py PRETRAINED_PT OUTPUT_ONNX
Prints the largest absolute difference between PyTorch and onnxruntime on random inputs of a few shapes and
fails above PARITY_LIMIT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# The encoder's shape (resemblyzer/hparams.py): 40 mel bands in, a 3-layer LSTM of 256, a 256-d embedding.
MEL_BANDS, HIDDEN, LAYERS, EMBEDDING = 40, 256, 3, 256
PARITY_LIMIT = 1e-4  # on unit-norm embeddings; the conversion gives about 1e-6
# (batch, frames): a batch of 1.6 s partials, a single one, and a short window of another length.
PARITY_SHAPES = ((8, 160), (1, 160), (3, 70))


def build_encoder(pretrained: Path):
    import torch
    from torch import nn

    class Encoder(nn.Module):
        """resemblyzer.VoiceEncoder's forward: the last layer's final hidden state, ReLU, L2 norm."""

        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(MEL_BANDS, HIDDEN, LAYERS, batch_first=True)
            self.linear = nn.Linear(HIDDEN, EMBEDDING)
            self.relu = nn.ReLU()

        def forward(self, mels):
            _, (hidden, _) = self.lstm(mels)
            raw = self.relu(self.linear(hidden[-1]))
            return raw / torch.norm(raw, dim=1, keepdim=True)

    checkpoint = torch.load(pretrained, map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint["model_state"].items() if not k.startswith("similarity_")}
    encoder = Encoder()
    encoder.load_state_dict(state, strict=True)
    encoder.eval()
    return encoder


def max_difference(encoder, onnx_path: Path) -> float:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch, frames in PARITY_SHAPES:
        # Mel power values as the features give them: non-negative, a wide dynamic range.
        mels = (rng.random((batch, frames, MEL_BANDS), dtype=np.float32) ** 4) * 4.0
        with torch.no_grad():
            expected = encoder(torch.from_numpy(mels)).numpy()
        (got,) = session.run(None, {"mels": mels})
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def convert(pretrained: Path, output: Path) -> float:
    import torch

    encoder = build_encoder(pretrained)
    example = torch.zeros(2, 160, MEL_BANDS)
    tmp = output.with_suffix(".tmp")
    # The TorchScript exporter keeps the LSTM one ONNX LSTM node (the dynamo exporter unrolls it).
    torch.onnx.export(encoder, (example,), str(tmp), input_names=["mels"], output_names=["embeddings"],
                      dynamic_axes={"mels": {0: "batch", 1: "frames"}, "embeddings": {0: "batch"}},
                      opset_version=17, dynamo=False)
    difference = max_difference(encoder, tmp)
    if difference > PARITY_LIMIT:
        tmp.unlink()
        raise SystemExit(f"ge2e_to_onnx: ONNX differs from PyTorch by {difference:.2e} (limit {PARITY_LIMIT:.0e})")
    tmp.rename(output)
    return difference


def main() -> int:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[4])
    import warnings

    warnings.filterwarnings("ignore")  # the exporter's deprecation notes and its batch-size remark on LSTMs
    difference = convert(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"ge2e_to_onnx: parity with PyTorch, max abs difference {difference:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
