"""Time to quantize a Llama-3.2-1B-shaped model to GGUF on the CPU: quickloris' C++ core vs the
`gguf` package's numpy path and llama.cpp's own quantizer (ggml, bundled with llama-cpp-python).

    .venv/bin/python -m benchmarks.gguf_quantize [--threads 2] [--layers 16] [--out DIR]    # in the repository root

Shapes: 16 layers, hidden 2048, intermediate 8192, 32 query / 8 key-value heads of 64, vocab 128256,
tied embeddings (1.236 B parameters). Weights are random normal (std 0.02), generated one tensor at a
time outside the timed region (peak memory: one float32 tensor, 1 GiB for the embedding).

Measured, each over every tensor of the model (seconds of quantization only):
  * Q4_K_M: the per-tensor types llama-quantize picks (Q4_K / Q6_K), quickloris with `--threads`
    threads vs ggml's `ggml_quantize_chunk` driven by the same number of Python threads over row
    chunks (how llama-quantize splits work; ctypes releases the GIL);
  * Q8_0, the type all three can produce: quickloris (`--threads` and 1 thread), ggml, gguf's numpy;
  * (`--ggml-lib`) the same against another ggml build, e.g. one compiled with -march=native;
  * the whole export of the Q4_K_M model through the GGUF writer to a temporary file (quantize +
    stream to disk + fsync + rename);
and the bytes of every tensor are compared between quickloris and ggml.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks.report import after_record
from quickloris.export import ggml_reference
from quickloris.export.quants import GGMLType, quantize, tensor_type
from quickloris.export.writer import GGUFWriter
from quickloris.utils.provenance import record


def llama32_1b_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, vocab, kv = 2048, 8192, 128256, 512
    out = [("token_embd.weight", (vocab, hidden))]
    for i in range(layers):
        out += [
            (f"blk.{i}.attn_norm.weight", (hidden,)),
            (f"blk.{i}.attn_q.weight", (hidden, hidden)),
            (f"blk.{i}.attn_k.weight", (kv, hidden)),
            (f"blk.{i}.attn_v.weight", (kv, hidden)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden)),
            (f"blk.{i}.ffn_norm.weight", (hidden,)),
            (f"blk.{i}.ffn_gate.weight", (inter, hidden)),
            (f"blk.{i}.ffn_up.weight", (inter, hidden)),
            (f"blk.{i}.ffn_down.weight", (hidden, inter)),
        ]
    return out + [("output_norm.weight", (hidden,))]


def ggml_quantize_threads(ref: ggml_reference.GGMLReference, x: np.ndarray, type_id: int, threads: int) -> np.ndarray:
    """ggml_quantize_chunk over `threads` Python threads taking 32-row chunks in turn (as llama-quantize)."""
    out = np.empty((x.shape[0], ref.row_bytes(type_id, x.shape[1])), np.uint8)
    chunk = max(1, 32 * 512 // x.shape[1]) * 32
    starts = iter(range(0, x.shape[0], chunk))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                r0 = next(starts, None)
            if r0 is None:
                return
            ref.quantize_into(x, type_id, out, r0, min(chunk, x.shape[0] - r0))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results/)")
    parser.add_argument("--skip-numpy", action="store_true", help="skip gguf's (slow) numpy Q8_0 path")
    parser.add_argument(
        "--ggml-lib",
        default=None,
        help="another libggml-base.so to compare with (default: llama-cpp-python's bundled one)",
    )
    parser.add_argument("--name", default="quantize_llama32_1b", help="result file name prefix")
    args = parser.parse_args(argv)

    tensors = llama32_1b_tensors(args.layers)
    n_params = sum(int(np.prod(s)) for _, s in tensors)
    ref = ggml_reference.GGMLReference(args.ggml_lib) if args.ggml_lib else ggml_reference.load()
    rng = np.random.default_rng(0)
    secs = {k: 0.0 for k in ("ours_q4_k_m", "ggml_q4_k_m", "ours_q8_0", "ours_q8_0_1thread", "ggml_q8_0", "numpy_q8_0")}
    types: dict[str, int] = {}
    mismatched: list[str] = []
    for name, shape in tensors:
        x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).reshape(-1, shape[-1])
        qt = tensor_type("q4_k_m", name, shape, n_layers=args.layers, tied_output=True)
        types[qt.name] = types.get(qt.name, 0) + int(np.prod(shape))
        ours, dt = timed(quantize, x, qt, threads=args.threads)
        secs["ours_q4_k_m"] += dt
        q8, dt = timed(quantize, x, GGMLType.Q8_0, threads=args.threads)
        secs["ours_q8_0"] += dt
        secs["ours_q8_0_1thread"] += timed(quantize, x, GGMLType.Q8_0, threads=1)[1]
        if ref is not None:
            theirs, dt = timed(ggml_quantize_threads, ref, x, int(qt), args.threads)
            secs["ggml_q4_k_m"] += dt
            theirs8, dt = timed(ggml_quantize_threads, ref, x, int(GGMLType.Q8_0), args.threads)
            secs["ggml_q8_0"] += dt
            if not (np.array_equal(ours, theirs) and np.array_equal(q8, theirs8)):
                mismatched.append(name)
        if not args.skip_numpy:
            from gguf.constants import GGMLQuantizationType
            from gguf.quants import quantize as gguf_quantize

            secs["numpy_q8_0"] += timed(gguf_quantize, x, GGMLQuantizationType.Q8_0)[1]
        print(
            f"{name:28s} {qt.name:5s} {tuple(shape)} ours {secs['ours_q4_k_m']:.1f} s ggml {secs['ggml_q4_k_m']:.1f} s",
            file=sys.stderr,
        )

    # The whole Q4_K_M file through the writer (quantize + stream + fsync + rename), random data regenerated.
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        gen = 0.0
        with GGUFWriter(os.path.join(tmp, "llama32-1b-q4_k_m.gguf"), threads=args.threads) as w:
            w.add_string("general.architecture", "llama")
            idx = [
                w.add_tensor(n, s, tensor_type("q4_k_m", n, s, n_layers=args.layers, tied_output=True))
                for n, s in tensors
            ]
            w.begin()
            for i, (_, shape) in zip(idx, tensors):
                g0 = time.perf_counter()
                x = rng.standard_normal(shape, dtype=np.float32) * 0.02
                gen += time.perf_counter() - g0
                w.write_tensor(i, x)
        file_secs = time.perf_counter() - start - gen
        file_bytes = w.tensor_offsets[-1][1] + w.tensor_offsets[-1][2]

    results = {
        "model": f"Llama-3.2-1B shapes, {args.layers} layers, tied embeddings",
        "parameters": n_params,
        "threads": args.threads,
        "q4_k_m_types_by_parameters": types,
        "seconds": {k: round(v, 2) for k, v in secs.items() if v or k.startswith("ours")},
        "q4_k_m_export_to_file_seconds": round(file_secs, 2),
        "q4_k_m_file_bytes": int(file_bytes),
        "mparams_per_second": {k: round(n_params / v / 1e6, 1) for k, v in secs.items() if v},
        "speedup_q4_k_m_vs_ggml": round(secs["ggml_q4_k_m"] / secs["ours_q4_k_m"], 2) if ref else None,
        "speedup_q8_0_vs_gguf_numpy": round(secs["numpy_q8_0"] / secs["ours_q8_0"], 2) if secs["numpy_q8_0"] else None,
        "speedup_q8_0_vs_ggml": round(secs["ggml_q8_0"] / secs["ours_q8_0"], 2) if ref else None,
        "bytes_equal_ggml": (not mismatched) if ref else None,
        "mismatched_tensors": mismatched,
        "ggml_library": ref.path if ref else None,
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    from quickloris import _native

    results["quickloris_kquant_isa"] = _native.kquant_isa()
    after_record(record("gguf", args.name, results, args.out))
    for k, v in results.items():
        print(f"{k}: {v}")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
