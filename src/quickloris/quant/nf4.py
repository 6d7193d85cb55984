"""NF4 with double quantization, exactly as bitsandbytes stores it (pure-PyTorch reference).

Layout of a weight W with n = W.numel() values (row-major, `[out, in]`), blocksize B (64 by default):

* ``packed``: uint8 ``[ceil(n/2), 1]``; byte j holds value 2j in its high nibble and 2j+1 in its low nibble
  (an odd n pads the last low nibble with code 7, i.e. 0.0; code 0 where bitsandbytes' CUDA kernel does: in an
  all-zero last block).
* ``absmax``: one scale per block of B values. Without double quantization it is float32
  ``absmax[b] = max |W[bB:(b+1)B]|``. With double quantization ("nested") it is uint8 codes into the
  256-entry signed dynamic map ``code2``, one float32 ``absmax2`` per 256 absmax values, and a float32
  ``offset`` (the mean of the float absmax values) subtracted before quantizing them.
* Dequantization (each step rounded to float32, in this order, no fused multiply-add)::

      scale[b] = code2[absmax[b]] * absmax2[b // 256] + offset      # nested
      W[i]     = NF4[nibble(i)] * scale[i // B]                      # then rounded to fp16/bf16/fp32

Quantization: ``absmax[b]`` as above, ``x * (1 / absmax[b])`` in float32, nibble = the NF4 bucket (strict
``>`` against the midpoints between consecutive NF4 values, which equal the CUDA kernel's thresholds).
For the nested 8-bit step, bitsandbytes' CUDA and CPU backends round differently: CUDA picks the nearest
code by a binary search (``rounding="bnb-cuda"``, our default on GPUs), while the CPU backend looks codes up in a
65536-bin table (``rounding="bnb-cpu"``), which is off by one code for ~0.15 % of values. Both are
reproduced here so that quickloris quantizes byte-for-byte like bitsandbytes on either device.

Memory: 4 bits per value + 8 bits per 64 values + 32 bits per 16384 values ≈ 4.127 bits per value.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import json
import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_ZERO_CODE = 7
NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

Rounding = Literal["bnb-cuda", "bnb-cpu"]
Reciprocal = Callable[[torch.Tensor], torch.Tensor]  # float32 1 / x, elementwise


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 table as float32 [16]."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def signed_dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry signed dynamic-exponent map that quantizes the absmax values (float32, sorted).

    For exponent e = 0..6 the decade [10^(e-6) * 0.1, 10^(e-6)] holds 2^e levels: the midpoints of
    2^e + 1 evenly spaced points between 0.1 and 1, scaled by 10^(e-6), with both signs; plus 0 and 1.
    The float32 arithmetic (linspace, midpoint, scaling) follows bitsandbytes so the table is bit-identical.
    """
    levels: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10.0 ** (e - 6)
        levels += (decade * mids).tolist() + (-decade * mids).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32, device=device)


@dataclasses.dataclass
class NF4State:
    """Everything but the packed bytes that is needed to dequantize one NF4 weight.

    Attributes:
        shape: shape of the dense weight (``[out, in]`` for a linear layer).
        dtype: dtype of the dense weight; the default output dtype of dequantization.
        blocksize: values per absmax scale (bitsandbytes' default: 64).
        absmax: uint8 ``[nblocks]`` codes (nested) or float32 ``[nblocks]`` scales.
        code: float32 ``[16]`` NF4 table.
        offset: float32 0-d tensor added to the decoded absmax (nested only).
        absmax2: float32 ``[ceil(nblocks / 256)]`` second-level scales (nested only).
        code2: float32 ``[256]`` table that decodes the uint8 absmax codes (nested only).
        nested_blocksize: absmax values per absmax2 scale (256).
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to(self, device: torch.device | str) -> NF4State:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            absmax=move(self.absmax),
            code=move(self.code),
            offset=move(self.offset),
            absmax2=move(self.absmax2),
            code2=move(self.code2),
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.absmax, self.code, self.offset, self.absmax2, self.code2) if t is not None)

    def validate(self, packed: torch.Tensor | None = None) -> None:
        """Raise ValueError/TypeError if the state (and `packed`, if given) is not a consistent NF4 weight."""
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4 weight dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        if self.blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {self.blocksize}")
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"NF4 code table must be float32 [16], got {self.code.dtype} {tuple(self.code.shape)}")
        nb = self.nblocks
        if self.absmax.numel() != nb:
            raise ValueError(
                f"absmax has {self.absmax.numel()} entries, expected {nb} for shape "
                f"{tuple(self.shape)} and blocksize {self.blocksize}"
            )
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"nested absmax must be uint8 codes, got {self.absmax.dtype}")
            if self.code2 is None or self.offset is None:
                raise ValueError("nested NF4 state needs code2 and offset besides absmax2")
            if self.code2.dtype != torch.float32 or self.code2.numel() != 256:
                raise ValueError(f"code2 must be float32 [256], got {self.code2.dtype} {tuple(self.code2.shape)}")
            if self.nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested blocksize must be {NESTED_BLOCKSIZE}, got {self.nested_blocksize}")
            nb2 = -(-nb // self.nested_blocksize)
            if self.absmax2.dtype != torch.float32 or self.absmax2.numel() != nb2:
                raise ValueError(
                    f"absmax2 must be float32 [{nb2}], got {self.absmax2.dtype} {tuple(self.absmax2.shape)}"
                )
            if self.offset.dtype != torch.float32 or self.offset.numel() != 1:
                raise ValueError(f"offset must be a float32 scalar, got {self.offset.dtype} {tuple(self.offset.shape)}")
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 (not nested) or uint8 (nested), got {self.absmax.dtype}")
        if packed is not None:
            if packed.dtype != torch.uint8:
                raise TypeError(
                    f"packed NF4 data must be uint8 (view other storage dtypes as uint8), got {packed.dtype}"
                )
            if packed.numel() != (self.numel + 1) // 2:
                raise ValueError(
                    f"packed data has {packed.numel()} bytes, expected {(self.numel + 1) // 2} "
                    f"for shape {tuple(self.shape)}"
                )
            devices = {t.device for t in (packed, *self.tensors())}
            if len(devices) != 1:
                raise ValueError(
                    f"packed data and quantization state are on different devices: {sorted(map(str, devices))}"
                )


# ----------------------------------------------------------------------------------------------------------
# quantization


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| of each block of `blocksize` values (the last block may be partial), float32."""
    n = flat.numel()
    pad = (-n) % blocksize
    padded = torch.nn.functional.pad(flat.abs(), (0, pad)) if pad else flat.abs()
    return padded.view(-1, blocksize).amax(dim=1)


def _scaled(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, reciprocal: Reciprocal) -> torch.Tensor:
    """x * (1 / absmax[block]) in float32, as both bitsandbytes backends compute it (a reciprocal, then a product)."""
    n = flat.numel()
    inv = reciprocal(absmax).repeat_interleave(blocksize)[:n]
    return flat * inv


@functools.cache
def _cuda_thresholds() -> tuple[float, ...]:
    """The 15 decision thresholds of bitsandbytes' CUDA NF4 kernel, as float32 values.

    The kernel compares with decimal literals: the shortest decimal of each float64 midpoint of the NF4 levels
    (``repr``), which the CUDA compiler rounds to float32 from the decimal. For 4 of the 15 that lands one float32
    step away from the float32 midpoint the CPU backend computes (the decimal sits within 1e-16 of a tie between two
    float32 values, on the other side): values exactly between the two then get another code (measured: 5 of
    58.7M values of a float32 [4096, 14336] weight). Each decimal is rounded here exactly (rational arithmetic,
    ties to even), never through float64."""
    levels = [float(v) for v in NF4_LEVELS]
    out = []
    for lo, hi in zip(levels[:-1], levels[1:]):
        exact = fractions.Fraction(repr((lo + hi) / 2))
        f = torch.tensor(float(exact), dtype=torch.float32)
        near = [torch.nextafter(f, torch.tensor(-2.0)), f, torch.nextafter(f, torch.tensor(2.0))]
        out.append(
            float(min(near, key=lambda c: (abs(fractions.Fraction(float(c)) - exact), int(c.view(torch.int32)) & 1)))
        )
    return tuple(out)


def _nf4_nibbles(scaled: torch.Tensor, zero_block: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    if rounding == "bnb-cuda":
        thresholds = torch.tensor(_cuda_thresholds(), dtype=torch.float32, device=scaled.device)
    else:  # the CPU backend's bounds: float32 midpoints
        thresholds = (nf4_code(scaled.device)[:-1] + nf4_code(scaled.device)[1:]) / 2
    q = torch.bucketize(scaled, thresholds)  # x > t[i] -> above bucket i (ties go down), as the CUDA tree
    # An all-zero block has absmax 0: CUDA computes 0 * (1/0) = NaN, which its comparison tree maps to code 0;
    # the CPU backend clamps absmax to 1e-38 and gets code 7. Either dequantizes to (-)0.
    return torch.where(zero_block, torch.zeros_like(q) if rounding == "bnb-cuda" else torch.full_like(q, 7), q)


def _binary_search_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest entry of the sorted 256-entry `code` for each x, by bitsandbytes' CUDA binary search.

    The search halves a pivot interval from 127 in steps 64..1, then compares x against the midpoint between
    the final pivot and its bracketing neighbour; exact ties resolve toward the final pivot.
    """
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        lower_pivot = torch.where(right, pivot, lower_pivot)
        lower = torch.where(right, val, lower)
        upper_pivot = torch.where(right, upper_pivot, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = x > val
    go_up = right & (x > (upper + val) * 0.5)
    go_down = ~right & (x < (lower + val) * 0.5)
    return torch.where(go_up, upper_pivot, torch.where(go_down, lower_pivot, pivot))


def _bnb_cpu_lut_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU backend: x in [-1, 1] is binned into 65536 cells, each mapped to a code beforehand.

    Cell i stands for v_i = -1 + 2i/65535 and maps to the first code whose upper midpoint is >= v_i.
    x goes to cell trunc((clamp(x) + 1) * 0.5 * 65535 + 0.5). (Whether the compiler fused the last
    multiply-add changed no cell among 5e7 random inputs; the unfused float32 form is used.)
    """
    cells = torch.arange(65536, dtype=torch.float32, device=x.device)
    v = -1.0 + (2.0 * cells) / 65535.0
    mids = 0.5 * (code[:-1] + code[1:])
    table = torch.searchsorted(mids, v, side="left")  # advance while mid < v
    h = (x.clamp(-1.0, 1.0) + 1.0) * 0.5
    idx = ((h * 65535.0) + 0.5).to(torch.int64)
    return table[idx]


def _quantize_absmax(
    absmax: torch.Tensor, rounding: Rounding, reciprocal: Reciprocal
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (uint8 codes, float32 absmax2, float32 offset) of the float32 absmax values."""
    offset = absmax.mean()
    centred = absmax - offset
    absmax2 = _blockwise_absmax(centred, NESTED_BLOCKSIZE)
    zero = (absmax2 == 0).repeat_interleave(NESTED_BLOCKSIZE)[: centred.numel()]
    scaled = _scaled(centred, absmax2, NESTED_BLOCKSIZE, reciprocal).masked_fill(zero, 0.0)  # 0 * (1/0) would be NaN
    code2 = signed_dynamic_map(absmax.device)
    if rounding == "bnb-cuda":
        q = _binary_search_codes(scaled, code2)
    else:
        q = _bnb_cpu_lut_codes(scaled, code2)
    q = torch.where(zero, torch.zeros_like(q), q)  # bitsandbytes writes code 0 for an all-zero block
    return q.to(torch.uint8), absmax2, offset


def quantize_nf4(
    weight: torch.Tensor,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    rounding: Rounding | None = None,
    reciprocal: Reciprocal = torch.reciprocal,
) -> tuple[torch.Tensor, NF4State]:
    """Quantize a float tensor to NF4 in bitsandbytes' layout; returns ``(packed [ceil(n/2), 1] uint8, state)``.

    `rounding` picks which bitsandbytes backend to match byte-for-byte: ``"bnb-cuda"`` (nearest absmax code by
    binary search; all-zero blocks get nibble 0) or ``"bnb-cpu"`` (absmax codes through a 65536-bin table;
    all-zero blocks get nibble 7). Default: the backend bitsandbytes uses on `weight`'s device.

    `reciprocal` takes ``1 / absmax`` for both the NF4 and the nested step. The default rounds it exactly, as
    bitsandbytes' CPU backend does; its CUDA library is built with ``--use_fast_math``, where ``1.0f / x`` is the
    hardware's approximate ``rcp.approx.ftz.f32`` (within 1 ulp, not always the exact rounding), which no PyTorch
    op computes: `quickloris.quantize_nf4` (`quickloris.kernels.nf4_quantize`) passes that instruction on CUDA
    tensors. With the exact reciprocal a CUDA weight's bytes equal bitsandbytes' except for values within an ulp
    of a bucket threshold in a block whose two reciprocals differ (on the GPU: 1 of 15 random cases, a float32
    [4096, 14336] weight).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"NF4 quantization takes float16/bfloat16/float32 weights, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if rounding is None:
        rounding = "bnb-cpu" if weight.device.type == "cpu" else "bnb-cuda"
    if rounding not in ("bnb-cuda", "bnb-cpu"):
        raise ValueError(f"rounding must be 'bnb-cuda' or 'bnb-cpu', got {rounding!r}")
    flat = weight.detach().reshape(-1).float()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot quantize a weight containing inf or NaN")

    absmax = _blockwise_absmax(flat, blocksize)
    zero_block = (absmax == 0).repeat_interleave(blocksize)[: flat.numel()]
    nibbles = _nf4_nibbles(_scaled(flat, absmax, blocksize, reciprocal), zero_block, rounding).to(torch.uint8)
    if nibbles.numel() % 2:
        # The pad is quantized as a 0.0 of the last block: code 7, or, in an all-zero block on CUDA, code 0.
        pad = 0 if rounding == "bnb-cuda" and bool(zero_block[-1]) else NF4_ZERO_CODE
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), pad)])
    packed = ((nibbles[0::2] << 4) | nibbles[1::2]).unsqueeze(1)

    state = NF4State(
        shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, absmax=absmax, code=nf4_code(weight.device)
    )
    if double_quant:
        state.absmax, state.absmax2, state.offset = _quantize_absmax(absmax, rounding, reciprocal)
        state.code2 = signed_dynamic_map(weight.device)
    return packed, state


# ----------------------------------------------------------------------------------------------------------
# dequantization (the reference the Triton kernel is tested against)


def dequantize_absmax(state: NF4State) -> torch.Tensor:
    """float32 per-block scales: ``code2[absmax] * absmax2[b // 256] + offset`` (two roundings) if nested."""
    if not state.nested:
        return state.absmax
    second = state.absmax2.repeat_interleave(state.nested_blocksize)[: state.absmax.numel()]
    return (state.code2[state.absmax.long()] * second) + state.offset


def dequantize_nf4_reference(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-PyTorch NF4 dequantization, bit-identical to bitsandbytes' ``dequantize_4bit``."""
    state.validate(packed)
    out_dtype = dtype or state.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"output dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[: state.numel].long()
    scales = dequantize_absmax(state).repeat_interleave(state.blocksize)[: state.numel]
    return (state.code[nibbles] * scales).to(out_dtype).reshape(state.shape)


# ----------------------------------------------------------------------------------------------------------
# interchange with bitsandbytes objects and `*-bnb-4bit` checkpoints


def state_from_bnb(quant_state) -> NF4State:
    """Convert a ``bitsandbytes.functional.QuantState`` (NF4) without copying its tensors."""
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type != "nf4":
        raise ValueError(f"only NF4 is supported, got quant_type={quant_type!r}")
    shape = torch.Size(quant_state.shape)
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=quant_state.absmax.device)
        return NF4State(
            shape=shape,
            dtype=quant_state.dtype,
            blocksize=quant_state.blocksize,
            absmax=quant_state.absmax,
            code=quant_state.code,
            offset=offset,
            absmax2=s2.absmax,
            code2=s2.code,
            nested_blocksize=s2.blocksize,
        )
    return NF4State(
        shape=shape,
        dtype=quant_state.dtype,
        blocksize=quant_state.blocksize,
        absmax=quant_state.absmax,
        code=quant_state.code,
    )


def as_packed_uint8(data: torch.Tensor) -> torch.Tensor:
    """bitsandbytes may store the packed bytes in another dtype (``quant_storage``); view them as uint8."""
    return data if data.dtype == torch.uint8 else data.view(torch.uint8)


_QS_SUFFIX = "quant_state.bitsandbytes__"


def state_from_checkpoint(tensors: Mapping[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, NF4State]:
    """Read ``{prefix}`` and its quantization tensors from a pre-quantized ``*-bnb-4bit`` state dict.

    `prefix` is the weight's key, e.g. ``"model.layers.0.mlp.down_proj.weight"``; the checkpoint holds
    ``{prefix}.absmax``, ``{prefix}.quant_map``, ``{prefix}.nested_absmax``, ``{prefix}.nested_quant_map`` and
    ``{prefix}.quant_state.bitsandbytes__nf4`` (a uint8 tensor of JSON with shape, dtype, blocksize, offset).
    """
    if prefix not in tensors:
        raise KeyError(f"checkpoint has no tensor {prefix!r}")
    meta_keys = [k for k in tensors if k.startswith(f"{prefix}.{_QS_SUFFIX}")]
    if not meta_keys:
        raise ValueError(f"{prefix!r} is not a bitsandbytes 4-bit weight (no {prefix}.{_QS_SUFFIX}* entry)")
    quant_type = meta_keys[0].rsplit("__", 1)[-1]
    if quant_type != "nf4":
        raise ValueError(f"{prefix!r} is quantized as {quant_type!r}; only 'nf4' is supported")
    meta = json.loads(bytes(tensors[meta_keys[0]].to(torch.uint8).tolist()).decode("utf-8"))
    get = lambda name: tensors[f"{prefix}.{name}"]  # noqa: E731
    packed = as_packed_uint8(tensors[prefix])
    state = NF4State(
        shape=torch.Size(meta["shape"]),
        dtype=getattr(torch, meta["dtype"]),
        blocksize=int(meta["blocksize"]),
        absmax=get("absmax"),
        code=get("quant_map").float(),
    )
    if f"{prefix}.nested_absmax" in tensors:
        state.absmax2 = get("nested_absmax")
        state.code2 = get("nested_quant_map")
        state.nested_blocksize = int(meta["nested_blocksize"])
        state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=packed.device)
    state.validate(packed)
    return packed, state


def state_to_checkpoint(packed: torch.Tensor, state: NF4State, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes writes for one NF4 weight (inverse of :func:`state_from_checkpoint`)."""
    state.validate(packed)
    meta: dict = {
        "quant_type": "nf4",
        "blocksize": state.blocksize,
        "dtype": str(state.dtype).removeprefix("torch."),
        "shape": list(state.shape),
    }
    out = {prefix: packed, f"{prefix}.absmax": state.absmax, f"{prefix}.quant_map": state.code}
    if state.nested:
        meta.update(
            nested_blocksize=state.nested_blocksize, nested_dtype="float32", nested_offset=float(state.offset.item())
        )
        out[f"{prefix}.nested_absmax"] = state.absmax2
        out[f"{prefix}.nested_quant_map"] = state.code2
    out[f"{prefix}.{_QS_SUFFIX}nf4"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out
