"""Inline PTX for the NF4 unpack + table step: 4 packed bytes -> their 8 float32 NF4 levels.

Each byte holds two values: the high nibble is the first, the low nibble the second. The 16-entry float32
table lives in 16 registers, transposed by byte: ``T[k][q]`` holds byte k of entries 4q..4q+3. For 4 values at
once (the 4 high nibbles, then the 4 low nibbles) and each byte position k:

    lo_k = prmt(T[k][0], T[k][1], sel)     # byte k of entry (i & 7)        for each of the 4 values
    hi_k = prmt(T[k][2], T[k][3], sel)     # byte k of entry 8 + (i & 7)
    r_k  = lop3(lo_k, hi_k, mask, 0xD8)    # pick hi_k where bit 3 of i is set: (lo & ~m) | (hi & m)

where `sel` packs the four 3-bit indices into prmt's four selector nibbles and `mask` is 0xFF in each byte whose index
has bit 3 set. The asm is elementwise over bytes (``pack=4``), so Triton's grouping of bytes into a register never
matters: byte k of the input register maps to output register k (high) and 4 + k (low). A 4x4 byte transpose (8 prmt)
then turns (r_0..r_3) into the 4 float32 bit patterns. About 7 integer instructions per value, no memory access: the
table never leaves registers.

Needs only prmt/lop3 (sm_50+), so it runs on the T4 (sm_75) as well as Hopper.
"""

from __future__ import annotations

import struct

from quickloris.quant.nf4 import NF4_LEVELS


def _table_words() -> list[list[int]]:
    """T[k][q]: byte k of NF4 entries 4q..4q+3, entry 4q+b in byte b (little-endian)."""
    bits = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_LEVELS]
    return [
        [sum(((bits[4 * q + b] >> (8 * k)) & 0xFF) << (8 * b) for b in range(4)) for q in range(4)] for k in range(4)
    ]


def _lookup4(idx: str, prefix: str) -> list[str]:
    """PTX computing `{prefix}e0..e3` = NF4[byte j of register idx] for j = 0..3 (bytes of idx are < 16)."""
    p = prefix
    lines = [
        # selector: the low 3 bits of the 4 indices as the 4 nibbles of the low half-word
        f"and.b32 {p}t, {idx}, 0x07070707;",
        f"shr.u32 {p}s, {p}t, 4;",
        f"or.b32 {p}t, {p}t, {p}s;",
        f"prmt.b32 {p}s, {p}t, 0, 0x0020;",
        # mask: 0xFF in each byte whose index is >= 8
        f"shr.u32 {p}m, {idx}, 3;",
        f"and.b32 {p}m, {p}m, 0x01010101;",
        f"mul.lo.u32 {p}m, {p}m, 255;",
    ]
    for k in range(4):
        lines += [
            f"prmt.b32 {p}lo, tb{k}0, tb{k}1, {p}s;",
            f"prmt.b32 {p}hi, tb{k}2, tb{k}3, {p}s;",
            f"lop3.b32 {p}r{k}, {p}lo, {p}hi, {p}m, 0xD8;",
        ]
    lines += [  # transpose: e_j = (r0.b_j, r1.b_j, r2.b_j, r3.b_j)
        f"prmt.b32 {p}u0, {p}r0, {p}r1, 0x5140;",
        f"prmt.b32 {p}u1, {p}r2, {p}r3, 0x5140;",
        f"prmt.b32 {p}e0, {p}u0, {p}u1, 0x5410;",
        f"prmt.b32 {p}e1, {p}u0, {p}u1, 0x7632;",
        f"prmt.b32 {p}u0, {p}r0, {p}r1, 0x7362;",
        f"prmt.b32 {p}u1, {p}r2, {p}r3, 0x7362;",
        f"prmt.b32 {p}e2, {p}u0, {p}u1, 0x5410;",
        f"prmt.b32 {p}e3, {p}u0, {p}u1, 0x7632;",
    ]
    return lines


def unpack_bytes_ptx() -> str:
    """PTX for `tl.inline_asm_elementwise(..., pack=4)` over packed uint8 bytes.

    ``$8`` holds 4 packed bytes (one per element of the pack); ``$0..$3`` receive the NF4 levels of their high
    nibbles and ``$4..$7`` those of their low nibbles (as .b32 bit patterns), i.e. two float32 outputs per byte.
    """
    regs = ["x", "ia", "ib"] + [f"tb{k}{q}" for k in range(4) for q in range(4)]
    for p in ("a", "b"):
        regs += [
            f"{p}{r}" for r in ("t", "s", "m", "lo", "hi", "r0", "r1", "r2", "r3", "u0", "u1", "e0", "e1", "e2", "e3")
        ]
    lines = ["{", f".reg .b32 {', '.join(regs)};", "mov.b32 x, $8;"]
    for k, row in enumerate(_table_words()):
        lines += [f"mov.b32 tb{k}{q}, {word:#010x};" for q, word in enumerate(row)]
    lines += ["shr.u32 ia, x, 4;", "and.b32 ia, ia, 0x0F0F0F0F;", "and.b32 ib, x, 0x0F0F0F0F;"]
    lines += _lookup4("ia", "a") + _lookup4("ib", "b")
    lines += [f"mov.b32 ${j}, ae{j};" for j in range(4)] + [f"mov.b32 ${4 + j}, be{j};" for j in range(4)]
    lines.append("}")
    # One line: inductor copies this string into the Python source it generates for a compiled graph (a user
    # Triton kernel's globals) as a plain quoted literal, where a newline ended the string (SyntaxError on a GPU
    # compile through `quickloris.dequantize_nf4`). PTX needs no newlines: each statement ends with ';'.
    return " ".join(lines)


# Explicit round-to-nearest multiply: ptxas never contracts an `.rn` multiply into a fused multiply-add, which
# would change the last bit of `code2[q] * absmax2 + offset` against bitsandbytes (two separate roundings).
MUL_RN_F32 = "mul.rn.f32 $0, $1, $2;"
