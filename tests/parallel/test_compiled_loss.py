"""The compiled loss region: value and gradient equal plain cross-entropy; one graph for any token count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quickloris.parallel.compile import compile_stats, reset_compile_stats
from quickloris.parallel.compiled_loss import chunk_spans, compiled_head_loss, make_chunk_fn


def _reference(h, w, y, num_items=None, softcap=None):
    z = (h @ w.t()).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    total = F.cross_entropy(z, y, reduction="sum", ignore_index=-100)
    return total / (num_items if num_items is not None else (y != -100).sum().clamp_min(1))


def test_chunk_spans_merge_a_one_row_tail():
    assert chunk_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_spans(9, 4) == [(0, 4), (4, 9)]
    assert chunk_spans(3, 8) == [(0, 3)]
    assert chunk_spans(1, 8) == [(0, 1)]


@pytest.mark.parametrize("softcap", [None, 7.0])
def test_value_and_gradient_match_cross_entropy_one_graph(seed, softcap):
    torch._dynamo.reset()  # a fresh cache: the graph count below is this test's (several seeds run in one process)
    fn = make_chunk_fn(backend="aot_eager")
    w = torch.randn(53, 24) / 5
    reset_compile_stats()
    for n, chunk, num_items in ((37, 8, None), (91, 8, 150), (17, 8, None), (66, 8, None), (9, 8, None)):
        h = torch.randn(n, 24, requires_grad=True)
        y = torch.randint(0, 53, (n,))
        y[::5] = -100
        loss = compiled_head_loss(fn, h, w, y, num_items=num_items, softcap=softcap, chunk_size=chunk)
        g = torch.rand(())
        (dh,) = torch.autograd.grad(loss, h, g)
        hr = h.detach().clone().requires_grad_()
        ref = _reference(hr, w, y, num_items, softcap)
        (dr,) = torch.autograd.grad(ref, hr, g)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dh, dr, rtol=1e-4, atol=1e-6)
    stats = compile_stats()
    assert stats["graph_breaks"] == 0 and stats["unique_graphs"] == 1, stats


def test_bf16_and_3d_hidden(seed):
    fn = make_chunk_fn(backend="aot_eager")
    w = (torch.randn(40, 32) / 6).bfloat16()
    h = torch.randn(2, 11, 32, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 40, (2, 11))
    loss = compiled_head_loss(fn, h, w, y, chunk_size=6)
    loss.backward()
    hr = h.detach().clone().requires_grad_()
    ref = _reference(hr.reshape(-1, 32), w, y.reshape(-1))
    ref.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and h.grad.shape == h.shape
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    assert (h.grad.float() - hr.grad.float()).norm() / hr.grad.float().norm() < 1e-2
