"""`quickloris bench dequant`: NF4 dequantization against Unsloth, bitsandbytes and PEFT.

1. The specification's `test_dequantize` harness (part A of the challenge notebook): three MLP configs,
   1000 iterations, a synchronize after each matrix; wall-clock seconds per implementation, each in a process of
   its own (`benchmarks.dequant.harness`: Unsloth's *real* `fast_dequantize` from $QUICKLORIS_UNSLOTH_SITE),
   `--rounds` rounds in turn x `--repeats` runs; the harness floor (its `torch.empty` run + the bytes at copy
   bandwidth) and quickloris' median as a fraction of it.
2. Per matrix (`benchmarks.dequant.timing`): CUDA-event median (`triton.testing.do_bench`), GB/s over the bytes
   that must move (packed n/2 + absmax n/64 + absmax2 + output 2n) and the fraction of the device's measured copy
   bandwidth; host time per call. quickloris, bitsandbytes and PEFT in this process; Unsloth's real
   `fast_dequantize` in a process of its own (as in the harness: importing it patches transformers); without
   $QUICKLORIS_UNSLOTH_SITE its column records why it is missing (no imitation).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.dequant.timing import nf4_layer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iters", type=int, default=1000, help="harness iterations per config (spec: 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="harness rounds (each implementation once per round)")
    parser.add_argument("--repeats", type=int, default=3, help="harness runs per implementation and round")
    parser.add_argument("--skip-harness", action="store_true", help="only the per-matrix timings")


def _copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (TB/s)."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * 2**30 / (ms * 1e-3) / 1e12


def _per_matrix(fns: dict[str, Callable], copy_tbs: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`benchmarks.dequant.timing.matrix_us` of `fns` here and of Unsloth's real function in its own process: the
    rows, and what Unsloth's process returned (its host time, or why it did not run)."""
    from benchmarks.dequant.harness import run_in_process
    from benchmarks.dequant.timing import matrix_us

    rows = matrix_us(fns)
    unsloth = run_in_process("unsloth_fast_dequantize", 1, 1, matrices=True)
    for i, row in enumerate(rows):
        row["floor_us"] = row["bytes"] / (copy_tbs * 1e12) * 1e6
        if "matrix_us" in unsloth:
            row["unsloth_fast_dequantize"] = unsloth["matrix_us"][i]
        for name in [*fns, "unsloth_fast_dequantize"]:
            if name in row:
                us = row[name]
                row[name] = {
                    "us": round(us, 2),
                    "GBps": round(row["bytes"] / (us * 1e-6) / 1e9, 1),
                    "fraction_of_copy_bw": round(row["bytes"] / (us * 1e-6) / (copy_tbs * 1e12), 3),
                }
    return rows, unsloth


def _plain_twin(packed, quant_state):
    """quickloris' kernel with the plain-Triton unpack instead of the inline PTX (for comparison)."""
    import torch

    from quickloris.kernels import nf4_launch as K

    a, a2, c2, off, code, shape, dtype, bs = K.state_fields(quant_state)
    out = torch.empty(shape, dtype=dtype, device="cuda")
    K.launch(K.nf4_dequant_kernel, packed, a, a2, c2, off, code, out, out.numel(), bs, False)
    return out


def _correctness_and_launches() -> dict[str, Any]:
    """Bit-exactness against bitsandbytes' CUDA dequantization (inline-PTX path and plain twin) and the number of
    kernel launches of one call, as recorded facts next to the timings."""
    import bitsandbytes.functional as bnbF
    import torch

    import quickloris

    def bits(t):
        return t.view(torch.int16) if t.dtype != torch.float32 else t.view(torch.int32)

    exact = []
    for out_f, in_f, dt_name in [
        (4096, 1024, "bfloat16"),
        (14336, 4096, "bfloat16"),
        (8192, 2048, "float16"),
        (4096, 14336, "bfloat16"),
        (1000, 1000, "float16"),
        (129, 264, "bfloat16"),
    ]:
        dt = getattr(torch, dt_name)
        q, qs = bnbF.quantize_4bit(
            torch.randn(out_f, in_f, dtype=dt, device="cuda") * 0.05,
            blocksize=64,
            compress_statistics=True,
            quant_type="nf4",
        )
        ref = bits(bnbF.dequantize_4bit(q, qs))
        ours = bits(quickloris.dequantize_nf4(q, qs))
        plain = bits(_plain_twin(q, qs))
        exact.append(
            {
                "shape": [out_f, in_f],
                "dtype": dt_name,
                "inline_ptx_bit_exact": bool(torch.equal(ours, ref)),
                "plain_twin_bit_exact": bool(torch.equal(plain, ref)),
            }
        )
    layer = nf4_layer(4096, 1024, torch.bfloat16)
    quickloris.dequantize_nf4(layer)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        quickloris.dequantize_nf4(layer)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"bit_exact_vs_bitsandbytes": exact, "kernel_launches_per_call": len(kernels), "kernels": kernels}


def _write_floor() -> dict[str, float]:
    """Time to only write the 14336x4096 bf16 output (80% of the kernel's traffic is this write)."""
    import torch
    from triton.testing import do_bench

    out = torch.empty(14336, 4096, dtype=torch.bfloat16, device="cuda")
    us = do_bench(lambda: out.fill_(1.0), warmup=25, rep=200, return_mode="median") * 1e3
    return {"us": round(us, 2), "TBps": round(out.numel() * 2 / (us * 1e-6) / 1e12, 3)}


def _config_sweep() -> list[dict[str, Any]]:
    """Our kernel's (absmax blocks per program, warps, streaming stores) on 14336x4096 bf16 weights, rotating over
    4 weights so that no launch finds its input in L2."""
    import itertools

    import torch
    from triton.testing import do_bench

    from quickloris.kernels import nf4_launch as K

    layers = [nf4_layer(14336, 4096, torch.bfloat16) for _ in range(4)]
    fields = [K.state_fields(layer.weight.quant_state) for layer in layers]
    out = torch.empty(14336, 4096, dtype=torch.bfloat16, device="cuda")
    rows = []
    grid = [(b, w, False) for b in (16, 32, 64, 128) for w in (2, 4, 8)] + [(32, 4, True), (64, 4, True)]
    for blocks, warps, stream in grid:
        turn = itertools.cycle(range(4))

        def fn():
            i = next(turn)
            a, a2, c2, off, code, shape, _, bs = fields[i]
            K.launch(
                K.nf4_dequant_kernel,
                layers[i].weight.data,
                a,
                a2,
                c2,
                off,
                code,
                out,
                out.numel(),
                bs,
                True,
                config=(blocks, warps, stream),
            )

        rows.append(
            {
                "blocks": blocks,
                "warps": warps,
                "streaming_stores": stream,
                "us": round(do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3, 2),
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("quickloris bench dequant needs a CUDA GPU (see docs/device.md); nothing was measured.")
        return 2
    import bitsandbytes.functional as bnbF
    from peft.utils.integrations import dequantize_module_weight

    import quickloris
    from benchmarks.dequant.timing import host_us
    from benchmarks.report import after_record
    from quickloris.kernels.nf4_launch import default_config, direct_launch_problem
    from quickloris.utils.provenance import record

    fns: dict[str, Callable] = {
        "quickloris": lambda layer: quickloris.dequantize_nf4(layer),
        "bnb_dequantize_4bit": lambda layer: bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
        "peft_dequantize_module_weight": dequantize_module_weight,
    }
    results: dict[str, Any] = {}
    copy_tbs = _copy_bandwidth()
    results["copy_bandwidth_TBps"] = round(copy_tbs, 3)
    # eager calls launch compiled kernels directly unless Triton's / torch's internals differ (then: Triton's launcher)
    results["eager_direct_launch"] = direct_launch_problem() or "used"
    print(f"copy bandwidth: {copy_tbs:.2f} TB/s")

    results["config_sweep_14336x4096_bf16"] = sweep = _config_sweep()
    best = min(sweep, key=lambda r: r["us"])
    print(
        "config sweep (blocks, warps, .cs -> us): "
        + ", ".join(f"({r['blocks']},{r['warps']},{int(r['streaming_stores'])})={r['us']}" for r in sweep)
    )
    print(f"best config: {best}; default: {default_config(14336 * 4096, 64)}")

    timed = {**fns, "quickloris_plain_twin": lambda layer: _plain_twin(layer.weight.data, layer.weight.quant_state)}
    results["correctness"] = corr = _correctness_and_launches()
    print(
        f"launches per call: {corr['kernel_launches_per_call']} {corr['kernels']}; bit-exact vs bitsandbytes: "
        + ", ".join(
            f"{r['shape'][0]}x{r['shape'][1]} {r['dtype']} ptx={r['inline_ptx_bit_exact']} "
            f"plain={r['plain_twin_bit_exact']}"
            for r in corr["bit_exact_vs_bitsandbytes"]
        )
    )

    results["write_only_floor_14336x4096_bf16"] = wf = _write_floor()
    print(f"write-only floor (fill_ of the 14336x4096 bf16 output, 117 MB): {wf['us']} us = {wf['TBps']} TB/s")

    rows, unsloth = _per_matrix(timed, copy_tbs)
    results["per_matrix"] = rows
    results["unsloth_source"] = (
        f"unsloth.kernels.utils.fast_dequantize {unsloth.get('version', '')}, in a process of its own"
        if "matrix_us" in unsloth
        else f"not measured: {unsloth.get('error', unsloth)}"
    )
    print(f"unsloth per matrix: {results['unsloth_source']}")
    names = [*timed, "unsloth_fast_dequantize"]
    for row in rows:
        cells = "  ".join(f"{k}={row[k]['us']:.1f}us" for k in names if k in row)
        print(f"{row['shape'][0]}x{row['shape'][1]} {row['dtype']}: floor {row['floor_us']:.1f}us  {cells}")
    results["host_us_per_call_4096x1024"] = host = host_us(fns)
    if "host_us" in unsloth:
        host["unsloth_fast_dequantize"] = unsloth["host_us"]
    print("host time per call, 4096x1024 (us): " + "  ".join(f"{k}={v}" for k, v in host.items()))

    if not args.skip_harness:
        results["harness"] = _harness_rounds(args, copy_tbs)
    after_record(record("dequant", "dequant", results, args.out))
    return 0


def _harness_rounds(args: argparse.Namespace, copy_tbs: float) -> dict[str, Any]:
    """The specification's harness, each implementation in its own process (`benchmarks.dequant.harness`),
    `--rounds` rounds in turn (drift on a shared machine hits every implementation alike), `--repeats` runs per
    process; medians over all runs, quickloris as a fraction of the harness floor."""
    from benchmarks.dequant.harness import FUNCTIONS, harness_bytes, run_in_process

    runs: dict[str, dict[str, Any]] = {name: {"seconds": []} for name in FUNCTIONS}
    for rnd in range(args.rounds):
        for name in FUNCTIONS:
            got = run_in_process(name, args.iters, args.repeats)
            if "error" in got:
                runs[name].setdefault("errors", []).append(got["error"])
            runs[name]["seconds"] += got.get("seconds", [])
            if "version" in got:
                runs[name]["version"] = got["version"]
            print(f"harness round {rnd} {name}: {got}", flush=True)
    med = {k: statistics.median(v["seconds"]) for k, v in runs.items() if v["seconds"]}
    out: dict[str, Any] = {"runs": runs, "median_seconds": med, "iters": args.iters}
    bytes_s = harness_bytes(args.iters) / (copy_tbs * 1e12)
    if "torch_empty_floor" in med:
        out["floor_parts"] = {"python_and_sync_s": med["torch_empty_floor"], "bytes_at_copy_bandwidth_s": bytes_s}
    # floor: the harness' Python + sync; one_launch_floor: also one empty kernel per matrix, launched and waited for
    # (what any one-kernel dequantization pays whatever its kernel does); each + the bytes at copy bandwidth
    for name, prefix in (("torch_empty_floor", "floor"), ("one_launch_floor", "one_launch_floor")):
        if name not in med:
            continue
        out[f"{prefix}_seconds"] = floor = med[name] + bytes_s
        if "quickloris" in med:
            seconds = runs["quickloris"]["seconds"]
            out[f"quickloris_fraction_of_{prefix}"] = {
                "median": floor / med["quickloris"],
                "best": floor / min(seconds),
                "worst": floor / max(seconds),
            }
    for name, key in (
        ("unsloth_fast_dequantize", "speedup_vs_unsloth"),
        ("bnb_dequantize_4bit", "speedup_vs_bnb"),
        ("peft_dequantize_module_weight", "speedup_vs_peft"),
    ):
        if name in med and "quickloris" in med:
            out[key] = med[name] / med["quickloris"]
    print(
        f"harness medians (s): {med}; "
        + ", ".join(f"{k} {v}" for k, v in out.items() if k.startswith(("speedup", "quickloris_")))
    )
    return out
