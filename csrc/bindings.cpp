// The only file that knows about Python: exposes the torch-free C++ core of quickloris.
#include <nanobind/nanobind.h>

namespace nb = nanobind;

NB_MODULE(_native, m) {
    m.doc() = "quickloris native core (C++17)";
    m.attr("ABI_VERSION") = 1;
}
