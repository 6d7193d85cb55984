"""Linear + cross-entropy with a trainable head: two passes, the second over blocks of the vocabulary.

`chunked_linear_loss` chooses this for plain cross-entropy when the head weight requires grad (a full
fine-tune's lm_head, the specification's part E); a frozen head (QLoRA) keeps the row-chunked schedules.

Math. z = x W^T + b ([N, V], never held whole), per row n with label y_n (rows with y_n = ignore_index count
zero):

    loss_n = lse_n - z_{n, y_n},        lse_n = log sum_v exp z_{n, v}
    d loss_n / d z_{n, v} = softmax(z_n)_v - [v = y_n] = exp(z_{n, v} - lse_n) - [v = y_n]

Pass 1 (forward): row chunk by row chunk, z in x's dtype, upcast, lse_n and z_{n, y_n}; only lse [N] (fp32) is
kept for backward. Pass 2 (backward, upstream gradient g, a scalar): vocabulary block by block, with G_b =
g (exp(z_b - lse) - onehot_b) on the valid rows, cast to x's dtype as autograd would:

    dW_b = G_b^T x     (rows v0..v1 of dW: one matmul over all N rows - rounded once, like the naive path)
    db_b = sum_n G_b   dx = sum_b G_b W_b   (summed in fp32; on CUDA each product is accumulated in fp32 by
                                         cuBLAS, elsewhere rounded to x's dtype first)

Why blocks of the vocabulary: the row-chunked schedules sum a full [V, H] partial dW per row chunk (in fp32, two
|W| more of memory and ~5 |W| bytes of traffic per chunk); here every dW row is one matmul and the fp32
accumulator is dx's [N, H] instead of dW's [V, H]. When N rows would make that accumulator larger than W's, pass
2 goes row chunk by row chunk instead (dx of a chunk summed over the blocks in fp32, dW summed over chunks in fp32
per block): `order="auto"` picks the smaller accumulator. Four matmuls of N x V x H in all (the naive path:
three), and memory over the inputs of about |dW| + |dx| (fp32) + one block's [rows, V_b] fp32 temporaries.

Elementwise work. With PyTorch's formulas each logit moves ~66 bytes (upcast, logsumexp's passes, sub / exp /
mul / cast) - on an H200 at 16K tokens, V 128256, about as long as a matmul. On CUDA (`kernels="auto"`) the
Triton kernels of `quickloris.kernels.ce_kernel` do it on the 16-bit logits in place (lse read once; G written
over the block's logits): ~6 bytes per logit, no fp32 [rows, V_b] tensor. Same math in fp32, one rounding of G.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

#: Bytes per logit alive at once in pass 2 (the 16-bit block, its fp32 upcast exponentiated in place, the cast
#: copy: 10), counted as the row-chunked schedules count theirs, so one memory budget means the same in both.
BYTES_PER_LOGIT = 12


def block_size(rows: int, vocab: int, memory_budget: int, multiple: int = 128) -> int:
    """Vocabulary entries per block so that `rows` x block logits take at most `memory_budget` bytes
    (`BYTES_PER_LOGIT` each): a multiple of `multiple` (tensor-core friendly) when that fits, at least 1, at most
    `vocab`."""
    cols = memory_budget // (max(rows, 1) * BYTES_PER_LOGIT)
    return max(1, min(vocab, cols // multiple * multiple if cols >= multiple else cols))


def _logits(x, weight, bias, v0=None, v1=None):
    w = weight if v0 is None else weight[v0:v1]
    b = None if bias is None else (bias if v0 is None else bias[v0:v1])
    return torch.nn.functional.linear(x, w, b)


@functools.cache
def _fp32_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(fp32, a, b, out_dtype=fp32, out=...)` takes 16-bit a, b on `device` (CUDA builds)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for 16-bit a, b: where the backend can, with the product kept in fp32 (cuBLAS'
    `out_dtype`: not rounded to 16 bits before the sum), elsewhere through a product in a's dtype."""
    if a.dtype != torch.float32 and _fp32_addmm(acc.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


def use_kernels(kernels: str, x: torch.Tensor) -> bool:
    """ "auto": the Triton kernels on CUDA (where Triton is installed), the PyTorch formulas elsewhere; "triton":
    the kernels (CUDA, or CPU under TRITON_INTERPRET=1 - the tests); "torch": the PyTorch formulas."""
    from quickloris.kernels import ce_kernel

    if kernels == "torch":
        return False
    if kernels == "auto":
        return x.device.type == "cuda" and ce_kernel.available(x)
    if kernels == "triton":
        if not ce_kernel.available(x):
            raise RuntimeError(f"the cross-entropy Triton kernels cannot run on {x.device} here")
        return True
    raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")


class VocabBlockedCE(torch.autograd.Function):
    """`apply(x [N, H], weight [V, H], bias [V] | None, labels [N], ignore_index, row_chunk, memory_budget,
    order, kernels="auto")` -> sum over valid rows of the cross-entropy (fp32 scalar). `kernels`: `use_kernels`.

    With the kernels (`quickloris.kernels.ce_kernel`) the softmax work reads the 16-bit logits where the matmul
    wrote them and G overwrites them in place: ~6 bytes moved per logit in all instead of ~66, and the block's
    only temporary is its 16-bit logits (2 of the 12 bytes per logit the budget counts).
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, labels, ignore_index: int, row_chunk: int, memory_budget: int, order: str, kernels="auto"
    ):
        n = x.shape[0]
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        fused = use_kernels(kernels, x)
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, n, row_chunk):
            e = min(s + row_chunk, n)
            z = _logits(x[s:e], weight, bias)
            if fused:
                from quickloris.kernels.ce_kernel import row_lse

                lse[s:e] = row_lse(z)
            else:
                z = z.float()
                lse[s:e] = torch.logsumexp(z, dim=-1)
            zy = z.gather(1, safe[s:e, None]).squeeze(1).float()
            total += torch.where(valid[s:e], lse[s:e] - zy, 0.0).sum()
            del z
        ctx.save_for_backward(x, weight, bias, safe, valid, lse)
        ctx.cfg = (row_chunk, memory_budget, order, fused)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight, bias, safe, valid, lse = ctx.saved_tensors
        row_chunk, budget, order, fused = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n, h = x.shape
        v = weight.shape[0]
        if order == "auto":  # the smaller fp32 accumulator: dx's [N, H] or dW's [V, H]
            order = "vocab" if n <= v or not need_w else "rows"
        dx = torch.zeros(n, h, dtype=torch.float32, device=x.device) if need_x else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty(v, dtype=torch.float32, device=x.device) if need_b else None
        scale = torch.where(valid, g.float(), 0.0)[:, None]  # g on valid rows, 0 on ignored ones
        if fused:
            from quickloris.kernels.ce_kernel import softmax_grad_

            scale_rows, labels_rows = scale.squeeze(1).contiguous(), safe.long().contiguous()

        def block_grad(rs: int, re: int, v0: int, v1: int) -> torch.Tensor:
            """G for rows [rs, re) and vocabulary [v0, v1), in x's dtype."""
            if fused:  # in place in the block's logits (`ce_kernel.softmax_grad_`)
                z = _logits(x[rs:re], weight, bias, v0, v1)
                return softmax_grad_(z, lse[rs:re], labels_rows[rs:re], scale_rows[rs:re], v0)
            p = _logits(x[rs:re], weight, bias, v0, v1).float()
            p.sub_(lse[rs:re, None]).exp_()
            lab = safe[rs:re]
            hit = (lab >= v0) & (lab < v1)
            rows = hit.nonzero().squeeze(1)
            p[rows, lab[rows] - v0] -= 1.0
            return p.mul_(scale[rs:re]).to(x.dtype)

        if order == "vocab":
            step = block_size(n, v, budget)
            for v0 in range(0, v, step):
                v1 = min(v0 + step, v)
                gb = block_grad(0, n, v0, v1)
                if need_w:  # straight into dW's rows: no temporary
                    torch.mm(gb.t(), x, out=dw[v0:v1])
                if need_b:
                    db[v0:v1] = gb.float().sum(0)
                if need_x:
                    _add_product(dx, gb, weight[v0:v1])
                del gb
        else:
            dw32 = torch.zeros(v, h, dtype=torch.float32, device=x.device) if need_w else None
            step = block_size(row_chunk, v, budget)
            for rs in range(0, n, row_chunk):
                re = min(rs + row_chunk, n)
                for v0 in range(0, v, step):
                    v1 = min(v0 + step, v)
                    gb = block_grad(rs, re, v0, v1)
                    if need_w:
                        _add_product(dw32[v0:v1], gb.t(), x[rs:re])
                    if need_b:
                        db[v0:v1] = (db[v0:v1] if rs else 0) + gb.float().sum(0)
                    if need_x:
                        _add_product(dx[rs:re], gb, weight[v0:v1])
                    del gb
            if need_w:
                dw.copy_(dw32)
                del dw32
        return (
            None if dx is None else dx.to(x.dtype),
            dw,
            None if db is None else db.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )
