"""QLoRALinear: PEFT's parameter layout and init, construction from nn.Linear / bitsandbytes Linear4bit,
train/eval dropout, bad options."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from quickloris.nn.qlora_linear import QLoRALinear
from quickloris.tensor.nf4_tensor import NF4Tensor


def test_peft_layout_init_and_scaling(seed):
    m = QLoRALinear(NF4Tensor.from_float(torch.randn(40, 64)), r=8, lora_alpha=16)
    assert [n for n, _ in m.named_parameters()] == ["weight", "lora_A.default.weight", "lora_B.default.weight"]
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_A.default.weight", "lora_B.default.weight"]
    assert m.scaling == 2.0 and torch.count_nonzero(m.lora_B.default.weight) == 0
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), x @ m.weight.dequantize().t())  # B = 0: the base model at start
    rs = QLoRALinear(NF4Tensor.from_float(torch.randn(40, 64)), r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling == pytest.approx(8 / math.sqrt(16))
    g = QLoRALinear(NF4Tensor.from_float(torch.randn(40, 64)), r=4, init_lora_weights="gaussian")
    assert torch.count_nonzero(g.lora_B.default.weight) == 0 and g.lora_A.default.weight.std() < 1


def test_from_linear_dense_and_bnb(seed):
    dense = nn.Linear(64, 24, bias=True)
    q = QLoRALinear.from_linear(dense, r=4, init_lora_weights=False)
    assert isinstance(q.weight, NF4Tensor) and q.bias is not None and not q.bias.requires_grad
    x = torch.randn(2, 64)
    A, B = q.lora_weights
    want = x @ q.weight.dequantize().t() + q.bias + q.scaling * (x @ A.t()) @ B.t()
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)

    lin4 = bnb.nn.Linear4bit(64, 24, bias=False, quant_type="nf4")
    lin4.weight = bnb.nn.Params4bit(torch.randn(24, 64), requires_grad=False, quant_type="nf4")._quantize("cpu")
    q4 = QLoRALinear.from_linear(lin4, r=2)
    assert q4.weight.packed.data_ptr() == lin4.weight.data.data_ptr()
    with pytest.raises(TypeError, match="cannot make a QLoRALinear"):
        QLoRALinear.from_linear(nn.Conv1d(2, 2, 1))


def test_dropout_only_in_training(seed):
    m = QLoRALinear(NF4Tensor.from_float(torch.randn(16, 64)), r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(8, 64)
    m.eval()
    a, b = m(x), m(x)
    assert torch.equal(a, b)
    m.train()
    assert not torch.allclose(m(x), a)


def test_base_only_layer(seed):
    m = QLoRALinear(NF4Tensor.from_float(torch.randn(16, 64)), r=0)
    assert m.lora_weights is None and not any(p.requires_grad for p in m.parameters())
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), x @ m.weight.dequantize().t())


def test_bad_options():
    w = NF4Tensor.from_float(torch.randn(16, 64))
    with pytest.raises(TypeError, match="NF4Tensor"):
        QLoRALinear(torch.randn(16, 64))
    for kw, msg in (
        (dict(r=-1), "r must"),
        (dict(r=2.5), "r must"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dtype=torch.int32), "lora_dtype"),
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
    ):
        with pytest.raises((ValueError, TypeError), match=msg):
            QLoRALinear(w, **kw)
    with pytest.raises(ValueError, match="bias"):
        QLoRALinear(w, torch.zeros(3))
