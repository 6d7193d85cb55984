// GGUF v3 writer (see gguf_writer.h for the layout).
#include "gguf_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <system_error>

#include "quants.h"

namespace ql::gguf {
namespace {

constexpr uint32_t kVersion = 3;
constexpr size_t kMaxTensorName = 63;  // ggml keeps names in char[64], NUL included
constexpr uint32_t kDefaultAlignment = 32;

template <class T>
void append_le(std::string& out, T v) {
    for (size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<char>((static_cast<uint64_t>(v) >> (8 * i)) & 0xff));
}

void append_string(std::string& out, const std::string& s) {
    append_le<uint64_t>(out, s.size());
    out += s;
}

[[noreturn]] void throw_errno(const std::string& what) {
    throw std::system_error(errno, std::generic_category(), what);
}

std::string type_name(ValueType t) { return "GGUF type " + std::to_string(static_cast<uint32_t>(t)); }

std::string dirname_of(const std::string& path) {
    const size_t slash = path.find_last_of('/');
    if (slash == std::string::npos) return ".";
    return slash == 0 ? "/" : path.substr(0, slash);
}

std::string basename_of(const std::string& path) {
    const size_t slash = path.find_last_of('/');
    return slash == std::string::npos ? path : path.substr(slash + 1);
}

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

}  // namespace

size_t scalar_size(ValueType t) {
    switch (t) {
        case ValueType::U8: case ValueType::I8: case ValueType::BOOL: return 1;
        case ValueType::U16: case ValueType::I16: return 2;
        case ValueType::U32: case ValueType::I32: case ValueType::F32: return 4;
        case ValueType::U64: case ValueType::I64: case ValueType::F64: return 8;
        case ValueType::STRING: case ValueType::ARRAY: return 0;
    }
    throw std::invalid_argument("unknown GGUF value type " + std::to_string(static_cast<uint32_t>(t)));
}

Value Value::integer(ValueType t, int64_t v) {
    int64_t lo = 0;
    uint64_t hi = 0;
    switch (t) {
        case ValueType::U8: hi = 0xff; break;
        case ValueType::I8: lo = -128; hi = 127; break;
        case ValueType::U16: hi = 0xffff; break;
        case ValueType::I16: lo = -32768; hi = 32767; break;
        case ValueType::U32: hi = 0xffffffffu; break;
        case ValueType::I32: lo = std::numeric_limits<int32_t>::min(); hi = std::numeric_limits<int32_t>::max(); break;
        case ValueType::U64: hi = std::numeric_limits<uint64_t>::max(); break;
        case ValueType::I64: lo = std::numeric_limits<int64_t>::min(); hi = std::numeric_limits<int64_t>::max(); break;
        case ValueType::BOOL: hi = 1; break;
        default: throw std::invalid_argument("Value::integer: " + type_name(t) + " is not an integer type");
    }
    if (v < lo || (v >= 0 && static_cast<uint64_t>(v) > hi))
        throw std::invalid_argument("value " + std::to_string(v) + " out of range for " + type_name(t));
    Value out{t, {}};
    switch (scalar_size(t)) {
        case 1: append_le<uint8_t>(out.payload, static_cast<uint8_t>(v)); break;
        case 2: append_le<uint16_t>(out.payload, static_cast<uint16_t>(v)); break;
        case 4: append_le<uint32_t>(out.payload, static_cast<uint32_t>(v)); break;
        default: append_le<uint64_t>(out.payload, static_cast<uint64_t>(v)); break;
    }
    return out;
}

Value Value::floating(ValueType t, double v) {
    Value out{t, {}};
    if (t == ValueType::F32) {
        const float f = static_cast<float>(v);
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        append_le(out.payload, bits);
    } else if (t == ValueType::F64) {
        uint64_t bits;
        std::memcpy(&bits, &v, 8);
        append_le(out.payload, bits);
    } else {
        throw std::invalid_argument("Value::floating: " + type_name(t) + " is not F32/F64");
    }
    return out;
}

Value Value::string(const std::string& s) {
    Value out{ValueType::STRING, {}};
    append_string(out.payload, s);
    return out;
}

Value Value::array_raw(ValueType elem, const std::string& bytes) {
    const size_t size = scalar_size(elem);
    if (size == 0) throw std::invalid_argument("array_raw needs a fixed-size element type");
    if (bytes.size() % size != 0) throw std::invalid_argument("array bytes are not a whole number of elements");
    if (elem == ValueType::BOOL)
        for (char c : bytes)
            if (c != 0 && c != 1) throw std::invalid_argument("BOOL array elements must be 0 or 1");
    Value out{ValueType::ARRAY, {}};
    append_le<uint32_t>(out.payload, static_cast<uint32_t>(elem));
    append_le<uint64_t>(out.payload, bytes.size() / size);
    out.payload += bytes;
    return out;
}

Value Value::array_strings(const std::vector<std::string>& items) {
    Value out{ValueType::ARRAY, {}};
    append_le<uint32_t>(out.payload, static_cast<uint32_t>(ValueType::STRING));
    append_le<uint64_t>(out.payload, items.size());
    for (const auto& s : items) append_string(out.payload, s);
    return out;
}

Value Value::array_values(ValueType elem, const std::vector<Value>& items) {
    scalar_size(elem);  // validates the id
    Value out{ValueType::ARRAY, {}};
    append_le<uint32_t>(out.payload, static_cast<uint32_t>(elem));
    append_le<uint64_t>(out.payload, items.size());
    for (const auto& v : items) {
        if (v.type != elem)
            throw std::invalid_argument("array element of " + type_name(v.type) + " in an array of " + type_name(elem));
        out.payload += v.payload;
    }
    return out;
}

Writer::Writer(std::string path, uint32_t alignment) : path_(std::move(path)), alignment_(alignment) {
    if (path_.empty()) throw std::invalid_argument("GGUF output path is empty");
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0)
        throw std::invalid_argument("alignment must be a power of two, got " + std::to_string(alignment_));
}

Writer::~Writer() { abort(); }

void Writer::set_kv(const std::string& key, Value value) {
    if (state_ != State::Planning) throw std::logic_error("set_kv after begin()");
    if (key.empty() || key.size() > 65535) throw std::invalid_argument("GGUF keys must have 1 to 65535 bytes");
    for (unsigned char c : key)
        if (c < 0x20 || c > 0x7e) throw std::invalid_argument("GGUF key '" + key + "' must be printable ASCII");
    if (key == "general.alignment")
        throw std::invalid_argument("general.alignment is written from the writer's alignment argument");
    for (const auto& kv : kv_)
        if (kv.first == key) throw std::invalid_argument("duplicate GGUF key '" + key + "'");
    kv_.emplace_back(key, std::move(value));
}

size_t Writer::add_tensor(const std::string& name, const std::vector<uint64_t>& ne, GgmlType type) {
    if (state_ != State::Planning) throw std::logic_error("add_tensor after begin()");
    if (name.empty() || name.size() > kMaxTensorName)
        throw std::invalid_argument("tensor name '" + name + "' must have 1 to 63 bytes");
    for (const auto& t : tensors_)
        if (t.name == name) throw std::invalid_argument("duplicate tensor name '" + name + "'");
    if (ne.empty() || ne.size() > 4) throw std::invalid_argument("tensor '" + name + "' must have 1 to 4 dimensions");
    uint64_t rows = 1;
    for (size_t i = 0; i < ne.size(); ++i) {
        if (ne[i] == 0 || ne[i] > (uint64_t(1) << 40)) throw std::invalid_argument("tensor '" + name + "' has a bad dimension");
        if (i > 0) rows *= ne[i];
    }
    const uint64_t nbytes = quantized_size(type, static_cast<int64_t>(rows), static_cast<int64_t>(ne[0]));
    const uint64_t offset = align_up(data_bytes_, alignment_);
    tensors_.push_back({name, ne, type, nbytes, offset});
    data_bytes_ = offset + nbytes;
    return tensors_.size() - 1;
}

void Writer::write_all(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
        const ssize_t w = ::write(fd_, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            throw_errno("writing " + temp_path_);
        }
        p += w;
        n -= static_cast<size_t>(w);
        file_pos_ += static_cast<uint64_t>(w);
    }
}

void Writer::pad_to_alignment() {
    static const char zeros[256] = {};
    uint64_t pad = align_up(file_pos_, alignment_) - file_pos_;
    while (pad > 0) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(pad, sizeof zeros));
        write_all(zeros, n);
        pad -= n;
    }
}

void Writer::begin() {
    if (state_ != State::Planning) throw std::logic_error("begin() called twice");
    const std::string dir = dirname_of(path_);
    std::string templ = dir + "/." + basename_of(path_) + ".XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    fd_ = ::mkstemp(buf.data());
    if (fd_ < 0) throw_errno("creating a temporary file in " + dir);
    temp_path_ = buf.data();
    (void)::fchmod(fd_, 0644);  // mkstemp makes 0600; a model file is meant to be shared
    state_ = State::Writing;
    try {
        std::vector<std::pair<std::string, Value>> kvs = kv_;
        if (alignment_ != kDefaultAlignment)
            kvs.emplace_back("general.alignment", Value::integer(ValueType::U32, alignment_));
        std::string head = "GGUF";
        append_le<uint32_t>(head, kVersion);
        append_le<uint64_t>(head, tensors_.size());
        append_le<uint64_t>(head, kvs.size());
        for (const auto& [key, value] : kvs) {
            append_string(head, key);
            append_le<uint32_t>(head, static_cast<uint32_t>(value.type));
            head += value.payload;
        }
        for (const auto& t : tensors_) {
            append_string(head, t.name);
            append_le<uint32_t>(head, static_cast<uint32_t>(t.ne.size()));
            for (uint64_t d : t.ne) append_le<uint64_t>(head, d);
            append_le<uint32_t>(head, static_cast<uint32_t>(t.type));
            append_le<uint64_t>(head, t.offset);
        }
        write_all(head.data(), head.size());
        pad_to_alignment();
        data_offset_ = file_pos_;
        current_ = 0;
        current_written_ = 0;
    } catch (...) {
        abort();
        throw;
    }
}

void Writer::check_writing(size_t index) {
    if (state_ != State::Writing) throw std::logic_error("tensor data written outside begin()/finish()");
    if (index >= tensors_.size()) throw std::out_of_range("tensor index " + std::to_string(index) + " out of range");
    if (index != current_)
        throw std::logic_error("tensor '" + tensors_[index].name + "' written out of order; expected '" +
                               (current_ < tensors_.size() ? tensors_[current_].name : std::string("<none>")) + "'");
}

void Writer::write_tensor_bytes(size_t index, const void* data, size_t n) {
    check_writing(index);
    TensorInfo& t = tensors_[index];
    if (current_written_ + n > t.nbytes)
        throw std::invalid_argument("tensor '" + t.name + "' gets more than its " + std::to_string(t.nbytes) + " bytes");
    try {
        if (current_written_ == 0 && file_pos_ != data_offset_ + t.offset)
            throw std::logic_error("internal: tensor '" + t.name + "' not at its planned offset");
        write_all(data, n);
        current_written_ += n;
        if (current_written_ == t.nbytes) {
            pad_to_alignment();
            ++current_;
            current_written_ = 0;
        }
    } catch (...) {
        abort();
        throw;
    }
}

void Writer::write_tensor_f32(size_t index, const float* src, int64_t nrows, int64_t ncols, int nthreads) {
    check_writing(index);
    const TensorInfo& t = tensors_[index];
    uint64_t rows = 1;
    for (size_t i = 1; i < t.ne.size(); ++i) rows *= t.ne[i];
    if (static_cast<uint64_t>(ncols) != t.ne[0] || static_cast<uint64_t>(nrows) != rows || current_written_ != 0)
        throw std::invalid_argument("tensor '" + t.name + "': data of " + std::to_string(nrows) + " x " + std::to_string(ncols) +
                                    " does not match its declared shape");
    if (t.type == GgmlType::F32) {
        write_tensor_bytes(index, src, static_cast<size_t>(nrows * ncols) * sizeof(float));
        return;
    }
    // About 4M values per chunk: bounded buffer, enough rows to keep every thread busy.
    const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / ncols);
    std::vector<uint8_t> buf(quantized_size(t.type, std::min(chunk, nrows), ncols));
    for (int64_t r = 0; r < nrows; r += chunk) {
        const int64_t nr = std::min(chunk, nrows - r);
        try {
            quantize(t.type, src + r * ncols, nr, ncols, buf.data(), nthreads);
        } catch (const std::invalid_argument& e) {
            abort();
            throw std::invalid_argument("tensor '" + t.name + "': " + e.what() + " (rows offset " + std::to_string(r) + ")");
        }
        write_tensor_bytes(index, buf.data(), quantized_size(t.type, nr, ncols));
    }
}

void Writer::finish() {
    if (state_ != State::Writing) throw std::logic_error("finish() without begin()");
    if (current_ != tensors_.size()) {
        const std::string missing = tensors_[current_].name;
        abort();
        throw std::logic_error("finish() before all tensor data was written (missing '" + missing + "')");
    }
    try {
        if (::fsync(fd_) != 0) throw_errno("fsync " + temp_path_);
        const int fd = fd_;
        fd_ = -1;
        if (::close(fd) != 0) throw_errno("close " + temp_path_);
        if (::rename(temp_path_.c_str(), path_.c_str()) != 0) throw_errno("renaming onto " + path_);
    } catch (...) {
        abort();
        throw;
    }
    state_ = State::Finished;
    // Persist the rename itself; failure here cannot corrupt the file, so it is not an error.
    const int dfd = ::open(dirname_of(path_).c_str(), O_RDONLY | O_DIRECTORY);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

void Writer::abort() noexcept {
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
    if (state_ == State::Writing && !temp_path_.empty()) ::unlink(temp_path_.c_str());
    if (state_ != State::Finished) state_ = State::Aborted;
}

}  // namespace ql::gguf
