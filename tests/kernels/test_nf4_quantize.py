"""`quickloris.quantize_nf4` (quickloris.kernels.nf4_quantize): the reference's bytes on the CPU, bitsandbytes' CUDA
kernel's bytes on a GPU, where the one difference is the kernel's fast-math reciprocal (``rcp.approx.ftz.f32``)."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch

import quickloris
from quickloris.kernels.nf4_quantize import rcp_approx_ftz
from quickloris.quant import nf4
from tests.quant.test_nf4 import DTYPES, assert_same_quantization, bits, bnb_quantize


@pytest.mark.parametrize("rounding", ["bnb-cpu", "bnb-cuda"])
def test_on_the_cpu_it_is_the_reference(seed, rounding):
    w = torch.randn(70, 130, dtype=torch.bfloat16)
    ours = quickloris.quantize_nf4(w, rounding=rounding)
    ref = nf4.quantize_nf4(w, rounding=rounding)
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1].absmax, ref[1].absmax) and torch.equal(ours[1].absmax2, ref[1].absmax2)


def test_the_ptx_reciprocal_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="float32 CUDA tensor"):
        rcp_approx_ftz(torch.ones(3))


@pytest.mark.gpu
def test_the_ptx_reciprocal_is_within_one_ulp_and_not_always_exact(seed):
    """rcp.approx is what bitsandbytes' kernel divides with: never more than 1 ulp from the exact reciprocal, and
    for some float32 inputs not the exact one (else the hook would change nothing)."""
    x = torch.rand(1 << 20, device="cuda") * 4 + 1e-3
    approx, exact = rcp_approx_ftz(x), torch.reciprocal(x)
    ulps = (approx.view(torch.int32).long() - exact.view(torch.int32).long()).abs()
    assert int(ulps.max()) <= 1
    assert int((ulps == 1).sum()) > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 128), (129, 257), (3, 5), (64, 64 * 256 + 64), (4096, 14336)])
def test_quantize_equals_bitsandbytes_cuda(seed, dtype, shape):
    """The CUDA half of "quantize_nf4 reproduces bitsandbytes' bytes": on a CUDA tensor quantize_nf4 follows
    bitsandbytes' CUDA kernel (its approximate reciprocal, nearest nested-absmax code by binary search, all-zero
    blocks to nibble 0), byte for byte, scales included; an all-zero block and a zero row are part of the input.
    (With the exact reciprocal the float32 [4096, 14336] case failed on an H100, adac2bb.)"""
    w = (torch.randn(shape, dtype=dtype) * torch.rand(1).item() * 0.1).cuda()
    w.view(-1)[:64] = 0  # one all-zero block (the backends encode it differently)
    w[-1] = 0
    ours, theirs = quickloris.quantize_nf4(w), bnb_quantize(w)
    assert_same_quantization(ours, theirs)
    assert torch.equal(bits(nf4.dequantize_nf4_reference(*ours).cpu()), bits(bnbF.dequantize_4bit(*theirs).cpu()))


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_blocksizes_and_non_nested_cuda(seed, blocksize):
    w = torch.randn(96, 200, dtype=torch.float32, device="cuda")
    assert_same_quantization(
        quickloris.quantize_nf4(w, blocksize=blocksize, double_quant=False),
        bnb_quantize(w, nested=False, blocksize=blocksize),
    )
    assert_same_quantization(quickloris.quantize_nf4(w, blocksize=blocksize), bnb_quantize(w, blocksize=blocksize))
