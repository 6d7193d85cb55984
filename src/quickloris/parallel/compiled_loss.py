"""The training loss as one compiled region: lm_head + cross-entropy + its gradient, a chunk of tokens at a time.

The chunked loss (`quickloris.ops.chunked_linear`) cannot simply be wrapped in `torch.compile`: its number of
chunks depends on the token count, so a compiled loss would recompile for every new chunk count, and its per-chunk
`torch.func.vjp` runs in eager code, where a compiled function cannot be called. Here the region is one chunk's
*value and gradient*::

    z   = x_c @ W^T (fp32)               x_c: [C, H] rows of the last hidden state, W: [V, H] the frozen head
    l_c = scale * sum_rows loss(z, y_c)  loss: `quickloris.ops.linear_losses.cross_entropy` (ignore_index, softcap,
                                         label smoothing, z-loss), scale = 1 / (token count of the whole step)
    dx_c = d l_c / d x_c                 by `torch.func.vjp` inside the compiled function (no written derivative)

compiled once with dynamic shapes (all chunks have `C` rows but the last; a 1-row tail is merged into the chunk
before it, so no size-1 specialisation). An autograd Function runs it through the shared chunk loop
(`quickloris.ops.chunked_core.chunked_forward`, gradient-in-forward schedule: one head matmul fewer than
recomputing in backward): forward sums the l_c in fp32 and assembles dx ([N, H], held in x's dtype), backward
returns ``dx * grad_out``. Memory: one chunk's [C, V] fp32 logits and their gradient at a time (C from
`choose_chunk_size`, 1 GiB budget by default) plus dx. Inductor fuses the upcast, log-sum-exp, target gather
and the softmax-minus-one-hot gradient into a few kernels around the two matmuls.

It applies when the head is a plain frozen ``nn.Linear`` without bias (QLoRA: lm_head is frozen); otherwise the
model keeps the eager chunked loss. The loss forward is installed once, by `quickloris.models.chunked_loss`;
`enable_compiled_loss(model)` only gives it this per-chunk function instead of the eager one (recorded in
``model.quickloris_edits`` as a ``compile`` edit), with the same config; `disable_compiled_loss` puts the eager one
back.
"""

from __future__ import annotations

import torch
from torch import nn

from quickloris.models import surgery
from quickloris.models.chunked_loss import STEP as LOSS
from quickloris.models.chunked_loss import causal_lm_parts, eager_head_loss, set_head_loss
from quickloris.ops.chunked_core import (
    ChunkPlan,
    ChunkStep,
    choose_chunk_size,
    chunked_backward,
    chunked_forward,
    row_spans,
)
from quickloris.ops.linear_losses import cross_entropy
from quickloris.parallel.regions import traced_as_region


def _chunk_value_and_grad(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    label_smoothing: float,
    z_loss: float,
):
    def f(xc):
        per_row = cross_entropy(
            xc,
            weight,
            None,
            labels,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
        return per_row.sum() * scale

    value, vjp = torch.func.vjp(f, x)
    (dx,) = vjp(torch.ones_like(value))
    return value, dx


def make_chunk_fn(backend: str = "inductor", mode: str | None = None, options: dict | None = None):
    """The compiled per-chunk function (one per model: its own dynamo cache entry)."""
    return traced_as_region(
        torch.compile(_chunk_value_and_grad, fullgraph=True, dynamic=True, backend=backend, mode=mode, options=options)
    )


def chunk_spans(n: int, chunk: int) -> list[tuple[int, int]]:
    """Row spans of `chunk` rows; a tail of one row joins the previous span (a 1-row chunk would recompile)."""
    return row_spans(n, chunk, merge_unit_tail=True)


class CompiledChunkedCE(torch.autograd.Function):
    """``apply(chunk_fn, x [N, H], weight [V, H], labels [N], scale, chunk, options) -> scale * sum of losses``."""

    @staticmethod
    def forward(ctx, chunk_fn, x, weight, labels, scale, chunk: int, options: tuple):
        plan = ChunkPlan(call=chunk_fn, chunk=chunk, grad_in_forward=True, merge_unit_tail=True, dx_dtype=x.dtype)
        return chunked_forward(
            ctx, plan, _compiled_step(options), (x, weight, labels, scale), (), (bool(ctx.needs_input_grad[1]),)
        )

    @staticmethod
    def backward(ctx, grad_out):
        # dx is held in x's dtype, so the upstream gradient is applied in that dtype; gradient in forward: no
        # recompute, no step needed.
        (dx,) = chunked_backward(ctx, grad_out.to(ctx.dtypes[0]), None)
        return None, dx, None, None, None, None, None


def _compiled_step(options: tuple):
    """The chunk as the compiled function computes it: (l_c, dx_c) in one call. Its cotangent is always 1 (the
    gradient-in-forward schedule), which the function applies itself; without a gradient, dx_c is dropped."""

    def make(plan: ChunkPlan, tensors, needs, per_row) -> ChunkStep:
        x, weight, labels, scale = tensors

        def grad(s, e, cot):
            value, dx = plan.call(x[s:e], weight, labels[s:e], scale, *options)
            return value, dx, []

        return ChunkStep(lambda s, e: grad(s, e, None)[0], grad)

    return make


def compiled_head_loss(
    chunk_fn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items=None,
    ignore_index: int = -100,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight^T`` against `labels` over `num_items` (default: valid labels)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long()
    count = (y != ignore_index).sum() if num_items is None else torch.as_tensor(num_items, device=x.device)
    scale = 1.0 / count.to(device=x.device, dtype=torch.float32).clamp_min(1)
    chunk = chunk_size or choose_chunk_size(max(x.shape[0], 1), weight.shape[0], memory_budget=memory_budget)
    options = (ignore_index, softcap, float(label_smoothing), float(z_loss))
    return CompiledChunkedCE.apply(chunk_fn, x, weight.detach(), y, scale, chunk, options)


class CompiledHeadLoss:
    """The head loss a compiled model's loss forward calls (`quickloris.models.chunked_loss.eager_head_loss`'s
    signature), holding that model's compiled chunk function."""

    def __init__(self, chunk_fn):
        self.chunk_fn = chunk_fn

    def __call__(self, hidden, head, targets, num_items, ignore_index, softcap, config):
        return compiled_head_loss(
            self.chunk_fn,
            hidden,
            head.weight,
            targets,
            num_items=num_items,
            ignore_index=ignore_index,
            softcap=softcap,
            chunk_size=config.chunk_size,
            memory_budget=config.memory_budget,
        )


def supports_compiled_loss(model: nn.Module) -> bool:
    """True when the head is a frozen bias-free nn.Linear (what the compiled region differentiates through)."""
    _, head = causal_lm_parts(surgery.unwrap(model))
    return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad


def enable_compiled_loss(
    model: nn.Module, *, backend: str = "inductor", mode: str | None = None, options: dict | None = None
) -> nn.Module:
    """Make `model`'s chunked training loss (enabled already) run each chunk through one compiled region."""
    if surgery.state(model, LOSS) is None:
        raise ValueError(
            "the compiled loss replaces the chunked loss's per-chunk step: enable the chunked loss first "
            "(prepare_model does, with QLoRAConfig.chunked_loss)"
        )
    if not supports_compiled_loss(model):
        raise ValueError("the compiled loss needs a frozen, bias-free nn.Linear lm_head (as QLoRA has)")
    set_head_loss(
        model,
        CompiledHeadLoss(make_chunk_fn(backend, mode, options)),
        "compile",
        f"lm_head + cross-entropy chunk compiled ({backend})",
    )
    return model


def disable_compiled_loss(model: nn.Module) -> nn.Module:
    """Put the eager per-chunk step back (the chunked loss stays)."""
    loss_state = surgery.state(model, LOSS)
    if loss_state is not None and isinstance(loss_state["head_loss"], CompiledHeadLoss):
        loss_state["head_loss"] = eager_head_loss
    return model


def is_compiled_loss_enabled(model: nn.Module) -> bool:
    loss_state = surgery.state(model, LOSS)
    return loss_state is not None and isinstance(loss_state["head_loss"], CompiledHeadLoss)


__all__ = [
    "enable_compiled_loss",
    "disable_compiled_loss",
    "compiled_head_loss",
    "make_chunk_fn",
    "chunk_spans",
    "supports_compiled_loss",
    "is_compiled_loss_enabled",
    "CompiledHeadLoss",
]
