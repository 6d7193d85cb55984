// The ggml tensor types quickloris writes, with their block geometry.
//
// Ids, block sizes and byte sizes are those of ggml's `enum ggml_type` (GGUF stores the id);
// a row of `ncols` values takes `ncols / block_size * type_size` bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ql {

enum class GgmlType : uint32_t {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    BF16 = 30,
};

struct TypeTraits {
    GgmlType type;
    const char* name;
    int64_t block_size;  // values per block
    int64_t type_size;   // bytes per block
};

constexpr int64_t QK_K = 256;  // super-block of the K-quants

inline constexpr TypeTraits kTypes[] = {
    {GgmlType::F32, "F32", 1, 4},        {GgmlType::F16, "F16", 1, 2},
    {GgmlType::BF16, "BF16", 1, 2},      {GgmlType::Q8_0, "Q8_0", 32, 34},
    {GgmlType::Q4_0, "Q4_0", 32, 18},    {GgmlType::Q5_0, "Q5_0", 32, 22},
    {GgmlType::Q5_1, "Q5_1", 32, 24},    {GgmlType::Q4_K, "Q4_K", QK_K, 144},
    {GgmlType::Q5_K, "Q5_K", QK_K, 176}, {GgmlType::Q6_K, "Q6_K", QK_K, 210},
};

// nullptr when `id` is not a type quickloris supports.
inline const TypeTraits* find_type(uint32_t id) {
    for (const auto& t : kTypes)
        if (static_cast<uint32_t>(t.type) == id) return &t;
    return nullptr;
}

inline const TypeTraits& traits(GgmlType t) { return *find_type(static_cast<uint32_t>(t)); }

}  // namespace ql
