"""GGUF v3 files through the C++ writer: typed metadata, tensors declared up front, data streamed.

    with GGUFWriter("model.gguf") as w:
        w.add_string("general.architecture", "llama")
        w.add_uint32("llama.block_count", 16)
        i = w.add_tensor("token_embd.weight", (vocab, hidden), GGMLType.Q6_K)
        w.begin()                      # header, metadata and tensor infos are written here
        w.write_tensor(i, embedding)   # float data, quantized in C++ chunk by chunk
    # leaving the block renames the finished temporary file onto model.gguf; an exception deletes it

Shapes are given in PyTorch order ([out, in]); the file stores them reversed (ggml's ne[0] is the
contiguous dimension).
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from quickloris import _native
from quickloris.export.quants import GGMLType


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "<u1",
}


def _encode(vtype: GGUFValueType, value: Any, elem: GGUFValueType | None) -> Any:
    """Python value -> what the native writer takes (arrays become (elem_type, bytes | list))."""
    if vtype != GGUFValueType.ARRAY:
        return value
    if elem is None:
        raise TypeError("an ARRAY value needs elem_type")
    if elem in _NUMPY_DTYPES:
        arr = np.asarray(value)
        if elem == GGUFValueType.BOOL and arr.dtype != np.bool_:
            raise TypeError("a BOOL array must hold bools")
        if arr.dtype.kind in "iub" and elem in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            arr = arr.astype(np.float64)
        target = np.dtype(_NUMPY_DTYPES[elem])
        if arr.dtype.kind in "iu" and arr.size:
            info = np.iinfo(target) if target.kind in "iu" else None
            if info is not None and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"array values out of range for {elem.name}")
        return (int(elem), np.ascontiguousarray(arr, dtype=target).tobytes())
    if elem == GGUFValueType.STRING:
        return (int(elem), list(value))
    # Arrays of arrays: each item is (elem_type, items).
    return (int(elem), [_encode(GGUFValueType.ARRAY, items, GGUFValueType(sub)) for sub, items in value])


class GGUFWriter:
    """Writes one GGUF file atomically (temporary sibling + fsync + rename).

    `overwrite=False`: the finished file is put in place only if nothing exists under `path` at that moment
    (a hard link, which fails instead of replacing), so a file that appeared during the export is kept and
    FileExistsError raised; the finished data is then deleted.
    """

    def __init__(
        self, path: str | os.PathLike, *, alignment: int = 32, threads: int = 0, overwrite: bool = True
    ) -> None:
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment!r}")
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"output folder {parent!r} does not exist")
        self.threads = threads or (os.cpu_count() or 1)
        self.overwrite = overwrite
        target = os.path.abspath(self.path)
        if not overwrite:  # the native writer renames onto a private name; `finish` links that to `path`
            target = os.path.join(parent, f".{os.path.basename(self.path)}.{os.getpid()}-{secrets.token_hex(4)}.done")
        self._target = target
        self._native = _native.GGUFWriter(target, alignment)
        self._shapes: list[tuple[int, ...]] = []
        self._types: list[GGMLType] = []
        self.keys: list[str] = []

    # -- metadata -----------------------------------------------------------------------------
    def add(
        self, key: str, vtype: GGUFValueType | int, value: Any, elem_type: GGUFValueType | int | None = None
    ) -> None:
        """Add metadata `key` with an explicit GGUF type (arrays: `elem_type` and a sequence)."""
        vtype = GGUFValueType(vtype)
        elem = GGUFValueType(elem_type) if elem_type is not None else None
        self._native.set_kv(key, int(vtype), _encode(vtype, value, elem))
        self.keys.append(key)

    def add_string(self, key: str, value: str) -> None:
        self.add(key, GGUFValueType.STRING, value)

    def add_uint32(self, key: str, value: int) -> None:
        self.add(key, GGUFValueType.UINT32, int(value))

    def add_int32(self, key: str, value: int) -> None:
        self.add(key, GGUFValueType.INT32, int(value))

    def add_float32(self, key: str, value: float) -> None:
        self.add(key, GGUFValueType.FLOAT32, float(value))

    def add_bool(self, key: str, value: bool) -> None:
        self.add(key, GGUFValueType.BOOL, bool(value))

    def add_array(self, key: str, values: Sequence[Any] | np.ndarray, elem_type: GGUFValueType | int) -> None:
        self.add(key, GGUFValueType.ARRAY, values, elem_type)

    # -- tensors ------------------------------------------------------------------------------
    def add_tensor(self, name: str, shape: Sequence[int], qtype: GGMLType | int) -> int:
        """Declare a tensor (PyTorch-order `shape`); returns the index to write its data with."""
        shape = tuple(int(s) for s in shape)
        qtype = GGMLType(qtype)
        index = self._native.add_tensor(name, list(reversed(shape)), int(qtype))
        self._shapes.append(shape)
        self._types.append(qtype)
        return index

    def begin(self) -> None:
        """Create the temporary file and write header, metadata and tensor infos."""
        self._native.begin()

    def write_tensor(self, index: int, values: Any) -> None:
        """Quantize float `values` (numpy or CPU torch tensor of the declared shape) and append them."""
        shape = self._shapes[index]
        if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
            values = values.detach().to("cpu").float().contiguous().numpy()
        arr = np.ascontiguousarray(values, dtype=np.float32)
        if tuple(arr.shape) != shape:
            raise ValueError(f"tensor {index} has shape {shape}, got data of shape {tuple(arr.shape)}")
        self._native.write_tensor_f32(index, arr.reshape(-1, shape[-1]), self.threads)

    def write_tensor_bytes(self, index: int, data: bytes | np.ndarray) -> None:
        """Append already-encoded bytes of tensor `index` (may be called in pieces)."""
        if isinstance(data, bytes):
            raw = np.frombuffer(data, dtype=np.uint8)
        else:
            raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        self._native.write_tensor_bytes(index, raw)

    def finish(self) -> None:
        self._native.finish()
        if self.overwrite:
            return
        try:
            try:
                os.link(self._target, self.path)
            except FileExistsError:
                raise FileExistsError(
                    f"{self.path} appeared while it was being written; it was left as it is and nothing was written"
                ) from None
            except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
                if os.path.lexists(self.path):
                    raise FileExistsError(
                        f"{self.path} appeared while it was being written; it was left as it is and nothing was written"
                    ) from None
                os.rename(self._target, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._target)

    def abort(self) -> None:
        self._native.abort()

    @property
    def temp_path(self) -> str:
        return self._native.temp_path

    @property
    def tensor_offsets(self) -> list[tuple[str, int, int]]:
        """(name, offset in the data section, bytes) per tensor."""
        return list(self._native.tensor_offsets)

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
