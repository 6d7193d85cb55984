"""`quickloris.dequantize_nf4`: NF4 (bitsandbytes layout) -> fp16/bf16/fp32 in one fused Triton launch.

The kernel and its math: `nf4_kernel.py`; launching and eager plans: `nf4_launch.py`. Here: argument
resolution and checks, the `torch.library` ops, and the public function.

The op `quickloris::dequantize_nf4` (and `_out`) is a `triton_op` on GPUs, so `torch.compile(fullgraph=True)`
traces straight through it to the kernel; eager calls skip the dispatcher (it adds ~10 us per call) and, after
their first checked call, launch through the weight object's cached launch (`nf4_fast`).
"""

from __future__ import annotations

from typing import Any

import torch

from quickloris.kernels.nf4_fast import cached, remember
from quickloris.kernels.nf4_kernel import interpreting, nf4_dequant_kernel, triton
from quickloris.kernels.nf4_launch import launch, state_fields, use_asm
from quickloris.quant.nf4 import FLOAT_DTYPES, NF4State, as_packed_uint8, dequantize_nf4_reference

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
            raise TypeError(
                f"cannot find an NF4 quantization state on {type(weight).__name__}: pass a "
                "bitsandbytes Params4bit/Linear4bit, a quickloris NF4 weight, or (packed, quant_state)"
            )
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"packed NF4 data must be a tensor, got {type(weight).__name__}")
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return as_packed_uint8(data), quant_state


def _check(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out_dtype, out) -> int:
    n = 1
    for s in shape:
        n *= s
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed data has {packed.numel()} bytes but the quant state's shape {tuple(shape)} needs {(n + 1) // 2}"
        )
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
            raise ValueError(
                f"out must be a contiguous {out_dtype} tensor of shape {tuple(shape)} on {dev}; got "
                f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
            )
    return n


def _dequant_into(
    packed, absmax, absmax2, code2, offset, code, shape, blocksize, out, kernel=None, inline_ptx=None
) -> torch.Tensor:
    n = out.numel()
    if packed.device.type == "cuda" or (interpreting() and packed.device.type == "cpu"):
        if triton is None:
            raise RuntimeError("the NF4 GPU kernel needs triton; install it (pip install triton)")
        launch(
            kernel or nf4_dequant_kernel,
            packed,
            absmax,
            absmax2,
            code2,
            offset,
            code,
            out,
            n,
            blocksize,
            use_asm(packed.device, inline_ptx),
        )
    else:  # CPU without the Triton interpreter (or another device): the pure-PyTorch reference
        state = NF4State(
            shape=torch.Size(shape),
            dtype=out.dtype,
            blocksize=blocksize,
            absmax=absmax,
            code=code,
            offset=offset,
            absmax2=absmax2,
            code2=code2,
        )
        out.copy_(dequantize_nf4_reference(packed, state, out.dtype))
    return out


def _op_body(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    shape: list[int],
    blocksize: int,
    dtype: torch.dtype,
    inline_ptx: bool | None = None,
) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    kernel = None if interpreting() else torch.library.wrap_triton(nf4_dequant_kernel)
    return _dequant_into(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out, kernel, inline_ptx)


def _op_out_body(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
    inline_ptx: bool | None = None,
) -> None:
    kernel = None if interpreting() else torch.library.wrap_triton(nf4_dequant_kernel)
    _dequant_into(packed, absmax, absmax2, code2, offset, code, list(out.shape), blocksize, out, kernel, inline_ptx)


def _register_ops() -> bool:
    """Define `quickloris::dequantize_nf4` and `quickloris::dequantize_nf4_out`.

    On GPUs they are `triton_op`s: AOTDispatcher decomposes them, so Inductor sees the Triton kernel itself.
    Under TRITON_INTERPRET=1 they are opaque `custom_op`s (an interpreted kernel cannot be traced), which still
    keeps `torch.compile(fullgraph=True)` free of graph breaks.
    """
    if triton is None or not hasattr(torch.library, "triton_op"):
        return False
    if interpreting():
        op = torch.library.custom_op("quickloris::dequantize_nf4", mutates_args=())(_op_body)

        @op.register_fake
        def _(packed, absmax, absmax2, code2, offset, code, shape, blocksize, dtype, inline_ptx=None):
            return torch.empty(shape, dtype=dtype, device=packed.device)

        torch.library.custom_op("quickloris::dequantize_nf4_out", mutates_args=("out",))(_op_out_body)
    else:
        torch.library.triton_op("quickloris::dequantize_nf4", mutates_args=())(_op_body)
        torch.library.triton_op("quickloris::dequantize_nf4_out", mutates_args=("out",))(_op_out_body)
    return True


_HAS_OP = _register_ops()


def dequantize_nf4(
    weight: Any,
    quant_state: Any = None,
    *,
    out: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    inline_ptx: bool | None = None,
) -> torch.Tensor:
    """Dequantize an NF4 weight (bitsandbytes layout, nested or not) to a dense fp16/bf16/fp32 tensor.

    Args:
        weight: a bitsandbytes ``Params4bit`` or ``Linear4bit``, a quickloris NF4 weight, or the packed uint8
            tensor (then `quant_state` is required).
        quant_state: a ``quickloris.quant.nf4.NF4State`` or a bitsandbytes ``QuantState`` (taken from
            `weight` when omitted).
        out: optional preallocated output (contiguous, the weight's shape); nothing else is allocated.
        dtype: output dtype (default: `out`'s dtype, else the weight's original dtype).
        inline_ptx: the kernel's unpack/table step: None (default) inline PTX wherever it can run (CUDA, compiled
            Triton), False the plain-Triton twin, True inline PTX or a ValueError where it cannot run. Both give
            the same bits; the switch exists to compare them.

    Returns the ``[out_features, in_features]`` matrix, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.
    One kernel launch on CUDA; on CPU the Triton kernel runs under ``TRITON_INTERPRET=1``, else the reference.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:
        result = cached(weight, quant_state, out, dtype, inline_ptx)
        if result is not None:
            return result
    packed, state = _resolve(weight, quant_state)
    absmax, absmax2, code2, offset, code, shape, state_dtype, blocksize = state_fields(state)
    out_dtype = dtype or (out.dtype if out is not None else state_dtype)
    _check(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out_dtype, out)
    if inline_ptx:
        use_asm(packed.device, inline_ptx)  # says here, before any dispatch, where inline PTX cannot run
    if _HAS_OP and compiling:
        if out is None:
            return torch.ops.quickloris.dequantize_nf4(
                packed, absmax, absmax2, code2, offset, code, list(shape), blocksize, out_dtype, inline_ptx
            )
        torch.ops.quickloris.dequantize_nf4_out(
            packed, absmax, absmax2, code2, offset, code, blocksize, out, inline_ptx
        )
        return out
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=packed.device)
    if packed.is_cuda and triton is not None:
        asm = use_asm(packed.device, inline_ptx)
        launched = launch(
            nf4_dequant_kernel, packed, absmax, absmax2, code2, offset, code, out, out.numel(), blocksize, asm
        )
        remember(weight, quant_state, packed, state, asm, launched)
        return out
    return _dequant_into(packed, absmax, absmax2, code2, offset, code, shape, blocksize, out, inline_ptx=inline_ptx)
