#!/usr/bin/env python3
"""Convert a CTranslate2 (faster-whisper) Whisper model directory to a whisper.cpp ggml model file (.bin).

Why: the benchmark runs whisper.cpp (through pywhispercpp) beside our service and the original server, and
the comparison only means something with the same weights; the only Whisper weights we may fetch are the
CTranslate2 `base` model that scripts/fetch-assets assembles. Its test: service/tests/test_ggml_converter.py.

Usage: scripts/ct2_to_ggml.py CT2_DIR OUT.bin    (needs numpy and faster-whisper, for the mel filters)

The weights are read by ct2_whisper.py beside this script, under openai-whisper's names, which are also
whisper.cpp's. Written as whisper.cpp's loader reads a ggml file (src/whisper.cpp, whisper_model_load),
all integers int32 little-endian:
    magic 0x67676d6c ("ggml");
    hyperparameters: n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_text_ctx,
        n_text_state, n_text_head, n_text_layer, n_mels, ftype (1: the large matrices in float16);
    mel filter bank: n_mel, n_fft, then n_mel x n_fft float32 (the loader computes the log-mel with it);
    vocabulary: count, then count x {length, raw bytes}: the ordinary tokens only, ids 0 to <|endoftext|>
        excluded; the loader names the special tokens after them by itself, from n_vocab;
    tensors until the end of the file: n_dims, name length, type (0 float32, 1 float16),
        dims[n_dims] innermost first (NumPy's shape reversed), name, data in C order.
The loader fixes each tensor's type from ftype: vectors, the positional embeddings and the convolution
biases (stored as n_state x 1) in float32, matrices and convolution kernels in float16. The CTranslate2
model is float16 already, so nothing is lost. Alignment heads are not stored: whisper.cpp has presets.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
from ct2_whisper import read_whisper

GGML_MAGIC = 0x67676D6C
FTYPE_F16 = 1
SAMPLE_RATE, N_FFT = 16000, 400  # Whisper's front end: 25 ms windows at 16 kHz
# Kept in float32 although they are matrices: whisper.cpp adds them to activations in float32.
FLOAT32_MATRICES = {"encoder.positional_embedding", "decoder.positional_embedding", "encoder.conv1.bias",
                    "encoder.conv2.bias"}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character: printable Latin-1 bytes as
    themselves, the others (control bytes, space, ...) as U+0100 onwards in byte order. The inverse map."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(0x100 + i) for i, b in enumerate(others)}
    return {c: b for b, c in chars.items()}


def read_vocabulary(ct2_dir: Path) -> list[str]:
    """The model's tokens in id order, as CTranslate2 stores them (vocabulary.txt or vocabulary.json)."""
    text_file, json_file = Path(ct2_dir) / "vocabulary.txt", Path(ct2_dir) / "vocabulary.json"
    if text_file.is_file():
        return text_file.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    return json.loads(json_file.read_text(encoding="utf-8"))


def ordinary_tokens(tokens: list[str], n_vocab: int) -> list[bytes]:
    """The tokens before <|endoftext|>, as raw bytes; checked against where whisper.cpp expects the special
    ones (its ids are derived from n_vocab, not read from the file)."""
    if len(tokens) != n_vocab:
        raise ValueError(f"vocabulary has {len(tokens)} tokens, the model's embeddings {n_vocab}")
    multilingual = n_vocab >= 51865
    eot = tokens.index("<|endoftext|>")
    if eot != 50256 + multilingual or tokens[eot + 1] != "<|startoftranscript|>":
        raise ValueError(f"<|endoftext|> at id {eot}: not where whisper.cpp expects a Whisper vocabulary's")
    alphabet = _byte_level_alphabet()
    try:
        return [bytes(alphabet[c] for c in token) for token in tokens[:eot]]
    except KeyError as exc:
        raise ValueError(f"a token holds {exc}, not a byte-level BPE character") from None


def mel_filters(n_mels: int) -> np.ndarray:
    """Whisper's mel filter bank (Slaney-style, as librosa builds it), n_mels x (N_FFT / 2 + 1)."""
    from faster_whisper.feature_extractor import FeatureExtractor

    return FeatureExtractor.get_mel_filters(SAMPLE_RATE, N_FFT, n_mels).astype(np.float32)


def _tensor_record(name: str, array: np.ndarray) -> tuple[bytes, np.ndarray]:
    if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
        array = array.reshape(-1, 1)
    as_float32 = array.ndim < 2 or name in FLOAT32_MATRICES
    data = np.ascontiguousarray(array, dtype="<f4" if as_float32 else "<f2")
    encoded = name.encode("utf-8")
    header = struct.pack(f"<3i{data.ndim}i", data.ndim, len(encoded), 0 if as_float32 else 1, *data.shape[::-1])
    return header + encoded, data


def write_ggml(ct2_dir: Path, out: Path) -> Path:
    """Convert CT2_DIR to the ggml file OUT (written beside it first, then renamed)."""
    dims, state = read_whisper(ct2_dir)
    tokens = ordinary_tokens(read_vocabulary(ct2_dir), dims["n_vocab"])
    filters = mel_filters(dims["n_mels"])
    partial = Path(out).with_name(Path(out).name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<I", GGML_MAGIC))
        f.write(struct.pack("<11i", dims["n_vocab"], dims["n_audio_ctx"], dims["n_audio_state"],
                            dims["n_audio_head"], dims["n_audio_layer"], dims["n_text_ctx"], dims["n_text_state"],
                            dims["n_text_head"], dims["n_text_layer"], dims["n_mels"], FTYPE_F16))
        f.write(struct.pack("<2i", *filters.shape))
        f.write(filters.astype("<f4").tobytes())
        f.write(struct.pack("<i", len(tokens)))
        f.writelines(struct.pack("<i", len(token)) + token for token in tokens)
        for name, array in state.items():
            header, data = _tensor_record(name, array)
            f.write(header)
            f.write(data.tobytes())
    partial.replace(out)
    return Path(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: scripts/ct2_to_ggml.py CT2_DIR OUT.bin")
    print(write_ggml(Path(sys.argv[1]), Path(sys.argv[2])))
