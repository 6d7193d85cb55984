"""QLoRA linear autograd: values and gradients against plain autograd through the dequantized weight; the dense
weight is never saved for backward (eager: saved-tensor hooks; compiled: the partitioner's saved values)."""

from __future__ import annotations

import pytest
import torch

from quickloris.ops.qlora_linear import nf4_matmul, qlora_linear
from quickloris.tensor.nf4_tensor import NF4Tensor


def _reference(x, w_dense, bias, A, B, scaling, mask=None, p=0.0):
    xd = x if mask is None else x * mask / (1 - p)
    y = x @ w_dense.t() + scaling * (xd @ A.t()) @ B.t()
    return y if bias is None else y + bias


def _case(out_f, in_f, r, dtype=torch.float32, bias=False):
    w = NF4Tensor.from_float(torch.randn(out_f, in_f, dtype=dtype) / in_f**0.5)
    A = (torch.randn(r, in_f) / in_f**0.5).requires_grad_()
    B = (torch.randn(out_f, r) / r**0.5).requires_grad_()
    b = torch.randn(out_f, dtype=dtype) if bias else None
    return w, A, B, b


@pytest.mark.parametrize("shape", [(48, 70, 4, (3, 5)), (33, 64, 1, (7,)), (130, 96, 16, (2, 3, 4))])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_autograd_through_dequantized_weight(seed, shape, bias):
    out_f, in_f, r, lead = shape
    w, A, B, b = _case(out_f, in_f, r, bias=bias)
    x = torch.randn(*lead, in_f, requires_grad=True)
    s = 1.7
    y = qlora_linear(x, w, b, A, B, scaling=s)
    g = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), g)
    xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    yr = _reference(xr, w.dequantize(torch.float32), b, Ar, Br, s)
    rx, rA, rB = torch.autograd.grad(yr, (xr, Ar, Br), g)
    assert y.shape == (*lead, out_f)
    for got, want in ((y, yr), (dx, rx), (dA, rA), (dB, rB)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_uses_one_mask_for_forward_and_backward(seed):
    w, A, B, _ = _case(40, 64, 8)
    x = torch.randn(6, 64, requires_grad=True)
    p = 0.3
    state = torch.get_rng_state()
    y = qlora_linear(x, w, None, A, B, scaling=2.0, dropout=p)
    g = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), g)
    torch.set_rng_state(state)
    mask = torch.rand_like(x) >= p  # the draw the layer made
    assert 0 < mask.sum() < mask.numel()
    xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    yr = _reference(xr, w.dequantize(), None, Ar, Br, 2.0, mask, p)
    for got, want in zip((y, dx, dA, dB), (yr, *torch.autograd.grad(yr, (xr, Ar, Br), g))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_matches_fp32_reference_within_bf16_tolerance(seed):
    w, A, B, _ = _case(96, 128, 16, dtype=torch.bfloat16)
    x = torch.randn(2, 9, 128, dtype=torch.bfloat16, requires_grad=True)
    y = qlora_linear(x, w, None, A, B, scaling=2.0)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert A.grad.dtype == torch.float32  # LoRA params keep their dtype; the math ran in bf16
    xr, Ar, Br = (t.detach().float().clone().requires_grad_() for t in (x, A, B))
    yr = _reference(xr, w.dequantize(torch.float32), None, Ar, Br, 2.0)
    yr.square().sum().backward()
    # bf16 rounds each output to 8 bits of mantissa: compare in norm (an elementwise bound fails on the rare output
    # that lands near zero) and against what plain bf16 autograd through the same weights gets wrong.
    xb, Ab, Bb = (t.detach().clone().requires_grad_() for t in (x, A, B))
    yb = _reference(xb, w.dequantize(torch.bfloat16), None, Ab.to(torch.bfloat16), Bb.to(torch.bfloat16), 2.0)
    plain_err = ((yb.float() - yr).norm() / yr.norm()).item()
    assert ((y.float() - yr).norm() / yr.norm()).item() <= 1.5 * plain_err  # measured: <= 1.003x over 200 seeds
    for got, want in ((x.grad.float(), xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
        assert (got - want).norm() / want.norm() < 2e-2


def test_base_only_and_frozen_input(seed):
    w, *_ = _case(24, 64, 4)
    x = torch.randn(5, 64, requires_grad=True)
    y = qlora_linear(x, w)
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.ones(5, 24) @ w.dequantize())
    A = torch.randn(4, 64, requires_grad=True)
    B = torch.randn(24, 4, requires_grad=True)
    qlora_linear(torch.randn(5, 64), w, None, A, B).sum().backward()  # input without grad: only dA, dB
    assert A.grad is not None and B.grad is not None


def test_nf4_matmul_both_directions(seed):
    w, *_ = _case(24, 64, 4)
    dense = w.dequantize()
    a, g, add = torch.randn(5, 64), torch.randn(5, 24), torch.randn(5, 64)
    torch.testing.assert_close(nf4_matmul(a, w), a @ dense.t())
    torch.testing.assert_close(nf4_matmul(g, w, transpose_weight=False, addend=add), add + g @ dense)
    with pytest.raises(ValueError, match="must be \\[rows, 64\\]"):
        nf4_matmul(g, w)
    # The low-rank addend made inside the op (eager and as the registered op under compile) equals the explicit one.
    u, B, A = torch.randn(5, 3), torch.randn(24, 3), torch.randn(3, 64)
    for fn in (nf4_matmul, torch.compile(nf4_matmul, backend="aot_eager", fullgraph=True)):
        torch.testing.assert_close(fn(a, w, low_rank=(u, B.t())), torch.addmm(u @ B.t(), a, dense.t()))
        torch.testing.assert_close(fn(g, w, transpose_weight=False, low_rank=(u, A)), torch.addmm(u @ A, g, dense))
    with pytest.raises(ValueError, match="not both"):
        nf4_matmul(a, w, addend=torch.zeros(5, 24), low_rank=(u, B.t()))


def _dense_like(t, w):
    return (
        isinstance(t, torch.Tensor)
        and not isinstance(t, NF4Tensor)
        and t.is_floating_point()
        and t.numel() >= w.numel()
        and tuple(t.shape[-2:]) in (tuple(w.shape), tuple(w.shape[::-1]))
    )


def test_dense_weight_is_never_saved_for_backward(seed):
    """Every tensor autograd saves while the layer runs forward: none is the dense [out, in] weight."""
    w, A, B, _ = _case(256, 192, 8)
    x = torch.randn(4, 192, requires_grad=True)  # fewer rows than the weight: x itself cannot be mistaken for it
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = qlora_linear(x, w, None, A, B, scaling=2.0, dropout=0.1)
    y.sum().backward()
    assert saved, "the hooks saw nothing"
    assert not [tuple(t.shape) for t in saved if _dense_like(t, w)]
    assert any(isinstance(t, NF4Tensor) for t in saved)  # the 4-bit weight is what backward dequantizes
    big = sum(t.numel() for t in saved if not isinstance(t, NF4Tensor) and t.is_floating_point())
    assert big < w.numel() / 4


def test_compiled_partition_saves_no_dense_weight(seed):
    """AOTAutograd's min-cut partitioner decides what a compiled graph saves: it must not be the dense W."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    w, A, B, _ = _case(256, 192, 8)
    saved: list = []

    def fw(gm, _):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        saved.extend(a.meta["val"] for a in out.args[0] if isinstance(getattr(a, "meta", {}).get("val"), torch.Tensor))
        return make_boxed_func(gm.forward)

    def backend(gm, example):
        return aot_module_simplified(
            gm,
            example,
            fw_compiler=fw,
            bw_compiler=lambda g, _: make_boxed_func(g.forward),
            partition_fn=min_cut_rematerialization_partition,
        )

    # a fresh dynamo cache: run once per seed in one process (QUICKLORIS_TEST_SEEDS), the lambda's code object would
    # recompile per seed and hit dynamo's recompile limit (8) - a harness failure, not the partition's
    torch._dynamo.reset()
    f = torch.compile(lambda x: qlora_linear(x, w, None, A, B, scaling=2.0), backend=backend, fullgraph=True)
    x = torch.randn(4, 192, requires_grad=True)
    f(x).sum().backward()
    assert saved and not [tuple(t.shape) for t in saved if _dense_like(t, w)]
    xr = x.detach().clone().requires_grad_()
    _reference(xr, w.dequantize(), None, A.detach(), B.detach(), 2.0).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_autocast_computes_in_autocast_dtype(seed):
    w, A, B, _ = _case(32, 64, 4)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = qlora_linear(x, w, None, A, B)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and A.grad.dtype == torch.float32


def test_bad_input():
    w, A, B, _ = _case(16, 64, 4)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="NF4Tensor"):
        qlora_linear(x, torch.randn(16, 64))
    with pytest.raises(ValueError, match="features"):
        qlora_linear(torch.randn(2, 63), w)
    with pytest.raises(ValueError, match="both lora_A and lora_B"):
        qlora_linear(x, w, None, A, None)
    with pytest.raises(ValueError, match="LoRA shapes"):
        qlora_linear(x, w, None, A, B.t())
    with pytest.raises(ValueError, match="dropout"):
        qlora_linear(x, w, None, A, B, dropout=1.0)
    with pytest.raises(ValueError, match="bias"):
        qlora_linear(x, w, torch.zeros(3))
    with pytest.raises(TypeError, match="float"):
        qlora_linear(torch.ones(2, 64, dtype=torch.long), w)
    frozen = NF4Tensor.from_float(torch.randn(16, 64))
    frozen.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        qlora_linear(x, frozen).sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_reference_and_saves_no_dense_weight(seed, dtype):
    """On CUDA the op dequantizes with the fused Triton kernel; eager and inductor-compiled (dynamic shapes)."""
    from quickloris.nn.qlora_linear import QLoRALinear

    out_f, in_f = 1024, 768
    w = NF4Tensor.from_float(torch.randn(out_f, in_f, device="cuda", dtype=dtype) / in_f**0.5)
    layer = QLoRALinear(w, r=16, lora_alpha=32, init_lora_weights=False)  # scaling 2, fp32 LoRA on the GPU
    A, B = layer.lora_weights
    x = torch.randn(3, 300, in_f, device="cuda", dtype=dtype, requires_grad=True)
    dense = w.dequantize()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = layer(x)
    assert not [t for t in saved if _dense_like(t, w)]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B), g)
    xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    yr = xr @ dense.t() + 2.0 * (xr @ Ar.to(dtype).t()) @ Br.to(dtype).t()
    want = torch.autograd.grad(yr, (xr, Ar, Br), g)
    torch.testing.assert_close(y, yr, rtol=2e-2, atol=2e-2)
    for a, b in zip(got, want):
        assert (a.float() - b.float()).norm() / b.float().norm() < 2e-2
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for rows in (300, 517):  # a second length: no recompile needed, same results
        xs = torch.randn(2, rows, in_f, device="cuda", dtype=dtype, requires_grad=True)
        gs = torch.randn(2, rows, out_f, device="cuda", dtype=dtype)
        got_c = torch.autograd.grad(compiled(xs), (xs, A, B), gs)
        got_e = torch.autograd.grad(layer(xs), (xs, A, B), gs)
        for a, b in zip(got_c, got_e):
            assert (a.float() - b.float()).norm() / b.float().norm() < 1e-2
