"""Core of the memory-efficient linear + loss: `f(X W^T + b)` row chunk by row chunk, never the full logits.

Internal to `quickloris.ops`; the public entry points are in `quickloris.ops.chunked_linear`
(`chunked_linear_loss`, `MemoryEfficientLinear`).

Math. Split the rows of X ([N, H]) into chunks X_1..X_k and let y_i = f(X_i W^T + b, targets_i) (one value per
row). The output is `sum_i sum(y_i)` (reductions "sum" / "mean") or `cat_i(y_i)` (reduction "none"). With
upstream gradient g (a scalar, or per row for "none"), the chain rule gives

    dL/dX_i = vjp_{X_i}(f_i)(g_i)        dL/dW = sum_i vjp_W(f_i)(g_i)        dL/db = sum_i vjp_b(f_i)(g_i)

Every vjp is taken by autograd on the chunk's own computation: no derivative is written by hand. dW and db are
summed over chunks in fp32 (each chunk's partial arrives in the weight's dtype, as the matmul's backward returns
it) and cast to the weight's dtype once at the end.

Memory. Naive: [N, V] bf16 logits plus two or three fp32 tensors of that size (upcast, log-softmax, its
gradient): ~12 B x N x V, 25 GB at N = 16384, V = 128256. Chunked: one chunk's worth (`BYTES_PER_LOGIT` x rows
x V, see `choose_chunk_size`) plus dX, and only when W requires grad an fp32 dW sum (2 |W|) and one chunk's
partial dW (|W|).

Two schedules:
* `grad_in_forward=False` (default): forward evaluates f chunk by chunk under no_grad; backward recomputes each
  chunk and differentiates it with the real upstream gradient. One extra X W^T matmul.
* `grad_in_forward=True` (sum / mean only): forward differentiates each chunk with cotangent 1 right away and
  keeps dX (fp32 unless the plan says otherwise) and dW; backward multiplies them by g. As many matmuls as the
  naive path, but the gradients are computed even if backward never runs, and are held from forward to backward.

One loop, three users. `chunked_forward` / `chunked_backward` hold everything above (row spans, the no-grad and
gradient loops, fp32 sums, dX assembly, autocast re-entry, the final scale and cast); an autograd Function only
unpacks its inputs and says how one chunk is computed (a `ChunkStep`): `ChunkedLinearFunction` by
`torch.func.vjp` of a functional call (Dynamo traces it), `MemoryEfficientLinear` by `torch.autograd.grad`
through a module, `quickloris.parallel.compiled_loss.CompiledChunkedCE` by a compiled value-and-gradient function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

#: Peak transient bytes per logit of one chunk for cross-entropy / log-probs: three fp32 [C, V] tensors are alive
#: at once in backward (the log-softmax autograd keeps, the NLL gradient, the log-softmax gradient); the bf16
#: logits and their gradient come and go around them. z-loss, softcap, KL and entropy keep one or two more.
BYTES_PER_LOGIT = 12
#: Default transient memory allowed for one chunk (`choose_chunk_size`).
DEFAULT_MEMORY_BUDGET = 1 << 30


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def choose_chunk_size(n_rows: int, vocab_size: int, *, memory_budget: int | None = None, multiple: int = 8) -> int:
    """Rows per chunk so that one chunk's logits-sized temporaries fit in `memory_budget` bytes.

    Rule: `rows = memory_budget // (vocab_size * BYTES_PER_LOGIT)`, rounded down to a multiple of `multiple`
    (tensor-core friendly), at least `multiple`, at most `n_rows`. Default budget 1 GiB: 696 rows for a
    128256-token vocabulary, 5456 rows for 16384. Only shapes enter the rule, so equal shapes give equal chunks
    (no device query, nothing for torch.compile to guard on beyond the shapes).
    """
    _positive_int("n_rows", n_rows)
    _positive_int("vocab_size", vocab_size)
    _positive_int("multiple", multiple)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else _positive_int("memory_budget", memory_budget)
    rows = budget // (vocab_size * BYTES_PER_LOGIT)
    return min(n_rows, max(multiple, rows // multiple * multiple))


def resolve_chunk_size(chunk_size: int | None, n_rows: int, vocab_size: int, memory_budget: int | None) -> int:
    """An explicit `chunk_size`, else `choose_chunk_size` from `memory_budget` (never both)."""
    if chunk_size is None:
        return choose_chunk_size(max(n_rows, 1), vocab_size, memory_budget=memory_budget)
    _positive_int("chunk_size", chunk_size)
    if memory_budget is not None:
        raise ValueError("pass either chunk_size or memory_budget, not both")
    return min(chunk_size, max(n_rows, 1))


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkPlan:
    """One call. `call`: the chunk's function, called by the Function's step; for `ChunkedLinearFunction`
    `call(x_chunk, weight, bias, labels_chunk, rows_chunk: dict) -> output of the chunk`.

    per_row: True = one output per row, concatenated ("none"); False = summed in fp32; None = decided by the
    first chunk (0-d output: summed), as the specification's class does. merge_unit_tail: a last span of one row
    joins the span before it (`row_spans`). dx_dtype: the dtype dX is held in under grad_in_forward.
    """

    call: Callable[..., torch.Tensor]
    chunk: int
    per_row: bool | None = False
    grad_in_forward: bool = False
    row_names: tuple[str, ...] = ()
    merge_unit_tail: bool = False
    dx_dtype: torch.dtype = torch.float32


class ChunkStep(NamedTuple):
    """How one chunk of rows [s, e) is computed; the only thing the chunked Functions differ in.

    value(s, e) -> the chunk's output (forward, under no_grad); grad(s, e, cotangent) -> (the chunk's reduced
    output, cotangent-weighted d out / d x[s:e] or None, [d out / d param or None for each param]).
    """

    value: Callable[[int, int], torch.Tensor]
    grad: Callable[..., tuple]


def amp_state(x: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    """Autocast as forward saw it: backward re-enters it so the recomputed chunk matches (as checkpoint does)."""
    dev = x.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


def amp_context(state: tuple[str, bool, torch.dtype]):
    return torch.autocast(device_type=state[0], dtype=state[2], enabled=state[1])


def row_spans(n: int, chunk: int, merge_unit_tail: bool = False) -> list[tuple[int, int]]:
    """[s, e) spans of `chunk` rows; with merge_unit_tail a 1-row tail joins the span before it."""
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if merge_unit_tail and len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


def reduce_chunk(out: torch.Tensor, per_row: bool, rows: int) -> torch.Tensor:
    if not per_row:
        return out.float().sum()
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(
            f"a per-row output needs one value per row: the loss function returned shape "
            f"{tuple(out.shape)} for a chunk of {rows} rows"
        )
    return out


def _chunk_inputs(plan: ChunkPlan, labels, rows, s: int, e: int):
    lab = None if labels is None else labels[s:e]
    return lab, {k: (None if v is None else v[s:e]) for k, v in zip(plan.row_names, rows)}


class _GradSum:
    """Sum of per-chunk gradients: fp32 across chunks; a single chunk's gradient is kept as returned."""

    def __init__(self, n_chunks: int):
        self.n_chunks, self.acc = n_chunks, None

    def add(self, g: torch.Tensor | None) -> None:
        if g is None:
            return
        if self.acc is None:
            self.acc = g if self.n_chunks == 1 else g.float()
        else:
            self.acc.add_(g)


def scale_cast(t: torch.Tensor | None, scale: torch.Tensor | None, dtype: torch.dtype, rows: int = 8192):
    """`(t * scale).to(dtype)` by row slices, so the peak is |t| + |result| rather than 2 |t| + |result|."""
    if t is None:
        return None
    if scale is None:
        return t.to(dtype)
    if t.dim() == 0 or t.shape[0] <= rows:
        return (t * scale).to(dtype)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    for s, e in row_spans(t.shape[0], rows):
        out[s:e] = (t[s:e] * scale).to(dtype)
    return out


def value_loop(spans, value, per_row: bool | None):
    """Each chunk's output, reduced; per_row None is decided by the first chunk (a 0-d output is summed)."""
    outs = []
    for s, e in spans:
        raw = value(s, e)
        if per_row is None:
            per_row = raw.dim() > 0
        outs.append(reduce_chunk(raw, per_row, e - s))
        del raw
    return outs, per_row


def grad_loop(
    spans,
    per_row: bool,
    x: torch.Tensor,
    need_x: bool,
    n_params: int,
    chunk_grad,
    cotangent: torch.Tensor,
    keep_outputs: bool,
    dx_dtype: torch.dtype,
):
    """Runs `chunk_grad(s, e, cot) -> (out, dx_chunk, [param grads])` over the spans; sums what it returns."""
    # One chunk: its dx is the whole dx (no copy). No rows: an empty dx, as the full computation would give.
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device) if need_x and len(spans) != 1 else None
    sums = [_GradSum(len(spans)) for _ in range(n_params)]
    outs = []
    for s, e in spans:
        out, gx, gps = chunk_grad(s, e, cotangent[s:e] if per_row else cotangent)
        if keep_outputs:
            outs.append(out)
        if gx is not None:
            if dx is None:
                dx = gx.to(dx_dtype)
            else:
                dx[s:e] = gx
        for acc, g in zip(sums, gps):
            acc.add(g)
        # Drop this chunk's gradients before the next chunk allocates its own.
        del out, gx, gps
    return outs, dx, [acc.acc for acc in sums]


def chunked_forward(ctx, plan: ChunkPlan, make_step, tensors: tuple, params: tuple, needs: tuple[bool, ...]):
    """The forward of a chunked autograd Function, either schedule.

    tensors: what `make_step(plan, tensors, needs, per_row) -> ChunkStep` reads, x [N, H] first (saved for the
    recompute); params: the tensors besides x that may receive gradients (None allowed); needs: whether x and
    each param require grad. Returns the fp32 sum of the chunks' outputs, or their concatenation (per row).
    """
    x = tensors[0]
    ctx.plan, ctx.needs, ctx.amp = plan, needs, amp_state(x)
    ctx.dtypes = (x.dtype, *(None if p is None else p.dtype for p in params))
    spans = row_spans(x.shape[0], plan.chunk, plan.merge_unit_tail)
    if plan.grad_in_forward and any(needs):
        step = make_step(plan, tensors, needs, plan.per_row)
        one = torch.ones((), dtype=torch.float32, device=x.device)
        outs, dx, grads = grad_loop(spans, False, x, needs[0], len(params), step.grad, one, True, plan.dx_dtype)
        ctx.save_for_backward(dx, *grads)
        return torch.stack(outs).sum() if outs else x.new_zeros((), dtype=torch.float32)
    outs, ctx.per_row = value_loop(spans, make_step(plan, tensors, needs, plan.per_row).value, plan.per_row)
    if any(needs):
        ctx.save_for_backward(*tensors)
    if not outs:
        return x.new_zeros((0,) if ctx.per_row else (), dtype=torch.float32)
    return torch.cat(outs) if ctx.per_row else torch.stack(outs).sum()


def chunked_backward(ctx, grad_out: torch.Tensor, make_step) -> list[torch.Tensor | None]:
    """[dx, *param grads] of `chunked_forward`: the held gradients times `grad_out`, or each chunk recomputed
    (under the autocast state forward saw) and differentiated with its slice of `grad_out`."""
    plan, needs = ctx.plan, ctx.needs
    if plan.grad_in_forward:
        return [scale_cast(t, grad_out, d) for t, d in zip(ctx.saved_tensors, ctx.dtypes)]
    tensors = ctx.saved_tensors
    x = tensors[0]
    step = make_step(plan, tensors, needs, ctx.per_row)
    spans = row_spans(x.shape[0], plan.chunk, plan.merge_unit_tail)
    with amp_context(ctx.amp):
        _, dx, grads = grad_loop(
            spans, bool(ctx.per_row), x, needs[0], len(needs) - 1, step.grad, grad_out, False, x.dtype
        )
    return [dx, *[scale_cast(g, None, d) for g, d in zip(grads, ctx.dtypes[1:])]]


class ChunkedLinearFunction(torch.autograd.Function):
    """Core: `apply(plan, x [N, H], weight [V, H], bias [V] | None, labels [N] | None, *row_tensors)`.

    Gradients reach x, weight and bias (those that require grad) as ordinary autograd outputs, so FSDP2 and
    torch.compile see normal parameter gradients. Labels and row tensors get none.
    """

    @staticmethod
    def forward(ctx, plan: ChunkPlan, x, weight, bias, labels, *rows):
        needs = tuple(bool(v) for v in ctx.needs_input_grad[1:4])
        return chunked_forward(ctx, plan, _vjp_step, (x, weight, bias, labels, *rows), (weight, bias), needs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        dx, dw, db = chunked_backward(ctx, grad_out, _vjp_step)
        return (None, dx, dw, db, *(None,) * (1 + len(ctx.plan.row_names)))  # labels, row tensors: no gradient


def _vjp_step(plan: ChunkPlan, tensors, needs, per_row) -> ChunkStep:
    """`ChunkedLinearFunction`'s chunk: `plan.call` on (x, weight, bias, labels, *rows); (output, dx, [dW, db]) by
    `torch.func.vjp` of the chunk's own computation."""
    x, weight, bias, labels, *rows = tensors
    idx = [i for i in range(3) if needs[i]]

    def value(s, e):
        lab, rc = _chunk_inputs(plan, labels, rows, s, e)
        return plan.call(x[s:e], weight, bias, lab, rc)

    def grad(s, e, cot):
        lab, rc = _chunk_inputs(plan, labels, rows, s, e)
        own = [x[s:e], weight, bias]

        def f(*diff):
            args = list(own)
            for i, d in zip(idx, diff):
                args[i] = d
            return reduce_chunk(plan.call(args[0], args[1], args[2], lab, rc), bool(per_row), e - s)

        out, vjp_fn = torch.func.vjp(f, *[own[i] for i in idx])
        got = vjp_fn(cot.to(out.dtype))
        del vjp_fn  # holds the chunk's saved activations
        full = [None, None, None]
        for i, g in zip(idx, got):
            full[i] = g
        return out, full[0], full[1:]

    return ChunkStep(value, grad)
