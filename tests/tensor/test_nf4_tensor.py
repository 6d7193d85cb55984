"""NF4Tensor: bitsandbytes' bytes without copies, the few ops a frozen parameter needs, clear errors otherwise,
and traceability (a compiled region reads its inner tensors with no graph break)."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from quickloris.quant.nf4 import dequantize_nf4_reference, quantize_nf4
from quickloris.tensor.nf4_tensor import NF4Tensor, nf4_fields


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def bnb_param(w: torch.Tensor, nested: bool = True) -> bnb.nn.Params4bit:
    p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=nested, quant_type="nf4")
    return p._quantize("cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 64), (33, 70), (1, 5)])
@pytest.mark.parametrize("nested", [True, False])
def test_from_float_is_bitsandbytes_quantization(seed, dtype, shape, nested):
    w = torch.randn(shape, dtype=dtype)
    t = NF4Tensor.from_float(w, double_quant=nested)
    packed, state = quantize_nf4(w, double_quant=nested)
    assert t.shape == shape and t.dtype == dtype and t.nested == nested and not t.requires_grad
    assert torch.equal(t.packed, packed) and torch.equal(t.absmax, state.absmax)
    assert torch.equal(bits(t.dequantize()), bits(dequantize_nf4_reference(packed, state)))
    assert torch.equal(bits(t.dequantize(torch.float32)), bits(dequantize_nf4_reference(packed, state, torch.float32)))
    assert t.inner_nbytes() <= w.numel() * 0.52 + 1200  # ~4.13 bits per value + the two code tables


@pytest.mark.parametrize("nested", [True, False])
def test_from_bnb_wraps_the_same_bytes(seed, nested):
    p = bnb_param(torch.randn(80, 192, dtype=torch.bfloat16), nested)
    t = NF4Tensor.from_bnb(p)
    qs = p.quant_state
    assert t.packed.data_ptr() == p.data.data_ptr() and t.absmax.data_ptr() == qs.absmax.data_ptr()
    if nested:
        assert t.absmax2.data_ptr() == qs.state2.absmax.data_ptr()
    assert t.shape == qs.shape and t.dtype == torch.bfloat16
    assert torch.equal(bits(t.dequantize()), bits(bnbF.dequantize_4bit(p.data, qs)))
    lin = bnb.nn.Linear4bit(192, 80, bias=False, quant_type="nf4")
    lin.weight = p
    assert NF4Tensor.from_bnb(lin).packed.data_ptr() == p.data.data_ptr()  # a Linear4bit works too


def test_to_bnb_shares_bytes_and_decodes_identically(seed):
    t = NF4Tensor.from_float(torch.randn(48, 130, dtype=torch.float16))
    p = t.to_bnb()
    assert p.data.data_ptr() == t.packed.data_ptr()
    assert torch.equal(bits(bnbF.dequantize_4bit(p.data, p.quant_state)), bits(t.dequantize()))


def test_checkpoint_round_trip(seed):
    t = NF4Tensor.from_float(torch.randn(64, 96, dtype=torch.bfloat16))
    back = NF4Tensor.from_checkpoint(t.to_checkpoint("m.w"), "m.w")
    assert torch.equal(bits(back.dequantize()), bits(t.dequantize()))


def test_parameter_detach_clone_deepcopy_and_flatten(seed):
    t = NF4Tensor.from_float(torch.randn(40, 64))
    p = nn.Parameter(t, requires_grad=False)
    assert isinstance(p, NF4Tensor) and isinstance(p, nn.Parameter) and p.packed is t.packed
    d = t.detach()
    assert type(d) is NF4Tensor and d.packed is t.packed
    c = copy.deepcopy(p)
    assert type(c) is NF4Tensor and c.packed.data_ptr() != t.packed.data_ptr() and torch.equal(c.packed, t.packed)
    names, ctx = t.__tensor_flatten__()
    back = NF4Tensor.__tensor_unflatten__({n: getattr(t, n) for n in names}, ctx, t.shape, t.stride())
    assert torch.equal(back.dequantize(), t.dequantize())
    assert "NF4Tensor(shape=(40, 64)" in repr(p)


def test_module_to_moves_bytes_and_dtype_relabels(seed):
    lin = nn.Linear(64, 40, bias=False)
    w = NF4Tensor.from_float(lin.weight.detach())
    lin.weight = nn.Parameter(w, requires_grad=False)
    dense = w.dequantize(torch.float32)
    lin.to(torch.bfloat16)  # a dtype change relabels: same bytes, dequantized to bf16 from now on
    assert type(lin.weight) is NF4Tensor and lin.weight.dtype == torch.bfloat16
    assert lin.weight.packed.data_ptr() == w.packed.data_ptr()
    assert torch.equal(lin.weight.dequantize(), dense.to(torch.bfloat16))
    lin.to("meta")
    assert type(lin.weight) is NF4Tensor and lin.weight.device.type == "meta"
    assert lin.weight.packed.device.type == "meta" and isinstance(lin.weight, nn.Parameter)


def test_copy_between_nf4_tensors(seed):
    a, b = (NF4Tensor.from_float(torch.randn(16, 64)) for _ in range(2))
    a.copy_(b)
    assert torch.equal(a.dequantize(), b.dequantize())
    with pytest.raises(TypeError, match="only copy an NF4Tensor"):
        a.copy_(torch.zeros(16, 64))
    with pytest.raises(ValueError, match="formats differ"):
        a.copy_(NF4Tensor.from_float(torch.randn(32, 32)))


@pytest.mark.parametrize(
    "op",
    [
        lambda w: w + 1,
        lambda w: w.sum(),
        lambda w: torch.nn.functional.linear(torch.randn(2, 64), w),
        lambda w: w.t(),
        lambda w: w[0],
        lambda w: w.view(4, -1, 2),
    ],
)
def test_other_ops_raise(op):
    w = NF4Tensor.from_float(torch.randn(8, 64))
    with pytest.raises(NotImplementedError, match="NF4Tensor does not support"):
        op(w)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        NF4Tensor.from_float(torch.randn(64))
    with pytest.raises(TypeError, match="already an NF4Tensor"):
        NF4Tensor.from_float(NF4Tensor.from_float(torch.randn(4, 64)))
    with pytest.raises(TypeError, match="Params4bit"):
        NF4Tensor.from_bnb(torch.randn(4, 4))
    packed, state = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="bytes"):
        NF4Tensor(packed[:-1], state)
    with pytest.raises(TypeError, match="NF4State"):
        NF4Tensor(packed, {"absmax": state.absmax})
    with pytest.raises(TypeError, match="dequantizes to one of"):
        NF4Tensor.from_float(torch.randn(4, 64), dtype=torch.int8)
    with pytest.raises(ValueError, match="not nf4|only NF4|quant_type"):
        p = bnb.nn.Params4bit(torch.randn(8, 64), requires_grad=False, quant_type="fp4")._quantize("cpu")
        NF4Tensor.from_bnb(p)


def test_compiled_region_reads_inner_tensors_without_graph_break(seed):
    from torch._dynamo.utils import counters

    from quickloris.quant.nf4 import NF4State

    t = NF4Tensor.from_float(torch.randn(24, 64))
    lin = nn.Linear(64, 24, bias=False)
    lin.weight = nn.Parameter(t, requires_grad=False)

    def f(x, w):
        f = nf4_fields(w)
        state = NF4State(
            shape=torch.Size(f["shape"]),
            dtype=torch.float32,
            blocksize=f["blocksize"],
            absmax=f["absmax"],
            code=f["code"],
            offset=f["offset"],
            absmax2=f["absmax2"],
            code2=f["code2"],
        )
        return x @ dequantize_nf4_reference(f["packed"], state).t()

    torch._dynamo.reset()  # run once per seed in one process, a cached graph would leave the counters empty
    counters.clear()
    x = torch.randn(5, 64)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, lin.weight)
    torch.testing.assert_close(out, x @ t.dequantize(torch.float32).t())
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
