"""Memory-efficient linear + loss: `f(X W^T + b)` computed row chunk by row chunk, never the full logits.

Math. Split the rows of X ([N, H]) into chunks X_1..X_k and let y_i = f(X_i W^T + b, targets_i) (one value per
row). The output is `sum_i sum(y_i)` (reductions "sum" / "mean") or `cat_i(y_i)` (reduction "none"). With
upstream gradient g (a scalar, or per row for "none"), the chain rule gives

    dL/dX_i = vjp_{X_i}(f_i)(g_i)        dL/dW = sum_i vjp_W(f_i)(g_i)        dL/db = sum_i vjp_b(f_i)(g_i)

Every vjp is taken by autograd on the chunk's own computation (`torch.func.vjp` in the functional API, which
Dynamo traces; `torch.autograd.grad` in the specification's module-based class): no derivative is written by
hand. dW and db are summed over chunks in fp32 (each chunk's partial arrives in the weight's dtype, as the
matmul's backward returns it) and cast to the weight's dtype once at the end.

Memory. Naive: [N, V] bf16 logits plus two or three fp32 tensors of that size (upcast, log-softmax, its
gradient): ~12 B x N x V, 25 GB at N = 16384, V = 128256. Chunked: one chunk's worth (`BYTES_PER_LOGIT` x rows
x V, see `choose_chunk_size`) plus dX, and only when W requires grad an fp32 dW sum (2 |W|) and one chunk's
partial dW (|W|).

Two schedules:
* `grad_in_forward=False` (default): forward evaluates f chunk by chunk under no_grad; backward recomputes each
  chunk and differentiates it with the real upstream gradient. One extra X W^T matmul.
* `grad_in_forward=True` (sum / mean only): forward differentiates each chunk with cotangent 1 right away and
  keeps dX (fp32) and dW; backward multiplies them by g. As many matmuls as the naive path, but the gradients
  are computed even if backward never runs, and are held from forward to backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

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
    """One call: `call(x_chunk, weight, bias, labels_chunk, rows_chunk: dict) -> output of the chunk`.

    per_row: True = one output per row, concatenated ("none"); False = summed in fp32; None = decided by the
    first chunk (0-d output: summed), as the specification's class does.
    """

    call: Callable[..., torch.Tensor]
    chunk: int
    per_row: bool | None = False
    grad_in_forward: bool = False
    row_names: tuple[str, ...] = ()


def _amp_state(x: torch.Tensor) -> tuple[str, bool, torch.dtype]:
    """Autocast as forward saw it: backward re-enters it so the recomputed chunk matches (as checkpoint does)."""
    dev = x.device.type
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


def _amp(state: tuple[str, bool, torch.dtype]):
    return torch.autocast(device_type=state[0], dtype=state[2], enabled=state[1])


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _reduce_chunk(out: torch.Tensor, per_row: bool, rows: int) -> torch.Tensor:
    if not per_row:
        return out.float().sum()
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(f"a per-row output needs one value per row: the loss function returned shape "
                         f"{tuple(out.shape)} for a chunk of {rows} rows")
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


def _scale_cast(t: torch.Tensor | None, scale: torch.Tensor | None, dtype: torch.dtype, rows: int = 8192):
    """`(t * scale).to(dtype)` by row slices, so the peak is |t| + |result| rather than 2 |t| + |result|."""
    if t is None:
        return None
    if scale is None:
        return t.to(dtype)
    if t.dim() == 0 or t.shape[0] <= rows:
        return (t * scale).to(dtype)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    for s, e in _spans(t.shape[0], rows):
        out[s:e] = (t[s:e] * scale).to(dtype)
    return out


def _grad_loop(plan: ChunkPlan, per_row: bool, x: torch.Tensor, need_x: bool, n_params: int, chunk_grad,
               cotangent: torch.Tensor, keep_outputs: bool, dx_dtype: torch.dtype):
    """Runs `chunk_grad(s, e, cot) -> (out, dx_chunk, [param grads])` over the chunks; sums what it returns."""
    spans = _spans(x.shape[0], plan.chunk)
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device) if need_x and len(spans) > 1 else None
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


class ChunkedLinearFunction(torch.autograd.Function):
    """Core: `apply(plan, x [N, H], weight [V, H], bias [V] | None, labels [N] | None, *row_tensors)`.

    Gradients reach x, weight and bias (those that require grad) as ordinary autograd outputs, so FSDP2 and
    torch.compile see normal parameter gradients. Labels and row tensors get none.
    """

    @staticmethod
    def forward(ctx, plan: ChunkPlan, x, weight, bias, labels, *rows):
        needs = tuple(bool(v) for v in ctx.needs_input_grad[1:4])
        ctx.plan, ctx.needs, ctx.amp = plan, needs, _amp_state(x)
        if plan.grad_in_forward and any(needs):
            grad = _vjp_chunk_fn(plan, x, weight, bias, labels, rows, needs)
            one = torch.ones((), dtype=torch.float32, device=x.device)
            outs, dx, (dw, db) = _grad_loop(plan, False, x, needs[0], 2, grad, one, True, torch.float32)
            ctx.save_for_backward(dx, dw, db, weight, bias)
            ctx.x_dtype = x.dtype
            return torch.stack(outs).sum() if outs else x.new_zeros((), dtype=torch.float32)
        outs = []
        for s, e in _spans(x.shape[0], plan.chunk):
            lab, rc = _chunk_inputs(plan, labels, rows, s, e)
            outs.append(_reduce_chunk(plan.call(x[s:e], weight, bias, lab, rc), plan.per_row, e - s))
        if any(needs):
            ctx.save_for_backward(x, weight, bias, labels, *rows)
        if not outs:
            return x.new_zeros((0,) if plan.per_row else (), dtype=torch.float32)
        return torch.cat(outs) if plan.per_row else torch.stack(outs).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        plan, needs = ctx.plan, ctx.needs
        tail = (None,) * (1 + len(plan.row_names))  # labels, row tensors
        if plan.grad_in_forward:
            dx, dw, db, weight, bias = ctx.saved_tensors
            return (None, _scale_cast(dx, grad_out, ctx.x_dtype), _scale_cast(dw, grad_out, weight.dtype),
                    _scale_cast(db, grad_out, None if bias is None else bias.dtype), *tail)
        x, weight, bias, labels, *rows = ctx.saved_tensors
        grad = _vjp_chunk_fn(plan, x, weight, bias, labels, rows, needs)
        with _amp(ctx.amp):
            _, dx, (dw, db) = _grad_loop(plan, bool(plan.per_row), x, needs[0], 2, grad, grad_out, False, x.dtype)
        return (None, dx, _scale_cast(dw, None, weight.dtype),
                _scale_cast(db, None, None if bias is None else bias.dtype), *tail)


def _vjp_chunk_fn(plan, x, weight, bias, labels, rows, needs):
    """Per-chunk (output, dx, [dW, db]) by `torch.func.vjp` of the chunk's own computation."""
    idx = [i for i in range(3) if needs[i]]

    def chunk_grad(s, e, cot):
        lab, rc = _chunk_inputs(plan, labels, rows, s, e)
        own = [x[s:e], weight, bias]

        def f(*diff):
            args = list(own)
            for i, d in zip(idx, diff):
                args[i] = d
            return _reduce_chunk(plan.call(args[0], args[1], args[2], lab, rc), bool(plan.per_row), e - s)

        out, vjp_fn = torch.func.vjp(f, *[own[i] for i in idx])
        got = vjp_fn(cot.to(out.dtype))
        del vjp_fn  # holds the chunk's saved activations
        full = [None, None, None]
        for i, g in zip(idx, got):
            full[i] = g
        return out, full[0], full[1:]

    return chunk_grad


class MemoryEfficientLinear(torch.autograd.Function):
    """The specification's API: `MemoryEfficientLinear.apply(X, linear, labels, forward_function)`.

    `forward_function(X_chunk, linear, labels_chunk)` maps a chunk of rows (X flattened to [rows, H], labels to
    [rows, ...]) to either a 0-d tensor (the chunk's sum: outputs are added) or one value per row (outputs are
    concatenated and reshaped to X's leading dimensions). Optional: `chunk_size` (rows) or `memory_budget`
    (bytes, `choose_chunk_size`), `grad_in_forward` (scalar outputs only, see the module docstring).

    `linear` may be any module (nn.Linear, a LoRA-wrapped or 4-bit layer...): its parameters that require grad
    enter the autograd graph as inputs of this Function, and backward returns their gradients, so they land in
    `.grad` the normal way. Backward recomputes each chunk under grad mode and differentiates forward_function
    with `torch.autograd.grad` (upstream gradient applied; parameter gradients summed over chunks in fp32).
    """

    @classmethod
    def apply(cls, X, linear, labels, forward_function, chunk_size: int | None = None, *,
              memory_budget: int | None = None, grad_in_forward: bool = False):
        if not isinstance(X, torch.Tensor) or X.dim() < 2:
            raise ValueError(f"X must be a tensor of shape [..., hidden] with at least 2 dims, got "
                             f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
        if not isinstance(linear, torch.nn.Module):
            raise TypeError(f"linear must be a torch.nn.Module, got {type(linear).__name__}")
        if not callable(forward_function):
            raise TypeError("forward_function must be callable as forward_function(X_chunk, linear, labels_chunk)")
        lead = X.shape[:-1]
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[:len(lead)] != lead):
            raise ValueError(f"labels must be a tensor whose leading dims match X's {tuple(lead)}, got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        vocab = getattr(linear, "out_features", None)
        if chunk_size is None and not isinstance(vocab, int):
            raise ValueError("linear has no out_features: pass chunk_size explicitly")
        x2 = X.reshape(-1, X.shape[-1])
        lab = None if labels is None else labels.reshape(x2.shape[0], *labels.shape[len(lead):])
        plan = ChunkPlan(call=lambda xc, w, b, yc, rc: forward_function(xc, linear, yc),
                         chunk=resolve_chunk_size(chunk_size, x2.shape[0], vocab or 1, memory_budget),
                         per_row=None, grad_in_forward=bool(grad_in_forward))
        params = tuple(p for p in linear.parameters() if p.requires_grad)
        out = super().apply(plan, x2, lab, *params)
        return out.reshape(*lead, *out.shape[1:]) if out.dim() >= 1 else out

    @staticmethod
    def forward(ctx, plan: ChunkPlan, x, labels, *params):
        needs = (bool(ctx.needs_input_grad[1]), *(bool(v) for v in ctx.needs_input_grad[3:]))
        spans = _spans(x.shape[0], plan.chunk)
        ctx.plan, ctx.needs, ctx.amp = plan, needs, _amp_state(x)
        if plan.grad_in_forward and any(needs):
            ctx.per_row = False
            chunk_grad = _autograd_chunk_fn(plan, None, x, labels, params, needs)
            one = torch.ones((), dtype=torch.float32, device=x.device)
            outs, dx, grads = _grad_loop(plan, False, x, needs[0], len(params), chunk_grad, one, True,
                                         torch.float32)
            ctx.save_for_backward(dx, *grads)
            ctx.x_dtype, ctx.param_dtypes = x.dtype, [p.dtype for p in params]
            return torch.stack(outs).sum() if outs else x.new_zeros((), dtype=torch.float32)
        # Scalar or per-row output is decided by the first chunk, as the specification does.
        first = None
        if spans:
            s, e = spans[0]
            first = plan.call(x[s:e], None, None, None if labels is None else labels[s:e], {})
        per_row = first is not None and first.dim() > 0
        ctx.per_row = per_row
        outs = []
        for i, (s, e) in enumerate(spans):
            raw = first if i == 0 else plan.call(x[s:e], None, None, None if labels is None else labels[s:e], {})
            outs.append(_reduce_chunk(raw, per_row, e - s))
            first = raw = None
        if any(needs):
            ctx.save_for_backward(x, labels, *params)
        if not outs:
            return x.new_zeros((), dtype=torch.float32)
        return torch.cat(outs) if per_row else torch.stack(outs).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        plan, needs = ctx.plan, ctx.needs
        if plan.grad_in_forward:
            dx, *grads = ctx.saved_tensors
            return (None, _scale_cast(dx, grad_out, ctx.x_dtype), None,
                    *[_scale_cast(g, grad_out, d) for g, d in zip(grads, ctx.param_dtypes)])
        x, labels, *params = ctx.saved_tensors
        chunk_grad = _autograd_chunk_fn(plan, ctx.per_row, x, labels, params, needs)
        with _amp(ctx.amp):
            _, dx, grads = _grad_loop(plan, ctx.per_row, x, needs[0], len(params), chunk_grad, grad_out, False,
                                      x.dtype)
        return (None, dx, None, *[_scale_cast(g, None, p.dtype) for g, p in zip(grads, params)])


def _autograd_chunk_fn(plan, per_row, x, labels, params, needs):
    """Per-chunk (output, dx, [grad per param]) by `torch.autograd.grad` through the module's own forward."""

    def chunk_grad(s, e, cot):
        xc = x[s:e].detach().requires_grad_(needs[0])
        lab = None if labels is None else labels[s:e]
        with torch.enable_grad():
            raw = plan.call(xc, None, None, lab, {})
            if per_row is None and raw.dim() > 0:  # grad_in_forward: the upstream gradient must be a scalar
                raise ValueError("grad_in_forward needs forward_function to return a scalar per chunk")
            out = _reduce_chunk(raw, bool(per_row), e - s)
            del raw
        wanted = [p for p, n in zip(params, needs[1:]) if n]
        inputs = ([xc] if needs[0] else []) + wanted
        got = list(torch.autograd.grad(out, inputs, cot.to(out.dtype), allow_unused=True)) if inputs else []
        gx = got.pop(0) if needs[0] else None
        it = iter(got)
        gps = [next(it) if n else None for n in needs[1:]]
        return out.detach(), gx, gps

    return chunk_grad


def _check_tensor(name: str, t: Any, *, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(t.shape)}")
    return t


def chunked_linear_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                        bias: torch.Tensor | None = None, loss: str | Callable[..., torch.Tensor] = "cross_entropy",
                        reduction: str = "mean", num_items: int | torch.Tensor | None = None,
                        chunk_size: int | None = None, memory_budget: int | None = None,
                        grad_in_forward: bool = False, check_labels: bool = True, **options: Any) -> torch.Tensor:
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
    _check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., hidden] with at least 2 dims, got {tuple(x.shape)}")
    _check_tensor("weight", weight, dims=(2,))
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [vocab, {x.shape[-1]}] to match x's hidden size, got {tuple(weight.shape)}")
    if weight.device != x.device or (weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"x and weight must share dtype and device (outside autocast), got {x.dtype}/{x.device} "
                         f"and {weight.dtype}/{weight.device}")
    vocab = weight.shape[0]
    if bias is not None and (_check_tensor("bias", bias, dims=(1,)).shape[0] != vocab or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [{vocab}] of dtype {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    lead = x.shape[:-1]
    n = x[..., 0].numel()
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
                raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; found "
                                 f"{int(labels[bad].flatten()[0])}")
    names = tuple(getattr(fn, "row_args", ()))
    rows = []
    for name in names:
        t = options.pop(name, None)
        if t is not None:
            _check_tensor(name, t)
            if t.shape[:len(lead)] != lead:
                raise ValueError(f"{name} must have x's leading shape {tuple(lead)} first, got {tuple(t.shape)}")
            t = t.reshape(n, *t.shape[len(lead):])
        rows.append(t)
    for name, t in [*zip(names, rows), *options.items()]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{name} receives no gradient from chunked_linear_loss; pass {name}.detach()")
    plan = ChunkPlan(call=lambda xc, w, b, yc, rc: fn(xc, w, b, yc, **rc, **options),
                     chunk=resolve_chunk_size(chunk_size, n, vocab, memory_budget),
                     per_row=reduction == "none", grad_in_forward=bool(grad_in_forward), row_names=names)
    out = ChunkedLinearFunction.apply(plan, x.reshape(n, x.shape[-1]), weight, bias,
                                      None if labels is None else labels.reshape(n), *rows)
    if reduction == "none":
        return out.reshape(lead)
    if reduction == "sum":
        return out
    if num_items is None:
        count = n if labels is None else (labels != ignore_index).sum()
    elif isinstance(num_items, torch.Tensor):
        count = num_items.to(out.device)
    elif isinstance(num_items, int) and not isinstance(num_items, bool) and num_items >= 0:
        count = num_items
    else:
        raise ValueError(f"num_items must be a non-negative int or a tensor, got {num_items!r}")
    if isinstance(count, int):
        return out / max(count, 1)
    return out / count.clamp_min(1)
