// 16-bit floats and the 32-value block quantizers (Q8_0, Q4_0, Q5_0, Q5_1).
//
// Q8_0: d = amax / 127, q = round_half_away(x / d).
// Q4_0 / Q5_0: d = x_amax / -8 (or -16), where x_amax is the signed value of largest magnitude,
//   so that value maps to the end of the range with the most levels; q = trunc(x / d + 8.5)
//   clamped to 15 (q = trunc(x / d + 16.5) clamped to 31).
// Q5_1: d = (max - min) / 31, m = min, q = trunc((x - min) / d + 0.5).
// The reciprocal 1/d is computed once per block and multiplied in, as ggml does.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "half.h"
#include "quants.h"

namespace ql {
namespace {

constexpr int QK = 32;

// Largest-magnitude value with its sign (first one on ties), as ggml picks it.
inline float signed_absmax(const float* x) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; ++j) {
        if (amax < std::fabs(x[j])) {
            amax = std::fabs(x[j]);
            max = x[j];
        }
    }
    return max;
}

// roundf (halves away from zero) for |x| < 2^31 without a libm call: x - trunc(x) is exact.
inline int round_half_away(float x) {
    const int i = static_cast<int>(x);
    const float frac = x - static_cast<float>(i);
    return i + (frac >= 0.5f) - (frac <= -0.5f);
}

inline void store_u32(uint8_t* p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

inline uint32_t load_u32(const uint8_t* p) {
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
           (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}

}  // namespace

void quantize_row_f16(const float* x, uint8_t* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) store_u16(y + 2 * i, fp32_to_fp16(x[i]));
}

void quantize_row_bf16(const float* x, uint8_t* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) store_u16(y + 2 * i, fp32_to_bf16(x[i]));
}

void dequantize_row_f16(const uint8_t* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(load_u16(x + 2 * i));
}

void dequantize_row_bf16(const uint8_t* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_fp32(load_u16(x + 2 * i));
}

void quantize_row_q8_0(const float* x, uint8_t* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += QK, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = std::fabs(x[j]) > amax ? std::fabs(x[j]) : amax;
        const float d = amax / 127;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        store_u16(y, fp32_to_fp16(d));
        for (int j = 0; j < QK; ++j)
            y[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(round_half_away(x[j] * id)));
    }
}

void dequantize_row_q8_0(const uint8_t* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += 34, y += QK) {
        const float d = fp16_to_fp32(load_u16(x));
        for (int j = 0; j < QK; ++j) y[j] = static_cast<float>(static_cast<int8_t>(x[2 + j])) * d;
    }
}

void quantize_row_q4_0(const float* x, uint8_t* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += QK, y += 18) {
        const float d = signed_absmax(x) / -8;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        store_u16(y, fp32_to_fp16(d));
        for (int j = 0; j < QK / 2; ++j) {
            const int lo = std::min(15, static_cast<int>(x[j] * id + 8.5f));
            const int hi = std::min(15, static_cast<int>(x[j + QK / 2] * id + 8.5f));
            y[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
        }
    }
}

void dequantize_row_q4_0(const uint8_t* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += 18, y += QK) {
        const float d = fp16_to_fp32(load_u16(x));
        for (int j = 0; j < QK / 2; ++j) {
            y[j] = d * static_cast<float>((x[2 + j] & 0x0f) - 8);
            y[j + QK / 2] = d * static_cast<float>((x[2 + j] >> 4) - 8);
        }
    }
}

void quantize_row_q5_0(const float* x, uint8_t* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += QK, y += 22) {
        const float d = signed_absmax(x) / -16;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        store_u16(y, fp32_to_fp16(d));
        uint32_t qh = 0;
        for (int j = 0; j < QK / 2; ++j) {
            const int lo = std::min(31, static_cast<int>(x[j] * id + 16.5f));
            const int hi = std::min(31, static_cast<int>(x[j + QK / 2] * id + 16.5f));
            y[6 + j] = static_cast<uint8_t>((lo & 0x0f) | ((hi & 0x0f) << 4));
            qh |= static_cast<uint32_t>(lo >> 4) << j;
            qh |= static_cast<uint32_t>(hi >> 4) << (j + QK / 2);
        }
        store_u32(y + 2, qh);
    }
}

void dequantize_row_q5_0(const uint8_t* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += 22, y += QK) {
        const float d = fp16_to_fp32(load_u16(x));
        const uint32_t qh = load_u32(x + 2);
        for (int j = 0; j < QK / 2; ++j) {
            const int lo = (x[6 + j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4);
            const int hi = (x[6 + j] >> 4) | static_cast<int>(((qh >> (j + QK / 2)) & 1u) << 4);
            y[j] = d * static_cast<float>(lo - 16);
            y[j + QK / 2] = d * static_cast<float>(hi - 16);
        }
    }
}

void quantize_row_q5_1(const float* x, uint8_t* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += QK, y += 24) {
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < QK; ++j) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 31;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        store_u16(y, fp32_to_fp16(d));
        store_u16(y + 2, fp32_to_fp16(min));
        uint32_t qh = 0;
        for (int j = 0; j < QK / 2; ++j) {
            const int lo = static_cast<uint8_t>((x[j] - min) * id + 0.5f);
            const int hi = static_cast<uint8_t>((x[j + QK / 2] - min) * id + 0.5f);
            y[8 + j] = static_cast<uint8_t>((lo & 0x0f) | ((hi & 0x0f) << 4));
            qh |= static_cast<uint32_t>((lo >> 4) & 1) << j;
            qh |= static_cast<uint32_t>((hi >> 4) & 1) << (j + QK / 2);
        }
        store_u32(y + 4, qh);
    }
}

void dequantize_row_q5_1(const uint8_t* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += 24, y += QK) {
        const float d = fp16_to_fp32(load_u16(x));
        const float m = fp16_to_fp32(load_u16(x + 2));
        const uint32_t qh = load_u32(x + 4);
        for (int j = 0; j < QK / 2; ++j) {
            const int lo = (x[8 + j] & 0x0f) | static_cast<int>(((qh >> j) & 1u) << 4);
            const int hi = (x[8 + j] >> 4) | static_cast<int>(((qh >> (j + QK / 2)) & 1u) << 4);
            y[j] = d * static_cast<float>(lo) + m;
            y[j + QK / 2] = d * static_cast<float>(hi) + m;
        }
    }
}

}  // namespace ql
