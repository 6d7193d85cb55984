"""quickloris.quant.nf4 against the real bitsandbytes: its CPU backend, and (`gpu` tests) its CUDA kernels, whose
rounding of the nested absmax differs; the CUDA dequantization kernel is tests/kernels'."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors.torch import load, save

from quickloris.quant import nf4

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def bnb_quantize(w: torch.Tensor, nested: bool = True, blocksize: int = 64):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def assert_same_quantization(ours, theirs):
    packed, state = ours
    q, qs = theirs
    assert packed.device == q.device
    packed, q = packed.cpu(), q.cpu()
    assert torch.equal(packed, q)
    assert packed.shape == q.shape
    assert torch.equal(state.absmax.cpu(), qs.absmax.cpu())
    assert state.nested == qs.nested
    if qs.nested:
        assert torch.equal(state.absmax2.cpu(), qs.state2.absmax.cpu())
        assert torch.equal(state.code2.cpu(), qs.state2.code.cpu())
        assert torch.equal(state.offset.cpu(), qs.offset.cpu())
    assert torch.equal(state.code.cpu(), qs.code.cpu())


def test_tables_match_bitsandbytes():
    assert torch.equal(nf4.signed_dynamic_map(), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(nf4.nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 128), (129, 257), (1, 7), (3, 5), (64, 64 * 256 + 64), (2048, 1536)])
def test_quantize_equals_bitsandbytes(seed, dtype, shape):
    # (129, 257): partial last absmax block and odd element count; (64, 64*256+64): partial absmax2 group
    w = torch.randn(shape, dtype=dtype) * torch.rand(1).item() * 0.1
    assert_same_quantization(nf4.quantize_nf4(w), bnb_quantize(w))


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_blocksizes_and_non_nested(seed, blocksize):
    w = torch.randn(96, 200, dtype=torch.bfloat16)
    assert_same_quantization(
        nf4.quantize_nf4(w, blocksize=blocksize, double_quant=False), bnb_quantize(w, nested=False, blocksize=blocksize)
    )
    assert_same_quantization(nf4.quantize_nf4(w, blocksize=blocksize), bnb_quantize(w, blocksize=blocksize))


@pytest.mark.parametrize("shape", [(4096, 14336), (3584, 18944), (5120, 13824)])
def test_real_layer_shapes(seed, shape):
    w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
    ours, theirs = nf4.quantize_nf4(w), bnb_quantize(w)
    assert_same_quantization(ours, theirs)
    deq = nf4.dequantize_nf4_reference(*ours)
    assert torch.equal(bits(deq), bits(bnbF.dequantize_4bit(*theirs)))


def test_all_zero_blocks_follow_each_backend():
    w = torch.randn(4, 256)
    w[1] = 0.0  # whole absmax blocks of zeros (and, nested, a centred absmax of 0 in a one-group tensor)
    assert_same_quantization(nf4.quantize_nf4(w), bnb_quantize(w))
    packed, _ = nf4.quantize_nf4(w, rounding="bnb-cuda")
    assert torch.all(packed.view(4, 128)[1] == 0)  # CUDA: 0 * (1/0) = NaN -> code 0 (level -1)
    assert torch.all(nf4.quantize_nf4(w, rounding="bnb-cpu")[0].view(4, 128)[1] == 0x77)  # CPU: level 0
    # Without double quantization the zero block's scale is exactly 0, so either way it decodes to zeros.
    for rounding in ("bnb-cuda", "bnb-cpu"):
        deq = nf4.dequantize_nf4_reference(*nf4.quantize_nf4(w, rounding=rounding, double_quant=False))
        assert torch.all(deq[1] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_reference_bit_exact(seed, dtype, nested):
    w = torch.randn(257, 320, dtype=dtype)
    q, qs = bnb_quantize(w, nested=nested)
    ref = nf4.dequantize_nf4_reference(q, nf4.state_from_bnb(qs))
    assert ref.dtype == dtype and ref.shape == w.shape
    assert torch.equal(bits(ref), bits(bnbF.dequantize_4bit(q, qs)))


def test_cuda_rounding_is_nearest_code(seed):
    """The emulated CUDA binary search returns the nearest code, up to the kernel's float32 midpoints: it compares x
    with ``(upper + val) * 0.5`` rounded to float32, so an x between that and the exact midpoint (within one float32
    spacing of it) may get the other neighbour, at most one spacing farther (seen at seed 33 of a 50-seed run:
    x = 0.99648439884, the float32 midpoint of codes 254 and 255, 6e-9 nearer to code 255, got code 254)."""
    code = nf4.signed_dynamic_map()
    x = torch.cat([torch.rand(20000) * 2 - 1, (torch.rand(5000) * 2 - 1) * 1e-4, code, torch.tensor([-1.0, 1.0])])
    got = nf4._binary_search_codes(x, code)
    dist = (x.double()[:, None] - code.double()[None, :]).abs()  # exact: differences of float32 values
    chosen, best = dist.gather(1, got[:, None]).squeeze(1), dist.min(dim=1).values
    spacing = (torch.nextafter(x.abs(), torch.tensor(2.0)) - x.abs()).double()
    assert torch.all(chosen - best <= spacing)
    assert int((chosen > best).sum()) <= 5  # a rare rounding case, not a pattern


def test_cuda_rounding_quantization_decodes_as_well_as_cpu(seed):
    w = torch.randn(512, 512)
    err = {
        r: (nf4.dequantize_nf4_reference(*nf4.quantize_nf4(w, rounding=r)) - w).abs().mean().item()
        for r in ("bnb-cuda", "bnb-cpu")
    }
    assert err["bnb-cuda"] <= err["bnb-cpu"] * 1.001


def test_checkpoint_round_trip_with_bitsandbytes(seed):
    """Our tensors load in bitsandbytes, and bitsandbytes' Linear4bit state dict (via safetensors) loads in ours."""
    lin = bnb.nn.Linear4bit(192, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(
        torch.randn(96, 192, dtype=torch.bfloat16), requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    lin.weight = lin.weight._quantize("cpu")  # quantize on this device, as .cuda() would on a GPU
    sd = {f"layer.{k}": v for k, v in lin.state_dict().items()}
    sd = load(save({k: v.contiguous() for k, v in sd.items()}))  # through safetensors, as checkpoints are
    packed, state = nf4.state_from_checkpoint(sd, "layer.weight")
    expected = bnbF.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(bits(nf4.dequantize_nf4_reference(packed, state)), bits(expected))

    ours = nf4.state_to_checkpoint(packed, state, "w")
    qs = bnbF.QuantState.from_dict({k[2:]: v for k, v in ours.items() if k != "w"}, device=torch.device("cpu"))
    assert torch.equal(bits(bnbF.dequantize_4bit(ours["w"], qs)), bits(expected))


def test_checkpoint_errors():
    w = torch.randn(8, 64)
    packed, state = nf4.quantize_nf4(w)
    sd = nf4.state_to_checkpoint(packed, state, "w")
    with pytest.raises(KeyError, match="no tensor"):
        nf4.state_from_checkpoint(sd, "missing")
    with pytest.raises(ValueError, match="not a bitsandbytes 4-bit weight"):
        nf4.state_from_checkpoint({"w": packed}, "w")
    fp4 = dict(sd)
    fp4["w.quant_state.bitsandbytes__fp4"] = fp4.pop("w.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="only 'nf4'"):
        nf4.state_from_checkpoint(fp4, "w")


def test_state_from_bnb_rejects_fp4():
    _, qs = bnbF.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="only NF4"):
        nf4.state_from_bnb(qs)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (torch.ones(4, 64, dtype=torch.int32), TypeError, "float16/bfloat16/float32"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, "inf or NaN"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "inf or NaN"),
        (torch.empty(0, 64), ValueError, "empty"),
    ],
)
def test_quantize_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        nf4.quantize_nf4(bad)


def test_quantize_bad_options():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="rounding"):
        nf4.quantize_nf4(torch.randn(4, 64), rounding="nearest")


def test_validate_catches_inconsistent_state():
    packed, state = nf4.quantize_nf4(torch.randn(16, 64))
    with pytest.raises(ValueError, match="bytes"):
        state.validate(packed[:-1])
    with pytest.raises(TypeError, match="uint8"):
        state.validate(packed.view(torch.int8))
    bad = nf4.NF4State(**{**state.__dict__, "absmax": state.absmax[:-1]})
    with pytest.raises(ValueError, match="absmax has"):
        bad.validate()
    with pytest.raises(ValueError, match="different devices"):
        state.validate(packed.to("meta"))


@pytest.mark.parametrize("rounding", ["bnb-cuda", "bnb-cpu"])
def test_odd_count_pad_nibble_follows_the_backend(rounding):
    """An odd count pads the last low nibble as a 0.0 of the last block: code 7 (NF4's zero), except in an all-zero
    last block under CUDA rounding, which bitsandbytes' kernel writes as code 0 like the block's values."""
    w = torch.randn(3, 43)  # 129 values: a last block of one value
    packed, _ = nf4.quantize_nf4(w, rounding=rounding)
    assert int(packed[-1, 0]) & 15 == 7
    w.view(-1)[-1] = 0.0  # the last block is now all zeros
    packed, state = nf4.quantize_nf4(w, rounding=rounding)
    assert int(packed[-1, 0]) == (0 if rounding == "bnb-cuda" else 0x77)
    packed, state = nf4.quantize_nf4(w, rounding=rounding, double_quant=False)  # exact scales: the block is +-0
    assert float(nf4.dequantize_nf4_reference(packed, state).view(-1)[-1]) == 0.0


def test_cuda_rounding_uses_the_kernels_float32_thresholds():
    """bitsandbytes' CUDA kernel compares with decimal literals rounded to float32 by the compiler; 4 of its 15
    thresholds sit one float32 step from the float32 midpoints the CPU backend uses. A value exactly at such a
    midpoint gets a different code per backend (the GPU test checks the CUDA side against the kernel itself)."""
    c = nf4.nf4_code()
    mids = (c[:-1] + c[1:]) / 2
    cuda = torch.tensor(nf4._cuda_thresholds())
    assert (cuda != mids).sum() == 4 and ((cuda - mids).abs() <= torch.finfo(torch.float32).eps).all()
    x = torch.tensor([1.0, float(mids[14])])  # absmax 1: the second value is scaled to the midpoint itself
    codes = {r: int(nf4.quantize_nf4(x, rounding=r, double_quant=False)[0][0, 0]) & 15 for r in ("bnb-cpu", "bnb-cuda")}
    assert codes == {"bnb-cpu": 14, "bnb-cuda": 15}
