"""The inline-PTX unpack/table step, executed by a PTX-subset emulator on CPU (the GPU test runs it for real)."""

from __future__ import annotations

import random
import struct

from quickloris.kernels.nf4_ptx import unpack_word_ptx
from quickloris.quant.nf4 import NF4_LEVELS

from .ptx_emulator import run

NF4_BITS = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_LEVELS]


def expected(word: int) -> list[int]:
    out = []
    for j in range(4):  # byte j (little-endian) holds value 2j (high nibble) and 2j+1 (low nibble)
        byte = (word >> (8 * j)) & 0xFF
        out += [NF4_BITS[byte >> 4], NF4_BITS[byte & 0xF]]
    return out


def test_every_nibble_in_every_position():
    asm = unpack_word_ptx()
    for code in range(16):
        for pos in range(8):
            byte, high = divmod(pos, 2)
            word = (code << (8 * byte + (4 if high == 0 else 0)))
            assert run(asm, {8: word}, 8) == expected(word), (code, pos)


def test_random_words(seed):
    rng = random.Random(seed)
    asm = unpack_word_ptx()
    for word in [0, 0xFFFFFFFF, 0x77777777, 0x88888888] + [rng.getrandbits(32) for _ in range(300)]:
        assert run(asm, {8: word}, 8) == expected(word), hex(word)
