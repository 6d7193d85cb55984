"""Launching the NF4 kernel: argument reading, tuned defaults, and cached launch plans for eager calls.

Triton's per-call argument binding costs ~10 us of Python, more than the kernel takes on small weights, so
eager calls reuse (a) compiled kernels keyed like Triton's own specialization and (b) per-weight plans that
re-validate by identity and launch the compiled kernel directly.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any

import torch

from quickloris.kernels.nf4_kernel import interpreting, nf4_dequant_kernel, tl, triton
from quickloris.quant.nf4 import NF4State, state_from_bnb

def state_fields(state: Any) -> tuple:
    """(absmax, absmax2, code2, offset, code, shape, dtype, blocksize) of an NF4State or bitsandbytes QuantState."""
    if isinstance(state, NF4State):
        return (state.absmax, state.absmax2, state.code2, state.offset, state.code, state.shape, state.dtype,
                state.blocksize)
    if getattr(state, "quant_type", None) is not None:  # bitsandbytes QuantState, read without copies
        if state.quant_type != "nf4":
            raise ValueError(f"only NF4 weights are supported, got quant_type={state.quant_type!r}")
        if state.nested and not isinstance(state.offset, torch.Tensor):
            state = state_from_bnb(state)
            return state_fields(state)
        if state.nested:
            s2 = state.state2
            if s2.blocksize != 256:
                raise ValueError(f"nested blocksize must be 256, got {s2.blocksize}")
            return state.absmax, s2.absmax, s2.code, state.offset, state.code, state.shape, state.dtype, state.blocksize
        return state.absmax, None, None, None, state.code, state.shape, state.dtype, state.blocksize
    raise TypeError(f"quant_state must be a quickloris NF4State or a bitsandbytes QuantState, got {type(state).__name__}")


@functools.lru_cache(maxsize=None)
def default_config(n: int, blocksize: int) -> tuple[int, int, bool]:
    """(absmax blocks per program, warps, streaming stores): 4096 values per program, 4 warps, plain stores, the
    best of two sweeps of `quickloris bench dequant` on an H100 (14336x4096 bf16, weights rotated so no launch
    hits L2: 55.5 and 55.9 us; 2048 values: 56.2/56.3 us; streaming stores and persistent software-pipelined
    programs were slower: benchmarks/results/dequant/dequant-20261123T015234Z.json)."""
    blocks = max(1, min(4096 // blocksize, 64))
    return blocks, 4, False


# Compiled kernels by specialization, for launching without Triton's per-call argument binding (~10 us of
# Python per call, more than the kernel itself on small weights). Keyed like Triton's own specialization.
_COMPILED: dict[tuple, Any] = {}


def _spec_key(tensors, ints, constexprs, warps, device_index) -> tuple:
    return (device_index, warps, *constexprs,
            *((t.dtype, t.data_ptr() % 16 == 0) for t in tensors),
            *((i == 1, i % 16 == 0, i >= 2**31) for i in ints))


def launch(kernel, packed, absmax, absmax2, code2, offset, code, out, n, blocksize, use_asm, config=None):
    """Launch the kernel once. `use_asm` selects the inline-PTX unpack; the `.rn` multiply is always used on GPUs.
    `config` = (absmax blocks per program, warps, streaming stores) overrides the defaults (for the sweep)."""
    nblocks = absmax.numel()
    blocks, warps, stream = config or default_config(n, blocksize)
    nested = absmax2 is not None
    interp = interpreting()
    # 16-bit outputs go out as one 32-bit word per packed byte when n is even and the output 4-byte aligned.
    pairs = out.dtype != torch.float32 and n % 2 == 0 and out.data_ptr() % 4 == 0
    tensors = (packed, absmax, absmax2 if nested else absmax, code2 if nested else code, offset if nested else code,
               code, out)
    constexprs = (blocksize, blocks, nested, use_asm, out.is_cuda and not interp,
                  interp and out.dtype == torch.bfloat16, _TL_DTYPES[out.dtype], pairs,
                  n % (blocks * blocksize) == 0, stream and out.is_cuda)
    grid = (triton.cdiv(nblocks, blocks),)
    # Direct launches only from eager code on the current device (Triton launches in the current context).
    direct = kernel is nf4_dequant_kernel and out.is_cuda and out.device.index == torch.cuda.current_device()
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
                    "STREAM")
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32} if triton else {}


def use_asm(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreting() and os.environ.get("QUICKLORIS_NF4_ASM", "1") != "0"





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


def plan_for(state: Any) -> _Plan | None:
    entry = _PLANS.get(id(state))
    return entry[1] if entry is not None and entry[0]() is state else None


def planned(weight: Any, quant_state: Any, out: torch.Tensor | None, dtype: torch.dtype | None):
    """The output of a direct launch if `weight` has a valid plan, else None (then the checked path runs)."""
    source = getattr(weight, "weight", None) if isinstance(weight, torch.nn.Module) else weight
    state = quant_state if quant_state is not None else getattr(source, "quant_state", None)
    plan = plan_for(state) if state is not None else None
    if plan is None or plan.source() is not source or not isinstance(source, torch.Tensor):
        return None
    absmax, absmax2, code2, offset, code, shape, _, _ = state_fields(state)
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


def make_plan(weight, packed, state, out, launched) -> None:
    compiled, grid, args = launched
    source = getattr(weight, "weight", None) if isinstance(weight, torch.nn.Module) else weight
    if compiled is None or not isinstance(source, torch.Tensor) or packed.data_ptr() % 16 or out.data_ptr() % 16:
        return
    absmax, absmax2, code2, offset, code, shape, _, _ = state_fields(state)
    key = id(state)
    try:
        ref = weakref.ref(state, lambda _, key=key: _PLANS.pop(key, None))
        plan = _Plan(source, packed, (absmax, absmax2, code2, offset, code), shape, out.dtype, out.device,
                     compiled, grid, args)
    except TypeError:  # not weak-referenceable: no plan
        return
    _PLANS[key] = (ref, plan)
