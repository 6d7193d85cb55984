"""Fused NF4 dequantization: one Triton launch decodes both quantization levels.

For absmax block b (B = blocksize values) and value i of the weight (see quickloris.quant.nf4)::

    scale[b] = code2[absmax[b]] * absmax2[b // 256] + offset     # float32, two roundings, no FMA
    W[i]     = NF4[nibble(i)] * scale[i // B]                     # float32, then rounded to fp16/bf16/fp32

Each program decodes BLOCKS absmax blocks: it reads their uint8 codes, looks up code2 and absmax2 (both cached:
`evict_last`), streams the packed bytes once (`evict_first`: they are never read again) and writes the output.
No intermediate buffer exists: the decoded absmax lives in registers. Bytes moved per value: 0.5 (packed) +
1/64 (absmax) + 2 (fp16/bf16 output), so the kernel is bound by memory bandwidth.

Two twins of the unpack/table step:
* GPU: inline PTX (`nf4_ptx.unpack_bytes_ptx`) turns each 4 packed bytes into their 8 float32 levels with
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
import weakref
from typing import Any

import torch

from quickloris.quant.nf4 import FLOAT_DTYPES, NF4State, as_packed_uint8, dequantize_nf4_reference, state_from_bnb

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton still get the reference path
    triton = None

from quickloris.kernels.nf4_ptx import MUL_RN_F32, unpack_bytes_ptx

if triton is not None:
    _UNPACK_ASM: tl.constexpr = tl.constexpr(unpack_bytes_ptx())
    _MUL_ASM: tl.constexpr = tl.constexpr(MUL_RN_F32)

    @triton.jit
    def _mul_rn(a, b, USE_ASM: tl.constexpr):
        if USE_ASM:
            return tl.inline_asm_elementwise(_MUL_ASM, "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return a * b

    @triton.jit
    def _to_bits16(values, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
        """float32 -> its fp16/bf16 rounding (to nearest even) as the low 16 bits of a uint32."""
        if SOFT_BF16:
            # The interpreter rounds fp32 -> bf16 wrongly (truncation / half-up without carry); round on the
            # bits as the GPU's cvt.rn.bf16.f32 does. Values are finite here.
            bits = values.to(tl.uint32, bitcast=True)
            return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        else:
            return values.to(OUT_DTYPE).to(tl.uint16, bitcast=True).to(tl.uint32)

    @triton.jit
    def _dequant_tile(tile, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n, nblocks, BLOCKSIZE: tl.constexpr,
                      BLOCKS: tl.constexpr, NESTED: tl.constexpr, UNPACK_ASM: tl.constexpr, MUL_ASM: tl.constexpr,
                      SOFT_BF16: tl.constexpr, OUT_DTYPE: tl.constexpr, PAIRS: tl.constexpr, EVEN: tl.constexpr,
                      STREAM: tl.constexpr):
        """Decode absmax blocks [tile*BLOCKS, (tile+1)*BLOCKS) of the weight."""
        blk = tile * BLOCKS + tl.arange(0, BLOCKS)
        blk_ok = blk < nblocks
        if NESTED:
            if EVEN:
                q = tl.load(absmax_ptr + blk, eviction_policy="evict_last")
                a2 = tl.load(absmax2_ptr + blk // 256, eviction_policy="evict_last")
            else:
                q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0, eviction_policy="evict_last")
                a2 = tl.load(absmax2_ptr + blk // 256, mask=blk_ok, other=0.0, eviction_policy="evict_last")
            c2 = tl.load(code2_ptr + q.to(tl.int32), eviction_policy="evict_last")
            scale = _mul_rn(c2, a2, MUL_ASM) + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0, eviction_policy="evict_last")

        # Byte j of a block holds value 2j (high nibble) and 2j+1 (low nibble); each block has BLOCKSIZE/2 bytes.
        HALF: tl.constexpr = BLOCKSIZE // 2
        base = tile.to(tl.int64) * (BLOCKS * HALF)  # first byte of this tile; int64: n may pass 2^31
        b_idx = base + tl.arange(0, BLOCKS)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        if EVEN:
            packed = tl.load(packed_ptr + b_idx, eviction_policy="evict_first")
        else:
            packed = tl.load(packed_ptr + b_idx, mask=b_idx < (n + 1) // 2, other=0, eviction_policy="evict_first")
        if UNPACK_ASM:
            hi, lo = tl.inline_asm_elementwise(_UNPACK_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                               dtype=(tl.int32, tl.int32), is_pure=True, pack=4)
            hi = hi.to(tl.float32, bitcast=True)
            lo = lo.to(tl.float32, bitcast=True)
        else:
            hi = tl.load(code_ptr + (packed >> 4).to(tl.int32), eviction_policy="evict_last")
            lo = tl.load(code_ptr + (packed & 0x0F).to(tl.int32), eviction_policy="evict_last")
        hi = hi * scale[:, None]
        lo = lo * scale[:, None]

        if PAIRS:
            # Little-endian: the low half-word is value 2j. Same layout as the bytes: no shuffle, 16-byte stores.
            word = _to_bits16(hi, OUT_DTYPE, SOFT_BF16) | (_to_bits16(lo, OUT_DTYPE, SOFT_BF16) << 16)
            words_ptr = out_ptr.to(tl.pointer_type(tl.int32))
            if EVEN:
                tl.store(words_ptr + b_idx, word.to(tl.int32, bitcast=True), cache_modifier=".cs" if STREAM else "")
            else:
                tl.store(words_ptr + b_idx, word.to(tl.int32, bitcast=True), mask=b_idx < n // 2,
                         cache_modifier=".cs" if STREAM else "")
        else:
            values = tl.join(hi, lo).reshape(BLOCKS, BLOCKSIZE)
            o_idx = 2 * base + tl.arange(0, BLOCKS)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
            if SOFT_BF16:
                result = _to_bits16(values, OUT_DTYPE, SOFT_BF16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                result = values.to(OUT_DTYPE)
            tl.store(out_ptr + o_idx, result, mask=o_idx < n)


    @triton.jit
    def _nf4_dequant_kernel(
        packed_ptr,  # uint8 [ceil(n/2)]
        absmax_ptr,  # uint8 [nblocks] (nested) or float32 [nblocks]
        absmax2_ptr,  # float32 [ceil(nblocks/256)] (nested)
        code2_ptr,  # float32 [256] (nested)
        offset_ptr,  # float32 [1] (nested)
        code_ptr,  # float32 [16]
        out_ptr,  # OUT_DTYPE [n] (read as int32 [n/2] holding value pairs when PAIRS)
        n,
        nblocks,
        BLOCKSIZE: tl.constexpr,
        BLOCKS: tl.constexpr,
        NESTED: tl.constexpr,
        UNPACK_ASM: tl.constexpr,
        MUL_ASM: tl.constexpr,
        SOFT_BF16: tl.constexpr,
        OUT_DTYPE: tl.constexpr,
        PAIRS: tl.constexpr,  # 16-bit output written as one 32-bit word per packed byte
        EVEN: tl.constexpr,  # n is a multiple of BLOCKS * BLOCKSIZE: no masks, full-width vector accesses
        STREAM: tl.constexpr,  # write the output with streaming stores (.cs): it is read once, by the next matmul
        STAGES: tl.constexpr,  # 0: one tile per program; k > 0: persistent programs, k-deep software pipeline
    ):
        if STAGES == 0:
            _dequant_tile(tl.program_id(0), packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n, nblocks,
                          BLOCKSIZE, BLOCKS, NESTED, UNPACK_ASM, MUL_ASM, SOFT_BF16, OUT_DTYPE, PAIRS, EVEN, STREAM)
        else:
            for tile in tl.range(tl.program_id(0), tl.cdiv(nblocks, BLOCKS), tl.num_programs(0), num_stages=STAGES):
                _dequant_tile(tile, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n, nblocks,
                          BLOCKSIZE, BLOCKS, NESTED, UNPACK_ASM, MUL_ASM, SOFT_BF16, OUT_DTYPE, PAIRS, EVEN, STREAM)


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
def _config(n: int, blocksize: int) -> tuple[int, int, bool, int]:
    """(absmax blocks per tile, warps, streaming stores, stages): 2048 values per program, 4 warps, plain stores,
    one tile per program: within noise of the best of the sweep `quickloris bench dequant` runs on an H100
    (14336x4096 bf16, weights rotated: 55.7-56.2 us; streaming stores and other shapes did not help)."""
    blocks = max(1, min(2048 // blocksize, 64))
    return blocks, 4, False, 0


# Compiled kernels by specialization, for launching without Triton's per-call argument binding (~10 us of
# Python per call, more than the kernel itself on small weights). Keyed like Triton's own specialization.
_COMPILED: dict[tuple, Any] = {}


def _spec_key(tensors, ints, constexprs, warps, device_index) -> tuple:
    return (device_index, warps, *constexprs,
            *((t.dtype, t.data_ptr() % 16 == 0) for t in tensors),
            *((i == 1, i % 16 == 0, i >= 2**31) for i in ints))


def _launch(kernel, packed, absmax, absmax2, code2, offset, code, out, n, blocksize, use_asm, config=None):
    """Launch the kernel once. `use_asm` selects the inline-PTX unpack; the `.rn` multiply is always used on GPUs.
    `config` = (absmax blocks per tile, warps, streaming stores, pipeline stages; 0 = one tile per program)
    overrides the defaults (for the sweep)."""
    nblocks = absmax.numel()
    blocks, warps, stream, stages = config or _config(n, blocksize)
    nested = absmax2 is not None
    interp = _interpreting()
    # 16-bit outputs go out as one 32-bit word per packed byte when n is even and the output 4-byte aligned.
    pairs = out.dtype != torch.float32 and n % 2 == 0 and out.data_ptr() % 4 == 0
    tensors = (packed, absmax, absmax2 if nested else absmax, code2 if nested else code, offset if nested else code,
               code, out)
    constexprs = (blocksize, blocks, nested, use_asm, out.is_cuda and not interp,
                  interp and out.dtype == torch.bfloat16, _TL_DTYPES[out.dtype], pairs,
                  n % (blocks * blocksize) == 0, stream and out.is_cuda, stages)
    tiles = triton.cdiv(nblocks, blocks)
    grid = (min(tiles, _sm_count(out.device) * _PROGRAMS_PER_SM) if stages else tiles,)
    # Direct launches only from eager code on the current device (Triton launches in the current context).
    direct = kernel is _nf4_dequant_kernel and out.is_cuda and out.device.index == torch.cuda.current_device()
    if direct:
        key = _spec_key(tensors, (n, nblocks), constexprs, warps, out.device.index)
        compiled = _COMPILED.get(key)
        if compiled is not None:
            stream = torch._C._cuda_getCurrentRawStream(out.device.index)
            enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
            meta = compiled.launch_metadata(grid, stream, *tensors, n, nblocks, *constexprs) if enter else None
            compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, meta, enter, leave,
                         *tensors, n, nblocks, *constexprs)
            return compiled, grid, (*tensors, n, nblocks, *constexprs)
    compiled = kernel[grid](*tensors, n, nblocks, **dict(zip(_CONSTEXPR_NAMES, constexprs)), num_warps=warps)
    if direct and compiled is not None:
        _COMPILED[key] = compiled
    return compiled, grid, (*tensors, n, nblocks, *constexprs)


_CONSTEXPR_NAMES = ("BLOCKSIZE", "BLOCKS", "NESTED", "UNPACK_ASM", "MUL_ASM", "SOFT_BF16", "OUT_DTYPE", "PAIRS", "EVEN",
                    "STREAM", "STAGES")
_PROGRAMS_PER_SM = 8


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32} if triton else {}


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



class _Plan:
    """A launch that can be repeated for one quantization state with only a new output tensor.

    Eager calls spend more time in Python than the kernel takes on small weights (argument resolution, checks,
    Triton's argument binding; `Params4bit.data` alone goes through `__torch_function__`). After one fully
    checked call, the plan keeps the compiled kernel, its arguments and the packed bytes; a later call with the
    same weight object (same data pointer) and the same state tensors launches directly. Anything else takes
    the checked path.
    """

    __slots__ = ("source", "packed", "packed_ptr", "tensors", "shape", "dtype", "device", "device_index",
                 "compiled", "grid", "head", "tail")

    def __init__(self, source, packed, tensors, shape, dtype, device, compiled, grid, args):
        self.source = weakref.ref(source)
        self.packed, self.packed_ptr = packed, packed.data_ptr()
        self.tensors, self.shape, self.dtype = tensors, shape, dtype
        self.device, self.device_index = device, device.index
        self.compiled, self.grid = compiled, grid
        self.head, self.tail = args[:6], args[7:]  # (packed .. code), out, (n, nblocks, constexprs...)

    def launch(self, out: torch.Tensor) -> torch.Tensor:
        stream = torch._C._cuda_getCurrentRawStream(self.device_index)
        enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
        c = self.compiled
        args = (*self.head, out, *self.tail)
        if _listening(enter) or _listening(leave):  # a profiler is listening: behave exactly like Triton's launcher
            c.run(self.grid[0], 1, 1, stream, c.function, c.packed_metadata,
                  c.launch_metadata(self.grid, stream, *args), enter, leave, *args)
        else:
            c.run(self.grid[0], 1, 1, stream, c.function, c.packed_metadata, None, None, None, *args)
        return out


def _listening(hook) -> bool:
    """Triton keeps a (usually empty) HookChain as its launch hook; older versions keep None or a function."""
    return hook is not None and bool(getattr(hook, "calls", True))


# id(quantization state) -> (weak reference to it, plan). By id: bitsandbytes' QuantState is not hashable.
_PLANS: dict[int, tuple[weakref.ref, _Plan]] = {}


def _plan_for(state: Any) -> _Plan | None:
    entry = _PLANS.get(id(state))
    return entry[1] if entry is not None and entry[0]() is state else None


def _planned(weight: Any, quant_state: Any, out: torch.Tensor | None, dtype: torch.dtype | None):
    """The output of a direct launch if `weight` has a valid plan, else None (then the checked path runs)."""
    source = getattr(weight, "weight", None) if isinstance(weight, torch.nn.Module) else weight
    state = quant_state if quant_state is not None else getattr(source, "quant_state", None)
    plan = _plan_for(state) if state is not None else None
    if plan is None or plan.source() is not source or not isinstance(source, torch.Tensor):
        return None
    absmax, absmax2, code2, offset, code, shape, _, _ = _fields(state)
    t = plan.tensors
    if not (absmax is t[0] and absmax2 is t[1] and code2 is t[2] and offset is t[3] and code is t[4]
            and shape == plan.shape and (dtype is None or dtype == plan.dtype)
            and source.data_ptr() == plan.packed_ptr and torch.cuda.current_device() == plan.device_index):
        return None
    if out is None:
        out = torch.empty(plan.shape, dtype=plan.dtype, device=plan.device)
    elif not (out.dtype == plan.dtype and out.shape == plan.shape and out.is_contiguous()
              and out.data_ptr() % 16 == 0 and out.get_device() == plan.device_index):
        return None
    return plan.launch(out)


def _make_plan(weight, packed, state, out, launched) -> None:
    compiled, grid, args = launched
    source = getattr(weight, "weight", None) if isinstance(weight, torch.nn.Module) else weight
    if compiled is None or not isinstance(source, torch.Tensor) or packed.data_ptr() % 16 or out.data_ptr() % 16:
        return
    absmax, absmax2, code2, offset, code, shape, _, _ = _fields(state)
    key = id(state)
    try:
        ref = weakref.ref(state, lambda _, key=key: _PLANS.pop(key, None))
        plan = _Plan(source, packed, (absmax, absmax2, code2, offset, code), shape, out.dtype, out.device,
                     compiled, grid, args)
    except TypeError:  # not weak-referenceable: no plan
        return
    _PLANS[key] = (ref, plan)


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
    compiling = torch.compiler.is_compiling()
    if not compiling:
        result = _planned(weight, quant_state, out, dtype)
        if result is not None:
            return result
    packed, state = _resolve(weight, quant_state)
    absmax, absmax2, code2, offset, code, shape, state_dtype, blocksize = _fields(state)
    out_dtype = dtype or (out.dtype if out is not None else state_dtype)
    _check(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out_dtype, out)
    if _HAS_OP and compiling:
        if out is None:
            return torch.ops.quickloris.dequantize_nf4(packed, absmax, absmax2, code2, offset, code, list(shape),
                                                       blocksize, out_dtype)
        torch.ops.quickloris.dequantize_nf4_out(packed, absmax, absmax2, code2, offset, code, blocksize, out)
        return out
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    if packed.is_cuda and out_dtype == state_dtype and triton is not None:
        launched = _launch(_nf4_dequant_kernel, packed, absmax, absmax2, code2, offset, code, out, out.numel(),
                           blocksize, _use_asm(packed.device))
        _make_plan(weight, packed, state, out, launched)
        return out
    return _dequant_into(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out)
