// IEEE half (fp16) and bfloat16 conversions, bit-exact with numpy and ggml.
//
// fp32 -> fp16 rounds to nearest, ties to even; overflow gives +-inf, results below the
// smallest subnormal round to +-0, NaN becomes a quiet NaN (0x7e00 | sign).
// fp32 -> bf16 keeps the top 16 bits rounded to nearest-even; NaN is forced quiet (bit 6 of
// the upper half set), which is what both numpy's gguf path and ggml do.
#pragma once

#include <cstdint>
#include <cstring>

namespace ql {

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t fp32_to_fp16(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t abs = x & 0x7fffffffu;
    if (abs > 0x7f800000u) return sign | 0x7e00u;               // NaN
    if (abs >= 0x477ff000u) return sign | 0x7c00u;              // rounds to >= 65520: inf
    if (abs >= 0x38800000u) {                                    // normal half (>= 2^-14)
        // Re-bias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits.
        const uint32_t m = abs - 0x38000000u;                    // exponent - 112
        const uint32_t rounded = m + 0x0fffu + ((m >> 13) & 1u);  // ties to even
        return sign | static_cast<uint16_t>(rounded >> 13);     // a carry bumps the exponent
    }
    if (abs < 0x33000000u) return sign;                          // < 2^-25: rounds to zero
    // Subnormal half: value = mant * 2^-24. Shift the full 24-bit significand.
    const uint32_t e = abs >> 23;                                // 102..112
    const uint32_t sig = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;                             // 14..24
    const uint32_t half_bit = 1u << (shift - 1);
    const uint32_t rest = sig & ((half_bit << 1) - 1u);
    uint32_t q = sig >> shift;
    if (rest > half_bit || (rest == half_bit && (q & 1u))) q += 1;  // may carry into normal
    return sign | static_cast<uint16_t>(q);
}

inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));
    if (exp != 0) return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
    if (mant == 0) return bits_f32(sign);
    // Subnormal: mant * 2^-24 is exact in fp32.
    const float v = static_cast<float>(mant) * bits_f32(0x33800000u);
    return sign ? -v : v;
}

inline uint16_t fp32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64u);
    return static_cast<uint16_t>((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

inline float bf16_to_fp32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

inline void store_u16(uint8_t* p, uint16_t v) {
    p[0] = static_cast<uint8_t>(v);
    p[1] = static_cast<uint8_t>(v >> 8);
}

inline uint16_t load_u16(const uint8_t* p) {
    return static_cast<uint16_t>(p[0] | (static_cast<uint16_t>(p[1]) << 8));
}

}  // namespace ql
