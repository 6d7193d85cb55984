"""Probe (device): where quantize_nf4 on a CUDA tensor and bitsandbytes' CUDA kernel disagree, and whether the
kernel's reciprocal explains it. bitsandbytes multiplies each value by 1 / absmax of its block; the probe recomputes
that reciprocal as IEEE division (torch.reciprocal, ours) and as PTX rcp.approx.ftz.f32 (what nvcc emits for 1.0f / x
under --use_fast_math) and counts the nibbles each choice gets different from bitsandbytes. Writes OUT/nf4-cuda.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bitsandbytes.functional as bnbF
import torch
import triton
import triton.language as tl

from quickloris.quant import nf4


@triton.jit
def _rcp_approx(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
    y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(y_ptr + offs, y, mask=offs < n)


def rcp_approx(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _rcp_approx[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp")
    args = ap.parse_args()
    rows = []
    for shape in [(4096, 14336), (2048, 1536)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            torch.manual_seed(0)
            w = (torch.randn(shape, dtype=dtype) * 0.05).cuda()
            ours, st = nf4.quantize_nf4(w)
            q, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            a, b = nibbles(ours), nibbles(q)
            n = w.numel()
            flat = w.reshape(-1).float()
            absmax = flat.abs().view(-1, 64).amax(dim=1)
            thr = (nf4.nf4_code("cuda")[:-1] + nf4.nf4_code("cuda")[1:]) / 2
            alt = {}
            for name, inv in (("ieee", torch.reciprocal(absmax)), ("rcp_approx", rcp_approx(absmax))):
                scaled = flat * inv.repeat_interleave(64)[:n]
                alt[name] = int((torch.bucketize(scaled, thr).to(torch.uint8) != b[:n]).sum())
            diff = (a[:n] != b[:n]).nonzero().flatten()
            rows.append(
                {
                    "shape": list(shape),
                    "dtype": str(dtype),
                    "nibbles_differ": int(diff.numel()),
                    "of": n,
                    "absmax_codes_differ": int((st.absmax.cpu() != qs.absmax.cpu()).sum()),
                    "offset_equal": bool(torch.equal(st.offset.cpu(), qs.offset.cpu())),
                    "recomputed_differ": alt,
                    "examples": [
                        {
                            "i": int(i),
                            "x": float(flat[i]),
                            "absmax": float(absmax[i // 64]),
                            "ours": int(a[i]),
                            "bnb": int(b[i]),
                        }
                        for i in diff[:5].tolist()
                    ],
                }
            )
            print(rows[-1], flush=True)
    Path(args.out, "nf4-cuda.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
