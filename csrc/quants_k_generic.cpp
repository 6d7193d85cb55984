// K-quant quantizers for any CPU (4 lanes: SSE2 on x86-64, NEON on arm64).
#define QL_KQ_WIDTH 4
#define QL_KQ_SUFFIX generic
#include "kquants_impl.h"
