"""Read a CTranslate2 (faster-whisper) Whisper model as NumPy arrays under openai-whisper's names.

Shared by the converters beside it (ct2_to_openai_whisper.py, ct2_to_ggml.py): both formats name their
tensors as openai-whisper's state_dict does. Needs only NumPy. Only float16/float32 models convert (an
int8-quantised model.bin cannot give back the weights).

model.bin layout (CTranslate2 binary version 6, little-endian; ctranslate2/specs/model_spec.py::_serialize):
    uint32 binary_version, string spec_name, uint32 spec_revision, uint32 num_variables,
    num_variables x {string name, uint8 rank, uint32 dims[rank], uint8 dtype, uint32 num_bytes, bytes data},
    uint32 num_aliases, num_aliases x {string alias, string target}
  where string = uint16 length (including the trailing NUL) + utf-8 bytes + NUL, and dtype 0 float32,
  1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Names (CTranslate2 WhisperSpec -> openai-whisper): self_attention/linear_0 is the fused query/key/value
projection (split in 3; openai's key projection has no bias, CTranslate2 stores zeros there), attention/
linear_1 the fused cross-attention key/value (split in 2), layer norms' gamma/beta are weight/bias, and the
output projection is tied to decoder/embeddings. Alignment heads (word timings) are not in model.bin.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2_model_bin(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """A CTranslate2 model.bin as (spec name, {variable name: array})."""
    buf = Path(path).read_bytes()
    off = 0

    def unpack(fmt: str):
        nonlocal off
        (value,) = struct.unpack_from("<" + fmt, buf, off)
        off += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal off
        length = unpack("H")
        text = buf[off:off + length - 1].decode("utf-8")
        off += length
        return text

    version = unpack("I")
    if version != 6:
        raise ValueError(f"unsupported CTranslate2 binary version {version} (expected 6)")
    spec = string()
    unpack("I")  # spec revision
    variables = {}
    for _ in range(unpack("I")):
        name = string()
        dims = [unpack("I") for _ in range(unpack("B"))]
        dtype_id, nbytes = unpack("B"), unpack("I")
        if dtype_id not in _DTYPES:
            raise ValueError(f"{name}: dtype id {dtype_id} (bfloat16?) not supported")
        dtype = np.dtype(_DTYPES[dtype_id])
        data = np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=off)
        variables[name] = data.reshape(dims).copy()
        off += nbytes
    for _ in range(unpack("I")):  # aliases: only the tied output projection, implied by both formats
        string(), string()
    if off != len(buf):
        raise ValueError(f"trailing bytes in model.bin: parsed {off} of {len(buf)}")
    return spec, variables


def convert(v: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """CTranslate2 WhisperSpec variables as (ModelDimensions keyword arguments, openai-whisper state_dict)."""
    for name, arr in v.items():
        if arr.dtype == np.int8 and arr.ndim == 2:
            raise ValueError(f"{name} is int8-quantised; convert from a float16/float32 CTranslate2 model")

    def n_layers(prefix: str) -> int:
        parts = (k.split("/") for k in v if k.startswith(prefix + "/layer_"))
        return len({p[1] for p in parts if p[1][len("layer_"):].isdigit()})

    dims = {
        "n_mels": int(v["encoder/conv1/weight"].shape[1]),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(v["encoder/conv1/weight"].shape[0]),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": n_layers("encoder"),
        "n_vocab": int(v["decoder/embeddings/weight"].shape[0]),
        "n_text_ctx": int(v["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(v["decoder/embeddings/weight"].shape[1]),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": n_layers("decoder"),
    }
    sd: dict[str, np.ndarray] = {}

    def put(key: str, arr: np.ndarray) -> None:
        sd[key] = np.ascontiguousarray(arr)

    def linear(dst: str, src: str, rows: slice | None = None, bias: bool = True) -> None:
        w, b = v[src + "/weight"], v[src + "/bias"]
        if rows is not None:
            w, b = w[rows], b[rows]
        put(dst + ".weight", w)
        if bias:
            put(dst + ".bias", b)
        elif np.any(b):  # dropping a bias that is not zero would change the model
            raise ValueError(f"{src}: the key projection's bias is not zero")

    def layer_norm(dst: str, src: str) -> None:
        put(dst + ".weight", v[src + "/gamma"])
        put(dst + ".bias", v[src + "/beta"])

    def self_attention(dst: str, src: str) -> None:
        d = v[src + "/linear_0/weight"].shape[1]
        linear(dst + ".query", src + "/linear_0", slice(0, d))
        linear(dst + ".key", src + "/linear_0", slice(d, 2 * d), bias=False)
        linear(dst + ".value", src + "/linear_0", slice(2 * d, 3 * d))
        linear(dst + ".out", src + "/linear_1")

    def block(dst: str, src: str, cross: bool) -> None:
        self_attention(dst + ".attn", src + "/self_attention")
        layer_norm(dst + ".attn_ln", src + "/self_attention/layer_norm")
        if cross:
            n = v[src + "/attention/linear_0/weight"].shape[1]
            linear(dst + ".cross_attn.query", src + "/attention/linear_0")
            linear(dst + ".cross_attn.key", src + "/attention/linear_1", slice(0, n), bias=False)
            linear(dst + ".cross_attn.value", src + "/attention/linear_1", slice(n, 2 * n))
            linear(dst + ".cross_attn.out", src + "/attention/linear_2")
            layer_norm(dst + ".cross_attn_ln", src + "/attention/layer_norm")
        linear(dst + ".mlp.0", src + "/ffn/linear_0")
        linear(dst + ".mlp.2", src + "/ffn/linear_1")
        layer_norm(dst + ".mlp_ln", src + "/ffn/layer_norm")

    for i in (1, 2):
        linear(f"encoder.conv{i}", f"encoder/conv{i}")
    put("encoder.positional_embedding", v["encoder/position_encodings/encodings"])
    for i in range(dims["n_audio_layer"]):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    layer_norm("encoder.ln_post", "encoder/layer_norm")
    put("decoder.token_embedding.weight", v["decoder/embeddings/weight"])
    put("decoder.positional_embedding", v["decoder/position_encodings/encodings"])
    for i in range(dims["n_text_layer"]):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    layer_norm("decoder.ln", "decoder/layer_norm")
    return dims, sd


def read_whisper(ct2_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """CT2_DIR/model.bin as (openai-whisper dimensions, state_dict of NumPy arrays)."""
    spec, variables = read_ct2_model_bin(Path(ct2_dir) / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{ct2_dir} is not a Whisper model (spec {spec!r})")
    return convert(variables)
