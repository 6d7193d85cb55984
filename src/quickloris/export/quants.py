"""ggml tensor types, the C++ quantizers behind them, and llama.cpp's per-tensor type mixes.

Types (values per block, bytes per block, bits per value):

| type | block | bytes | bits | dequantized value |
|---|---|---|---|---|
| F32 / F16 / BF16 | 1 | 4 / 2 / 2 | 32 / 16 / 16 | x |
| Q8_0 | 32 | 34 | 8.5 | d * q, q int8 |
| Q4_0 | 32 | 18 | 4.5 | d * (q - 8) |
| Q5_0 / Q5_1 | 32 | 22 / 24 | 5.5 / 6 | d * (q - 16) / d * q + m |
| Q4_K / Q5_K | 256 | 144 / 176 | 4.5 / 5.5 | (d * sc_j) * q - dmin * m_j per 32 values |
| Q6_K | 256 | 210 | 6.5625 | (d * sc_j) * (q - 32) per 16 values |

Quantizing is done by `quickloris._native` (csrc/), byte-identical to ggml's reference quantizers.
The presets (`q4_k_m`, ...) pick a type per tensor exactly as `llama-quantize` does for Llama-family
models (`llama_tensor_get_type` in llama.cpp): e.g. Q4_K_M stores attn_v and ffn_down of the first
and last eighth of the layers, and every third layer in between, as Q6_K, the output matrix as Q6_K,
and everything else as Q4_K.
"""

from __future__ import annotations

import enum
import os
from typing import Literal

import numpy as np

from quickloris import _native


class GGMLType(enum.IntEnum):
    """ggml tensor type ids (as stored in GGUF tensor infos)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30

    @property
    def block_size(self) -> int:
        return _native.GGML_TYPES[self.name][1]

    @property
    def type_size(self) -> int:
        return _native.GGML_TYPES[self.name][2]

    def row_bytes(self, ncols: int) -> int:
        if ncols % self.block_size:
            raise ValueError(f"{self.name} needs rows of a multiple of {self.block_size} values, got {ncols}")
        return ncols // self.block_size * self.type_size


Preset = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
PRESETS: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")

# preset -> (default type for 2-D weights, llama_ftype id written as general.file_type)
_PRESET_INFO: dict[str, tuple[GGMLType, int]] = {
    "f32": (GGMLType.F32, 0),
    "f16": (GGMLType.F16, 1),
    "bf16": (GGMLType.BF16, 32),
    "q8_0": (GGMLType.Q8_0, 7),
    "q4_0": (GGMLType.Q4_0, 2),
    "q4_k_s": (GGMLType.Q4_K, 14),
    "q4_k_m": (GGMLType.Q4_K, 15),
    "q5_k_s": (GGMLType.Q5_K, 16),
    "q5_k_m": (GGMLType.Q5_K, 17),
    "q6_k": (GGMLType.Q6_K, 18),
}

# llama.cpp's fallbacks when a row length is not a multiple of 256 (e.g. hidden size 576).
_K_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}


def check_preset(preset: str) -> str:
    if preset not in _PRESET_INFO:
        raise ValueError(f"quant must be one of {', '.join(PRESETS)}; got {preset!r}")
    return preset


def file_type(preset: str) -> int:
    """The `general.file_type` (llama_ftype) of a preset."""
    return _PRESET_INFO[check_preset(preset)][1]


def _more_bits(layer: int, n_layers: int) -> bool:
    # llama.cpp's use_more_bits: first and last eighth of the layers, and every third in between.
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(
    preset: str,
    name: str,
    shape: tuple[int, ...],
    *,
    n_layers: int,
    tied_output: bool,
    more_bits_attn_v: bool | None = None,
) -> GGMLType:
    """ggml type of GGUF tensor `name` (PyTorch-order `shape`) under `preset`.

    `tied_output`: the model has no separate `output.weight`, so `token_embd.weight` doubles as the
    output matrix and is typed like it. A fused `attn_qkv` (Phi-3) is typed like `attn_v`, as llama.cpp does.
    `more_bits_attn_v`: llama.cpp types the model as 70B (an 80-layer GQA llama or qwen2: the architecture
    says, `GGUFArch.more_bits_for_attn_v`), so Q4_K attn_v becomes Q5_K; None: 80 layers.
    """
    default = _PRESET_INFO[check_preset(preset)][0]
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return GGMLType.F32  # norms, biases, rope factors: small and precision-critical
    if default in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        return default
    ncols = shape[-1]
    parts = name.split(".")
    layer = int(parts[1]) if parts[0] == "blk" else -1
    kind = parts[2] if layer >= 0 else parts[0]
    qtype = default
    if name == "output.weight" or (tied_output and name == "token_embd.weight"):
        if default != GGMLType.Q8_0:
            qtype = GGMLType.Q8_0 if ncols % 256 else GGMLType.Q6_K
    elif kind in ("attn_v", "attn_qkv"):
        if preset in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layers):
            qtype = GGMLType.Q6_K
        elif preset == "q4_k_s" and layer < 4:
            qtype = GGMLType.Q5_K
        if (n_layers == 80 if more_bits_attn_v is None else more_bits_attn_v) and qtype == GGMLType.Q4_K:
            qtype = GGMLType.Q5_K  # llama.cpp's 70B rule: attn_v is 8x smaller there (GQA), so spend bits
    elif kind == "ffn_down":
        if preset in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layers):
            qtype = GGMLType.Q6_K
        elif preset == "q4_k_s" and layer < n_layers // 8:
            qtype = GGMLType.Q5_K
    if ncols % qtype.block_size:
        qtype = _K_FALLBACK.get(qtype, GGMLType.F16)
        if ncols % qtype.block_size:
            qtype = GGMLType.F16
    return qtype


def _threads(threads: int) -> int:
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = all cores), got {threads!r}")
    return threads or (os.cpu_count() or 1)


def quantize(values: np.ndarray, qtype: GGMLType | int, *, threads: int = 0) -> np.ndarray:
    """Quantize float `values` (rows along the last axis) to `qtype`; returns uint8 [..., row_bytes]."""
    qtype = GGMLType(qtype)
    arr = np.ascontiguousarray(values, dtype=np.float32)
    if arr.ndim == 0:
        raise ValueError("values must have at least one dimension")
    rows = arr.reshape(-1, arr.shape[-1]) if arr.size else arr.reshape(0, arr.shape[-1])
    out = _native.quantize(rows, int(qtype), _threads(threads))
    return out.reshape(*arr.shape[:-1], out.shape[-1])


def dequantize(data: np.ndarray, qtype: GGMLType | int, shape: tuple[int, ...], *, threads: int = 0) -> np.ndarray:
    """Inverse of `quantize`: uint8 blocks of `qtype` -> float32 array of `shape`."""
    qtype = GGMLType(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ValueError("shape must have at least one dimension")
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    ncols = shape[-1]
    nrows = int(np.prod(shape[:-1], dtype=np.int64))
    if raw.size != nrows * qtype.row_bytes(ncols):
        raise ValueError(f"{raw.size} bytes do not hold a {qtype.name} tensor of shape {shape}")
    return _native.dequantize(raw.reshape(nrows, -1), int(qtype), ncols, _threads(threads)).reshape(shape)
