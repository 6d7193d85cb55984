// Type dispatch and the multithreaded whole-tensor quantize / dequantize.
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "parallel.h"
#include "quants.h"

namespace ql {
namespace {

using QuantizeRow = void (*)(const float*, uint8_t*, int64_t);
using DequantizeRow = void (*)(const uint8_t*, float*, int64_t);

void quantize_row_f32(const float* x, uint8_t* y, int64_t n) {
    std::memcpy(y, x, static_cast<size_t>(n) * sizeof(float));
}

void dequantize_row_f32(const uint8_t* x, float* y, int64_t n) {
    std::memcpy(y, x, static_cast<size_t>(n) * sizeof(float));
}

struct Kernels {
    QuantizeRow quantize;
    DequantizeRow dequantize;
};

Kernels kernels(GgmlType type) {
    switch (type) {
        case GgmlType::F32: return {quantize_row_f32, dequantize_row_f32};
        case GgmlType::F16: return {quantize_row_f16, dequantize_row_f16};
        case GgmlType::BF16: return {quantize_row_bf16, dequantize_row_bf16};
        case GgmlType::Q8_0: return {quantize_row_q8_0, dequantize_row_q8_0};
        case GgmlType::Q4_0: return {quantize_row_q4_0, dequantize_row_q4_0};
        case GgmlType::Q5_0: return {quantize_row_q5_0, dequantize_row_q5_0};
        case GgmlType::Q5_1: return {quantize_row_q5_1, dequantize_row_q5_1};
        case GgmlType::Q4_K: return {quantize_row_q4_k, dequantize_row_q4_k};
        case GgmlType::Q5_K: return {quantize_row_q5_k, dequantize_row_q5_k};
        case GgmlType::Q6_K: return {quantize_row_q6_k, dequantize_row_q6_k};
    }
    throw std::invalid_argument("unsupported ggml type id " + std::to_string(static_cast<uint32_t>(type)));
}

const TypeTraits& checked_traits(GgmlType type) {
    const TypeTraits* t = find_type(static_cast<uint32_t>(type));
    if (!t) throw std::invalid_argument("unsupported ggml type id " + std::to_string(static_cast<uint32_t>(type)));
    return *t;
}

// Rows per work item: about 1 MiB of floats, at least one row.
int64_t rows_per_chunk(int64_t ncols) { return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, ncols)); }

}  // namespace

size_t quantized_size(GgmlType type, int64_t nrows, int64_t ncols) {
    const TypeTraits& t = checked_traits(type);
    if (nrows < 0 || ncols < 0) throw std::invalid_argument("negative tensor shape");
    if (ncols % t.block_size != 0)
        throw std::invalid_argument(std::string(t.name) + " needs rows of a multiple of " +
                                    std::to_string(t.block_size) + " values, got " + std::to_string(ncols));
    return static_cast<size_t>(nrows) * static_cast<size_t>(ncols / t.block_size * t.type_size);
}

void quantize(GgmlType type, const float* src, int64_t nrows, int64_t ncols, uint8_t* dst, int nthreads) {
    const size_t row_bytes = quantized_size(type, 1, ncols);
    const QuantizeRow fn = kernels(type).quantize;
    parallel_for(nrows, rows_per_chunk(ncols), nthreads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* x = src + r * ncols;
            for (int64_t c = 0; c < ncols; ++c) {
                if (!std::isfinite(x[c]))
                    throw std::invalid_argument("non-finite value " + std::to_string(x[c]) + " at row " +
                                                std::to_string(r) + ", column " + std::to_string(c));
            }
            fn(x, dst + static_cast<size_t>(r) * row_bytes, ncols);
        }
    });
}

void dequantize(GgmlType type, const uint8_t* src, int64_t nrows, int64_t ncols, float* dst, int nthreads) {
    const size_t row_bytes = quantized_size(type, 1, ncols);
    const DequantizeRow fn = kernels(type).dequantize;
    parallel_for(nrows, rows_per_chunk(ncols), nthreads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) fn(src + static_cast<size_t>(r) * row_bytes, dst + r * ncols, ncols);
    });
}

}  // namespace ql
