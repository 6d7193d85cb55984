"""The C++ quantizers against the `gguf` package (numpy) and llama.cpp's ggml, on fresh random data.

* bytes equal gguf's where gguf can quantize (F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1),
* bytes equal ggml's `ggml_quantize_chunk` (what llama-quantize runs) for every type, K-quants included,
* gguf's dequantization of our bytes equals ours exactly, and is within the format's error bound.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from quickloris.export.quants import GGMLType, dequantize, quantize

ALL = [
    GGMLType.F16,
    GGMLType.BF16,
    GGMLType.Q8_0,
    GGMLType.Q4_0,
    GGMLType.Q5_0,
    GGMLType.Q5_1,
    GGMLType.Q4_K,
    GGMLType.Q5_K,
    GGMLType.Q6_K,
]
GGUF_CAN_QUANTIZE = [GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q5_1]


def sample(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Rows of different distributions and scales, plus all-zero, constant, tiny and one-hot blocks."""
    kinds = [
        lambda s: rng.standard_normal(s),
        lambda s: rng.uniform(-1, 1, s),
        lambda s: rng.standard_t(2, s),
        lambda s: rng.uniform(0.1, 2, s),
        lambda s: rng.standard_normal(s) * (rng.random(s) < 0.1),
    ]
    x = np.stack([kinds[r % len(kinds)]((cols,)) for r in range(rows)])
    x *= np.exp(rng.uniform(-6, 3, (rows, 1)))  # row scales from 2e-3 to 20
    x.reshape(-1)[: min(x.size, 256)] = 0.0  # an all-zero super-block
    if rows > 1 and cols >= 64:
        x[1, :32] = 0.5  # a constant block
        x[1, 32:64] = rng.standard_normal(32) * 1e-9  # fp16 block scales underflow here
    if rows > 2:
        x[2, :] = 0.0
        x[2, cols // 2] = -3.0  # one-hot row
    return x.astype(np.float32)


def shape_for(qtype: GGMLType, rng: np.random.Generator) -> tuple[int, int]:
    block = max(qtype.block_size, 32)
    return int(rng.integers(3, 40)), block * int(rng.integers(1, 9))  # odd row counts, varied widths


def error_bound(qtype: GGMLType, x: np.ndarray) -> np.ndarray:
    """Largest |x - dequantized| the format allows, per value.

    fp16 block scales add 2^-11 relative error, and cannot resolve scales below 2^-24 (a block of
    values under ~1e-6 may come back as zeros): `floor` is that absolute limit.
    """
    h = 2.0**-11
    if qtype == GGMLType.F16:
        return np.maximum(np.abs(x) * h, 2.0**-25)
    if qtype == GGMLType.BF16:
        return np.abs(x) * 2.0**-8
    block = qtype.block_size
    b = x.reshape(-1, block).astype(np.float64)
    amax = np.abs(b).max(1, keepdims=True)
    tiny = 2.0**-24
    if qtype == GGMLType.Q8_0:
        bound = amax / 127 * (0.5 + 128 * h) + 128 * tiny
    elif qtype == GGMLType.Q4_0:  # levels -8..7 of step amax/8: the +amax end clips by up to a step
        bound = amax / 8 * (1 + 16 * h) + 16 * tiny
    elif qtype == GGMLType.Q5_0:
        bound = amax / 16 * (1 + 32 * h) + 32 * tiny
    elif qtype == GGMLType.Q5_1:
        lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
        bound = (hi - lo) / 31 * (0.5 + 32 * h) + np.abs(lo) * h + 32 * tiny
    else:
        # K-quants: one level step of the super-block's range (the range includes 0 for Q4_K/Q5_K,
        # is symmetric for Q6_K), with 50 % slack for the 6/8-bit rounding of the sub-block scales.
        # Measured worst case on varied random data: 0.99 of a step.
        nmax = {GGMLType.Q4_K: 15, GGMLType.Q5_K: 31, GGMLType.Q6_K: 63}[qtype]
        if qtype == GGMLType.Q6_K:
            rng_ = 2 * amax
        else:
            rng_ = np.maximum(b.max(1, keepdims=True), 0) - np.minimum(b.min(1, keepdims=True), 0)
        bound = 1.5 * rng_ / nmax + 64 * (nmax + 1) * tiny
    return (np.broadcast_to(bound, b.shape) + 1e-6 * amax).reshape(x.shape)


@pytest.mark.parametrize("qtype", GGUF_CAN_QUANTIZE, ids=lambda t: t.name)
def test_bytes_equal_gguf_numpy(qtype, seed):
    rng = np.random.default_rng(seed)
    x = sample(rng, *shape_for(qtype, rng)) + 0.0  # + 0.0 turns -0.0 into +0.0: see the test below
    ours = quantize(x, qtype, threads=2)
    theirs = gguf_quantize(x, GGMLQuantizationType(int(qtype)))
    assert ours.tobytes() == theirs.tobytes(), f"seed {seed}"


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q5_1], ids=lambda t: t.name)
def test_signed_zero_blocks_follow_llama_cpp(qtype, ggml):
    """The one place gguf's numpy path and ggml disagree: in a block of zeros that starts with -0.0,
    numpy stores the fp16 scale (Q4_0) or min (Q5_1) as +0.0 and ggml as -0.0. We follow ggml, the
    code llama.cpp runs; both decode to zeros."""
    x = np.zeros((1, 64), np.float32)
    x[0, 0] = -0.0
    x[0, 40] = 1.5
    ours = quantize(x, qtype)
    assert np.array_equal(ours, ggml.quantize(x, int(qtype)))
    theirs = gguf_quantize(x, GGMLQuantizationType(int(qtype))).reshape(ours.shape)
    differ = np.flatnonzero(ours[0] != theirs[0])
    assert set(differ) <= {1, 3}, differ  # only the sign byte of the first block's fp16 d (Q4_0) / m (Q5_1)
    np.testing.assert_array_equal(dequantize(ours, qtype, x.shape), dequantize(theirs, qtype, x.shape))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_bytes_equal_llama_cpp(qtype, seed, ggml):
    rng = np.random.default_rng(seed)
    x = sample(rng, *shape_for(qtype, rng))
    ours = quantize(x, qtype, threads=3)
    theirs = ggml.quantize(x, int(qtype))
    mismatched = np.flatnonzero((ours != theirs).any(1))
    assert mismatched.size == 0, f"seed {seed}: rows {mismatched[:5]} differ from ggml"


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_equals_gguf_and_is_within_bound(qtype, seed):
    rng = np.random.default_rng(seed)
    x = sample(rng, *shape_for(qtype, rng))
    data = quantize(x, qtype)
    ours = dequantize(data, qtype, x.shape)
    raw = data.view(np.float16) if qtype == GGMLType.F16 else data
    theirs = gguf_dequantize(raw, GGMLQuantizationType(int(qtype))).reshape(x.shape)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs, err_msg=f"seed {seed}")
    err = np.abs(ours.astype(np.float64) - x)
    worst = np.unravel_index(np.argmax(err - error_bound(qtype, x)), x.shape)
    assert (err <= error_bound(qtype, x)).all(), f"seed {seed}: error {err[worst]} at {worst}"
    assert not np.array_equal(ours, np.zeros_like(ours))


def test_fp16_rounding_matches_numpy_everywhere(seed):
    """Every half value round-trips; random floats over the whole fp16 range (subnormals, overflow
    to inf, exact ties) round like numpy's float16 (round to nearest, ties to even)."""
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float32)
    np.testing.assert_array_equal(quantize(finite, GGMLType.F16).view(np.float16), finite.astype(np.float16))
    rng = np.random.default_rng(seed)
    bits = rng.integers(0x2F000000, 0x47900000, 1 << 16, dtype=np.uint32)  # 1e-10 .. 73728
    ties = (np.arange(0, 1 << 16, dtype=np.uint32) << 13 | 0x1000).astype(np.uint32) & 0x7FFFFFFF
    ties = ties[(ties > 0x33000000) & (ties < 0x47800000)]
    vals = np.concatenate([bits, ties]).view(np.float32)
    vals = np.concatenate([vals, -vals])
    with np.errstate(over="ignore"):
        expected = vals.astype(np.float16)
    np.testing.assert_array_equal(quantize(vals, GGMLType.F16).view(np.float16), expected)


def test_thread_count_does_not_change_bytes(seed):
    rng = np.random.default_rng(seed)
    x = sample(rng, 37, 512)
    for qtype in (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0):
        one = quantize(x, qtype, threads=1)
        assert np.array_equal(one, quantize(x, qtype, threads=4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    x = np.zeros((3, 256), np.float32)
    x[2, 17] = bad
    with pytest.raises(ValueError, match="non-finite value .* row 2, column 17"):
        quantize(x, GGMLType.Q4_K)


def test_bad_shapes_and_types_are_rejected():
    with pytest.raises(ValueError, match="Q4_K needs rows of a multiple of 256 values, got 96"):
        quantize(np.zeros((2, 96), np.float32), GGMLType.Q4_K)
    with pytest.raises(ValueError, match="Q8_0 needs rows of a multiple of 32"):
        dequantize(np.zeros(34, np.uint8), GGMLType.Q8_0, (1, 48))
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(np.zeros(33, np.uint8), GGMLType.Q8_0, (1, 32))
    with pytest.raises(ValueError, match="threads"):
        quantize(np.zeros((1, 32), np.float32), GGMLType.Q8_0, threads=-1)
    with pytest.raises(ValueError):
        quantize(np.zeros((1, 32), np.float32), 3)  # Q4_1: not a type we write


def test_portable_k_quant_kernels_give_the_same_bytes(seed, ggml):
    """The K-quants are compiled for AVX2 and for any CPU; the portable build (forced here through
    QUICKLORIS_KQUANT_GENERIC in a subprocess) must give ggml's bytes too."""
    import subprocess
    import sys

    script = f"""
import numpy as np
from quickloris import _native
from quickloris.export.quants import GGMLType, quantize
from quickloris.export import ggml_reference
ref = ggml_reference.load()
assert _native.kquant_isa() == "generic"
rng = np.random.default_rng({seed})
x = (rng.standard_normal((33, 768)) * np.exp(rng.uniform(-6, 3, (33, 1)))).astype(np.float32)
x[0, :256] = 0
for t in (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K):
    assert np.array_equal(quantize(x, t, threads=2), ref.quantize(x, int(t))), t
print("ok")
"""
    env = dict(os.environ, QUICKLORIS_KQUANT_GENERIC="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
