"""The inline-PTX unpack/table step, executed by a PTX-subset emulator on CPU (the GPU test runs it for real)."""

from __future__ import annotations

import random
import struct

from quickloris.kernels.nf4_ptx import unpack_bytes_ptx
from quickloris.quant.nf4 import NF4_LEVELS

from .ptx_emulator import run

NF4_BITS = [struct.unpack("<I", struct.pack("<f", v))[0] for v in NF4_LEVELS]


def expected(word: int) -> list[int]:
    """Outputs 0-3: levels of the high nibbles of bytes 0-3; outputs 4-7: of their low nibbles."""
    packed = [(word >> (8 * j)) & 0xFF for j in range(4)]
    return [NF4_BITS[b >> 4] for b in packed] + [NF4_BITS[b & 0xF] for b in packed]


def test_every_nibble_in_every_position():
    asm = unpack_bytes_ptx()
    for code in range(16):
        for pos in range(8):
            byte, high = divmod(pos, 2)
            word = code << (8 * byte + (4 if high == 0 else 0))
            assert run(asm, {8: word}, 8) == expected(word), (code, pos)


def test_random_words(seed):
    rng = random.Random(seed)
    asm = unpack_bytes_ptx()
    for word in [0, 0xFFFFFFFF, 0x77777777, 0x88888888] + [rng.getrandbits(32) for _ in range(300)]:
        assert run(asm, {8: word}, 8) == expected(word), hex(word)
