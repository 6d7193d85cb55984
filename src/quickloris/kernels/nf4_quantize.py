"""`quickloris.quantize_nf4`: NF4 quantization byte-for-byte like bitsandbytes on the weight's own device.

Everything but one instruction is the pure-PyTorch reference (`quickloris.quant.nf4.quantize_nf4`). The exception:
bitsandbytes' CUDA library is compiled with ``--use_fast_math``, so its blockwise quantize kernel's
``1.0f / absmax`` is the approximate reciprocal ``rcp.approx.ftz.f32`` (at most 1 ulp from 1/x, and not always the
correctly rounded value), and every value of a block is scaled by that: ``q = bucket(x * rcp(absmax))``. A value
within an ulp of a bucket threshold in a block whose approximate and exact reciprocals differ then gets the other
nibble (the nested step's 256-blocks of absmax values likewise). No PyTorch op computes the approximation, so on a
CUDA tensor (rounding ``"bnb-cuda"``, the default there) the reciprocal is taken by one Triton launch whose body is
that PTX instruction (`rcp_approx_ftz`). On the CPU, or under the Triton interpreter (which runs no PTX), the
reference's exact reciprocal is used: bitsandbytes' CPU backend divides exactly too.
"""

from __future__ import annotations

import torch

from quickloris.kernels.nf4_kernel import interpreting, tl, triton
from quickloris.quant import nf4

if triton is not None:

    @triton.jit
    def _rcp_approx_ftz_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=1.0)
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
        tl.store(y_ptr + offs, y, mask=mask)


def rcp_approx_ftz(x: torch.Tensor) -> torch.Tensor:
    """Elementwise ``rcp.approx.ftz.f32`` of a float32 CUDA tensor (what ``1.0f / x`` compiles to under
    ``--use_fast_math``): 1/x within 1 ulp, subnormal inputs and outputs flushed to zero."""
    if x.dtype != torch.float32 or not x.is_cuda:
        raise ValueError(f"rcp_approx_ftz takes a float32 CUDA tensor, got {x.dtype} on {x.device}")
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        block = 1024
        _rcp_approx_ftz_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block)
    return y


def quantize_nf4(
    weight: torch.Tensor,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    rounding: nf4.Rounding | None = None,
) -> tuple[torch.Tensor, nf4.NF4State]:
    """Quantize `weight` to NF4 in bitsandbytes' layout (``(packed, state)``, see `quickloris.quant.nf4`), with the
    bytes bitsandbytes' backend for `weight`'s device writes: on CUDA its kernel's approximate reciprocal."""
    cuda_bytes = (rounding or "bnb-cuda") == "bnb-cuda" and isinstance(weight, torch.Tensor) and weight.is_cuda
    reciprocal = rcp_approx_ftz if cuda_bytes and triton is not None and not interpreting() else torch.reciprocal
    return nf4.quantize_nf4(
        weight, blocksize=blocksize, double_quant=double_quant, rounding=rounding, reciprocal=reciprocal
    )


__all__ = ["quantize_nf4", "rcp_approx_ftz"]
