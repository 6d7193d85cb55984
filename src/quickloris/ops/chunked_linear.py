"""Memory-efficient linear + loss, the public API: `chunked_linear_loss` and the specification's class.

`chunked_linear_loss(x, weight, labels, loss=...)` computes `loss(x @ weight.T + bias, labels)` chunk by chunk
of rows without ever holding the [tokens, vocab] logits; `MemoryEfficientLinear.apply(X, linear, labels,
forward_function)` is the challenge specification's interface. The math, the memory accounting and the two
schedules (recompute in backward / gradient in forward) are in `quickloris.ops.chunked_core`, whose chunk loop both
Functions use; the chunk-size rule is `choose_chunk_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from quickloris.ops.chunked_core import (  # noqa: F401 - re-exported
    BYTES_PER_LOGIT,
    DEFAULT_MEMORY_BUDGET,
    ChunkedLinearFunction,
    ChunkPlan,
    ChunkStep,
    amp_context,
    amp_state,
    choose_chunk_size,
    chunked_backward,
    chunked_forward,
    grad_loop,
    reduce_chunk,
    resolve_chunk_size,
    row_spans,
    scale_cast,
)


class MemoryEfficientLinear(torch.autograd.Function):
    """The specification's API: `MemoryEfficientLinear.apply(X, linear, labels, forward_function)`.

    `forward_function(X_chunk, linear, labels_chunk)` maps a chunk of rows (X flattened to [rows, H], labels to
    [rows, ...]) to either a 0-d tensor (the chunk's sum: outputs are added) or one value per row (outputs are
    concatenated and reshaped to X's leading dimensions). Optional: `chunk_size` (rows) or `memory_budget`
    (bytes, `choose_chunk_size`), `grad_in_forward` (scalar outputs only; see `quickloris.ops.chunked_core`).

    `linear` may be any module (nn.Linear, a LoRA-wrapped or 4-bit layer...): its parameters that require grad
    enter the autograd graph as inputs of this Function, and backward returns their gradients, so they land in
    `.grad` the normal way. Backward recomputes each chunk under grad mode and differentiates forward_function
    with `torch.autograd.grad` (upstream gradient applied; parameter gradients summed over chunks in fp32).
    """

    @classmethod
    def apply(
        cls,
        X,
        linear,
        labels,
        forward_function,
        chunk_size: int | None = None,
        *,
        memory_budget: int | None = None,
        grad_in_forward: bool = False,
    ):
        if not isinstance(X, torch.Tensor) or X.dim() < 2:
            raise ValueError(
                f"X must be a tensor of shape [..., hidden] with at least 2 dims, got "
                f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}"
            )
        if not isinstance(linear, torch.nn.Module):
            raise TypeError(f"linear must be a torch.nn.Module, got {type(linear).__name__}")
        if not callable(forward_function):
            raise TypeError("forward_function must be callable as forward_function(X_chunk, linear, labels_chunk)")
        lead = X.shape[:-1]
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[: len(lead)] != lead):
            raise ValueError(
                f"labels must be a tensor whose leading dims match X's {tuple(lead)}, got "
                f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
            )
        vocab = getattr(linear, "out_features", None)
        if not isinstance(vocab, int) and isinstance(getattr(linear, "weight", None), torch.Tensor):
            vocab = linear.weight.shape[0] if linear.weight.dim() == 2 else None
        if chunk_size is None and not isinstance(vocab, int):
            raise ValueError("cannot tell linear's output size (no out_features / 2-D weight): pass chunk_size")
        x2 = X.reshape(-1, X.shape[-1])
        lab = None if labels is None else labels.reshape(x2.shape[0], *labels.shape[len(lead) :])
        plan = ChunkPlan(
            call=lambda xc, w, b, yc, rc: forward_function(xc, linear, yc),
            chunk=resolve_chunk_size(chunk_size, x2.shape[0], vocab or 1, memory_budget),
            per_row=None,
            grad_in_forward=bool(grad_in_forward),
        )
        params = tuple(p for p in linear.parameters() if p.requires_grad)
        out = super().apply(plan, x2, lab, *params)
        return out.reshape(*lead, *out.shape[1:]) if out.dim() >= 1 else out

    @staticmethod
    def forward(ctx, plan: ChunkPlan, x, labels, *params):
        needs = (bool(ctx.needs_input_grad[1]), *(bool(v) for v in ctx.needs_input_grad[3:]))
        return chunked_forward(ctx, plan, _module_step, (x, labels, *params), params, needs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        dx, *grads = chunked_backward(ctx, grad_out, _module_step)
        return (None, dx, None, *grads)


def _module_step(plan: ChunkPlan, tensors, needs, per_row) -> ChunkStep:
    """`MemoryEfficientLinear`'s chunk: `plan.call` on (x, labels) through the module; (output, dx, [grad per
    param]) by `torch.autograd.grad`. per_row None (gradient in forward): the output must be a scalar."""
    x, labels, *params = tensors

    def value(s, e):
        return plan.call(x[s:e], None, None, None if labels is None else labels[s:e], {})

    def grad(s, e, cot):
        xc = x[s:e].detach().requires_grad_(needs[0])
        lab = None if labels is None else labels[s:e]
        with torch.enable_grad():
            raw = plan.call(xc, None, None, lab, {})
            if per_row is None and raw.dim() > 0:  # grad_in_forward: the upstream gradient must be a scalar
                raise ValueError("grad_in_forward needs forward_function to return a scalar per chunk")
            out = reduce_chunk(raw, bool(per_row), e - s)
            del raw
        wanted = [p for p, n in zip(params, needs[1:]) if n]
        inputs = ([xc] if needs[0] else []) + wanted
        got = list(torch.autograd.grad(out, inputs, cot.to(out.dtype), allow_unused=True)) if inputs else []
        gx = got.pop(0) if needs[0] else None
        it = iter(got)
        gps = [next(it) if n else None for n in needs[1:]]
        return out.detach(), gx, gps

    return ChunkStep(value, grad)


def _check_tensor(name: str, t: Any, *, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    return t


def chunked_linear_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    loss: str | Callable[..., torch.Tensor] = "cross_entropy",
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    grad_in_forward: bool = False,
    vocab_blocked: bool | None = None,
    check_labels: bool = True,
    **options: Any,
) -> torch.Tensor:
    """`loss(x @ weight.T + bias, labels)` without the [tokens, vocab] logits, differentiable in x, weight, bias.

    x: [..., H] (2-D or 3-D...); weight: [V, H]; bias: [V] or None; labels: int tensor of x's leading shape, or
    None for label-free losses. `loss`: a name in `quickloris.ops.linear_losses.LOSSES` ("cross_entropy",
    "token_logprobs", "grpo", "kl_div", "entropy") or a function with that module's signature. `options` go to
    the loss function; those it declares with `row_args` (e.g. GRPO's `advantages`) must have x's leading shape
    and are sliced with x.

    reduction: "sum"; "mean" = sum / max(count, 1) with count = `num_items` when given (e.g. the label count of
    a whole gradient-accumulation step or of all ranks, so the result equals one large batch's loss), else the
    number of labels != ignore_index here (rows, if labels is None); "none" = per-row values, x's leading shape.
    The result is fp32. chunk_size / memory_budget: see `choose_chunk_size`; results do not depend on them beyond
    fp32 rounding. check_labels: raise on labels outside [0, V) (one host sync; skipped under torch.compile).

    vocab_blocked: plain cross-entropy (no option but `ignore_index`, reduction "sum" / "mean") with a weight that
    requires grad goes through `quickloris.ops.vocab_blocked_ce` (backward over blocks of the vocabulary: dW in
    one matmul per block, no fp32 [V, H] accumulator); None = whenever that applies (eager, outside autocast,
    no `grad_in_forward`), False = never, True = always (an error where it does not apply).
    """
    from quickloris.ops.linear_losses import LOSSES

    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)} or a function, got {loss!r}")
        fn = LOSSES[loss]
    elif callable(loss):
        fn = loss
    else:
        raise TypeError(f"loss must be a name or a function, got {type(loss).__name__}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if grad_in_forward and reduction == "none":
        raise ValueError("grad_in_forward needs reduction 'sum' or 'mean' (a scalar upstream gradient)")
    if num_items is not None:
        if reduction != "mean":
            raise ValueError(f"num_items applies to reduction='mean' only, got reduction={reduction!r}")
        if not isinstance(num_items, torch.Tensor) and (
            not isinstance(num_items, int) or isinstance(num_items, bool) or num_items < 0
        ):
            raise ValueError(f"num_items must be a non-negative int or a tensor, got {num_items!r}")
    _check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., hidden] with at least 2 dims, got {tuple(x.shape)}")
    _check_tensor("weight", weight, dims=(2,))
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [vocab, {x.shape[-1]}] to match x's hidden size, got {tuple(weight.shape)}")
    if weight.device != x.device or (weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(
            f"x and weight must share dtype and device (outside autocast), got {x.dtype}/{x.device} "
            f"and {weight.dtype}/{weight.device}"
        )
    vocab = weight.shape[0]
    if bias is not None and (_check_tensor("bias", bias, dims=(1,)).shape[0] != vocab or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [{vocab}] of dtype {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    lead = x.shape[:-1]
    n = math.prod(lead)
    ignore_index = options.get("ignore_index", -100)
    if labels is not None:
        _check_tensor("labels", labels)
        if labels.shape != lead:
            raise ValueError(f"labels must have x's leading shape {tuple(lead)}, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if check_labels and not torch.compiler.is_compiling():
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
            if bool(bad.any()):
                raise ValueError(
                    f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found "
                    f"{int(labels[bad].flatten()[0])}"
                )
    names = tuple(getattr(fn, "row_args", ()))
    rows = []
    for name in names:
        t = options.pop(name, None)
        if t is not None:
            _check_tensor(name, t)
            if t.shape[: len(lead)] != lead:
                raise ValueError(f"{name} must have x's leading shape {tuple(lead)} first, got {tuple(t.shape)}")
            t = t.reshape(n, *t.shape[len(lead) :])
        rows.append(t)
    for name, t in [*zip(names, rows), *options.items()]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} receives no gradient from chunked_linear_loss; pass {name}.detach()")
    blocked = (
        loss == "cross_entropy"
        and set(options) <= {"ignore_index"}
        and reduction in ("sum", "mean")
        and not grad_in_forward
        and labels is not None
        and weight.dtype == x.dtype
    )
    if vocab_blocked and not blocked:
        raise ValueError(
            "vocab_blocked needs loss='cross_entropy' without options other than ignore_index, reduction 'sum' or "
            "'mean', labels, x and weight of one dtype, and grad_in_forward=False"
        )
    if vocab_blocked is None:
        blocked = blocked and weight.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        blocked = blocked and not torch.is_autocast_enabled(x.device.type)
    else:
        blocked = bool(vocab_blocked)
    if blocked:
        from quickloris.ops.vocab_blocked_ce import VocabBlockedCE

        rows_per_chunk = resolve_chunk_size(chunk_size, n, vocab, memory_budget)
        # the same bound on temporaries as the row-chunked schedules: `chunk_size` rows of logits, or the budget
        budget = memory_budget or (rows_per_chunk * vocab * BYTES_PER_LOGIT if chunk_size else DEFAULT_MEMORY_BUDGET)
        out = VocabBlockedCE.apply(
            x.reshape(n, x.shape[-1]),
            weight,
            bias,
            labels.reshape(n).long(),
            ignore_index,
            rows_per_chunk,
            budget,
            "auto",
        )
        return _reduce(out, reduction, n, labels, ignore_index, num_items)
    plan = ChunkPlan(
        call=lambda xc, w, b, yc, rc: fn(xc, w, b, yc, **rc, **options),
        chunk=resolve_chunk_size(chunk_size, n, vocab, memory_budget),
        per_row=reduction == "none",
        grad_in_forward=bool(grad_in_forward),
        row_names=names,
    )
    out = ChunkedLinearFunction.apply(
        plan, x.reshape(n, x.shape[-1]), weight, bias, None if labels is None else labels.reshape(n).long(), *rows
    )
    if reduction == "none":
        return out.reshape(lead)
    return _reduce(out, reduction, n, labels, ignore_index, num_items)


def _reduce(out, reduction: str, n: int, labels, ignore_index: int, num_items) -> torch.Tensor:
    """ "sum": the summed loss; "mean": divided by `num_items` or the count of labels != ignore_index (rows without
    labels), at least 1."""
    if reduction == "sum":
        return out
    if num_items is None:
        count = n if labels is None else (labels != ignore_index).sum()
    else:
        count = num_items.to(out.device) if isinstance(num_items, torch.Tensor) else num_items
    if isinstance(count, int):
        return out / max(count, 1)
    return out / count.clamp_min(1)
