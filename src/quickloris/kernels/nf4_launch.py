"""Launching the NF4 kernel: argument reading, tuned defaults, and compiled kernels for direct eager launches.

Triton's per-call argument binding costs ~10 us of Python, more than the kernel takes on small weights, so
eager calls reuse (a) compiled kernels keyed like Triton's own specialization (here) and (b) per-weight cached
launches that re-validate by identity and launch the compiled kernel directly (`nf4_fast`).

That direct launch repeats what Triton's `JITFunction.run` does with its private pieces (`CompiledKernel.run`
and its launcher's argument order, `knobs.runtime` launch hooks, torch's raw stream handle). They are checked once
(`direct_launch_problem`); if any is missing or differs, every launch takes the public ``kernel[grid](...)`` path:
the same kernel and bits, ~10 us more host time per call.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from quickloris.kernels.nf4_kernel import interpreting, nf4_dequant_kernel, tl, triton
from quickloris.quant.nf4 import NF4State, state_from_bnb


def state_fields(state: Any) -> tuple:
    """(absmax, absmax2, code2, offset, code, shape, dtype, blocksize) of an NF4State or bitsandbytes QuantState."""
    if isinstance(state, NF4State):
        return (
            state.absmax,
            state.absmax2,
            state.code2,
            state.offset,
            state.code,
            state.shape,
            state.dtype,
            state.blocksize,
        )
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
    raise TypeError(
        f"quant_state must be a quickloris NF4State or a bitsandbytes QuantState, got {type(state).__name__}"
    )


@functools.cache
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
    return (
        device_index,
        warps,
        *constexprs,
        *((t.dtype, t.data_ptr() % 16 == 0) for t in tensors),
        *((i == 1, i % 16 == 0, i >= 2**31) for i in ints),
    )


# What `JITFunction.run` does to launch a compiled kernel (whitespace removed): the direct launch does the same.
_JIT_LAUNCH = (
    "launch_metadata=kernel.launch_metadata(grid,stream,*bound_args.values())",
    "kernel.run(grid_0,grid_1,grid_2,stream,kernel.function,kernel.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*bound_args.values())",
)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@functools.cache
def direct_launch_problem() -> str | None:
    """Why eager calls cannot launch compiled kernels directly (None: they can), checked once per process."""
    if triton is None or interpreting():
        return "no compiled Triton"
    return internals_problem()


def internals_problem() -> str | None:
    """What differs from the internals the direct launch was written against (None: nothing): torch's raw stream
    handle, Triton's launch hooks, and Triton's own launch sequence in `JITFunction.run`, which the direct launch
    repeats argument for argument."""
    if not callable(getattr(torch._C, "_cuda_getCurrentRawStream", None)):
        return "torch._C._cuda_getCurrentRawStream is missing"
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if not all(hasattr(runtime, hook) for hook in ("launch_enter_hook", "launch_exit_hook")):
        return "triton.knobs.runtime has no launch_enter_hook / launch_exit_hook"
    try:
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime.jit import JITFunction

        source = "".join(inspect.getsource(JITFunction.run).split())
        meta = list(inspect.signature(CompiledKernel.launch_metadata).parameters.values())
    except (ImportError, AttributeError, OSError, TypeError, ValueError) as e:
        return f"Triton's launch internals cannot be read ({type(e).__name__}: {e})"
    if not all(step in source for step in _JIT_LAUNCH):
        return "triton.runtime.jit.JITFunction.run launches compiled kernels differently"
    if [p.kind for p in meta[1:]] != [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2 + [inspect.Parameter.VAR_POSITIONAL]:
        return "CompiledKernel.launch_metadata(grid, stream, *args) has another signature"
    return None


def _launchable(compiled: Any) -> bool:
    """`compiled` has what the direct launch calls: a loaded `function`, `packed_metadata`, `launch_metadata` and a
    launcher `run(gridX, gridY, gridZ, stream, function, *args)`."""
    run = getattr(compiled, "run", None)
    if (
        getattr(compiled, "function", None) is None
        or not hasattr(compiled, "packed_metadata")
        or not callable(getattr(compiled, "launch_metadata", None))
        or not callable(run)
    ):
        return False
    try:
        params = list(inspect.signature(run).parameters.values())
    except (TypeError, ValueError):
        return False
    return (
        [p.kind in _POSITIONAL for p in params[:5]] == [True] * 5
        and len(params) == 6
        and params[5].kind == inspect.Parameter.VAR_POSITIONAL
    )


def byte_aligned(t: torch.Tensor, k: int) -> bool:
    """Whether `t`'s first element sits at an address divisible by `k` bytes.

    A real tensor answers from its pointer. While torch.compile traces (a triton_op body runs on fake tensors,
    which have no pointer) it answers from the storage offset: every PyTorch allocator aligns a storage's start to
    at least 16 bytes (the CUDA caching allocator to 512), so a view is k-aligned iff its byte offset is.
    """
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t):
        return (t.storage_offset() * t.element_size()) % k == 0
    return t.data_ptr() % k == 0


def launch(kernel, packed, absmax, absmax2, code2, offset, code, out, n, blocksize, use_asm, config=None):
    """Launch the kernel once. `use_asm` selects the inline-PTX unpack; the `.rn` multiply is always used on GPUs.
    `config` = (absmax blocks per program, warps, streaming stores) overrides the defaults (for the sweep).
    Returns (compiled kernel or None when it cannot be launched directly, grid, launch arguments)."""
    nblocks = absmax.numel()
    blocks, warps, stream = config or default_config(n, blocksize)
    nested = absmax2 is not None
    interp = interpreting()
    # 16-bit outputs go out as one 32-bit word per packed byte when n is even and the output 4-byte aligned.
    pairs = out.dtype != torch.float32 and n % 2 == 0 and byte_aligned(out, 4)
    tensors = (
        packed,
        absmax,
        absmax2 if nested else absmax,
        code2 if nested else code,
        offset if nested else code,
        code,
        out,
    )
    constexprs = (
        blocksize,
        blocks,
        nested,
        use_asm,
        out.is_cuda and not interp,
        interp and out.dtype == torch.bfloat16,
        _TL_DTYPES[out.dtype],
        pairs,
        n % (blocks * blocksize) == 0,
        stream and out.is_cuda,
    )
    grid = (triton.cdiv(nblocks, blocks),)
    # Direct launches only from eager code on the current device (Triton launches in the current context).
    direct = (
        kernel is nf4_dequant_kernel
        and out.is_cuda
        and out.device.index == torch.cuda.current_device()
        and direct_launch_problem() is None
    )
    if direct:
        key = _spec_key(tensors, (n, nblocks), constexprs, warps, out.device.index)
        compiled = _COMPILED.get(key)
        if compiled is not None:
            stream = torch._C._cuda_getCurrentRawStream(out.device.index)
            enter, leave = triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook
            meta = compiled.launch_metadata(grid, stream, *tensors, n, nblocks, *constexprs) if enter else None
            compiled.run(
                grid[0],
                1,
                1,
                stream,
                compiled.function,
                compiled.packed_metadata,
                meta,
                enter,
                leave,
                *tensors,
                n,
                nblocks,
                *constexprs,
            )
            return compiled, grid, (*tensors, n, nblocks, *constexprs)
    compiled = kernel[grid](*tensors, n, nblocks, **dict(zip(_CONSTEXPR_NAMES, constexprs)), num_warps=warps)
    if not (direct and _launchable(compiled)):
        return None, grid, (*tensors, n, nblocks, *constexprs)
    _COMPILED[key] = compiled
    return compiled, grid, (*tensors, n, nblocks, *constexprs)


_CONSTEXPR_NAMES = (
    "BLOCKSIZE",
    "BLOCKS",
    "NESTED",
    "UNPACK_ASM",
    "MUL_ASM",
    "SOFT_BF16",
    "OUT_DTYPE",
    "PAIRS",
    "EVEN",
    "STREAM",
)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32} if triton else {}


def use_asm(device: torch.device, inline_ptx: bool | None = None) -> bool:
    """Whether the kernel unpacks with inline PTX: `inline_ptx` when given (True needs a CUDA device and compiled
    Triton; False: the plain-Triton twin, bit-identical), else wherever it can (CUDA without TRITON_INTERPRET=1)."""
    possible = device.type == "cuda" and not interpreting()
    if inline_ptx is None:
        return possible
    if inline_ptx and not possible:
        raise ValueError(
            f"inline_ptx=True needs a CUDA tensor and compiled Triton (not TRITON_INTERPRET=1); the "
            f"weight is on {device}{' under the interpreter' if interpreting() else ''}: pass "
            "inline_ptx=None or False"
        )
    return bool(inline_ptx)
