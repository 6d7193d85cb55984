"""Device diagnostic: where the host time of one eager `dequantize_nf4` call goes (microseconds per call)."""

from __future__ import annotations

import argparse
import time

import torch

import quickloris
from benchmarks.dequant.bench import _nf4_layer  # run from the repository root (run.sh puts it on PYTHONPATH)
from quickloris.kernels import nf4_dequant as K
from quickloris.kernels import nf4_launch as KL


def per_call(fn, calls=3000):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return round(dt, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.parse_args()
    layer = _nf4_layer(4096, 1024, torch.bfloat16)
    w, qs = layer.weight, layer.weight.quant_state
    packed = w.data
    quickloris.dequantize_nf4(layer)
    plan = KL.plan_for(qs)
    out = torch.empty(qs.shape, dtype=qs.dtype, device="cuda")
    rows = {
        "full dequantize_nf4(layer)": lambda: quickloris.dequantize_nf4(layer),
        "dequantize_nf4(packed, qs, out=out)": lambda: quickloris.dequantize_nf4(packed, qs, out=out),
        "torch.empty(shape)": lambda: torch.empty(qs.shape, dtype=qs.dtype, device="cuda"),
        "_resolve(layer)": lambda: K._resolve(layer, None),
        "layer.weight.data": lambda: layer.weight.data,
        "_fields(qs)": lambda: KL.state_fields(qs),
        "plan.launch(out)": lambda: plan.launch(out),
        "is_compiling()": lambda: torch.compiler.is_compiling(),
        "current_device()": lambda: torch.cuda.current_device(),
        "raw stream": lambda: torch._C._cuda_getCurrentRawStream(0),
        "triton knobs hook read": lambda: KL.triton.knobs.runtime.launch_enter_hook,
        "empty kernel-free python loop": lambda: None,
    }
    print(f"plan: {plan is not None}; enter hook: {KL.triton.knobs.runtime.launch_enter_hook}")
    for name, fn in rows.items():
        print(f"{name:40s} {per_call(fn):8.2f} us")


if __name__ == "__main__":
    main()
