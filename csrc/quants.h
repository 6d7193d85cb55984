// Quantizers producing llama.cpp's block layouts, and their dequantizers.
//
// Every function works on a whole number of blocks of one row (`n` values, `n % block_size == 0`)
// and reproduces ggml's reference ("_ref") quantizers operation for operation, so the bytes are
// identical (the core is built with -ffp-contract=off: no fused multiply-add may change a rounding).
//
// Block layouts (little-endian; d, m, dmin are fp16):
//   Q8_0 (32 values, 34 B): d, int8 q[32]                     x = d * q
//   Q4_0 (32, 18 B):        d, 4-bit q[32]                     x = d * (q - 8)
//   Q5_0 (32, 22 B):        d, high bits qh[4], low nibbles    x = d * (q - 16)
//   Q5_1 (32, 24 B):        d, m, qh[4], low nibbles           x = d * q + m
//   Q4_K (256, 144 B):      d, dmin, 8 x (6-bit scale, 6-bit min) in 12 B, 4-bit q[256]
//                           x = (d * sc_j) * q - (dmin * m_j)  for sub-block j of 32
//   Q5_K (256, 176 B):      as Q4_K plus a 5th bit per value in qh[32]
//   Q6_K (256, 210 B):      low nibbles ql[128], high 2 bits qh[64], int8 scales[16], d
//                           x = (d * scale_j) * (q - 32)      for sub-block j of 16
#pragma once

#include <cstddef>
#include <cstdint>

#include "ggml_types.h"

namespace ql {

void quantize_row_f16(const float* x, uint8_t* y, int64_t n);
void quantize_row_bf16(const float* x, uint8_t* y, int64_t n);
void quantize_row_q8_0(const float* x, uint8_t* y, int64_t n);
void quantize_row_q4_0(const float* x, uint8_t* y, int64_t n);
void quantize_row_q5_0(const float* x, uint8_t* y, int64_t n);
void quantize_row_q5_1(const float* x, uint8_t* y, int64_t n);
void quantize_row_q4_k(const float* x, uint8_t* y, int64_t n);
void quantize_row_q5_k(const float* x, uint8_t* y, int64_t n);
void quantize_row_q6_k(const float* x, uint8_t* y, int64_t n);

void dequantize_row_f16(const uint8_t* x, float* y, int64_t n);
void dequantize_row_bf16(const uint8_t* x, float* y, int64_t n);
void dequantize_row_q8_0(const uint8_t* x, float* y, int64_t n);
void dequantize_row_q4_0(const uint8_t* x, float* y, int64_t n);
void dequantize_row_q5_0(const uint8_t* x, float* y, int64_t n);
void dequantize_row_q5_1(const uint8_t* x, float* y, int64_t n);
void dequantize_row_q4_k(const uint8_t* x, float* y, int64_t n);
void dequantize_row_q5_k(const uint8_t* x, float* y, int64_t n);
void dequantize_row_q6_k(const uint8_t* x, float* y, int64_t n);

// Instruction set of the K-quant kernels in use: "avx2" or "generic".
const char* kquant_isa();

// Bytes of `nrows` rows of `ncols` values; throws std::invalid_argument if ncols is not a
// multiple of the block size.
size_t quantized_size(GgmlType type, int64_t nrows, int64_t ncols);

// Quantizes `nrows` x `ncols` row-major floats into `dst` (quantized_size bytes) on `nthreads`
// threads (rows are independent, so the bytes do not depend on the thread count).
// Throws std::invalid_argument naming the first non-finite value: ggml would store garbage.
void quantize(GgmlType type, const float* src, int64_t nrows, int64_t ncols, uint8_t* dst,
              int nthreads);

// Inverse of `quantize` for `nrows` x `ncols` values.
void dequantize(GgmlType type, const uint8_t* src, int64_t nrows, int64_t ncols, float* dst,
                int nthreads);

}  // namespace ql
