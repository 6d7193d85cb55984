// A GGUF v3 writer: typed metadata, tensor infos, aligned and streamed tensor data, written to a
// temporary sibling file that is fsync'ed and renamed onto the target only when complete.
//
// File layout (little-endian):
//   "GGUF", u32 version = 3, u64 n_tensors, u64 n_kv,
//   n_kv x { string key, u32 value_type, value },
//   n_tensors x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset },
//   zero padding to `alignment`, then each tensor's data at data_start + offset, each offset a
//   multiple of `alignment` (tensors are zero-padded in between).
// string = u64 byte length + bytes (no terminator); array = u32 element type, u64 count, elements.
// ne[0] is the innermost (contiguous) dimension: a PyTorch [out, in] weight has ne = {in, out}.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ggml_types.h"

namespace ql::gguf {

enum class ValueType : uint32_t {
    U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};

// Byte size of a fixed-size value type, 0 for STRING and ARRAY; throws for unknown ids.
size_t scalar_size(ValueType t);

// A metadata value, already encoded as the GGUF bytes that follow its type id.
struct Value {
    ValueType type;
    std::string payload;

    static Value integer(ValueType t, int64_t v);     // U8..I64, BOOL (range-checked)
    static Value floating(ValueType t, double v);     // F32, F64
    static Value string(const std::string& s);
    // An array of fixed-size elements given as their raw little-endian bytes.
    static Value array_raw(ValueType elem, const std::string& bytes);
    static Value array_strings(const std::vector<std::string>& items);
    // An array whose elements are all `elem` (used for arrays of arrays).
    static Value array_values(ValueType elem, const std::vector<Value>& items);
};

struct TensorInfo {
    std::string name;
    std::vector<uint64_t> ne;
    GgmlType type;
    uint64_t nbytes;
    uint64_t offset;  // relative to the start of the data section
};

class Writer {
public:
    explicit Writer(std::string path, uint32_t alignment = 32);
    ~Writer();  // removes the temporary file unless finish() succeeded
    Writer(const Writer&) = delete;
    Writer& operator=(const Writer&) = delete;

    void set_kv(const std::string& key, Value value);
    // Declares a tensor; returns its index. Data is written later in declaration order.
    size_t add_tensor(const std::string& name, const std::vector<uint64_t>& ne, GgmlType type);

    // Creates the temporary file and writes header, metadata and tensor infos.
    void begin();
    // Appends `n` bytes of tensor `index`'s data (a tensor may come in several pieces). Tensors
    // must be completed in declaration order.
    void write_tensor_bytes(size_t index, const void* data, size_t n);
    // Quantizes `nrows` x `ncols` floats to the tensor's type chunk by chunk (bounded memory) and
    // appends them.
    void write_tensor_f32(size_t index, const float* src, int64_t nrows, int64_t ncols, int nthreads);
    // Checks that every tensor is complete, fsyncs, renames onto the target and syncs the folder.
    void finish();
    // Closes and deletes the temporary file (no-op after finish()).
    void abort() noexcept;

    const std::string& path() const { return path_; }
    const std::string& temp_path() const { return temp_path_; }
    uint64_t data_offset() const { return data_offset_; }
    const std::vector<TensorInfo>& tensors() const { return tensors_; }

private:
    void write_all(const void* data, size_t n);
    void pad_to_alignment();
    void check_writing(size_t index);

    std::string path_;
    std::string temp_path_;
    uint32_t alignment_;
    std::vector<std::pair<std::string, Value>> kv_;
    std::vector<TensorInfo> tensors_;
    uint64_t data_bytes_ = 0;   // planned size of the data section
    uint64_t data_offset_ = 0;  // file offset of the data section
    uint64_t file_pos_ = 0;
    size_t current_ = 0;        // tensor being written
    uint64_t current_written_ = 0;
    int fd_ = -1;
    enum class State { Planning, Writing, Finished, Aborted } state_ = State::Planning;
};

}  // namespace ql::gguf
