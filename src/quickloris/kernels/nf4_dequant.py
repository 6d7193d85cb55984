"""Fused NF4 dequantization: one Triton launch decodes both quantization levels.

For absmax block b (B = blocksize values) and value i of the weight (see quickloris.quant.nf4)::

    scale[b] = code2[absmax[b]] * absmax2[b // 256] + offset     # float32, two roundings, no FMA
    W[i]     = NF4[nibble(i)] * scale[i // B]                     # float32, then rounded to fp16/bf16/fp32

Each program decodes BLOCKS absmax blocks: it reads their uint8 codes, looks up code2 and absmax2 (both cached:
`evict_last`), streams the packed bytes once (`evict_first`: they are never read again) and writes the output.
No intermediate buffer exists: the decoded absmax lives in registers. Bytes moved per value: 0.5 (packed) +
1/64 (absmax) + 2 (fp16/bf16 output), so the kernel is bound by memory bandwidth.

Two twins of the unpack/table step:
* GPU: inline PTX (`nf4_ptx.unpack_word_ptx`) turns each 32-bit word of packed bytes into 8 float32 levels with
  byte permutes on a register-resident table; the scale multiply is an explicit `mul.rn.f32`.
* `TRITON_INTERPRET=1` (no inline asm there): shifts/masks and a 16-entry table load.
Both are bit-identical to bitsandbytes' `dequantize_4bit` (tests check GPU asm == GPU plain == bitsandbytes).

Public entry: :func:`dequantize_nf4`. It is registered as the `torch.library` op `quickloris::dequantize_nf4`
(a `triton_op`), so `torch.compile(fullgraph=True)` traces straight through it; eager calls skip the
dispatcher and launch directly (the op adds ~10 us per call).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from quickloris.quant.nf4 import FLOAT_DTYPES, NF4State, as_packed_uint8, dequantize_nf4_reference, state_from_bnb

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton still get the reference path
    triton = None

from quickloris.kernels.nf4_ptx import MUL_RN_F32, unpack_word_ptx

if triton is not None:
    _UNPACK_ASM: tl.constexpr = tl.constexpr(unpack_word_ptx())
    _MUL_ASM: tl.constexpr = tl.constexpr(MUL_RN_F32)

    @triton.jit
    def _mul_rn(a, b, USE_ASM: tl.constexpr):
        if USE_ASM:
            return tl.inline_asm_elementwise(_MUL_ASM, "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return a * b

    @triton.jit
    def _nf4_dequant_kernel(
        packed_ptr,  # uint8 [ceil(n/2)] (plain) or int32 [n/8] (asm)
        absmax_ptr,  # uint8 [nblocks] (nested) or float32 [nblocks]
        absmax2_ptr,  # float32 [ceil(nblocks/256)] (nested)
        code2_ptr,  # float32 [256] (nested)
        offset_ptr,  # float32 [1] (nested)
        code_ptr,  # float32 [16]
        out_ptr,
        n,
        nblocks,
        BLOCKSIZE: tl.constexpr,
        BLOCKS: tl.constexpr,
        NESTED: tl.constexpr,
        UNPACK_ASM: tl.constexpr,
        MUL_ASM: tl.constexpr,
        SOFT_BF16: tl.constexpr,
    ):
        pid = tl.program_id(0)
        blk = pid * BLOCKS + tl.arange(0, BLOCKS)
        blk_ok = blk < nblocks
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0, eviction_policy="evict_last")
            c2 = tl.load(code2_ptr + q.to(tl.int32), eviction_policy="evict_last")
            a2 = tl.load(absmax2_ptr + blk // 256, mask=blk_ok, other=0.0, eviction_policy="evict_last")
            scale = _mul_rn(c2, a2, MUL_ASM) + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0, eviction_policy="evict_last")

        base = pid.to(tl.int64) * (BLOCKS * BLOCKSIZE)  # first value of this program; int64: n may pass 2^31
        if UNPACK_ASM:
            WORDS: tl.constexpr = BLOCKSIZE // 8
            w_idx = tl.arange(0, BLOCKS)[:, None] * WORDS + tl.arange(0, WORDS)[None, :]
            words = tl.load(packed_ptr + base // 8 + w_idx, mask=(base // 8 + w_idx) < n // 8, other=0,
                            eviction_policy="evict_first")
            v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
                _UNPACK_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
            levels = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
            levels = levels.to(tl.float32, bitcast=True).reshape(BLOCKS, BLOCKSIZE)
        else:
            HALF: tl.constexpr = BLOCKSIZE // 2
            b_idx = tl.arange(0, BLOCKS)[:, None] * HALF + tl.arange(0, HALF)[None, :]
            packed = tl.load(packed_ptr + base // 2 + b_idx, mask=(base // 2 + b_idx) < (n + 1) // 2, other=0,
                             eviction_policy="evict_first")
            hi = tl.load(code_ptr + (packed >> 4).to(tl.int32), eviction_policy="evict_last")
            lo = tl.load(code_ptr + (packed & 0x0F).to(tl.int32), eviction_policy="evict_last")
            levels = tl.join(hi, lo).reshape(BLOCKS, BLOCKSIZE)

        values = levels * scale[:, None]
        o_idx = tl.arange(0, BLOCKS)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if SOFT_BF16:
            # The interpreter rounds fp32 -> bf16 wrongly (truncation / half-up without carry); round to
            # nearest even on the bits, as the GPU's cvt.rn.bf16.f32 does. Values are finite here.
            bits = values.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            result = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            result = values.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + base + o_idx, result, mask=(base + o_idx) < n)


def _interpreting() -> bool:
    return triton is not None and not isinstance(_nf4_dequant_kernel, triton.runtime.JITFunction)


# ----------------------------------------------------------------------------------------------------------
# argument resolution: Params4bit / Linear4bit / quickloris NF4 weights / (packed, state) pairs


def _resolve(weight: Any, quant_state: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(weight, torch.nn.Module):
        if not hasattr(weight, "weight"):
            raise TypeError(f"{type(weight).__name__} has no .weight to dequantize")
        weight = weight.weight
    if quant_state is None:
        components = getattr(weight, "nf4_components", None)  # quickloris' own NF4 weight type
        if components is not None:
            return components()
        quant_state = getattr(weight, "quant_state", None)  # bitsandbytes Params4bit
        if quant_state is None:
            raise TypeError(f"cannot find an NF4 quantization state on {type(weight).__name__}: pass a "
                            "bitsandbytes Params4bit/Linear4bit, a quickloris NF4 weight, or (packed, quant_state)")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"packed NF4 data must be a tensor, got {type(weight).__name__}")
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return as_packed_uint8(data), quant_state


def _fields(state: Any) -> tuple:
    """(absmax, absmax2, code2, offset, code, shape, dtype, blocksize) of an NF4State or bitsandbytes QuantState."""
    if isinstance(state, NF4State):
        return (state.absmax, state.absmax2, state.code2, state.offset, state.code, state.shape, state.dtype,
                state.blocksize)
    if getattr(state, "quant_type", None) is not None:  # bitsandbytes QuantState, read without copies
        if state.quant_type != "nf4":
            raise ValueError(f"only NF4 weights are supported, got quant_type={state.quant_type!r}")
        if state.nested and not isinstance(state.offset, torch.Tensor):
            state = state_from_bnb(state)
            return _fields(state)
        if state.nested:
            s2 = state.state2
            if s2.blocksize != 256:
                raise ValueError(f"nested blocksize must be 256, got {s2.blocksize}")
            return state.absmax, s2.absmax, s2.code, state.offset, state.code, state.shape, state.dtype, state.blocksize
        return state.absmax, None, None, None, state.code, state.shape, state.dtype, state.blocksize
    raise TypeError(f"quant_state must be a quickloris NF4State or a bitsandbytes QuantState, got {type(state).__name__}")


def _check(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out_dtype, out) -> int:
    n = 1
    for s in shape:
        n *= s
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed data has {packed.numel()} bytes but the quant state's shape {tuple(shape)} "
                         f"needs {(n + 1) // 2}")
    if not packed.is_contiguous():
        raise ValueError("packed NF4 data must be contiguous")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"output dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {-(-n // blocksize)}")
    dev = packed.device
    for name, t in (("absmax", absmax), ("absmax2", absmax2), ("code2", code2), ("offset", offset), ("code", code)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the packed data is on {dev}")
    if absmax2 is not None and absmax.dtype != torch.uint8:
        raise TypeError(f"nested absmax must be uint8, got {absmax.dtype}")
    if absmax2 is None and absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32 when not nested, got {absmax.dtype}")
    if out is not None:
        if out.device != dev or out.dtype != out_dtype or tuple(out.shape) != tuple(shape) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {tuple(shape)} on {dev}; got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    return n


# ----------------------------------------------------------------------------------------------------------
# launch


@functools.lru_cache(maxsize=None)
def _config(n: int, blocksize: int) -> tuple[int, int]:
    """(absmax blocks per program, warps): ~4096 values per program, 4 warps."""
    blocks = max(1, min(4096 // blocksize, 64))
    return blocks, 4


def _launch(kernel, packed, absmax, absmax2, code2, offset, code, out, n, blocksize, use_asm, config=None) -> None:
    nblocks = absmax.numel()
    blocks, warps = config or _config(n, blocksize)
    nested = absmax2 is not None
    # The word-wise asm path needs whole 32-bit words of 8 values and 4-byte aligned data.
    word_ok = use_asm and n % 8 == 0 and packed.data_ptr() % 4 == 0
    src = packed.view(torch.int32) if word_ok else packed
    grid = (triton.cdiv(nblocks, blocks),)
    kernel[grid](src, absmax, absmax2 if nested else absmax, code2 if nested else code,
                 offset if nested else code, code, out, n, nblocks,
                 BLOCKSIZE=blocksize, BLOCKS=blocks, NESTED=nested, UNPACK_ASM=word_ok, MUL_ASM=use_asm,
                 SOFT_BF16=_interpreting() and out.dtype == torch.bfloat16, num_warps=warps)


def _use_asm(device: torch.device) -> bool:
    return device.type == "cuda" and not _interpreting() and os.environ.get("QUICKLORIS_NF4_ASM", "1") != "0"


def _dequant_into(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out, kernel=None) -> torch.Tensor:
    n = out.numel()
    if packed.device.type == "cuda" or (_interpreting() and packed.device.type == "cpu"):
        if triton is None:
            raise RuntimeError("the NF4 GPU kernel needs triton; install it (pip install triton)")
        _launch(kernel or _nf4_dequant_kernel, packed, absmax, absmax2, code2, offset, code, out, n, blocksize,
                _use_asm(packed.device))
    else:  # CPU without the Triton interpreter (or another device): the pure-PyTorch reference
        state = NF4State(shape=torch.Size(shape), dtype=out.dtype, blocksize=blocksize, absmax=absmax, code=code,
                         offset=offset, absmax2=absmax2, code2=code2)
        out.copy_(dequantize_nf4_reference(packed, state, out.dtype))
    return out


def _op_body(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None, code2: torch.Tensor | None,
             offset: torch.Tensor | None, code: torch.Tensor, shape: list[int], blocksize: int,
             dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    kernel = None if _interpreting() else torch.library.wrap_triton(_nf4_dequant_kernel)
    return _dequant_into(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out, kernel)


def _op_out_body(packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                 code2: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor, blocksize: int,
                 out: torch.Tensor) -> None:
    kernel = None if _interpreting() else torch.library.wrap_triton(_nf4_dequant_kernel)
    _dequant_into(packed, absmax, absmax2, code2, offset, code, list(out.shape), blocksize, out, kernel)


def _register_ops() -> bool:
    """Define `quickloris::dequantize_nf4` and `quickloris::dequantize_nf4_out`.

    On GPUs they are `triton_op`s: AOTDispatcher decomposes them, so Inductor sees the Triton kernel itself.
    Under TRITON_INTERPRET=1 they are opaque `custom_op`s (an interpreted kernel cannot be traced), which still
    keeps `torch.compile(fullgraph=True)` free of graph breaks.
    """
    if triton is None or not hasattr(torch.library, "triton_op"):
        return False
    if _interpreting():
        op = torch.library.custom_op("quickloris::dequantize_nf4", mutates_args=())(_op_body)

        @op.register_fake
        def _(packed, absmax, absmax2, code2, offset, code, shape, blocksize, dtype):
            return torch.empty(shape, dtype=dtype, device=packed.device)

        torch.library.custom_op("quickloris::dequantize_nf4_out", mutates_args=("out",))(_op_out_body)
    else:
        torch.library.triton_op("quickloris::dequantize_nf4", mutates_args=())(_op_body)
        torch.library.triton_op("quickloris::dequantize_nf4_out", mutates_args=("out",))(_op_out_body)
    return True


_HAS_OP = _register_ops()



def dequantize_nf4(weight: Any, quant_state: Any = None, *, out: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize an NF4 weight (bitsandbytes layout, nested or not) to a dense fp16/bf16/fp32 tensor.

    Args:
        weight: a bitsandbytes ``Params4bit`` or ``Linear4bit``, a quickloris NF4 weight, or the packed uint8
            tensor (then `quant_state` is required).
        quant_state: a ``quickloris.quant.nf4.NF4State`` or a bitsandbytes ``QuantState`` (taken from
            `weight` when omitted).
        out: optional preallocated output (contiguous, the weight's shape); nothing else is allocated.
        dtype: output dtype (default: `out`'s dtype, else the weight's original dtype).

    Returns the ``[out_features, in_features]`` matrix, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.
    One kernel launch on CUDA; on CPU the Triton kernel runs under ``TRITON_INTERPRET=1``, else the reference.
    """
    packed, state = _resolve(weight, quant_state)
    absmax, absmax2, code2, offset, code, shape, state_dtype, blocksize = _fields(state)
    out_dtype = dtype or (out.dtype if out is not None else state_dtype)
    _check(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out_dtype, out)
    if _HAS_OP and torch.compiler.is_compiling():
        if out is None:
            return torch.ops.quickloris.dequantize_nf4(packed, absmax, absmax2, code2, offset, code, list(shape),
                                                       blocksize, out_dtype)
        torch.ops.quickloris.dequantize_nf4_out(packed, absmax, absmax2, code2, offset, code, blocksize, out)
        return out
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    return _dequant_into(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out)
