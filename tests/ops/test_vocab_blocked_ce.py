"""Linear + cross-entropy over blocks of the vocabulary (quickloris.ops.vocab_blocked_ce) against the naive path
and an fp64 truth, in both loop orders; when `chunked_linear_loss` takes it; its temporaries' bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quickloris import chunked_linear_loss
from quickloris.ops.vocab_blocked_ce import VocabBlockedCE, block_size
from tests.helpers import within

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(n, h, v, dtype, bias):
    x = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) / h**0.5 * 2
    b = torch.randn(v, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < 0.3] = -100
    return x, w, b, y


def _naive(x, w, b, y):
    z = F.linear(x, w, b)
    return F.cross_entropy(z.float() if z.dtype != torch.float64 else z, y, reduction="sum")


def _grads(fn, x, w, b, y, dtype):
    ts = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(*ts, y)
    grads = torch.autograd.grad(out, [t for t in ts if t is not None])
    return out.detach(), grads


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("order", ["vocab", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_naive_and_truth(seed, order, dtype, bias, kernels):
    """Both the PyTorch formulas and the Triton kernels (here under the interpreter): they differ in fp32
    rounding only, before the same single rounding of G to x's dtype, so the bounds are the same."""
    n, h, v = 67, 24, 389  # odd sizes; a budget of ~3 blocks of the vocabulary and 3 row chunks
    x, w, b, y = _inputs(n, h, v, torch.float64, bias)
    budget = 12 * n * 130

    def blocked(xx, ww, bb, yy):
        return VocabBlockedCE.apply(xx, ww, bb, yy, -100, 23, budget, order, kernels)

    truth, g_truth = _grads(_naive, x, w, b, y, torch.float64)
    ours, g_ours = _grads(blocked, x, w, b, y, dtype)
    naive, g_naive = _grads(_naive, x, w, b, y, dtype)
    for name, a, c, t in zip(("loss", "dx", "dW", "db"), (ours, *g_ours), (naive, *g_naive), (truth, *g_truth)):
        assert a.dtype == c.dtype, name
        err, err_naive = (a.double() - t).abs().max().item(), (c.double() - t).abs().max().item()
        scale = t.abs().max().item()
        if dtype == torch.float32:  # fp32 sums in another order: a few fp32 ulps of the largest value
            within(err, 64 * torch.finfo(torch.float32).eps * scale, f"{name} fp32")
        else:  # the same bf16 matmuls and roundings as the naive path, plus the blocks' partials of dx (CPU: rounded
            # to bf16 before their fp32 sum: one bf16 ulp of the largest value)
            within(err, 2 * err_naive + torch.finfo(torch.bfloat16).eps * scale, f"{name} bf16")


def test_all_rows_ignored_gives_zero_loss_and_gradients(seed):
    x, w, b, y = _inputs(9, 8, 50, torch.float32, True)
    y[:] = -100
    xs, ws, bs = (t.float().requires_grad_() for t in (x, w, b))
    out = chunked_linear_loss(xs, ws, y, bias=bs, vocab_blocked=True)
    out.backward()
    assert out.item() == 0.0 and all(bool((t.grad == 0).all()) for t in (xs, ws, bs))


def test_chunked_linear_loss_takes_it_for_a_trainable_head_only(monkeypatch, seed):
    calls = []
    real = VocabBlockedCE.apply
    monkeypatch.setattr(VocabBlockedCE, "apply", lambda *a: calls.append(1) or real(*a))
    x, w, _, y = _inputs(20, 8, 40, torch.float32, False)
    xs = x.float().requires_grad_()
    chunked_linear_loss(xs, w.float().requires_grad_(), y)  # trainable head, plain cross-entropy
    assert calls == [1]
    chunked_linear_loss(xs, w.float(), y)  # frozen head (QLoRA): row chunks
    chunked_linear_loss(xs, w.float().requires_grad_(), y, label_smoothing=0.1)  # an option it does not have
    chunked_linear_loss(xs, w.float().requires_grad_(), y, grad_in_forward=True)
    chunked_linear_loss(xs, w.float().requires_grad_(), y, vocab_blocked=False)
    with torch.no_grad():
        chunked_linear_loss(xs, w.float().requires_grad_(), y)
    assert calls == [1]
    with pytest.raises(ValueError, match="vocab_blocked needs loss='cross_entropy'"):
        chunked_linear_loss(xs, w.float().requires_grad_(), y, z_loss=1e-4, vocab_blocked=True)


@pytest.mark.parametrize("rows, vocab, budget, expect", [(96, 509, 97728, 84), (16384, 128256, 1 << 30, 5376)])
def test_block_size_keeps_temporaries_within_the_budget(rows, vocab, budget, expect):
    cols = block_size(rows, vocab, budget)
    assert cols == expect and rows * cols * 12 <= budget
    assert block_size(4, 300, 1 << 30) == 300  # never more than the vocabulary
    assert block_size(10**9, 300, 1) == 1  # at least one column


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("order", ["vocab", "rows"])
def test_cuda_bf16_matches_truth_as_well_as_the_naive_path(seed, order, kernels):
    """On CUDA the blocks' dx (and, in row order, dW) products are summed in fp32 by cuBLAS (`out_dtype`): no
    extra rounding, so the error stays within the naive path's own (plus fp32 summation slack). "auto" is the
    Triton kernels on CUDA (fp32 math, G rounded once to bf16 as the naive path rounds it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    n, h, v = 1000, 256, 5003
    x, w, b, y = (None if t is None else t.cuda() for t in _inputs(n, h, v, torch.float64, True))
    budget = 12 * n * 1024

    def blocked(xx, ww, bb, yy):
        return VocabBlockedCE.apply(xx, ww, bb, yy, -100, 300, budget, order, kernels)

    truth, g_truth = _grads(_naive, x, w, b, y, torch.float64)
    ours, g_ours = _grads(blocked, x, w, b, y, torch.bfloat16)
    naive, g_naive = _grads(_naive, x, w, b, y, torch.bfloat16)
    for name, a, c, t in zip(("loss", "dx", "dW", "db"), (ours, *g_ours), (naive, *g_naive), (truth, *g_truth)):
        err, err_naive = (a.double() - t).abs().max().item(), (c.double() - t).abs().max().item()
        within(err, 2 * err_naive + 64 * torch.finfo(torch.float32).eps * t.abs().max().item(), name)


def test_cuda_takes_the_kernels_by_default_and_cpu_the_torch_formulas():
    from quickloris.ops.vocab_blocked_ce import use_kernels

    cpu = torch.zeros(2, 2)
    assert not use_kernels("auto", cpu) and not use_kernels("torch", cpu)
    with pytest.raises(ValueError, match="kernels must be"):
        use_kernels("fast", cpu)
    if torch.cuda.is_available():
        assert use_kernels("auto", cpu.cuda())


@pytest.mark.gpu
def test_cuda_trainable_head_compiles_fullgraph_with_the_kernels(seed):
    """`chunked_linear_loss` with a trainable head (the vocabulary blocks, whose softmax work runs in the Triton
    kernels on CUDA) under torch.compile(fullgraph=True): no graph break, the eager call's loss and gradients (the
    same kernels and matmuls: equal up to fp32 summation order)."""
    from torch._dynamo.utils import counters

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch._dynamo.reset()
    counters.clear()
    x, w, _, y = _inputs(300, 64, 1001, None, False)
    x, w, y = x.cuda().bfloat16(), w.cuda().bfloat16(), y.cuda()

    def grads(fn):
        xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
        loss = fn(xx, ww, y)
        loss.backward()
        return loss.detach().float(), xx.grad.float(), ww.grad.float()

    eager = grads(lambda a, b, c: chunked_linear_loss(a, b, c, memory_budget=12 * 300 * 256))
    compiled = grads(
        torch.compile(lambda a, b, c: chunked_linear_loss(a, b, c, memory_budget=12 * 300 * 256), fullgraph=True)
    )
    assert not counters["graph_break"]
    for name, a, e in zip(("loss", "dx", "dW"), compiled, eager):
        # bf16 results: a sum in another order can round one step (2^-8 of the value) the other way
        within((a - e).abs().max().item(), 2**-7 * e.abs().max().item(), name)
    torch._dynamo.reset()
