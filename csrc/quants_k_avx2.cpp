// K-quant quantizers for CPUs with AVX2 (8 lanes); CMake compiles this file with -mavx2 on x86-64
// and leaves it out elsewhere. Chosen at run time by quants_k.cpp.
#define QL_KQ_WIDTH 8
#define QL_KQ_SUFFIX avx2
#include "kquants_impl.h"
