"""The fused NF4 dequantization kernel (Triton): one launch decodes both quantization levels.

For absmax block b (B = blocksize values) and value i of the weight (see quickloris.quant.nf4)::

    scale[b] = code2[absmax[b]] * absmax2[b // 256] + offset     # float32, two roundings, no FMA
    W[i]     = NF4[nibble(i)] * scale[i // B]                     # float32, then rounded to fp16/bf16/fp32

Each program decodes BLOCKS absmax blocks: it reads their uint8 codes, looks up code2 and absmax2 (both cached:
`evict_last`), streams the packed bytes once (`evict_first`: they are never read again) and writes the output.
No intermediate buffer exists: the decoded absmax lives in registers. Bytes moved per value: 0.5 (packed) +
1/64 (absmax) + 2 (fp16/bf16 output), so the kernel is bound by memory bandwidth. 16-bit outputs are written as
one 32-bit word per packed byte, in the bytes' own register layout: no shuffle through shared memory.

Two twins of the unpack/table step:
* GPU: inline PTX (`nf4_ptx.unpack_bytes_ptx`) turns each 4 packed bytes into their 8 float32 levels with
  byte permutes on a register-resident table; the scale multiply is an explicit `mul.rn.f32`.
* `TRITON_INTERPRET=1` (no inline asm there): shifts/masks and a 16-entry table load.
Both are bit-identical to bitsandbytes' `dequantize_4bit` (tests check GPU asm == GPU plain == bitsandbytes).
Nothing here is Hopper-only (prmt/lop3 exist since sm_50; bf16 conversion is Triton's).
"""

from __future__ import annotations

from quickloris.kernels.nf4_ptx import MUL_RN_F32, unpack_bytes_ptx
from quickloris.kernels.triton_common import interpreting, tl, triton

if triton is not None:
    from quickloris.kernels.triton_common import bf16_bits_rn

__all__ = ["interpreting", "nf4_dequant_kernel", "tl", "triton"]

if triton is not None:
    _UNPACK_ASM: tl.constexpr = tl.constexpr(unpack_bytes_ptx())
    _MUL_ASM: tl.constexpr = tl.constexpr(MUL_RN_F32)

    @triton.jit
    def _mul_rn(a, b, USE_ASM: tl.constexpr):
        if USE_ASM:
            return tl.inline_asm_elementwise(_MUL_ASM, "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return a * b

    @triton.jit
    def _to_bits16(values, OUT_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
        """float32 -> its fp16/bf16 rounding (to nearest even) as the low 16 bits of a uint32."""
        if SOFT_BF16:  # the interpreter's bf16 cast does not round to nearest even
            return bf16_bits_rn(values)
        else:
            return values.to(OUT_DTYPE).to(tl.uint16, bitcast=True).to(tl.uint32)

    @triton.jit
    def nf4_dequant_kernel(
        packed_ptr,  # uint8 [ceil(n/2)]
        absmax_ptr,  # uint8 [nblocks] (nested) or float32 [nblocks]
        absmax2_ptr,  # float32 [ceil(nblocks/256)] (nested)
        code2_ptr,  # float32 [256] (nested)
        offset_ptr,  # float32 [1] (nested)
        code_ptr,  # float32 [16]
        out_ptr,  # OUT_DTYPE [n] (read as int32 [n/2] holding value pairs when PAIRS)
        n,
        nblocks,
        BLOCKSIZE: tl.constexpr,
        BLOCKS: tl.constexpr,
        NESTED: tl.constexpr,
        UNPACK_ASM: tl.constexpr,
        MUL_ASM: tl.constexpr,
        SOFT_BF16: tl.constexpr,
        OUT_DTYPE: tl.constexpr,
        PAIRS: tl.constexpr,  # 16-bit output written as one 32-bit word per packed byte
        EVEN: tl.constexpr,  # n is a multiple of BLOCKS * BLOCKSIZE: no masks, full-width vector accesses
        STREAM: tl.constexpr,  # write the output with streaming stores (.cs): it is read once, by the next matmul
    ):
        pid = tl.program_id(0)
        blk = pid * BLOCKS + tl.arange(0, BLOCKS)
        blk_ok = blk < nblocks
        if NESTED:
            if EVEN:
                q = tl.load(absmax_ptr + blk, eviction_policy="evict_last")
                a2 = tl.load(absmax2_ptr + blk // 256, eviction_policy="evict_last")
            else:
                q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0, eviction_policy="evict_last")
                a2 = tl.load(absmax2_ptr + blk // 256, mask=blk_ok, other=0.0, eviction_policy="evict_last")
            c2 = tl.load(code2_ptr + q.to(tl.int32), eviction_policy="evict_last")
            scale = _mul_rn(c2, a2, MUL_ASM) + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0, eviction_policy="evict_last")

        # Byte j of a block holds value 2j (high nibble) and 2j+1 (low nibble); each block has BLOCKSIZE/2 bytes.
        HALF: tl.constexpr = BLOCKSIZE // 2
        base = pid.to(tl.int64) * (BLOCKS * HALF)  # first byte of this program; int64: n may pass 2^31
        b_idx = base + tl.arange(0, BLOCKS)[:, None] * HALF + tl.arange(0, HALF)[None, :]
        if EVEN:
            packed = tl.load(packed_ptr + b_idx, eviction_policy="evict_first")
        else:
            packed = tl.load(packed_ptr + b_idx, mask=b_idx < (n + 1) // 2, other=0, eviction_policy="evict_first")
        if UNPACK_ASM:
            hi, lo = tl.inline_asm_elementwise(
                _UNPACK_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed], dtype=(tl.int32, tl.int32), is_pure=True, pack=4
            )
            hi = hi.to(tl.float32, bitcast=True)
            lo = lo.to(tl.float32, bitcast=True)
        else:
            hi = tl.load(code_ptr + (packed >> 4).to(tl.int32), eviction_policy="evict_last")
            lo = tl.load(code_ptr + (packed & 0x0F).to(tl.int32), eviction_policy="evict_last")
        hi = hi * scale[:, None]
        lo = lo * scale[:, None]

        if PAIRS:
            # Little-endian: the low half-word is value 2j. Same layout as the bytes: no shuffle, 16-byte stores.
            word = _to_bits16(hi, OUT_DTYPE, SOFT_BF16) | (_to_bits16(lo, OUT_DTYPE, SOFT_BF16) << 16)
            words_ptr = out_ptr.to(tl.pointer_type(tl.int32))
            if EVEN:
                tl.store(words_ptr + b_idx, word.to(tl.int32, bitcast=True), cache_modifier=".cs" if STREAM else "")
            else:
                tl.store(
                    words_ptr + b_idx,
                    word.to(tl.int32, bitcast=True),
                    mask=b_idx < n // 2,
                    cache_modifier=".cs" if STREAM else "",
                )
        else:
            values = tl.join(hi, lo).reshape(BLOCKS, BLOCKSIZE)
            o_idx = 2 * base + tl.arange(0, BLOCKS)[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
            if SOFT_BF16:
                result = _to_bits16(values, OUT_DTYPE, SOFT_BF16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                result = values.to(OUT_DTYPE)
            tl.store(out_ptr + o_idx, result, mask=o_idx < n)
