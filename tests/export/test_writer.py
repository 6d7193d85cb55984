"""The GGUF writer against the `gguf` package's reader: every value type, tensor infos, alignment,
streamed data, and atomicity (a failed write leaves no file, or the previous one, under the name)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest

from quickloris.export.quants import GGMLType, dequantize, quantize
from quickloris.export.writer import GGUFValueType as V
from quickloris.export.writer import GGUFWriter


def field_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_every_value_type_round_trips(tmp_path, seed):
    rng = np.random.default_rng(seed)
    scalars = {
        V.UINT8: 255,
        V.INT8: -128,
        V.UINT16: 65535,
        V.INT16: -32768,
        V.UINT32: 2**32 - 1,
        V.INT32: -(2**31),
        V.UINT64: 2**64 - 1,
        V.INT64: -(2**63),
        V.FLOAT32: 0.1,
        V.FLOAT64: 1e300,
        V.BOOL: True,
    }
    path = tmp_path / "kv.gguf"
    ints = {
        t: rng.integers(np.iinfo(d).min, np.iinfo(d).max, 7, dtype=d, endpoint=True)
        for t, d in [
            (V.UINT8, np.uint8),
            (V.INT8, np.int8),
            (V.UINT16, np.uint16),
            (V.INT16, np.int16),
            (V.UINT32, np.uint32),
            (V.INT32, np.int32),
            (V.UINT64, np.uint64),
            (V.INT64, np.int64),
        ]
    }
    floats = {V.FLOAT32: rng.standard_normal(5).astype(np.float32), V.FLOAT64: rng.standard_normal(5)}
    strings = ["", "plain", "ünïcødé 日本語", "Ġhello", "a b\nc\x00d"]
    with GGUFWriter(path) as w:
        for t, v in scalars.items():
            w.add(f"scalar.{t.name.lower()}", t, v)
        w.add_string("scalar.string", "héllo wörld")
        for t, arr in {**ints, **floats}.items():
            w.add_array(f"array.{t.name.lower()}", arr, t)
        w.add_array("array.bool", np.array([True, False, True]), V.BOOL)
        w.add_array("array.string", strings, V.STRING)
        w.add_array("array.empty", [], V.INT32)
        w.add_array("array.nested", [(V.INT32, [1, 2, 3]), (V.INT32, [4])], V.ARRAY)
        w.begin()
    r = gguf.GGUFReader(path)
    assert field_value(r, "GGUF.version") == 3
    for t, v in scalars.items():
        f = r.fields[f"scalar.{t.name.lower()}"]
        assert f.types == [gguf.GGUFValueType(int(t))]
        assert f.contents() == (pytest.approx(v, rel=1e-7) if t == V.FLOAT32 else v)
    assert field_value(r, "scalar.string") == "héllo wörld"
    for t, arr in {**ints, **floats}.items():
        f = r.fields[f"array.{t.name.lower()}"]
        assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(int(t))]
        np.testing.assert_array_equal(np.array(f.contents(), dtype=arr.dtype), arr)
    assert field_value(r, "array.bool") == [True, False, True]
    assert field_value(r, "array.string") == strings
    assert field_value(r, "array.empty") == []
    nested = r.fields["array.nested"]
    assert nested.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert [int(nested.parts[i][0]) for i in nested.data] == [1, 2, 3, 4]


@pytest.mark.parametrize("alignment", [32, 64])
def test_tensors_round_trip_with_alignment(tmp_path, seed, alignment):
    rng = np.random.default_rng(seed)
    specs = [
        ("a.weight", (3, 64), GGMLType.Q8_0),
        ("b.weight", (5,), GGMLType.F32),
        ("c.weight", (2, 7, 256), GGMLType.Q4_K),
        ("d.weight", (9, 33), GGMLType.F16),
        ("e.weight", (4, 96), GGMLType.BF16),
        ("f.weight", (2, 256), GGMLType.Q6_K),
    ]
    data = {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in specs}
    path = tmp_path / "t.gguf"
    with GGUFWriter(path, alignment=alignment, threads=2) as w:
        w.add_string("general.architecture", "test")
        idx = [w.add_tensor(name, shape, t) for name, shape, t in specs]
        w.begin()
        for i, (name, _, t) in zip(idx, specs):
            if t == GGMLType.Q4_K:  # also exercise writing pre-encoded bytes in pieces
                raw = quantize(data[name], t).reshape(-1)
                w.write_tensor_bytes(i, raw[:100].tobytes())
                w.write_tensor_bytes(i, raw[100:])
            else:
                w.write_tensor(i, data[name])
    r = gguf.GGUFReader(path)
    assert r.alignment == alignment
    if alignment != 32:
        assert field_value(r, "general.alignment") == alignment
    assert [t.name for t in r.tensors] == [s[0] for s in specs]
    for t, (name, shape, qtype) in zip(r.tensors, specs):
        assert t.tensor_type == gguf.GGMLQuantizationType(int(qtype))
        assert tuple(int(s) for s in t.shape) == tuple(reversed(shape))  # GGUF stores ne (innermost first)
        assert t.data_offset % alignment == 0
        raw = np.asarray(t.data)
        if qtype == GGMLType.F32:
            np.testing.assert_array_equal(raw.reshape(shape), data[name])
        else:
            ours = dequantize(raw.view(np.uint8), qtype, shape)
            np.testing.assert_array_equal(ours, dequantize(quantize(data[name], qtype), qtype, shape))
    assert os.path.getsize(path) % alignment == 0
    assert sorted(os.listdir(tmp_path)) == ["t.gguf"]


def test_bad_input_is_rejected(tmp_path):
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_uint32("a.b", 1)
    with pytest.raises(ValueError, match="duplicate GGUF key 'a.b'"):
        w.add_uint32("a.b", 2)
    with pytest.raises(ValueError, match="out of range"):
        w.add("a.c", V.UINT8, 256)
    with pytest.raises(TypeError, match="BOOL"):
        w.add("a.d", V.BOOL, 1)
    with pytest.raises(ValueError, match="general.alignment"):
        w.add_uint32("general.alignment", 64)
    with pytest.raises(ValueError, match="printable ASCII"):
        w.add_uint32("ké", 1)
    with pytest.raises(ValueError, match="1 to 63 bytes"):
        w.add_tensor("x" * 64, (32,), GGMLType.F32)
    w.add_tensor("t", (2, 32), GGMLType.Q8_0)
    with pytest.raises(ValueError, match="duplicate tensor name 't'"):
        w.add_tensor("t", (2, 32), GGMLType.Q8_0)
    with pytest.raises(ValueError, match="Q4_K needs rows of a multiple of 256"):
        w.add_tensor("u", (2, 32), GGMLType.Q4_K)
    with pytest.raises(ValueError, match="power of two"):
        GGUFWriter(tmp_path / "y.gguf", alignment=48)
    with pytest.raises(FileNotFoundError):
        GGUFWriter(tmp_path / "missing" / "z.gguf")


def test_out_of_order_or_incomplete_data_leaves_no_file(tmp_path):
    path = tmp_path / "x.gguf"
    w = GGUFWriter(path)
    a = w.add_tensor("a", (32,), GGMLType.F32)
    b = w.add_tensor("b", (32,), GGMLType.F32)
    w.begin()
    assert os.path.exists(w.temp_path)
    with pytest.raises(RuntimeError, match="written out of order; expected 'a'"):
        w.write_tensor(b, np.zeros(32))
    with pytest.raises(ValueError, match="shape"):
        w.write_tensor(a, np.zeros(31))
    w.write_tensor(a, np.zeros(32))
    with pytest.raises(RuntimeError, match="missing 'b'"):
        w.finish()
    assert os.listdir(tmp_path) == []


def test_exception_mid_write_keeps_previous_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"previous contents")
    with pytest.raises(ZeroDivisionError):
        with GGUFWriter(path) as w:
            i = w.add_tensor("a", (4, 32), GGMLType.Q8_0)
            w.begin()
            w.write_tensor_bytes(i, b"\0" * 34)
            raise ZeroDivisionError  # an error in the middle of writing
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["model.gguf"]
    with pytest.raises(ValueError, match="non-finite"):
        with GGUFWriter(path) as w:
            i = w.add_tensor("a", (4, 32), GGMLType.Q8_0)
            w.begin()
            w.write_tensor(i, np.full((4, 32), np.nan))
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_disk_error_leaves_no_truncated_file(tmp_path):
    """A real write(2) failure (file size limit, as on a full disk) raises OSError and leaves neither
    the target nor the temporary file behind. Runs in a subprocess because it lowers RLIMIT_FSIZE."""
    script = textwrap.dedent(f"""
        import resource, signal, os, sys, numpy as np
        from quickloris.export.writer import GGUFWriter
        from quickloris.export.quants import GGMLType
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # make write() fail with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            with GGUFWriter({str(tmp_path / "big.gguf")!r}) as w:
                i = w.add_tensor("a", (1024, 256), GGMLType.F32)
                w.begin()
                w.write_tensor(i, np.ones((1024, 256)))
        except OSError as e:
            print("OSError", e.errno)
            sys.exit(0)
        sys.exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OSError 27")  # EFBIG
    assert os.listdir(tmp_path) == []
