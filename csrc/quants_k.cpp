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
#include <cmath>
#include <cstring>

#include "half.h"
#include "quants.h"

namespace ql {
namespace {

constexpr float kGroupMaxEps = 1e-15f;

// Round to nearest, ties to even, valid for |x| < 2^22: adding 1.5 * 2^23 moves the integer part
// into the low mantissa bits (under the default rounding mode), which we read back directly.
inline int nearest_int(float x) {
    const uint32_t u = f32_bits(x + 12582912.0f);
    return static_cast<int>(u & 0x007fffffu) - 0x00400000;
}

inline int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Weighted affine fit of one sub-block (see the file comment). Returns the scale s; writes the
// levels to L and -m to *neg_min. `aux` is scratch of n bytes.
float fit_scale_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min,
                    uint8_t* aux, float rmin, float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;  // the offset only ever moves values up
    if (max == min) {
        std::memset(L, 0, static_cast<size_t>(n));
        *neg_min = -min;
        return 0.0f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        L[i] = static_cast<uint8_t>(clamp_int(nearest_int(iscale * (x[i] - min)), 0, nmax));
        const float diff = scale * L[i] + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    for (int k = 0; k <= nstep; ++k) {
        iscale = (rmin + rdelta * k + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            const int l = clamp_int(nearest_int(iscale * (x[i] - min)), 0, nmax);
            aux[i] = static_cast<uint8_t>(l);
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const float det = sum_w * sum_l2 - sum_l * sum_l;
        if (det > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if (this_min > 0) {  // a positive offset is not representable: refit the scale alone
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float error = 0;
            for (int i = 0; i < n; ++i) {
                const float diff = this_scale * aux[i] + this_min - x[i];
                error += w[i] * (diff * diff);
            }
            if (error < best_error) {
                std::memcpy(L, aux, static_cast<size_t>(n));
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *neg_min = -min;
    return scale;
}

// Symmetric fit of one sub-block (see the file comment); L receives q in [0, 2 nmax).
float fit_scale_symmetric(int n, int nmax, const float* x, int8_t* L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = std::fabs(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < kGroupMaxEps) {
        std::memset(L, 0, static_cast<size_t>(n));
        return 0.0f;
    }
    auto score = [&](float iscale, float& sumlx, float& suml2) {
        sumlx = suml2 = 0;
        for (int i = 0; i < n; ++i) {
            const int l = clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1);
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
    };
    auto assign = [&](float iscale) {
        for (int i = 0; i < n; ++i)
            L[i] = static_cast<int8_t>(nmax + clamp_int(nearest_int(iscale * x[i]), -nmax, nmax - 1));
    };
    float iscale = -nmax / max;
    float sumlx, suml2;
    assign(iscale);
    score(iscale, sumlx, suml2);
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int k = -9; k <= 9; ++k) {
        if (k == 0) continue;
        iscale = -(nmax + 0.1f * k) / max;
        score(iscale, sumlx, suml2);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            assign(iscale);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
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

// Shared part of Q4_K / Q5_K for one super-block: writes d, dmin and the 12 scale bytes at
// `head` (2 + 2 + 12 bytes) and the final levels (0..nmax) to L.
void quantize_affine_superblock(const float* x, uint8_t* head, uint8_t* L, int nmax, float rmin,
                                int nstep) {
    float scales[8], mins[8], weights[32];
    uint8_t aux[32];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        const float* xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
        const float av_x = std::sqrt(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
        scales[j] = fit_scale_min(32, nmax, xs, weights, L + 32 * j, &mins[j], aux, rmin, 0.1f, nstep);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t* s = head + 4;
    std::memset(s, 0, 12);
    for (int j = 0; j < 8; ++j) {
        // uint8 first, then clamp: a (pathological) negative scale wraps and saturates at 63.
        uint8_t ls = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
        uint8_t lm = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
        ls = ls < 63 ? ls : 63;
        lm = lm < 63 ? lm : 63;
        if (j < 4) {
            s[j] = ls;
            s[j + 4] = lm;
        } else {
            s[j + 4] = static_cast<uint8_t>((ls & 0x0f) | ((lm & 0x0f) << 4));
            s[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
            s[j] |= static_cast<uint8_t>((lm >> 4) << 6);
        }
    }
    const uint16_t d16 = fp32_to_fp16(max_scale / 63.f);
    const uint16_t dmin16 = fp32_to_fp16(max_min / 63.f);
    store_u16(head, d16);
    store_u16(head + 2, dmin16);
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        scale_min_k4(j, s, sc, m);
        const float d = fp16_to_fp32(d16) * sc;
        if (d == 0.0f) continue;  // keeps the fit's levels, as ggml does
        const float dm = fp16_to_fp32(dmin16) * m;
        for (int i = 0; i < 32; ++i)
            L[32 * j + i] = static_cast<uint8_t>(clamp_int(nearest_int((x[32 * j + i] + dm) / d), 0, nmax));
    }
}

}  // namespace

void quantize_row_q4_k(const float* x, uint8_t* y, int64_t n) {
    uint8_t L[QK_K];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 144) {
        quantize_affine_superblock(x, y, L, 15, -1.0f, 20);
        uint8_t* q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    }
}

void quantize_row_q5_k(const float* x, uint8_t* y, int64_t n) {
    uint8_t L[QK_K];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 176) {
        quantize_affine_superblock(x, y, L, 31, -0.5f, 15);
        uint8_t* qh = y + 16;
        uint8_t* ql = y + 48;
        std::memset(qh, 0, 32);
        uint8_t m1 = 1, m2 = 2;
        for (int j0 = 0; j0 < QK_K; j0 += 64, ql += 32) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[j0 + j], l2 = L[j0 + j + 32];
                if (l1 > 15) {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if (l2 > 15) {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
            }
            m1 = static_cast<uint8_t>(m1 << 2);
            m2 = static_cast<uint8_t>(m2 << 2);
        }
    }
}

void quantize_row_q6_k(const float* x, uint8_t* y, int64_t n) {
    int8_t L[QK_K];
    float scales[QK_K / 16];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 210) {
        float max_scale = 0, max_abs_scale = 0;
        for (int j = 0; j < QK_K / 16; ++j) {
            scales[j] = fit_scale_symmetric(16, 32, x + 16 * j, L + 16 * j);
            if (std::fabs(scales[j]) > max_abs_scale) {
                max_abs_scale = std::fabs(scales[j]);
                max_scale = scales[j];
            }
        }
        std::memset(y, 0, 210);
        if (max_abs_scale < kGroupMaxEps) continue;  // all-zero block
        uint8_t* ql = y;
        uint8_t* qh = y + 128;
        int8_t* sc = reinterpret_cast<int8_t*>(y + 192);
        const float iscale = -128.f / max_scale;
        const uint16_t d16 = fp32_to_fp16(1 / iscale);
        store_u16(y + 208, d16);
        for (int j = 0; j < QK_K / 16; ++j) {
            const int v = nearest_int(iscale * scales[j]);
            sc[j] = static_cast<int8_t>(v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; ++j) {
            const float d = fp16_to_fp32(d16) * sc[j];
            if (d == 0.0f) continue;
            for (int i = 0; i < 16; ++i)
                L[16 * j + i] = static_cast<int8_t>(clamp_int(nearest_int(x[16 * j + i] / d), -32, 31) + 32);
        }
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                const int q1 = L[j + l], q2 = L[j + l + 32], q3 = L[j + l + 64], q4 = L[j + l + 96];
                ql[l] = static_cast<uint8_t>((q1 & 0x0f) | ((q3 & 0x0f) << 4));
                ql[l + 32] = static_cast<uint8_t>((q2 & 0x0f) | ((q4 & 0x0f) << 4));
                qh[l] = static_cast<uint8_t>((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
            }
        }
    }
}

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
