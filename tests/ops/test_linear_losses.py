"""The loss functions of quickloris.ops.linear_losses, run chunked, against independent full-logits references.

Each reference builds the whole [N, V] logits and uses stock PyTorch (log_softmax / kl_div / Categorical);
loss and the gradients of X and W are compared on fresh random inputs (odd sizes, a chunk whose labels are all
ignored, bf16 and fp32, 2-D and 3-D X). bf16 is judged against an fp64 evaluation of the same inputs: the
chunked error must stay within twice the naive path's own error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quickloris import chunked_linear_loss
from quickloris.ops import linear_losses

H, V = 20, 157


def _up(z):
    return z if z.dtype == torch.float64 else z.float()


def ref_logprobs(x, w, y, temperature=1.0, softcap=None):
    z = _up(F.linear(x, w))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, -1).gather(-1, y.clamp_min(0)[..., None]).squeeze(-1)
    return logp * (y != -100)


def ref_grpo(x, w, y, adv, old, ref, *, beta, eps_low, eps_high, temperature):
    """TRL-style GRPO per-token loss, written out independently of quickloris."""
    logp = ref_logprobs(x, w, y, temperature)
    mask = y != -100
    ratio = torch.exp(logp - torch.where(mask, old, logp.detach()))
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per = -torch.min(unclipped, clipped)
    d = torch.where(mask, ref, logp.detach()) - logp
    per = per + beta * (torch.exp(d) - d - 1)
    return per * mask


def ref_kl(x, w, teacher_logits, y, temperature):
    s = torch.log_softmax(_up(F.linear(x, w)) / temperature, -1)
    t = torch.log_softmax(_up(teacher_logits) / temperature, -1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return kl * (y != -100)


def ref_entropy(x, w, y):
    z = _up(F.linear(x, w))
    return torch.distributions.Categorical(logits=z).entropy() * (y != -100)


def _make(lead, dtype):
    x = torch.randn(*lead, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * (2 / H**0.5)
    y = torch.randint(0, V, lead)
    y[torch.rand(lead) < 0.3] = -100
    y.view(-1)[:8] = -100  # the first chunk of 8 rows has nothing but ignored labels
    return x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), y


def _grads(out, ts, up):
    out.backward(up)
    gs = [t.grad.detach().clone() for t in ts]
    for t in ts:
        t.grad = None
    return gs


def _fp64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


def _check(chunked, naive, truth, name):
    assert torch.isfinite(chunked).all(), f"{name}: non-finite"
    if chunked.dtype == torch.float32 and naive.dtype == torch.float32 and truth is None:
        torch.testing.assert_close(chunked, naive, rtol=3e-5, atol=3e-6, msg=name)
        return
    err_c = (chunked.double() - truth).abs().max().item()
    err_n = (naive.double() - truth).abs().max().item()
    slack = torch.finfo(torch.bfloat16).eps * truth.abs().max().item()  # dW partials are rounded per chunk
    assert err_c <= 2 * err_n + slack, f"{name}: {err_c:.3g} vs naive {err_n:.3g}"


def _compare(dtype, lead, loss, chunked_kw, naive_fn, reduction):
    """Chunked vs naive vs (bf16) fp64 truth for loss, dX, dW; `naive_fn(x, w)` returns per-row values."""
    x, w, _ = chunked_kw.pop("_xw")
    out = chunked_linear_loss(
        x, w, chunked_kw.pop("labels"), loss=loss, reduction=reduction, chunk_size=8, **chunked_kw
    )
    up = torch.randn(out.shape) if reduction == "none" else torch.tensor(0.83)
    naive_rows = naive_fn(x, w)
    naive = naive_rows if reduction == "none" else naive_rows.sum()
    assert out.shape == naive.shape
    got = [out.detach(), *_grads(out, [x, w], up)]
    want = [naive.detach().float(), *_grads(naive, [x, w], up.to(naive.dtype))]
    truths = [None] * 3
    if dtype == torch.bfloat16:
        xt, wt = _fp64(x, w)
        t = naive_fn(xt, wt)
        t = t if reduction == "none" else t.sum()
        truths = [t.detach(), *_grads(t, [xt, wt], up.double())]
    for name, a, b, t in zip(("loss", "dX", "dW"), got, want, truths):
        _check(a, b, t, name)


PARAMS = [
    pytest.param(torch.float32, (45,), id="fp32-2d"),
    pytest.param(torch.bfloat16, (3, 17), id="bf16-3d"),
    pytest.param(torch.float32, (3, 17), id="fp32-3d"),
    pytest.param(torch.bfloat16, (45,), id="bf16-2d"),
]


@pytest.mark.parametrize("dtype,lead", PARAMS)
def test_linear_losses_token_logprobs(seed, dtype, lead):
    x, w, y = _make(lead, dtype)
    kw = {"_xw": (x, w, y), "labels": y, "temperature": 0.7, "softcap": 5.0}
    _compare(dtype, lead, "token_logprobs", kw, lambda a, b: ref_logprobs(a, b, y, 0.7, 5.0), "none")


@pytest.mark.parametrize("dtype,lead", PARAMS)
def test_linear_losses_grpo(seed, dtype, lead):
    x, w, y = _make(lead, dtype)
    with torch.no_grad():
        base = ref_logprobs(x.float(), w.float(), y, 0.9)
        # old / ref log-probs near the current ones, far enough that clipping is active on some tokens
        old = base + 0.4 * torch.randn(lead)
        ref = base + 0.3 * torch.randn(lead)
        old[y == -100] = 1e4  # garbage on ignored tokens must not leak (exp overflow) into the gradient
    adv = torch.randn(lead)
    opts = dict(beta=0.05, eps_low=0.2, eps_high=0.28, temperature=0.9)
    kw = {
        "_xw": (x, w, y),
        "labels": y,
        "advantages": adv,
        "old_logprobs": old,
        "ref_logprobs": ref,
        "beta": 0.05,
        "epsilon_low": 0.2,
        "epsilon_high": 0.28,
        "temperature": 0.9,
    }
    _compare(dtype, lead, "grpo", kw, lambda a, b: ref_grpo(a, b, y, adv, old, ref, **opts), "sum")
    ratio = torch.exp(base - old)[y != -100]
    assert ((ratio < 0.8) | (ratio > 1.28)).any(), "the clipped branch was not exercised"


@pytest.mark.parametrize("dtype,lead", PARAMS)
def test_linear_losses_kl_to_teacher_logits(seed, dtype, lead):
    x, w, y = _make(lead, dtype)
    teacher = (torch.randn(*lead, V) * 2).to(dtype)
    kw = {"_xw": (x, w, y), "labels": y, "teacher": teacher, "temperature": 1.5}
    _compare(dtype, lead, "kl_div", kw, lambda a, b: ref_kl(a, b, teacher, y, 1.5), "sum")


def test_linear_losses_kl_to_teacher_hidden_states(seed):
    """Teacher given as hidden states + its own head (different width): its logits are chunked too."""
    x, w, y = _make((2, 19), torch.float32)
    th, tw = torch.randn(2, 19, 12), torch.randn(V, 12) * 0.5
    out = chunked_linear_loss(x, w, y, loss="kl_div", reduction="none", chunk_size=8, teacher=th, teacher_weight=tw)
    ref = ref_kl(x, w, F.linear(th, tw), y, 1.0)
    torch.testing.assert_close(out, ref, rtol=3e-5, atol=3e-6)
    up = torch.randn(2, 19)
    torch.testing.assert_close(_grads(out, [x, w], up), _grads(ref, [x, w], up), rtol=3e-5, atol=3e-6)


@pytest.mark.parametrize("dtype,lead", PARAMS)
def test_linear_losses_entropy(seed, dtype, lead):
    x, w, y = _make(lead, dtype)
    kw = {"_xw": (x, w, y), "labels": y}
    _compare(dtype, lead, "entropy", kw, lambda a, b: ref_entropy(a, b, y), "none")


def test_linear_losses_entropy_without_labels(seed):
    x, w, _ = _make((31,), torch.float32)
    out = chunked_linear_loss(x, w, None, loss="entropy", chunk_size=8)  # mean over all rows
    ref = torch.distributions.Categorical(logits=F.linear(x, w)).entropy().mean()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_linear_losses_custom_function_with_row_args(seed):
    """A user loss with its own per-row tensor (a per-token weight) goes through the same machinery."""

    @linear_losses.row_args("token_weight")
    def weighted_ce(x, weight, bias, labels, *, token_weight):
        return linear_losses.cross_entropy(x, weight, bias, labels) * token_weight

    x, w, y = _make((2, 21), torch.float32)
    tw = torch.rand(2, 21)
    out = chunked_linear_loss(x, w, y, loss=weighted_ce, reduction="sum", chunk_size=8, token_weight=tw)
    ref = (F.cross_entropy(F.linear(x, w).transpose(1, 2), y, reduction="none") * tw).sum()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_grads(out, [x, w], None), _grads(ref, [x, w], None), rtol=1e-5, atol=1e-6)


def test_linear_losses_bad_input(seed):
    x, w, y = _make((2, 9), torch.float32)
    with pytest.raises(ValueError, match="advantages must have"):
        chunked_linear_loss(x, w, y, loss="grpo", advantages=torch.zeros(3, 9))
    with pytest.raises(ValueError, match="no gradient"):
        chunked_linear_loss(x, w, y, loss="grpo", advantages=torch.zeros(2, 9, requires_grad=True))
    with pytest.raises(ValueError, match="teacher has"):
        chunked_linear_loss(x, w, y, loss="kl_div", teacher=torch.zeros(2, 9, V + 1))
    with pytest.raises(ValueError, match="needs labels"):
        chunked_linear_loss(x, w, None, loss="token_logprobs")
    with pytest.raises(ValueError, match="ref_logprobs"):
        chunked_linear_loss(x, w, y, loss="grpo", advantages=torch.zeros(2, 9), beta=0.1)
    with pytest.raises(TypeError, match="weight must be"):
        linear_losses.logits(x, object(), torch.zeros(V))
