// K-quants (Q4_K, Q5_K, Q6_K): 256-value super-blocks whose sub-block scales are themselves
// quantized against one fp16 super-scale, reproducing ggml's reference quantizers.
//
// Q4_K / Q5_K (affine, 8 sub-blocks of 32): each sub-block j is fitted as
//     x ~= s_j * q + m_j,  q in [0, nmax], m_j <= 0
// minimising sum_i w_i (s_j q_i + m_j - x_i)^2 with importance w_i = rms(x) + |x_i|. The fit
// tries nstep + 1 grid scales iscale = (nmax + rmin + rdelta * k) / (max - min); for each the
// levels q are rounded and (s, m) solved in closed form (2x2 weighted least squares), keeping
// the best. s_j and -m_j are then stored as 6-bit multiples of d = max_j s_j / 63 and
// dmin = max_j(-m_j) / 63, and the levels re-rounded against the stored scales.
//
// Q6_K (symmetric, 16 sub-blocks of 16): x ~= s_j * (q - 32), q in [0, 63]. For each sub-block
// the scale maximising (sum w x l)^2 / sum w l^2 (w = x^2) over 19 grid scales around
// -32 / x_amax is kept; the s_j are stored as int8 multiples of d = s_max / -128.
//
// Memory: 4.5 / 5.5 / 6.5625 bits per value for Q4_K / Q5_K / Q6_K.
//
// The quantizers live in kquants_impl.h, compiled for AVX2 (quants_k_avx2.cpp, x86-64 only) and for
// any CPU (quants_k_generic.cpp); this file picks one at run time and holds the dequantizers.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "half.h"
#include "quants.h"

namespace ql {

void quantize_row_q4_k_generic(const float* x, uint8_t* y, int64_t n);
void quantize_row_q5_k_generic(const float* x, uint8_t* y, int64_t n);
void quantize_row_q6_k_generic(const float* x, uint8_t* y, int64_t n);
#if QL_HAVE_AVX2
void quantize_row_q4_k_avx2(const float* x, uint8_t* y, int64_t n);
void quantize_row_q5_k_avx2(const float* x, uint8_t* y, int64_t n);
void quantize_row_q6_k_avx2(const float* x, uint8_t* y, int64_t n);
#endif

namespace {

// QUICKLORIS_KQUANT_GENERIC=1 forces the portable kernels (tests check both give the same bytes).
bool use_avx2() {
#if QL_HAVE_AVX2
    static const bool yes = __builtin_cpu_supports("avx2") && !std::getenv("QUICKLORIS_KQUANT_GENERIC");
    return yes;
#else
    return false;
#endif
}

// 6-bit scale j and min j of the 12-byte K-quant scale field.
inline void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = static_cast<uint8_t>((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

}  // namespace

const char* kquant_isa() { return use_avx2() ? "avx2" : "generic"; }

#if QL_HAVE_AVX2
#define QL_DISPATCH(name) (use_avx2() ? name##_avx2 : name##_generic)
#else
#define QL_DISPATCH(name) name##_generic
#endif

void quantize_row_q4_k(const float* x, uint8_t* y, int64_t n) { QL_DISPATCH(quantize_row_q4_k)(x, y, n); }
void quantize_row_q5_k(const float* x, uint8_t* y, int64_t n) { QL_DISPATCH(quantize_row_q5_k)(x, y, n); }
void quantize_row_q6_k(const float* x, uint8_t* y, int64_t n) { QL_DISPATCH(quantize_row_q6_k)(x, y, n); }

void dequantize_row_q4_k(const uint8_t* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; ++b, x += 144) {
        const float d = fp16_to_fp32(load_u16(x));
        const float dmin = fp16_to_fp32(load_u16(x + 2));
        const uint8_t* q = x + 16;
        for (int j = 0; j < 8; j += 2, q += 32) {
            uint8_t sc, m;
            scale_min_k4(j, x + 4, sc, m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(j + 1, x + 4, sc, m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0x0f) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
        }
    }
}

void dequantize_row_q5_k(const uint8_t* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; ++b, x += 176) {
        const float d = fp16_to_fp32(load_u16(x));
        const float dmin = fp16_to_fp32(load_u16(x + 2));
        const uint8_t* qh = x + 16;
        const uint8_t* ql = x + 48;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0; j < 8; j += 2, ql += 32) {
            uint8_t sc, m;
            scale_min_k4(j, x + 4, sc, m);
            const float d1 = d * sc, m1 = dmin * m;
            scale_min_k4(j + 1, x + 4, sc, m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; ++l)
                *y++ = d1 * static_cast<float>((ql[l] & 0x0f) + (qh[l] & u1 ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l)
                *y++ = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
            u1 = static_cast<uint8_t>(u1 << 2);
            u2 = static_cast<uint8_t>(u2 << 2);
        }
    }
}

void dequantize_row_q6_k(const uint8_t* x, float* y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; ++b, x += 210) {
        const float d = fp16_to_fp32(load_u16(x + 208));
        const uint8_t* ql = x;
        const uint8_t* qh = x + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(x + 192);
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32, sc += 8, y += 128) {
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is] * static_cast<float>(q1);
                y[l + 32] = d * sc[is + 2] * static_cast<float>(q2);
                y[l + 64] = d * sc[is + 4] * static_cast<float>(q3);
                y[l + 96] = d * sc[is + 6] * static_cast<float>(q4);
            }
        }
    }
}

}  // namespace ql
