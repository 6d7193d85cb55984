"""The cross-entropy Triton kernels (quickloris.kernels.ce_kernel) against their PyTorch formulas: on CPU under
the Triton interpreter, on CUDA compiled (`gpu`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quickloris.kernels import ce_kernel
from tests.helpers import within

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(name: str) -> str:
    if name == "cpu" and not ce_kernel.interpreting():
        pytest.skip("the kernels run on CPU only under TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
    return name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_lse_matches_logsumexp(seed, device, dtype):
    dev = _device(device)
    rows, cols = 7, 2 * ce_kernel.BLOCK + 37  # a partial last block
    z = (torch.randn(rows, cols, device=dev) * 4 + torch.randn(rows, 1, device=dev) * 20).to(dtype)
    z[0, 5] = 60.0  # one dominant logit
    got, ref = ce_kernel.row_lse(z), torch.logsumexp(z.double(), dim=-1)
    assert got.dtype == torch.float32 and got.shape == (rows,)
    # fp32 sums of positive terms in another order (relative error ~ depth of the sum x eps), Triton's exp (a few
    # ulps), then the final M + log S rounding: 64 eps of max(1, |lse|) covers all three.
    eps = torch.finfo(torch.float32).eps
    within(((got.double() - ref).abs() / ref.abs().clamp_min(1)).max().item(), 64 * eps, "lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_grad_in_place_matches_the_formula(seed, device, dtype):
    dev = _device(device)
    rows, v0, cols = 9, 300, ce_kernel.BLOCK + 11
    full = (torch.randn(rows, v0 + cols + 50, device=dev) * 3).to(dtype)
    lse = torch.logsumexp(full.float(), dim=-1)
    labels = torch.randint(0, full.shape[1], (rows,), device=dev)
    labels[:3] = torch.tensor([v0, v0 + cols - 1, v0 + cols])  # first and last column of the block, just past it
    scale = torch.rand(rows, device=dev) + 0.5
    scale[4] = 0.0  # an ignored row
    block = full[:, v0 : v0 + cols].contiguous()
    ref = (block.double() - lse.double()[:, None]).exp()
    hit = (labels >= v0) & (labels < v0 + cols)
    ref[hit.nonzero().squeeze(1), labels[hit] - v0] -= 1.0
    ref = ref * scale.double()[:, None]
    z0 = block.clone()
    out = ce_kernel.softmax_grad_(block, lse, labels, scale, v0)
    assert out.data_ptr() == block.data_ptr() and out.dtype == dtype
    assert (out[4] == 0).all()
    # fp32 math (exp: a few ulps of a value <= 1 times scale <= 1.5) then one rounding to dtype: half an ulp of the
    # value, at most eps |ref| for bf16 (torch's eps is the ulp at 1); fp32: 8 eps absolute of the scale.
    err = (out.double() - ref).abs()
    bound = torch.finfo(dtype).eps * ref.abs() + 8 * torch.finfo(torch.float32).eps * 1.5
    within((err / bound).max().item(), 1.0, f"G {dtype}")
    if dtype == torch.bfloat16:
        # Rounded to nearest even like torch's cast of the fp32 formula: they can differ only where the fp32 values
        # (a few ulps apart) straddle a rounding boundary, ~ a few / 2^16 of the elements; truncation: ~half.
        onehot = F.one_hot((labels - v0 + 1).clamp(0, cols + 1), cols + 2)[:, 1:-1]  # outside the block: none
        torch_g = ((z0.float() - lse[:, None]).exp() - onehot) * scale[:, None]
        differ = (out != torch_g.to(dtype)).float().mean().item()
        within(differ, 0.01, "bf16 roundings that differ from torch's")
    # the label's column got its -1 (G < 0 there); a row whose label is outside the block is p * scale >= 0
    for r in range(rows):
        if r != 4 and hit[r]:
            assert out[r, labels[r] - v0] < 0
    assert (out[~hit] >= 0).all()


def test_bad_arguments_raise():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="contiguous rows"):
        ce_kernel.row_lse(z.t())
    with pytest.raises(TypeError, match="float32"):
        ce_kernel.softmax_grad_(z, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.long), z[:, 0], 0)
