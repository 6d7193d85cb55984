"""Per-matrix timings of one dequantization function, shared by `quickloris bench dequant` (its own process) and
the per-implementation child processes of `benchmarks.dequant.harness` (Unsloth's real ``fast_dequantize`` runs in
one: importing it patches transformers and more, so it never runs in the bench's process).

* `matrix_us`: CUDA-event median (`triton.testing.do_bench`) of ``fx(layer)`` per matrix of `MATRICES`, rotating
  over 4 weights so consecutive launches do not find the last one's bytes in L2.
* `host_us`: wall time per call with no synchronisation in between (4096 x 1024 bf16): the host-side cost once the
  GPU keeps up.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# (out_features, in_features, dtype name): Llama-3-8B's MLP shapes, a 4096 x 1024 (k/v) and an fp16 one
MATRICES = (
    (4096, 1024, "bfloat16"),
    (14336, 4096, "bfloat16"),
    (4096, 14336, "bfloat16"),
    (8192, 2048, "float16"),
)


def nf4_layer(out_f: int, in_f: int, dtype):
    """A bitsandbytes Linear4bit (NF4, double quant) on the GPU holding a random `dtype` weight."""
    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit

    layer = Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    layer.weight = Params4bit(
        torch.randn(out_f, in_f, dtype=dtype) * 0.02, requires_grad=False, compress_statistics=True, quant_type="nf4"
    )
    return layer.to("cuda")


def matrix_bytes(out_f: int, in_f: int, itemsize: int) -> int:
    """Bytes a dequantization must move: packed codes n/2, uint8 absmax n/64, fp32 absmax2 per 256 blocks, output."""
    n = out_f * in_f
    return n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + itemsize * n


def matrix_us(fns: dict[str, Callable]) -> list[dict]:
    """Per matrix of `MATRICES`: {"shape", "dtype", "bytes", name: microseconds for each of `fns`}."""
    import torch
    from triton.testing import do_bench

    rows = []
    for out_f, in_f, dt_name in MATRICES:
        dt = getattr(torch, dt_name)
        layers = [nf4_layer(out_f, in_f, dt) for _ in range(4)]
        row: dict = {"shape": [out_f, in_f], "dtype": dt_name, "bytes": matrix_bytes(out_f, in_f, dt.itemsize)}
        for name, fx in fns.items():
            i = iter(range(10**9))
            row[name] = do_bench(lambda: fx(layers[next(i) % 4]), warmup=25, rep=200, return_mode="median") * 1e3
        rows.append(row)
        layers = []  # freed before empty_cache
        torch.cuda.empty_cache()
    return rows


def host_us(fns: dict[str, Callable], calls: int = 2000) -> dict[str, float]:
    """Wall microseconds per call of each of `fns` on a 4096 x 1024 bf16 weight, no synchronisation in between."""
    import torch

    layer = nf4_layer(4096, 1024, torch.bfloat16)
    out: dict[str, float] = {}
    for name, fx in fns.items():
        for _ in range(50):
            fx(layer)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fx(layer)
        out[name] = round((time.perf_counter() - start) / calls * 1e6, 2)
        torch.cuda.synchronize()
    return out
