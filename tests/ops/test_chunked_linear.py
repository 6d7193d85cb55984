"""Chunked linear + loss (quickloris.ops.chunked_linear) against the naive full-logits computation.

Inputs are fresh random tensors of odd sizes (the `seed` fixture). fp32 results must match the naive path to
fp32 rounding; bf16 results are compared with an fp64 evaluation of the same bf16 inputs, and must be within
twice the naive path's own error (both do a bf16 matmul and fp32 softmax; they differ only in rounding order).
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from quickloris import MemoryEfficientLinear, chunked_linear_loss
from quickloris.ops.chunked_linear import BYTES_PER_LOGIT, choose_chunk_size, resolve_chunk_size


def _inputs(lead, H, V, dtype, *, bias=False, ignore_frac=0.3, w_grad=True):
    x = torch.randn(*lead, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, V, lead)
    y[torch.rand(lead) < ignore_frac] = -100
    cast = lambda t, g: None if t is None else t.to(dtype).requires_grad_(g)  # noqa: E731
    return cast(x, True), cast(w, w_grad), cast(b, w_grad), y


def _naive_ce(x, w, b, y, *, smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"):
    """The naive path: full [N, V] logits in x's dtype, upcast to fp32 (fp64 stays fp64), F.cross_entropy."""
    z = F.linear(x, w, b)
    z = z.float() if z.dtype != torch.float64 else z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z2, y2 = z.reshape(-1, z.shape[-1]), y.reshape(-1)
    per = F.cross_entropy(z2, y2, reduction="none", label_smoothing=smoothing)
    if z_loss:
        per = per + z_loss * torch.logsumexp(z2, -1).square() * (y2 != -100)
    if reduction == "none":
        return per.reshape(y.shape)
    total = per.sum()
    return total if reduction == "sum" else total / (y2 != -100).sum().clamp_min(1)


def _grads(out, tensors, upstream=None):
    out.backward(upstream)
    grads = [None if t is None or t.grad is None else t.grad.detach().clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return grads


def _fp64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def _close(chunked, naive, truth, name):
    """fp32: chunked == naive to rounding; bf16: chunked error <= 2x the naive path's own error + 1 ulp."""
    if chunked is None or naive is None:
        assert chunked is None and naive is None, name
        return
    assert chunked.dtype == naive.dtype, name
    assert torch.isfinite(chunked).all(), f"{name}: non-finite values"
    if chunked.dtype == torch.float32:
        torch.testing.assert_close(chunked, naive, rtol=2e-5, atol=2e-6, msg=name)
        return
    err_c = (chunked.double() - truth).abs().max().item()
    err_n = (naive.double() - truth).abs().max().item()
    # + one bf16 ulp of the largest value: per-chunk partials of dW / db are rounded to bf16 before the fp32 sum
    slack = torch.finfo(torch.bfloat16).eps * truth.abs().max().item()
    assert err_c <= 2 * err_n + slack, f"{name}: chunked err {err_c:.3g} vs naive err {err_n:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(37,), (3, 29)], ids=["2d", "3d"])
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recompute", "grad_in_forward"])
def test_chunked_ce_matches_naive(seed, dtype, lead, grad_in_forward):
    H, V = 24, 211
    x, w, b, y = _inputs(lead, H, V, dtype, bias=True)
    opts = dict(smoothing=0.1, z_loss=1e-3, softcap=4.0)
    up = torch.tensor(1.7)
    out = chunked_linear_loss(
        x, w, y, bias=b, chunk_size=8, grad_in_forward=grad_in_forward, label_smoothing=0.1, z_loss=1e-3, softcap=4.0
    )
    g = _grads(out * up, [x, w, b])
    ref = _naive_ce(x, w, b, y, **opts)
    gr = _grads(ref * up, [x, w, b])
    xt, wt, bt = _fp64(x, w, b)
    truth = _naive_ce(xt, wt, bt, y, **opts)
    gt = _grads(truth * up.double(), [xt, wt, bt])
    assert out.dtype == torch.float32 and out.shape == ()
    _close(out, ref.float(), truth, "loss")
    for name, a, r, t in zip(("dX", "dW", "db"), g, gr, gt):
        _close(a, r, t, name)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_chunked_reductions_and_upstream_gradient(seed, reduction):
    x, w, _, y = _inputs((5, 13), 16, 97, torch.float32)
    out = chunked_linear_loss(x, w, y, reduction=reduction, chunk_size=6)
    ref = _naive_ce(x, w, None, y, reduction=reduction)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    up = torch.randn(y.shape) if reduction == "none" else torch.tensor(-0.37)
    torch.testing.assert_close(_grads(out, [x, w], up), _grads(ref, [x, w], up), rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert out.shape == y.shape and (out[y == -100] == 0).all()


def test_chunked_mean_over_given_count_equals_one_big_batch(seed):
    """Two micro-batches, each `mean` over the whole step's label count, add up to the big batch's mean."""
    x, w, _, y = _inputs((4, 11), 16, 89, torch.float32)
    total = (y != -100).sum()
    parts = [chunked_linear_loss(x[i : i + 2], w, y[i : i + 2], num_items=total, chunk_size=5) for i in (0, 2)]
    g_parts = _grads(parts[0] + parts[1], [x, w])
    big = chunked_linear_loss(x, w, y, chunk_size=7)
    torch.testing.assert_close(parts[0] + parts[1], big, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_parts, _grads(big, [x, w]), rtol=1e-5, atol=1e-6)
    as_int = chunked_linear_loss(x[:2], w, y[:2].int(), num_items=int(total), chunk_size=5)  # int32 labels too
    torch.testing.assert_close(as_int, parts[0].detach())


def test_chunked_result_independent_of_chunk_size(seed):
    x, w, _, y = _inputs((53,), 20, 131, torch.float32)
    results = []
    for chunk in (1, 7, 16, 53, 1000):
        out = chunked_linear_loss(x, w, y, chunk_size=chunk)
        results.append((out.detach(), *_grads(out, [x, w])))
    budget = chunked_linear_loss(x, w, y, memory_budget=8 * 131 * BYTES_PER_LOGIT)
    results.append((budget.detach(), *_grads(budget, [x, w])))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_all_ignored_chunks_give_no_nan(seed):
    x, w, _, y = _inputs((40,), 16, 71, torch.bfloat16, ignore_frac=0.0)
    y[:24] = -100  # chunks 0-2 of 8 rows: nothing but ignored labels
    out = chunked_linear_loss(x, w, y, chunk_size=8)
    gx, gw = _grads(out, [x, w])
    assert torch.isfinite(out) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert (gx[:24] == 0).all()
    y[:] = -100  # the whole batch ignored: mean divides by max(count, 1) -> 0, zero gradients
    out = chunked_linear_loss(x, w, y, chunk_size=8)
    gx, gw = _grads(out, [x, w])
    assert out.item() == 0.0 and (gx == 0).all() and (gw == 0).all()


def test_chunked_frozen_weight_and_no_grad(seed):
    x, w, _, y = _inputs((2, 17), 12, 50, torch.float32, w_grad=False)
    out = chunked_linear_loss(x, w, y, chunk_size=5)
    (gx,) = _grads(out, [x])
    (gr,) = _grads(_naive_ce(x, w, None, y), [x])
    torch.testing.assert_close(gx, gr, rtol=1e-5, atol=1e-6)
    assert w.grad is None
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_loss(x, w, y, chunk_size=5), _naive_ce(x, w, None, y))


def test_chunked_autocast_recompute_matches(seed):
    """fp32 weights under bf16 autocast: backward re-enters autocast, so it differentiates what forward ran.

    With one chunk the chunked path runs exactly the naive path's ops (same bf16 roundings); outside autocast
    the recomputation would be fp32 and differ at bf16 level. Several chunks differ only in dW's summation.
    """
    x, w, _, y = _inputs((29,), 16, 61, torch.float32)
    for chunk, tol in ((29, 1e-6), (6, 2e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = chunked_linear_loss(x, w, y, chunk_size=chunk)
            ref = _naive_ce(x, w, None, y)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_grads(out, [x, w]), _grads(ref, [x, w]), rtol=tol, atol=tol)


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_chunked_never_materialises_logits(seed, grad_in_forward):
    """No tensor created in forward + backward is larger than one chunk of logits (or W / X themselves)."""
    N, H, V, chunk = 96, 8, 509, 16
    x, w, _, y = _inputs((N,), H, V, torch.float32)
    with _RecordShapes() as rec:
        chunked_linear_loss(x, w, y, chunk_size=chunk, grad_in_forward=grad_in_forward).backward()
    assert rec.largest <= max(chunk * V, V * H, N * H) < N * V
    with _RecordShapes() as naive:
        _naive_ce(x.detach(), w.detach(), None, y)
    assert naive.largest >= N * V


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of storages created inside the mode and still alive: a CPU stand-in for max_memory_allocated."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.sizes, self.live, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self.skip or key in self.sizes or st.nbytes() == 0:
                    continue
                self.sizes[key] = st.nbytes()
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key)
        return out

    def _free(self, key):
        self.live -= self.sizes.pop(key, 0)


@pytest.mark.parametrize("w_grad", [False, True], ids=["frozen_W", "trainable_W"])
def test_chunked_peak_memory_cpu_proxy(seed, w_grad):
    """Peak live memory over inputs: one chunk's BYTES_PER_LOGIT x rows x V, plus dX, plus (trainable W) the
    fp32 dW sum and one chunk's partial; the naive path holds ~BYTES_PER_LOGIT x N x V."""
    N, H, V, chunk = 1024, 64, 4000, 128
    x, w, _, y = _inputs((N,), H, V, torch.bfloat16, w_grad=w_grad)
    with _LiveBytes(x, w, y) as naive:
        _naive_ce(x, w, None, y).backward()
    x.grad = w.grad = None
    with _LiveBytes(x, w, y) as ours:
        chunked_linear_loss(x, w, y, chunk_size=chunk).backward()
    bound = 1.1 * BYTES_PER_LOGIT * chunk * V + 2 * N * H + (4 * V * H if w_grad else 0)
    assert ours.peak <= bound, (ours.peak, bound)
    assert naive.peak >= 0.9 * BYTES_PER_LOGIT * N * V
    assert ours.peak <= 0.25 * naive.peak


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recompute", "grad_in_forward"])
def test_chunked_compiles_fullgraph(seed, backend, grad_in_forward):
    """torch.compile(fullgraph=True) traces the call, forward and backward, without a graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, w, _, y = _inputs((3, 11), 16, 67, torch.float32)
    kw = {"chunk_size": 8, "z_loss": 1e-4, "grad_in_forward": grad_in_forward}
    fn = torch.compile(lambda x, w, y: chunked_linear_loss(x, w, y, **kw), fullgraph=True, backend=backend)
    out = fn(x, w, y)
    g = _grads(out, [x, w])
    ref = chunked_linear_loss(x, w, y, **kw)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, _grads(ref, [x, w]))
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_chunk_size_rule():
    assert choose_chunk_size(100_000, 128256) == 696  # 1 GiB // (128256 * 12) = 697 -> multiple of 8
    assert choose_chunk_size(100_000, 16384) == 5456
    assert choose_chunk_size(100, 128256) == 100
    assert choose_chunk_size(10_000, 128256, memory_budget=1) == 8  # never below `multiple`
    assert choose_chunk_size(10_000, 1000, memory_budget=64_000 * 12) == 64_000 // 1000 // 8 * 8
    assert resolve_chunk_size(50, 20, 10, None) == 20
    with pytest.raises(ValueError, match="chunk_size"):
        resolve_chunk_size(0, 20, 10, None)
    with pytest.raises(ValueError, match="not both"):
        resolve_chunk_size(4, 20, 10, 1 << 20)
    with pytest.raises(ValueError, match="memory_budget"):
        choose_chunk_size(10, 10, memory_budget=-5)


def test_chunked_bad_input_raises(seed):
    x, w, _, y = _inputs((4, 6), 8, 30, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        chunked_linear_loss(x, w[:, :5], y)
    with pytest.raises(ValueError, match="labels must have"):
        chunked_linear_loss(x, w, y[:, :5])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30\)"):
        chunked_linear_loss(x, w, torch.full_like(y, 30))
    with pytest.raises(ValueError, match="labels must be in"):
        chunked_linear_loss(x, w, torch.full_like(y, -3))
    with pytest.raises(TypeError, match="integer"):
        chunked_linear_loss(x, w, y.float())
    with pytest.raises(ValueError, match="at least 2 dims"):
        chunked_linear_loss(x[0, 0], w, y[0, 0])
    with pytest.raises(ValueError, match="2 dims"):
        chunked_linear_loss(x, w[None], y)
    with pytest.raises(ValueError, match="dtype"):
        chunked_linear_loss(x, w.double(), y)
    with pytest.raises(ValueError, match="bias"):
        chunked_linear_loss(x, w, y, bias=torch.zeros(29))
    with pytest.raises(ValueError, match="reduction"):
        chunked_linear_loss(x, w, y, reduction="avg")
    with pytest.raises(ValueError, match="grad_in_forward"):
        chunked_linear_loss(x, w, y, reduction="none", grad_in_forward=True)
    with pytest.raises(ValueError, match="loss must be one of"):
        chunked_linear_loss(x, w, y, loss="hinge")
    with pytest.raises(ValueError, match="num_items"):
        chunked_linear_loss(x, w, y, num_items=-1)
    with pytest.raises(ValueError, match="num_items applies"):
        chunked_linear_loss(x, w, y, reduction="sum", num_items=5)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_linear_loss(x, w, y, chunk_size=0)


# --- the specification's class -------------------------------------------------------------------------------


def transformation_function(batch, linear, labels):
    """The specification's example forward function, verbatim in behaviour."""
    x = linear(batch).float()
    return torch.nn.CrossEntropyLoss(reduction="sum")(x.view(-1, x.shape[-1]), labels.view(-1))


@pytest.mark.parametrize("bias", [False, True])
def test_spec_class_matches_naive(seed, bias):
    """The specification's usage and checks, at CPU size: loss, dX and dW (allclose rtol 1e-3, atol 1e-5)."""
    B, S, H, V = 3, 19, 32, 257
    X = torch.randn(B, S, H, requires_grad=True)
    labels = torch.randint(0, V, (B, S))
    lin_naive = torch.nn.Linear(H, V, bias=bias)
    lin_eff = torch.nn.Linear(H, V, bias=bias)
    lin_eff.load_state_dict(lin_naive.state_dict())
    ref = transformation_function(X, lin_naive, labels)
    ref.backward()
    X_eff = X.detach().clone().requires_grad_(True)
    out = MemoryEfficientLinear.apply(X_eff, lin_eff, labels, transformation_function)
    out.backward()
    assert torch.allclose(out, ref, rtol=1e-3, atol=1e-5)
    assert torch.allclose(X_eff.grad, X.grad, rtol=1e-3, atol=1e-5)
    assert torch.allclose(lin_eff.weight.grad, lin_naive.weight.grad, rtol=1e-3, atol=1e-5)
    if bias:
        assert torch.allclose(lin_eff.bias.grad, lin_naive.bias.grad, rtol=1e-3, atol=1e-5)
    # dynamic chunk sizes give the same result
    for chunk in (3, 64):
        lin_eff.zero_grad()
        X2 = X.detach().clone().requires_grad_(True)
        out2 = MemoryEfficientLinear.apply(X2, lin_eff, labels, transformation_function, chunk)
        out2.backward(torch.tensor(2.0))
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(X2.grad, 2 * X.grad, rtol=1e-4, atol=1e-6)


def test_spec_class_per_row_output_and_lora_module(seed):
    """A per-row forward function (concatenated) through a module with a frozen base and a trainable adapter."""

    class LoraHead(torch.nn.Module):
        def __init__(self, H, V):
            super().__init__()
            self.base = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
            self.a = torch.nn.Parameter(torch.randn(4, H) * 0.1)
            self.b = torch.nn.Parameter(torch.randn(V, 4) * 0.1)
            self.out_features = V

        def forward(self, x):
            return self.base(x) + x @ self.a.T @ self.b.T

    def logp(batch, linear, labels):
        return torch.log_softmax(linear(batch).float(), -1).gather(-1, labels[:, None]).squeeze(-1)

    head = LoraHead(16, 91)
    X = torch.randn(2, 23, 16, requires_grad=True)
    y = torch.randint(0, 91, (2, 23))
    up = torch.randn(2, 23)
    out = MemoryEfficientLinear.apply(X, head, y, logp, 7)
    assert out.shape == (2, 23)
    g = _grads(out, [X, head.a, head.b], up)
    ref = logp(X.reshape(-1, 16), head, y.reshape(-1)).reshape(2, 23)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, _grads(ref, [X, head.a, head.b], up), rtol=1e-5, atol=1e-6)
    assert head.base.weight.grad is None


def test_spec_class_grad_in_forward_and_errors(seed):
    lin = torch.nn.Linear(8, 40, bias=False)
    X = torch.randn(21, 8, requires_grad=True)
    y = torch.randint(0, 40, (21,))
    out = MemoryEfficientLinear.apply(X, lin, y, transformation_function, 4, grad_in_forward=True)
    g = _grads(out * 3.0, [X, lin.weight])
    ref = transformation_function(X, lin, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, _grads(ref * 3.0, [X, lin.weight]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 dims"):
        MemoryEfficientLinear.apply(X[0], lin, y, transformation_function)
    with pytest.raises(TypeError, match="nn.Module"):
        MemoryEfficientLinear.apply(X, lin.weight, y, transformation_function)
    with pytest.raises(ValueError, match="leading dims"):
        MemoryEfficientLinear.apply(X, lin, y[:5], transformation_function)
    with pytest.raises(TypeError, match="callable"):
        MemoryEfficientLinear.apply(X, lin, y, None)
    per_row = lambda b, linear, t: torch.nn.functional.cross_entropy(linear(b), t, reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match="scalar"):
        MemoryEfficientLinear.apply(X, lin, y, per_row, 4, grad_in_forward=True)


@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["recompute", "grad_in_forward"])
def test_zero_rows_give_zero_and_an_empty_gradient(grad_in_forward):
    """No rows: both APIs return an fp32 zero and x gets an empty gradient of its own dtype, as the full path."""
    w = torch.randn(5, 8, dtype=torch.bfloat16)
    y = torch.zeros(0, dtype=torch.long)
    ce = lambda b, lin, t: F.cross_entropy(lin(b).float(), t, reduction="sum")  # noqa: E731
    lin = torch.nn.Linear(8, 5, bias=False).bfloat16()
    for fn in (
        lambda x: chunked_linear_loss(x, w, y, reduction="sum", grad_in_forward=grad_in_forward),
        lambda x: MemoryEfficientLinear.apply(x, lin, y, ce, grad_in_forward=grad_in_forward),
    ):
        x = torch.randn(0, 8, dtype=torch.bfloat16, requires_grad=True)
        out = fn(x)
        out.backward()
        assert out.dtype == torch.float32 and out.shape == () and out.item() == 0.0
        assert x.grad is not None and x.grad.shape == (0, 8) and x.grad.dtype == torch.bfloat16
