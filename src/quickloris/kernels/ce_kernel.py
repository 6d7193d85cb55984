"""Triton kernels of the vocabulary-blocked cross-entropy (`quickloris.ops.vocab_blocked_ce`): the softmax work
done on the 16-bit logits where the matmul wrote them, with no fp32 [rows, V] copy.

* `row_lse(z)`: lse_r = log sum_v exp z_{r, v} per row of z ([R, V], any float dtype), in fp32. One program per
  (row, block of `BLOCK` columns) reads its block once and writes m_rb = max z, s_rb = sum exp(z - m_rb); then
  lse_r = M_r + log sum_b s_rb e^{m_rb - M_r}, M_r = max_b m_rb, on the small [R, V / BLOCK] partials. 2 bytes
  read per bf16 logit; PyTorch's `logsumexp(z.float())` moves ~30.
* `softmax_grad_(z, lse, labels, scale, v0)`: in place, z_{r, c} <- scale_r (exp(z_{r, c} - lse_r) - [v0 + c ==
  y_r]), computed in fp32 and rounded once to z's dtype: the cross-entropy gradient G of a block of columns
  [v0, v0 + C) of the vocabulary. 2 bytes read and 2 written per bf16 logit (PyTorch's chain: ~36).

Both are bound by memory bandwidth. Differences from the PyTorch formulas are in fp32 rounding only (lane-wise
summation order of lse; Triton's exp), i.e. a few fp32 ulps before the single rounding to z's dtype.
"""

from __future__ import annotations

import torch

from quickloris.kernels.triton_common import interpreting, tl, triton

if triton is not None:
    from quickloris.kernels.triton_common import bf16_bits_rn

#: Columns per program step; a multiple of every vector width.
BLOCK = 2048

if triton is not None:

    @triton.jit
    def _block_lse_kernel(z_ptr, m_ptr, s_ptr, n_cols, stride_row, n_blocks, BLOCK: tl.constexpr):
        """Partial (max, sum exp(z - max)) of one row over one block of columns."""
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(z_ptr + row * stride_row + idx, mask=idx < n_cols, other=float("-inf")).to(tl.float32)
        top = tl.max(z, axis=0)  # finite: every block holds at least one column
        tl.store(m_ptr + row * n_blocks + blk, top)
        tl.store(s_ptr + row * n_blocks + blk, tl.sum(tl.exp(z - top), axis=0))

    @triton.jit
    def _softmax_grad_kernel(
        z_ptr,
        lse_ptr,
        labels_ptr,
        scale_ptr,
        n_cols,
        stride_row,
        v0,
        BLOCK: tl.constexpr,
        SOFT_BF16: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < n_cols
        ptrs = z_ptr + row * stride_row + idx
        lse = tl.load(lse_ptr + row)
        label = tl.load(labels_ptr + row)
        scale = tl.load(scale_ptr + row)
        z = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
        g = tl.exp(z - lse)
        g = tl.where(idx + v0 == label, g - 1.0, g)
        g = g * scale
        if SOFT_BF16:  # the interpreter's bf16 cast does not round to nearest even
            tl.store(ptrs.to(tl.pointer_type(tl.uint16)), bf16_bits_rn(g).to(tl.uint16), mask=inside)
        else:
            tl.store(ptrs, g.to(z_ptr.dtype.element_ty), mask=inside)


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on `t`: a CUDA tensor with Triton installed, or any CPU tensor under the
    Triton interpreter (TRITON_INTERPRET=1, the CPU tests)."""
    if triton is None:
        return False
    return t.device.type == "cuda" or (interpreting() and t.device.type == "cpu")


def _check(z: torch.Tensor) -> None:
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"expected a 2-D tensor with contiguous rows, got shape {tuple(z.shape)} {z.stride()}")


def row_lse(z: torch.Tensor) -> torch.Tensor:
    """fp32 [R]: logsumexp of each row of z ([R, V], rows contiguous)."""
    _check(z)
    rows, cols = z.shape
    if not rows or not cols:
        return torch.logsumexp(z.float(), dim=-1)
    n_blocks = triton.cdiv(cols, BLOCK)
    m = torch.empty(rows, n_blocks, dtype=torch.float32, device=z.device)
    s = torch.empty_like(m)
    _block_lse_kernel[(rows, n_blocks)](z, m, s, cols, z.stride(0), n_blocks, BLOCK=BLOCK)
    top = m.amax(dim=1, keepdim=True)
    return (s * (m - top).exp_()).sum(dim=1).log_().add_(top.squeeze(1))


def softmax_grad_(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, v0: int):
    """In place: z <- scale[:, None] (exp(z - lse[:, None]) - onehot(labels - v0)), fp32 math, one rounding.

    z: [R, C] (rows contiguous), columns v0..v0+C of the vocabulary; lse, scale: fp32 [R]; labels: int64 [R]
    (a label outside [v0, v0 + C) subtracts nothing). Returns z.
    """
    _check(z)
    if lse.dtype != torch.float32 or scale.dtype != torch.float32 or labels.dtype != torch.int64:
        raise TypeError("lse and scale must be float32, labels int64")
    rows, cols = z.shape
    if rows and cols:
        soft = interpreting() and z.dtype == torch.bfloat16
        grid = (rows, triton.cdiv(cols, BLOCK))
        _softmax_grad_kernel[grid](
            z, lse.contiguous(), labels.contiguous(), scale.contiguous(), cols, z.stride(0), v0,
            BLOCK=BLOCK, SOFT_BF16=soft,
        )  # fmt: skip
    return z
