// K-quant quantizers (Q4_K, Q5_K, Q6_K), compiled once per instruction set: a translation unit
// defines QL_KQ_WIDTH (vector lanes: 8 with AVX2, 4 on baseline SSE2 / NEON) and QL_KQ_SUFFIX, then
// includes this file. See quants_k.cpp for the formats and the runtime dispatch.
//
// The fits of a super-block's sub-blocks are independent (8 sub-blocks of 32 values for Q4_K / Q5_K,
// 16 of 16 for Q6_K), so W of them run side by side, one per vector lane. Each lane performs exactly
// ggml's scalar sequence of IEEE operations (same accumulation order, no FMA: -ffp-contract=off), so
// the bytes are identical to ggml's reference quantizers, just several times faster.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "half.h"
#include "quants.h"

#if !defined(QL_KQ_WIDTH) || !defined(QL_KQ_SUFFIX)
#error "define QL_KQ_WIDTH and QL_KQ_SUFFIX before including kquants_impl.h"
#endif
#define QL_KQ_CAT2(a, b) a##_##b
#define QL_KQ_CAT(a, b) QL_KQ_CAT2(a, b)
#define QL_KQ_FN(name) QL_KQ_CAT(name, QL_KQ_SUFFIX)

namespace ql {
namespace {

constexpr int W = QL_KQ_WIDTH;
typedef float F __attribute__((vector_size(4 * QL_KQ_WIDTH)));
typedef int32_t I __attribute__((vector_size(4 * QL_KQ_WIDTH)));

constexpr float kGroupMaxEps = 1e-15f;

inline F splat(float v) { return F{} + v; }
inline I splat_i(int32_t v) { return I{} + v; }
inline F select(I mask, F a, F b) { return mask ? a : b; }
inline I select(I mask, I a, I b) { return mask ? a : b; }
inline F to_float(I v) { return __builtin_convertvector(v, F); }
inline I bits(F v) { return (I)v; }  // a vector cast reinterprets the bits
inline F vabs(F v) { return (F)(bits(v) & splat_i(0x7fffffff)); }
inline I clamp(I v, int32_t lo, int32_t hi) {
    v = v < splat_i(lo) ? splat_i(lo) : v;
    return v > splat_i(hi) ? splat_i(hi) : v;
}
inline bool any(I mask) {
    for (int i = 0; i < W; ++i)
        if (mask[i]) return true;
    return false;
}
inline F vsqrt(F v) {
    for (int i = 0; i < W; ++i) v[i] = std::sqrt(v[i]);
    return v;
}

// Round to nearest, ties to even, valid for |x| < 2^22: adding 1.5 * 2^23 moves the integer part
// into the low mantissa bits (under the default rounding mode), which are read back directly.
inline int nearest_int(float x) {
    const uint32_t u = f32_bits(x + 12582912.0f);
    return static_cast<int>(u & 0x007fffffu) - 0x00400000;
}
inline I nearest_int(F x) { return (bits(x + splat(12582912.0f)) & splat_i(0x007fffff)) - splat_i(0x00400000); }

// Weighted affine fit x ~= s q + m (m <= 0, q in [0, nmax]) of W sub-blocks, one per lane:
// xt[i] / wt[i] hold value / weight i of each. Returns s; writes q to L and -m to *neg_min.
F fit_scale_min(int n, int nmax, const F* xt, const F* wt, I* L, F* neg_min, float rmin, float rdelta, int nstep) {
    F min = xt[0], max = xt[0];
    F sum_w = wt[0];
    F sum_x = sum_w * xt[0];
    for (int i = 1; i < n; ++i) {
        min = select(xt[i] < min, xt[i], min);
        max = select(xt[i] > max, xt[i], max);
        sum_w += wt[i];
        sum_x += wt[i] * xt[i];
    }
    min = select(min > splat(0), splat(0), min);  // the offset only ever moves values up
    const I flat = max == min;                     // such lanes get levels 0 and scale 0 at the end
    const F flat_min = min;
    F iscale = splat(static_cast<float>(nmax)) / (max - min);
    F scale = splat(1.0f) / iscale;
    F best_error = splat(0);
    for (int i = 0; i < n; ++i) {
        L[i] = clamp(nearest_int(iscale * (xt[i] - min)), 0, nmax);
        const F diff = scale * to_float(L[i]) + min - xt[i];
        best_error += wt[i] * (diff * diff);
    }
    I aux[32];
    for (int k = 0; k <= nstep; ++k) {
        // (max - min) with the current best min, which moves as better fits are found (as in ggml)
        iscale = splat(rmin + rdelta * k + nmax) / (max - min);
        F sum_l = splat(0), sum_l2 = splat(0), sum_xl = splat(0);
        for (int i = 0; i < n; ++i) {
            aux[i] = clamp(nearest_int(iscale * (xt[i] - min)), 0, nmax);
            const F l = to_float(aux[i]);
            sum_l += wt[i] * l;
            sum_l2 += wt[i] * l * l;
            sum_xl += wt[i] * l * xt[i];
        }
        const F det = sum_w * sum_l2 - sum_l * sum_l;
        const I solvable = det > splat(0);
        if (!any(solvable)) continue;
        F this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        F this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        const I positive = this_min > splat(0);  // not representable: refit the scale alone
        this_min = select(positive, splat(0), this_min);
        this_scale = select(positive, sum_xl / sum_l2, this_scale);
        F error = splat(0);
        for (int i = 0; i < n; ++i) {
            const F diff = this_scale * to_float(aux[i]) + this_min - xt[i];
            error += wt[i] * (diff * diff);
        }
        const I better = solvable & (error < best_error);
        if (!any(better)) continue;
        for (int i = 0; i < n; ++i) L[i] = select(better, aux[i], L[i]);
        best_error = select(better, error, best_error);
        scale = select(better, this_scale, scale);
        min = select(better, this_min, min);
    }
    for (int i = 0; i < n; ++i) L[i] = select(flat, splat_i(0), L[i]);
    *neg_min = -select(flat, flat_min, min);
    return select(flat, splat(0), scale);
}

// Symmetric fit x ~= s (q - nmax) of W sub-blocks: the scale maximising (sum w x l)^2 / sum w l^2
// (w = x^2) over 19 grid scales around -nmax / x_amax. L receives q in [0, 2 nmax).
F fit_scale_symmetric(int n, int nmax, const F* xt, I* L) {
    F max = splat(0), amax = splat(0);
    for (int i = 0; i < n; ++i) {
        const F ax = vabs(xt[i]);
        const I greater = ax > amax;
        amax = select(greater, ax, amax);
        max = select(greater, xt[i], max);
    }
    const I zero = amax < splat(kGroupMaxEps);
    auto levels = [&](F iscale, int i) { return clamp(nearest_int(iscale * xt[i]), -nmax, nmax - 1); };
    auto score = [&](F iscale, F& sumlx, F& suml2) {
        sumlx = suml2 = splat(0);
        for (int i = 0; i < n; ++i) {
            const F l = to_float(levels(iscale, i));
            const F w = xt[i] * xt[i];
            sumlx += w * xt[i] * l;
            suml2 += w * l * l;
        }
    };
    F iscale = splat(static_cast<float>(-nmax)) / max;
    for (int i = 0; i < n; ++i) L[i] = splat_i(nmax) + levels(iscale, i);
    F sumlx, suml2;
    score(iscale, sumlx, suml2);
    F scale = select(suml2 != splat(0), sumlx / suml2, splat(0));
    F best = scale * sumlx;
    for (int k = -9; k <= 9; ++k) {
        if (k == 0) continue;
        iscale = splat(-(nmax + 0.1f * k)) / max;
        score(iscale, sumlx, suml2);
        const I better = (suml2 > splat(0)) & (sumlx * sumlx > best * suml2);
        if (!any(better)) continue;
        for (int i = 0; i < n; ++i) L[i] = select(better, splat_i(nmax) + levels(iscale, i), L[i]);
        const F new_scale = sumlx / suml2;
        scale = select(better, new_scale, scale);
        best = select(better, new_scale * sumlx, best);
    }
    for (int i = 0; i < n; ++i) L[i] = select(zero, splat_i(0), L[i]);
    return select(zero, splat(0), scale);
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
void quantize_affine_superblock(const float* x, uint8_t* head, uint8_t* L, int nmax, float rmin, int nstep) {
    constexpr int G = 8 / W;  // lane groups; sub-block j is lane j % W of group j / W
    F xt[G][32], wt[G][32];
    I Lt[G][32];
    float scales[8], mins[8];
    for (int g = 0; g < G; ++g) {
        for (int i = 0; i < 32; ++i)
            for (int l = 0; l < W; ++l) xt[g][i][l] = x[32 * (g * W + l) + i];
        F sum_x2 = splat(0);
        for (int i = 0; i < 32; ++i) sum_x2 += xt[g][i] * xt[g][i];
        const F av_x = vsqrt(sum_x2 / splat(32));
        for (int i = 0; i < 32; ++i) wt[g][i] = av_x + vabs(xt[g][i]);
        F m;
        const F s = fit_scale_min(32, nmax, xt[g], wt[g], Lt[g], &m, rmin, 0.1f, nstep);
        for (int l = 0; l < W; ++l) {
            scales[g * W + l] = s[l];
            mins[g * W + l] = m[l];
        }
    }
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
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
    for (int g = 0; g < G; ++g) {
        F d, dm;
        for (int l = 0; l < W; ++l) {
            uint8_t sc, m;
            scale_min_k4(g * W + l, s, sc, m);
            d[l] = fp16_to_fp32(d16) * sc;
            dm[l] = fp16_to_fp32(dmin16) * m;
        }
        const I keep = d == splat(0);  // keeps the fit's levels, as ggml does
        for (int i = 0; i < 32; ++i) {
            const I q = select(keep, Lt[g][i], clamp(nearest_int((xt[g][i] + dm) / d), 0, nmax));
            for (int l = 0; l < W; ++l) L[32 * (g * W + l) + i] = static_cast<uint8_t>(q[l]);
        }
    }
}

}  // namespace

void QL_KQ_FN(quantize_row_q4_k)(const float* x, uint8_t* y, int64_t n) {
    uint8_t L[QK_K];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 144) {
        quantize_affine_superblock(x, y, L, 15, -1.0f, 20);
        uint8_t* q = y + 16;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    }
}

void QL_KQ_FN(quantize_row_q5_k)(const float* x, uint8_t* y, int64_t n) {
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

void QL_KQ_FN(quantize_row_q6_k)(const float* x, uint8_t* y, int64_t n) {
    constexpr int G = 16 / W;  // sub-block j of 16 values is lane j % W of group j / W
    int8_t L[QK_K];
    float scales[16];
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K, y += 210) {
        F xt[G][16];
        I Lt[G][16];
        for (int g = 0; g < G; ++g) {
            for (int i = 0; i < 16; ++i)
                for (int l = 0; l < W; ++l) xt[g][i][l] = x[16 * (g * W + l) + i];
            const F sc = fit_scale_symmetric(16, 32, xt[g], Lt[g]);
            for (int l = 0; l < W; ++l) scales[g * W + l] = sc[l];
        }
        float max_scale = 0, max_abs_scale = 0;
        for (int j = 0; j < 16; ++j) {
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
        for (int j = 0; j < 16; ++j) {
            const int v = nearest_int(iscale * scales[j]);
            sc[j] = static_cast<int8_t>(v < 127 ? v : 127);
        }
        for (int g = 0; g < G; ++g) {
            F d;
            for (int l = 0; l < W; ++l) d[l] = fp16_to_fp32(d16) * sc[g * W + l];
            const I keep = d == splat(0);  // keeps the fit's levels, as ggml does
            for (int i = 0; i < 16; ++i) {
                const I q = select(keep, Lt[g][i], clamp(nearest_int(xt[g][i] / d), -32, 31) + splat_i(32));
                for (int l = 0; l < W; ++l) L[16 * (g * W + l) + i] = static_cast<int8_t>(q[l]);
            }
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

}  // namespace ql
