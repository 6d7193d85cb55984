"""QLoRA linear: a frozen NF4 base weight plus a trainable low-rank (LoRA) update, dense weight never saved.

Forward, for x [T, in] (leading dims flattened), W = deq(packed) [out, in], A [r, in], B [out, r]::

    x_d = x * m / (1 - p)                    m ~ Bernoulli(1 - p): LoRA dropout (x_d = x when p = 0 / eval)
    u   = s * (x_d @ A^T)                    [T, r]        s = alpha / r  (rsLoRA: alpha / sqrt(r))
    y   = x @ W^T + u @ B^T (+ bias)         u @ B^T is written into y's buffer, the base GEMM accumulates onto it

Backward, with g = dL/dy [T, out]::

    dB  = g^T @ u                            [out, r]
    v   = s * (g @ B)                        [T, r]
    dA  = v^T @ x_d                          [r, in]
    dx  = g @ W + (v @ A) * m / (1 - p)      W dequantized *again*; v @ A likewise the GEMM's starting value

Saved for backward: x_d (a view of x when p = 0, so nothing new), the boolean mask m (only with dropout), u
([T, r], tiny), A and B in the compute dtype, and the NF4 weight itself (its 4-bit inner tensors, which are
parameters anyway). The dense W ([out, in] in bf16: 117 MB for an 8B MLP matrix) exists only inside the two
matmul ops and is freed right after: per linear layer this saves 2 * out * in bytes of activation memory
versus autograd through a dequantized weight. dW is never computed (the base is frozen); dx is skipped when x
needs no gradient (e.g. the first layer's input).

The NF4 matmuls are one `torch.library.custom_op`, ``quickloris::nf4_matmul(a, <nf4 fields>, transpose_weight,
addend, lr_left, lr_right)`` = ``addend + a @ W^T`` (forward) or ``addend + a @ W`` (backward), the addend given
or made inside as ``lr_left @ lr_right`` (the LoRA term: then no separate [T, out] tensor is copied). It is
opaque to `torch.compile`
on purpose: if the dequantization were traced, AOTAutograd would common-subexpression-eliminate the forward and
backward dequantizations into one node and the partitioner would then save the dense W for backward - exactly
the memory this layer exists to avoid. Inside the op the fused Triton kernel (`quickloris.dequantize_nf4`)
decodes W, cuBLAS multiplies; nothing around it is lost to compile (a GEMM is an extern kernel either way), and
the LoRA matmuls, scaling, dropout, bias and every neighbouring op stay traced and fused.
"""

from __future__ import annotations

from typing import Any

import torch

from quickloris.quant.nf4 import NF4State, dequantize_nf4_reference

# ----------------------------------------------------------------------------------------------------------
# the NF4 matmul op


def _matmul(
    a: torch.Tensor,
    packed: torch.Tensor,
    state: NF4State,
    transpose_weight: bool,
    addend: torch.Tensor | None,
    lr_left: torch.Tensor | None = None,
    lr_right: torch.Tensor | None = None,
) -> torch.Tensor:
    k = state.shape[1] if transpose_weight else state.shape[0]
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(
            f"nf4_matmul: a must be [rows, {k}] for a weight of shape {list(state.shape)} "
            f"(transpose_weight={transpose_weight}), got {tuple(a.shape)}"
        )
    if packed.is_cuda:
        from quickloris.kernels.nf4_dequant import dequantize_nf4

        w = dequantize_nf4(packed, state, dtype=a.dtype)  # the fused Triton kernel
    else:
        # Off GPU: the bit-identical PyTorch reference (not the Triton kernel under TRITON_INTERPRET, a test
        # vehicle ~10x slower; the kernel itself is tested against bitsandbytes in tests/kernels).
        w = dequantize_nf4_reference(packed, state, a.dtype)
    w = w.t() if transpose_weight else w
    if lr_left is not None:
        # The low-rank addend is made here, in the output buffer, and the base GEMM accumulates onto it in place
        # (beta = 1): an addend passed in would first be copied into a fresh output (one read + one write of
        # [rows, n] per call, 6 % of a 1B step's kernel time on an H100).
        out = lr_left @ lr_right
        return out.addmm_(a, w)
    if addend is None:
        return a @ w
    return torch.addmm(addend, a, w)


def nf4_matmul_impl(
    a: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    shape: list[int],
    blocksize: int,
    transpose_weight: bool,
    addend: torch.Tensor | None,
    lr_left: torch.Tensor | None,
    lr_right: torch.Tensor | None,
) -> torch.Tensor:
    """``addend + a @ W^T`` (transpose_weight) or ``addend + a @ W``, W = deq(...) [out, in] in a's dtype; with
    ``lr_left`` [rows, r] and ``lr_right`` [r, n] the addend is ``lr_left @ lr_right`` (made in the output)."""
    state = NF4State(
        shape=torch.Size(shape),
        dtype=a.dtype,
        blocksize=blocksize,
        absmax=absmax,
        code=code,
        offset=offset,
        absmax2=absmax2,
        code2=code2,
    )
    return _matmul(a, packed, state, transpose_weight, addend, lr_left, lr_right)


def _register() -> Any:
    op = torch.library.custom_op("quickloris::nf4_matmul", mutates_args=())(nf4_matmul_impl)

    @op.register_fake
    def _(
        a, packed, absmax, absmax2, code2, offset, code, shape, blocksize, transpose_weight, addend, lr_left, lr_right
    ):
        n = shape[0] if transpose_weight else shape[1]
        return a.new_empty((a.shape[0], n))

    return op


_OP = _register()


def nf4_matmul(
    a: torch.Tensor,
    weight,
    *,
    transpose_weight: bool = True,
    addend: torch.Tensor | None = None,
    low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`nf4_matmul_impl` for an `NF4Tensor` weight; the registered op under torch.compile, a direct call in eager.

    ``low_rank=(p, q)`` adds ``p @ q`` ([rows, r] @ [r, n]) like an addend, without materialising it separately.
    """
    if addend is not None and low_rank is not None:
        raise ValueError("nf4_matmul: pass addend or low_rank, not both")
    left, right = low_rank if low_rank is not None else (None, None)
    if torch.compiler.is_compiling():
        return torch.ops.quickloris.nf4_matmul(
            a,
            weight.packed,
            weight.absmax,
            weight.absmax2,
            weight.code2,
            weight.offset,
            weight.code,
            [int(s) for s in weight.shape],
            int(weight.blocksize),
            transpose_weight,
            addend,
            left,
            right,
        )
    # Eager: no dispatcher round trip, and the weight's own cached state object, which lets the dequant kernel
    # reuse its launch plan (a direct launch). The plan lives as long as that state, i.e. as long as the weight.
    return _matmul(a, weight.packed, weight.nf4_state(), transpose_weight, addend, left, right)


# ----------------------------------------------------------------------------------------------------------
# autograd


class QLoRALinearFunction(torch.autograd.Function):
    """``apply(x, weight: NF4Tensor, bias, lora_A, lora_B, scaling, dropout_p)``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float):
        out_f, in_f = weight.shape
        x2 = x.reshape(-1, in_f)
        has_lora = lora_A is not None
        mask = None
        if has_lora:
            A = lora_A.to(x.dtype)
            B = lora_B.to(x.dtype)
            if dropout_p > 0.0:
                mask = torch.rand_like(x2) >= dropout_p
                xd = x2 * mask * (1.0 / (1.0 - dropout_p))
            else:
                xd = x2
            u = (xd @ A.t()) * scaling
            y = nf4_matmul(x2, weight, transpose_weight=True, low_rank=(u, B.t()))
        else:
            A = B = xd = u = None
            y = nf4_matmul(x2, weight, transpose_weight=True)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.scaling, ctx.dropout_p, ctx.has_lora, ctx.has_mask = scaling, dropout_p, has_lora, mask is not None
        ctx.x_shape = x.shape
        ctx.lora_dtypes = (lora_A.dtype, lora_B.dtype) if has_lora else None
        ctx.bias_dtype = None if bias is None else bias.dtype
        if has_lora:
            ctx.save_for_backward(weight, xd, mask, u, A, B)
        else:
            ctx.save_for_backward(weight)
        return y.reshape(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx, grad_out):
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if need_w:
            raise RuntimeError("the NF4 base weight is frozen: it cannot receive a gradient")
        if ctx.has_lora:
            weight, xd, mask, u, A, B = ctx.saved_tensors
        else:
            (weight,) = ctx.saved_tensors
        out_f, in_f = weight.shape
        g = grad_out.reshape(-1, out_f)
        dx = dbias = dA = dB = None
        if need_bias:
            dbias = g.sum(0).to(ctx.bias_dtype)
        addend = low_rank = None
        if ctx.has_lora:
            scaling = ctx.scaling
            if need_b:
                dB = (g.t() @ u).to(ctx.lora_dtypes[1])
            v = (g @ B) * scaling
            if need_a:
                dA = (v.t() @ xd).to(ctx.lora_dtypes[0])
            if need_x and ctx.has_mask:
                addend = (v @ A) * mask * (1.0 / (1.0 - ctx.dropout_p))
            elif need_x:
                low_rank = (v, A)
        if need_x:
            dx = nf4_matmul(g, weight, transpose_weight=False, addend=addend, low_rank=low_rank).reshape(ctx.x_shape)
        return dx, None, dbias, dA, dB, None, None


def qlora_linear(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``x @ deq(weight)^T + scaling * dropout(x) @ lora_A^T @ lora_B^T + bias`` (see the module docstring).

    weight: an `NF4Tensor` [out, in]; lora_A [r, in] and lora_B [out, r] (any float dtype: they are used in x's
    dtype and their gradients returned in their own), or both None for the frozen base alone. `dropout` is the
    probability of zeroing an input of the LoRA branch (pass 0 in eval mode).
    """
    from quickloris.tensor.nf4_tensor import NF4Tensor

    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"weight must be a quickloris NF4Tensor, got {type(weight).__name__}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features but the weight expects {weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)})"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("pass both lora_A and lora_B, or neither")
    if lora_A is not None:
        r = lora_A.shape[0]
        if lora_A.shape != (r, weight.shape[1]) or lora_B.shape != (weight.shape[0], r):
            raise ValueError(
                f"LoRA shapes must be A [r, {weight.shape[1]}] and B [{weight.shape[0]}, r], got "
                f"A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)}"
            )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast the layer computes in the autocast dtype (like nn.Linear); the Function itself runs with
        # autocast off so that every tensor it handles has that one dtype.
        x = x.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return QLoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout))
    return QLoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout))
