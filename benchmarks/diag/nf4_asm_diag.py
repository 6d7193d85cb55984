"""Device diagnostic for the NF4 inline-PTX unpack: runs the asm on crafted words and reports mismatches.

Usage (device): python3 benchmarks/diag/nf4_asm_diag.py --out $OUT
"""

from __future__ import annotations

import argparse
import random
import struct

import torch
import triton
import triton.language as tl

from quickloris.kernels.nf4_ptx import unpack_bytes_ptx
from quickloris.quant.nf4 import NF4_LEVELS

ASM = tl.constexpr(unpack_bytes_ptx())
BITS = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_LEVELS]


@triton.jit
def _planar(bytes_ptr, out_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    b = tl.load(bytes_ptr + i, mask=m, other=0)
    hi, lo = tl.inline_asm_elementwise(
        ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b], dtype=(tl.int32, tl.int32), is_pure=True, pack=4
    )
    tl.store(out_ptr + i, hi, mask=m)
    tl.store(out_ptr + N + i, lo, mask=m)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rng = random.Random(0)
    data = list(range(256)) + [rng.getrandbits(8) for _ in range(8192)]
    N = len(data)
    bt = torch.tensor(data, dtype=torch.uint8, device="cuda")
    out = torch.zeros(2 * N, dtype=torch.int32, device="cuda")
    ck = _planar[(triton.cdiv(N, 256),)](bt, out, N, BLOCK=256)
    got = [v & 0xFFFFFFFF for v in out.tolist()]
    bad, lines = 0, []
    for k, byte in enumerate(data):
        for name, g, e in (("hi", got[k], BITS[byte >> 4]), ("lo", got[N + k], BITS[byte & 0xF])):
            if g != e:
                bad += 1
                if len(lines) < 40:
                    lines.append(f"byte {byte:#04x} {name}: got {g:#010x} expected {e:#010x}")
    print(f"planar asm: {bad} mismatches of {2 * N}")
    print("\n".join(lines))
    with open(f"{args.out}/nf4_asm_planar.ptx", "w") as f:
        f.write(ck.asm["ptx"])


if __name__ == "__main__":
    main()
