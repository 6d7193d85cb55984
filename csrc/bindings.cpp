// The only file that knows about Python: exposes the torch-free C++ core of quickloris.
//
// Arrays cross as numpy buffers (no copies in); the GIL is released while quantizing or writing.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <system_error>
#include <thread>

#include "gguf_writer.h"
#include "quants.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using ql::GgmlType;
using ql::gguf::Value;
using ql::gguf::ValueType;

GgmlType checked_type(uint32_t id) {
    if (!ql::find_type(id)) throw std::invalid_argument("unsupported ggml type id " + std::to_string(id));
    return static_cast<GgmlType>(id);
}

int checked_threads(int n) {
    if (n < 0) throw std::invalid_argument("threads must be >= 0 (0 = all cores), got " + std::to_string(n));
    return n == 0 ? static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) : n;
}

std::string as_bytes(nb::handle obj, const char* what) {
    if (nb::isinstance<nb::bytes>(obj)) {
        nb::bytes b = nb::borrow<nb::bytes>(obj);
        return std::string(b.c_str(), b.size());
    }
    if (nb::isinstance<nb::str>(obj)) return nb::cast<std::string>(obj);
    throw nb::type_error((std::string(what) + " must be str or bytes").c_str());
}

// Python value -> GGUF value of type `vtype`. Arrays are given as (element_type, items) where
// items is bytes (raw little-endian elements) or a sequence (of str/bytes, numbers or nested
// (element_type, items) arrays).
Value make_value(uint32_t vtype, nb::handle obj) {
    const auto t = static_cast<ValueType>(vtype);
    ql::gguf::scalar_size(t);  // rejects unknown ids
    try {
        switch (t) {
            case ValueType::BOOL:
                if (!nb::isinstance<nb::bool_>(obj)) throw nb::type_error("a BOOL value must be a bool");
                return Value::integer(t, nb::cast<bool>(obj) ? 1 : 0);
            case ValueType::U64: {
                const uint64_t v = nb::cast<uint64_t>(obj);
                Value out = Value::integer(ValueType::U64, 0);
                for (int i = 0; i < 8; ++i) out.payload[i] = static_cast<char>((v >> (8 * i)) & 0xff);
                return out;
            }
            case ValueType::F32: case ValueType::F64:
                return Value::floating(t, nb::cast<double>(obj));
            case ValueType::STRING:
                return Value::string(as_bytes(obj, "a STRING value"));
            case ValueType::ARRAY: {
                if (!nb::isinstance<nb::tuple>(obj) || nb::len(obj) != 2)
                    throw nb::type_error("an ARRAY value must be a tuple (element_type, items)");
                const uint32_t elem = nb::cast<uint32_t>(obj[0]);
                nb::handle items = obj[1];
                const auto et = static_cast<ValueType>(elem);
                if (nb::isinstance<nb::bytes>(items)) return Value::array_raw(et, as_bytes(items, "items"));
                if (et == ValueType::STRING) {
                    std::vector<std::string> strings;
                    strings.reserve(nb::len(items));
                    for (nb::handle it : items) strings.push_back(as_bytes(it, "a STRING array element"));
                    return Value::array_strings(strings);
                }
                std::vector<Value> values;
                for (nb::handle it : items) values.push_back(make_value(elem, it));
                return Value::array_values(et, values);
            }
            default:
                if (nb::isinstance<nb::bool_>(obj) || !nb::isinstance<nb::int_>(obj))
                    throw nb::type_error("an integer GGUF value must be an int");
                return Value::integer(t, nb::cast<int64_t>(obj));
        }
    } catch (const nb::cast_error&) {
        throw std::invalid_argument("value does not fit GGUF type " + std::to_string(vtype));
    }
}

template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<2>> new_array(size_t rows, size_t cols, T** data) {
    T* buf = new T[rows * cols];
    nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<T*>(p); });
    *data = buf;
    return nb::ndarray<nb::numpy, T, nb::ndim<2>>(buf, {rows, cols}, owner);
}

using F32Matrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using U8Matrix = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using U8Any = nb::ndarray<const uint8_t, nb::c_contig, nb::device::cpu>;

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "quickloris native core (C++17): GGUF writer and ggml quantizers";
    m.attr("ABI_VERSION") = 2;

    nb::register_exception_translator([](const std::exception_ptr& p, void*) {
        try {
            std::rethrow_exception(p);
        } catch (const std::system_error& e) {
            nb::object err = nb::steal(PyObject_CallFunction(PyExc_OSError, "is", e.code().value(), e.what()));
            PyErr_SetObject(PyExc_OSError, err.ptr());
        }
    });

    nb::dict types;
    for (const auto& t : ql::kTypes)
        types[t.name] = nb::make_tuple(static_cast<uint32_t>(t.type), t.block_size, t.type_size);
    m.attr("GGML_TYPES") = types;
    m.def("kquant_isa", &ql::kquant_isa, "Instruction set of the K-quant kernels in use (avx2 or generic).");

    m.def(
        "quantize",
        [](F32Matrix src, uint32_t type, int threads) {
            const GgmlType t = checked_type(type);
            const int64_t rows = static_cast<int64_t>(src.shape(0)), cols = static_cast<int64_t>(src.shape(1));
            const size_t row_bytes = ql::quantized_size(t, 1, cols);
            uint8_t* out;
            auto result = new_array<uint8_t>(static_cast<size_t>(rows), row_bytes, &out);
            const int n = checked_threads(threads);
            nb::gil_scoped_release release;
            ql::quantize(t, src.data(), rows, cols, out, n);
            return result;
        },
        "src"_a, "type"_a, "threads"_a = 0,
        "Quantize a C-contiguous float32 [rows, cols] array to ggml type id `type`; returns uint8 [rows, row_bytes].");

    m.def(
        "dequantize",
        [](U8Matrix data, uint32_t type, int64_t cols, int threads) {
            const GgmlType t = checked_type(type);
            const int64_t rows = static_cast<int64_t>(data.shape(0));
            if (data.shape(1) != ql::quantized_size(t, 1, cols))
                throw std::invalid_argument("rows of " + std::to_string(data.shape(1)) + " bytes do not hold " +
                                            std::to_string(cols) + " values of this type");
            float* out;
            auto result = new_array<float>(static_cast<size_t>(rows), static_cast<size_t>(cols), &out);
            const int n = checked_threads(threads);
            nb::gil_scoped_release release;
            ql::dequantize(t, data.data(), rows, cols, out, n);
            return result;
        },
        "data"_a, "type"_a, "cols"_a, "threads"_a = 0,
        "Dequantize uint8 [rows, row_bytes] of ggml type id `type` to float32 [rows, cols].");

    using ql::gguf::Writer;
    nb::class_<Writer>(m, "GGUFWriter", "Low-level GGUF v3 writer (use quickloris.export.writer.GGUFWriter).")
        .def(nb::init<std::string, uint32_t>(), "path"_a, "alignment"_a = 32)
        .def("set_kv", [](Writer& w, const std::string& key, uint32_t vtype, nb::handle value) {
            w.set_kv(key, make_value(vtype, value));
        }, "key"_a, "value_type"_a, "value"_a)
        .def("add_tensor", [](Writer& w, const std::string& name, const std::vector<uint64_t>& ne, uint32_t type) {
            return w.add_tensor(name, ne, checked_type(type));
        }, "name"_a, "ne"_a, "type"_a)
        .def("begin", [](Writer& w) {
            nb::gil_scoped_release release;
            w.begin();
        })
        .def("write_tensor_bytes", [](Writer& w, size_t index, U8Any data) {
            nb::gil_scoped_release release;
            w.write_tensor_bytes(index, data.data(), data.size());
        }, "index"_a, "data"_a)
        .def("write_tensor_f32", [](Writer& w, size_t index, F32Matrix src, int threads) {
            const int n = checked_threads(threads);
            nb::gil_scoped_release release;
            w.write_tensor_f32(index, src.data(), static_cast<int64_t>(src.shape(0)), static_cast<int64_t>(src.shape(1)), n);
        }, "index"_a, "src"_a, "threads"_a = 0)
        .def("finish", [](Writer& w) {
            nb::gil_scoped_release release;
            w.finish();
        })
        .def("abort", &Writer::abort)
        .def_prop_ro("path", &Writer::path)
        .def_prop_ro("temp_path", &Writer::temp_path)
        .def_prop_ro("data_offset", &Writer::data_offset)
        .def_prop_ro("tensor_offsets", [](const Writer& w) {
            nb::list out;
            for (const auto& t : w.tensors()) out.append(nb::make_tuple(t.name, t.offset, t.nbytes));
            return out;
        });
}
