"""llama.cpp's own quantizer, reached through the ggml library bundled with llama-cpp-python.

Used only to compare against (tests, `benchmarks/gguf_quantize.py`): `ggml_quantize_chunk` is the
function `llama-quantize` runs for every tensor (without an importance matrix it calls ggml's
reference quantizers, which `quickloris._native` reproduces byte for byte).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np


class GGMLReference:
    """ctypes handle on libggml-base's `ggml_quantize_chunk` / `ggml_row_size`."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.lib = lib

    def row_bytes(self, type_id: int, ncols: int) -> int:
        return int(self.lib.ggml_row_size(int(type_id), ncols))

    def quantize_into(
        self, x: np.ndarray, type_id: int, out: np.ndarray, row0: int = 0, nrows: int | None = None
    ) -> None:
        """Quantize rows [row0, row0 + nrows) of contiguous float32 `x` [rows, cols] into `out` (same rows).

        ctypes releases the GIL during the call, so several Python threads can work on disjoint rows.
        """
        rows, cols = x.shape
        nrows = rows - row0 if nrows is None else nrows
        self.lib.ggml_quantize_chunk(int(type_id), x.ctypes.data, out.ctypes.data, row0 * cols, nrows, cols, None)

    def quantize(self, x: np.ndarray, type_id: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], self.row_bytes(type_id, x.shape[1])), np.uint8)
        self.quantize_into(x, type_id, out)
        return out


def load() -> GGMLReference | None:
    """The bundled ggml of llama-cpp-python, or None where that package (or its library) is missing."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - any import failure means "not reachable here"
        return None
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    return GGMLReference(path) if os.path.exists(path) else None
