"""A tiny emulator for the integer PTX subset our inline asm uses, so CPU tests run the exact asm text.

Supports: mov.b32, and.b32, or.b32, shr.u32, mul.lo.u32, prmt.b32 (default mode), lop3.b32, `.reg` lines and
`{`/`}`. Operands are registers, `$N` placeholders or integer literals. Semantics follow the PTX ISA manual.
"""

from __future__ import annotations

import re

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    src = a | (b << 32)  # bytes 0-3 from a, 4-7 from b
    out = 0
    for k in range(4):
        sel = (c >> (4 * k)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:  # sign-replicate mode: not used by our asm, but emulate it faithfully
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * k)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def run(asm: str, inputs: dict[int, int], n_outputs: int) -> list[int]:
    """Execute `asm` with `$i` inputs given by `inputs`; return the values written to `$0..$(n_outputs-1)`."""
    regs: dict[str, int] = {f"${i}": v & MASK for i, v in inputs.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok):
            return int(tok, 0) & MASK
        raise KeyError(f"read of unset register {tok!r}")

    # Statements end with ';' (the asm is one line, as inductor needs it); braces open and close the scope.
    for raw in re.split(r"[;{}]", asm):
        line = raw.strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [t.strip() for t in rest.split(",")]
        dst, srcs = args[0], args[1:]
        if op == "mov.b32":
            res = val(srcs[0])
        elif op == "and.b32":
            res = val(srcs[0]) & val(srcs[1])
        elif op == "or.b32":
            res = val(srcs[0]) | val(srcs[1])
        elif op == "shr.u32":
            res = val(srcs[0]) >> min(val(srcs[1]), 32)
        elif op == "mul.lo.u32":
            res = (val(srcs[0]) * val(srcs[1])) & MASK
        elif op == "prmt.b32":
            res = _prmt(val(srcs[0]), val(srcs[1]), val(srcs[2]))
        elif op == "lop3.b32":
            res = _lop3(val(srcs[0]), val(srcs[1]), val(srcs[2]), val(srcs[3]))
        else:
            raise NotImplementedError(f"emulator has no {op!r}")
        regs[dst] = res & MASK
    return [regs[f"${i}"] for i in range(n_outputs)]
